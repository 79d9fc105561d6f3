"""CIFAR-10 from its "binary version" (Krizhevsky, 2009; www.cs.toronto.edu/~kriz/cifar.html).

Each of ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` is a sequence of
records: one label byte (0..9), then 3072 pixel bytes: the 32x32 red plane, then green, then blue,
each row-major. The binary version is read rather than the python version because the latter is
a pickle, and unpickling a downloaded file can run arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lipcert.data.dataset import Dataset, Split, unit_images
from lipcert.data.paths import find_dataset_folder

#: Image geometry of CIFAR-10: 3 channel planes of 32x32.
CIFAR_CHANNELS, CIFAR_SIZE = 3, 32
#: One record: 1 label byte + 3 * 32 * 32 pixel bytes.
CIFAR_RECORD_BYTES = 1 + CIFAR_CHANNELS * CIFAR_SIZE * CIFAR_SIZE
#: The archive's top folder and its batch files.
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def read_cifar_binary(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one CIFAR-10 binary batch."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0:
        raise ValueError(f"{path} is empty: it holds no records (truncated or not copied whole)")
    if raw.size % CIFAR_RECORD_BYTES:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte "
            "records (truncated or not a CIFAR-10 binary batch)"
        )
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)  # (N, 3073)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    if len(labels) and int(labels.max()) >= len(CIFAR_CLASSES):
        raise ValueError(f"{path}: label byte {int(labels.max())} outside 0..9")
    images = records[:, 1:].reshape(-1, CIFAR_CHANNELS, CIFAR_SIZE, CIFAR_SIZE)  # (N, 3, 32, 32)
    return torch.from_numpy(np.ascontiguousarray(images)), labels


def _read_files(folder: Path, filenames: tuple[str, ...]) -> Split:
    parts = [read_cifar_binary(folder / name) for name in filenames]
    images = torch.cat([images for images, _ in parts])
    labels = torch.cat([labels for _, labels in parts])
    return Split(unit_images(images), labels)


def load_cifar10(data_dir: str | Path | None = None) -> Dataset:
    """CIFAR-10: 50000 train / 10000 test images ``(N, 3, 32, 32)`` in [0, 1].

    Looks for ``cifar10/cifar-10-batches-bin/`` under the roots of :mod:`lipcert.data.paths`.
    """
    files = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    folder = find_dataset_folder("cifar10", f"cifar10/{CIFAR_FOLDER}", files, data_dir)
    return Dataset(
        name="cifar10",
        train=_read_files(folder, CIFAR_TRAIN_FILES),
        test=_read_files(folder, (CIFAR_TEST_FILE,)),
        class_names=CIFAR_CLASSES,
    )
