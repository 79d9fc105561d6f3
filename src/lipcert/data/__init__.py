"""Datasets as tensors (digits, moons, MNIST, Fashion-MNIST, CIFAR-10), batch augmentations and
the input normalization layer."""

from lipcert.data.augment import BatchAugment, random_crop, random_flip
from lipcert.data.cifar import load_cifar10, read_cifar_binary
from lipcert.data.dataset import Dataset, Split
from lipcert.data.digits import load_digits
from lipcert.data.download import download, file_md5, verify_md5
from lipcert.data.idx import load_idx_dataset, read_idx
from lipcert.data.moons import load_moons
from lipcert.data.normalize import Normalize
from lipcert.data.registry import DATASET_NAMES, load_dataset

__all__ = [
    "DATASET_NAMES",
    "BatchAugment",
    "Dataset",
    "Normalize",
    "Split",
    "download",
    "file_md5",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "load_moons",
    "random_crop",
    "random_flip",
    "read_cifar_binary",
    "read_idx",
    "verify_md5",
]
