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


def _what_is_missing(folder: Path, filenames: Sequence[str]) -> str:
    """``folder`` and what it lacks, for the not-found message."""
    if not folder.is_dir():
        return f"{folder} (no such folder)"
    missing = [name for name in filenames if not (folder / name).is_file()]
    if len(missing) == len(filenames):
        return f"{folder} (none of the {len(filenames)} files)"
    return f"{folder} (missing {', '.join(str(folder / name) for name in missing)})"


def find_dataset_folder(
    dataset: str, subfolder: str, filenames: Sequence[str], data_dir: str | Path | None
) -> Path:
    """The first candidate folder that holds every one of ``filenames``.

    Raises ``FileNotFoundError`` (one line) naming the dataset, each folder searched with what it
    lacks, and how to get the files: a data folder option, or a download.
    """
    if data_dir is not None:
        candidates = [Path(data_dir) / subfolder, Path(data_dir)]
    else:
        candidates = [root / subfolder for root in default_roots()]
    for folder in candidates:
        if all((folder / name).is_file() for name in filenames):
            return folder
    searched = "; ".join(_what_is_missing(folder, filenames) for folder in candidates)
    root = subfolder.split("/")[0]
    raise FileNotFoundError(
        f"dataset {dataset} not found: searched {searched}. Point --data-dir (data.data_dir in a "
        f"config, data_dir= in Python) to a folder holding {subfolder}/, or download it (network "
        f"needed) with: python -c \"import lipcert.data; lipcert.data.download('{dataset}', "
        f"'{LOCAL_DATA}')\" (it lands in {LOCAL_DATA / root}/, searched by default)"
    )
