"""Where dataset files are looked for.

``data_dir`` when given (its sub-folder for the dataset, or itself); otherwise, relative to the
repository root and to the current directory: ``../shared/datasets`` (the read-only copy of the
original files on the dev machines) then ``data/`` (where :func:`lipcert.data.download` writes by
default). Each root holds one sub-folder a dataset: ``mnist/``, ``fashion-mnist/``, ``cifar10/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: The shared dataset folder beside the repository (see shared/datasets/README.md).
SHARED_DATASETS = Path("..") / "shared" / "datasets"
#: The folder ``download`` fills when no ``data_dir`` is given (git-ignored).
LOCAL_DATA = Path("data")


def _repo_root() -> Path | None:
    """The source checkout holding this package (src layout), if it is one."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def default_roots() -> list[Path]:
    """The data roots searched when no ``data_dir`` is given, in order, without duplicates."""
    bases = [base for base in (_repo_root(), Path.cwd()) if base is not None]
    roots: list[Path] = []
    for relative in (SHARED_DATASETS, LOCAL_DATA):
        for base in bases:
            root = (base / relative).resolve()
            if root not in roots:
                roots.append(root)
    return roots


def find_dataset_folder(
    dataset: str, subfolder: str, filenames: Sequence[str], data_dir: str | Path | None
) -> Path:
    """The first candidate folder that holds every one of ``filenames``.

    Raises ``FileNotFoundError`` naming every expected path and the download option.
    """
    if data_dir is not None:
        candidates = [Path(data_dir) / subfolder, Path(data_dir)]
    else:
        candidates = [root / subfolder for root in default_roots()]
    for folder in candidates:
        if all((folder / name).is_file() for name in filenames):
            return folder
    expected = "\n".join(f"  {folder / name}" for folder in candidates for name in filenames)
    raise FileNotFoundError(
        f"{dataset}: dataset files not found; expected (any one folder complete):\n{expected}\n"
        f"Pass data_dir=<root holding {subfolder}/>, or download=True to load_dataset "
        f"(or call lipcert.data.download({dataset!r}, root)) where a network is available."
    )
