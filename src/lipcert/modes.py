"""Module modes: run a block with a model in eval mode, every module's own flag restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode for the block; restore each module's own
    ``training`` flag after (``model.train(flag)`` would overwrite per-module choices, such as a
    frozen batch norm inside a model in training mode). TypeError when ``model`` is not a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            if module.training != flag:
                module.training = flag
