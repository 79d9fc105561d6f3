"""Output files the user names (plots, ONNX): checked before any work, written atomically, with
errors that name the user's path rather than the temporary file written beside it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lipcert.checkpoint import atomic_path


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path``, or an error naming ``what`` (e.g. "--plot") when it is a folder or
    when a file stands where one of its folders would be (missing folders are created later)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory: give a file name")
    _check_folders(path, path.parents, what)
    return path


def check_output_folder(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path``, or an error naming ``what`` (e.g. "run dir") when it, or one of
    its folders, is a file (missing folders are created later)."""
    path = Path(path)
    _check_folders(path, (path, *path.parents), what)
    return path


def _check_folders(path: Path, folders: Iterable[Path], what: str) -> None:
    """NotADirectoryError naming ``path`` when the first of ``folders`` that exists is a file."""
    existing = next(folder for folder in folders if folder.exists())  # "." or "/" at least
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a folder")


@contextmanager
def output_file(path: str | Path, what: str) -> Iterator[Path]:
    """A temporary path for the block to write, renamed over ``path`` when the block succeeds
    and removed otherwise (:func:`lipcert.checkpoint.atomic_path`); ``path``'s folder is created
    first. An ``OSError`` (no permission, disk full) names ``path``, not the temporary file."""
    path = check_output_file(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as err:
        raise OSError(f"cannot write {what} {path}: {err.strerror or err}") from err
