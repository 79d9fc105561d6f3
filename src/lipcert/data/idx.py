"""MNIST and Fashion-MNIST from their original gzip-compressed IDX files.

IDX format (LeCun et al., "THE MNIST DATABASE", yann.lecun.com/exdb/mnist): a big-endian int32
magic ``0x0000TTNN`` (TT the element type, 0x08 = unsigned byte; NN the number of dimensions), NN
big-endian int32 sizes, then the row-major payload. Fashion-MNIST (Xiao et al., 2017) uses the same
files and names.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from lipcert.data.dataset import Dataset, Split, unit_images
from lipcert.data.paths import find_dataset_folder

#: IDX magic of a uint8 3-D array (images: count, rows, cols).
IDX_IMAGES_MAGIC = 0x00000803
#: IDX magic of a uint8 1-D array (labels).
IDX_LABELS_MAGIC = 0x00000801
#: Byte size of one big-endian int32 header field.
IDX_INT_BYTES = 4
#: Bytes decompressed at a time (the largest read beyond what the header declares).
IDX_READ_CHUNK_BYTES = 1 << 20
#: The most bytes deflate (gzip's compression) can expand one compressed byte to: a 258-byte
#: match costs at least 2 bits, so 1032:1 (zlib's technical notes, "maximum compression factor").
DEFLATE_MAX_RATIO = 1032

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: Class names, index = label (MNIST digits; Fashion-MNIST from its README).
IDX_CLASSES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}  # fmt: skip


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """The first ``limit`` bytes of ``stream`` (fewer where it ends first), read a chunk at a
    time: a gzip stream is never inflated past ``limit`` bytes, whatever its length."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(IDX_READ_CHUNK_BYTES, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _read_shape(path: Path, stream: BinaryIO, magic: int) -> tuple[int, ...]:
    """The dimension sizes in the header opening ``stream`` (of the file ``path``); ValueError
    naming the file for a wrong magic or a truncated header."""
    ndim = magic & 0xFF
    header_bytes = IDX_INT_BYTES * (1 + ndim)  # magic, then one int32 size a dimension
    header = _read_at_most(stream, header_bytes)
    found = int.from_bytes(header[:IDX_INT_BYTES], "big")
    if len(header) >= IDX_INT_BYTES and found != magic:
        raise ValueError(f"{path}: IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    if len(header) < header_bytes:
        raise ValueError(f"{path}: truncated IDX header ({len(header)} of {header_bytes} bytes)")
    return struct.unpack(f">{ndim}I", header[IDX_INT_BYTES:])


def _check_deflatable(path: Path, shape: tuple[int, ...], declared: int) -> None:
    """ValueError naming ``path`` when its header declares more bytes than a gzip file of its
    size can hold (:data:`DEFLATE_MAX_RATIO`): a lying header is refused before any inflating."""
    size = path.stat().st_size
    most = DEFLATE_MAX_RATIO * size
    if declared > most:
        raise ValueError(
            f"{path}: the header declares shape {tuple(shape)}, {declared} bytes, more than a "
            f"gzip file of {size} bytes can hold (at most {most}: deflate expands at most "
            f"{DEFLATE_MAX_RATIO}:1; truncated or corrupt file)"
        )


def read_idx(path: str | Path, magic: int) -> Tensor:
    """The uint8 array stored in the gzip IDX file ``path``, checked against ``magic``.

    The header is read first and the payload after it decompressed up to one byte past the size
    the header declares (the product of its dimensions), so a small file inflating to gigabytes
    (a gzip bomb) costs no more memory than the array its header describes, and a header
    declaring more than the file can hold compressed is refused before any inflating. Raises
    ``ValueError`` naming the file for a bad gzip stream, a wrong magic, or a payload whose size
    does not match the header.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            shape = _read_shape(path, stream, magic)
            declared = math.prod(shape)  # Python ints: no overflow
            _check_deflatable(path, shape, declared)
            payload = _read_at_most(stream, declared + 1)  # one more byte tells a longer stream
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    if len(payload) != declared:
        size = f"{len(payload)} bytes" if len(payload) < declared else f"over {declared} bytes"
        raise ValueError(
            f"{path}: the header declares shape {tuple(shape)}, {declared} bytes, but the "
            f"payload after it is {size} (truncated or corrupt file)"
        )
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(shape))


def _read_split(folder: Path, images_file: str, labels_file: str, num_classes: int) -> Split:
    images = read_idx(folder / images_file, IDX_IMAGES_MAGIC)  # (N, H, W)
    labels = read_idx(folder / labels_file, IDX_LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise ValueError(
            f"{folder / images_file} holds {len(images)} images but {folder / labels_file} "
            f"holds {len(labels)} labels"
        )
    if not len(images):
        raise ValueError(f"{folder / images_file} holds no images (its header declares 0)")
    if int(labels.max()) >= num_classes:
        raise ValueError(f"{folder / labels_file}: label {int(labels.max())} >= {num_classes}")
    return Split(unit_images(images).unsqueeze(1), labels.long())  # (N, 1, H, W)


def load_idx_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """MNIST (``"mnist"``) or Fashion-MNIST (``"fashion-mnist"``): ``(N, 1, 28, 28)`` in [0, 1].

    Files are looked for as described in :mod:`lipcert.data.paths` (sub-folder ``name``).
    """
    if name not in IDX_CLASSES:
        raise ValueError(f"name must be one of {sorted(IDX_CLASSES)}, got {name!r}")
    folder = find_dataset_folder(name, name, IDX_FILES, data_dir)
    num_classes = len(IDX_CLASSES[name])
    return Dataset(
        name=name,
        train=_read_split(folder, TRAIN_IMAGES, TRAIN_LABELS, num_classes),
        test=_read_split(folder, TEST_IMAGES, TEST_LABELS, num_classes),
        class_names=IDX_CLASSES[name],
    )
