"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from torch import nn

from lipcert.checkpoint import load, read_checkpoint
from lipcert.config import TrainConfig, parse_config
from lipcert.data import Dataset, load_dataset
from lipcert.train import select_classes


def load_run(checkpoint: str, data_dir: str | None) -> tuple[nn.Module, TrainConfig, Dataset]:
    """The model of a training checkpoint, its config and its dataset."""
    model = load(checkpoint)
    _, meta = read_checkpoint(checkpoint)
    config = parse_config(meta["config"])
    data = load_dataset(config.data.dataset, data_dir or config.data.data_dir or None)
    data = select_classes(data, config.data.classes)
    return model, config, data


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the commands that evaluate a checkpoint on its test split."""
    parser.add_argument("checkpoint", help="a lipcert .safetensors checkpoint")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 1.58])
    parser.add_argument("--norm", choices=("l2", "linf"), help="default: the run's config")
    parser.add_argument("--data-dir", help="dataset folder (default: the config's, then search)")
