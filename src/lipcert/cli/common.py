"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lipcert.bounds.graph import natural_dtype
from lipcert.certify import check_eps
from lipcert.checkpoint import load_with_metadata
from lipcert.config import TrainConfig
from lipcert.data import Dataset, load_dataset
from lipcert.train import select_classes, stored_config


def check_device(device: str | torch.device) -> torch.device:
    """``--device`` as a ``torch.device``; ValueError when it asks for CUDA and there is none."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu")
    return device


def load_run(
    checkpoint: str, data_dir: str | None, device: str = "cpu"
) -> tuple[nn.Module, TrainConfig, Dataset]:
    """The model of a training checkpoint (on ``device``), its config and its dataset."""
    model, meta = load_with_metadata(checkpoint)
    model = model.to(check_device(device))
    if not meta.get("config"):
        raise ValueError(
            f"{checkpoint} has no run config (saved by lipcert.save without one), so its dataset "
            "is unknown: certify it from Python with lipcert.certify(model, x, y)"
        )
    config = stored_config(meta, checkpoint)
    data = load_dataset(config.data.dataset, data_dir or config.data.data_dir or None)
    data = select_classes(data, config.data.classes)
    return model, config, data


def eps_for(eps: list[float] | None, norm: str, config: TrainConfig) -> list[float]:
    """The --eps values, or the run's own when the norm is the run's (never l2 radii for l_inf)."""
    if eps is None:
        if norm != config.certify.norm:
            raise ValueError(
                f"--norm {norm} is not the run's norm ({config.certify.norm}): give --eps for it"
            )
        eps = config.certify.eps
    return check_eps(eps, "--eps")


def random_inputs(
    model: nn.Module, shape: tuple[int, ...], count: int, seed: int | None = None
) -> torch.Tensor:
    """``count`` uniform [0, 1) inputs of ``shape`` (without the batch dimension) on the device
    of ``model``'s first parameter or buffer and in the dtype it computes in
    (:func:`~lipcert.bounds.graph.natural_dtype`): a float64 or half model refuses float32
    inputs."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    x = torch.rand((count, *shape), generator=gen)
    reference = next(iter([*model.parameters(), *model.buffers()]), x)
    return x.to(reference.device, natural_dtype(model))


def check_positive(option: str, value: int) -> int:
    if value <= 0:
        raise ValueError(f"{option} must be a positive integer, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the commands that evaluate a checkpoint on its test split."""
    parser.add_argument("checkpoint", help="a lipcert .safetensors checkpoint")
    parser.add_argument("--eps", type=float, nargs="+", help="default: the run's config")
    parser.add_argument("--norm", choices=("l2", "linf"), help="default: the run's config")
    parser.add_argument("--data-dir", help="dataset folder (default: the config's, then search)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
