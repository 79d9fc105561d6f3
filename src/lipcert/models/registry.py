"""The model registry: named architectures, built from configs and rebuilt from checkpoints.

``build_model(name, **kwargs)`` records ``{"name", "kwargs"}`` on the model as ``lipcert_spec``,
which :func:`lipcert.save` stores so :func:`lipcert.load` can rebuild the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(factory: ModelFactory) -> ModelFactory:
    """Add ``factory`` to the registry under its function name."""
    MODELS[factory.__name__] = factory
    return factory


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name``; unknown names list the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    model = MODELS[name](**kwargs)
    model.lipcert_spec = {"name": name, "kwargs": kwargs}
    return model


def check_shape(input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """Validate ``input_shape`` (without batch) and ``num_classes``; returns the shape as ints."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {input_shape!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return shape
