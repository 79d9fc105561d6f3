"""Download the original dataset files, checked against their published MD5s.

Every file is streamed to a temporary file beside its destination, its MD5 checked, and only then
renamed into place (``os.replace`` is atomic on one file system): an interrupted or corrupted
download never leaves a file under the final name. Mirrors are tried in order.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lipcert.data.cifar import CIFAR_FOLDER, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES
from lipcert.data.idx import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS

#: Read size while streaming and hashing.
CHUNK_BYTES = 1 << 20
#: Seconds a mirror may stay silent before the next one is tried.
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from: sub-folder, mirrors, ``(file name, MD5)`` pairs, and
    the archive members (if any) to extract into the sub-folder."""

    folder: str
    mirrors: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    extract: tuple[str, ...] = ()


#: Published MD5s: MNIST and Fashion-MNIST as listed in shared/datasets/README.md (the ones
#: torchvision checks); CIFAR-10 binary version from www.cs.toronto.edu/~kriz/cifar.html.
SOURCES = {
    "mnist": Source(
        folder="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        files=(
            (TRAIN_IMAGES, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            (TRAIN_LABELS, "d53e105ee54ea40749a09fcbcd1e9432"),
            (TEST_IMAGES, "9fb629c4189551a2d022fa330f9573f3"),
            (TEST_LABELS, "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion-mnist": Source(
        folder="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            (TRAIN_IMAGES, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            (TRAIN_LABELS, "25c81989df183df01b3e8a0aad5dffbe"),
            (TEST_IMAGES, "bef4ecab320f06d8554ea6380940ec79"),
            (TEST_LABELS, "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "cifar10": Source(
        folder="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),),
        extract=tuple(f"{CIFAR_FOLDER}/{name}" for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)),
    ),
}


def _new_md5() -> hashlib._Hash:
    return hashlib.md5(usedforsecurity=False)  # an integrity check, not security


def file_md5(path: str | Path) -> str:
    """Hex MD5 of the file at ``path``."""
    digest = _new_md5()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | Path, expected: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless its MD5 is ``expected``."""
    found = file_md5(path)
    if found != expected.lower():
        raise ValueError(f"{path}: MD5 {found}, expected {expected.lower()}")


def write_atomically(dest: Path, stream: BinaryIO, md5: str | None = None) -> Path:
    """Copy ``stream`` to ``dest`` through a temporary file, checking its MD5 when given."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = _new_md5()
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise ValueError(f"{dest.name}: MD5 {digest.hexdigest()}, expected {md5.lower()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(urls: Sequence[str], dest: str | Path, md5: str) -> Path:
    """Download the first of ``urls`` that answers with the right MD5 to ``dest``, atomically."""
    dest = Path(dest)
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return write_atomically(dest, response, md5)
        except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
            errors.append(f"{url}: {err}")
    raise OSError(f"could not download {dest.name} from any mirror: " + "; ".join(errors))


def _extract(archive: Path, members: Sequence[str], folder: Path) -> None:
    """Extract the regular files ``members`` of the tar ``archive`` under ``folder``, atomically.

    Only the named members are written, to paths we chose, so the archive cannot write elsewhere.
    A file already extracted is kept only when it holds the member's bytes, compared with the
    archive (whose MD5 :func:`download` checked); one damaged since, even of the right size, is
    extracted again. A corrupt or truncated archive raises a ``ValueError`` naming it (files
    extracted before the damage stay; none is left half-written).
    """
    try:
        _extract_members(archive, members, folder)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:  # corruption
        reason = str(err).splitlines()[0].rstrip(":") if str(err) else type(err).__name__
        raise ValueError(
            f"{archive}: not a readable tar archive ({reason}): the file is corrupt or truncated; "
            "delete it and download it again"
        ) from err


def _member_stream(tar: tarfile.TarFile, archive: Path, member: str) -> BinaryIO:
    """The bytes of the regular file ``member`` of ``tar`` (read from ``archive``), or of the
    archive's file a link ``member`` names."""
    try:
        info = tar.getmember(member)
    except KeyError as err:
        raise ValueError(f"{archive}: member {member} missing") from err
    try:
        stream = tar.extractfile(info)
    except KeyError as err:  # tarfile's lookup of the link's target
        raise ValueError(
            f"{archive}: member {member} is a link to {info.linkname}, which is not in the archive"
        ) from err
    if stream is None:
        raise ValueError(f"{archive}: member {member} is not a regular file")
    return stream


def _holds(path: Path, stream: BinaryIO) -> bool:
    """Whether the file at ``path`` holds exactly the bytes of ``stream`` (a chunk at a time)."""
    with open(path, "rb") as held:
        while chunk := stream.read(CHUNK_BYTES):
            if held.read(len(chunk)) != chunk:
                return False
        return not held.read(1)


def _extract_members(archive: Path, members: Sequence[str], folder: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in members:
            dest = folder / member
            if dest.is_file() and _holds(dest, _member_stream(tar, archive, member)):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(dest, _member_stream(tar, archive, member))


def download(name: str, root: str | Path) -> Path:
    """Download dataset ``name`` under ``root`` (skipping files already there with the right MD5)
    and return its folder. ``load_dataset(name, data_dir=root)`` then finds it."""
    if name not in SOURCES:
        raise ValueError(f"name must be one of {sorted(SOURCES)} to download, got {name!r}")
    source = SOURCES[name]
    folder = Path(root) / source.folder
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in source.files:
        dest = folder / filename
        if not (dest.is_file() and file_md5(dest) == md5):
            fetch([mirror + filename for mirror in source.mirrors], dest, md5)
        if source.extract:
            _extract(dest, source.extract, folder)
    return folder
