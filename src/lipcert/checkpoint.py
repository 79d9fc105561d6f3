"""Self-describing checkpoints in safetensors: no pickle, so loading never runs code.

A file holds tensors plus string metadata. The model's state_dict goes under ``model.``; nested
training state (optimizer, scheduler, RNG, counters) is flattened by :func:`flatten`: tensors under
``state.<n>``, the rest as JSON with ``{"__tensor__": "state.<n>"}`` placeholders. The metadata also
records how to rebuild the model (its registry spec, :mod:`lipcert.models`) and the run's config,
so ``lipcert.load(path)`` needs nothing else. Writes are atomic: a temp file, fsync, then rename.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT_VERSION = "1"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


def flatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """JSON-able skeleton of ``obj``; its tensors are moved into ``tensors``."""
    if torch.is_tensor(obj):
        key = f"state.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep them as pairs
        return {_DICT: [[flatten(k, tensors), flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if _TUPLE in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton[_TUPLE])
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skeleton[_DICT]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; then synced and renamed over
    ``path`` (readers see the old file or the new one, never half), or removed on an error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file atomically (:func:`atomic_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: dict | None = None,
    state: dict | None = None,
) -> None:
    """Save ``model`` (+ optional run ``config`` and training ``state``) to ``path``."""
    spec = getattr(model, "lipcert_spec", None)
    if spec is None:
        raise ValueError(
            "lipcert.save needs a model built by lipcert.models.build_model (it records how to "
            "rebuild the architecture); save a plain state_dict yourself for other models"
        )
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    skeleton = flatten(state or {}, tensors)
    metadata = {
        "format": f"lipcert-{FORMAT_VERSION}",
        "model_spec": json.dumps(spec),
        "config": json.dumps(config or {}),
        "state": json.dumps(skeleton),
    }
    atomic_save(tensors, metadata, Path(path))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a lipcert checkpoint; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({err})") from err
    if raw.get("format") != f"lipcert-{FORMAT_VERSION}":
        raise CheckpointError(f"{path} is not a lipcert checkpoint (format {raw.get('format')!r})")
    try:
        meta = {k: json.loads(raw[k]) for k in ("model_spec", "config", "state")}
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({err})") from err
    return tensors, meta


def model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def load_into(model: nn.Module, tensors: dict[str, Tensor], path: str | Path) -> None:
    """Load the checkpoint's weights into ``model``; a mismatch names the differing keys."""
    state = model_state(tensors)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{path} does not fit this architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {sorted(bad_shapes)[:5]}"
        )
    model.load_state_dict(state)


def save(model: nn.Module, path: str | Path, config: dict | None = None) -> None:
    """Save a lipcert model (weights + architecture spec + optional config) as safetensors."""
    write_checkpoint(path, model, config=config)


def _integers(value: object) -> list[int]:
    """The ints in a JSON-like value (nested lists and dicts)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [n for item in value for n in _integers(item)]
    return []


def _check_sizes_fit(spec: dict, tensors: dict[str, Tensor], path: str | Path) -> None:
    """Every size in the model spec (a width, a depth, an input size) is at most the largest
    dimension of a stored tensor: a tampered spec (width 10^9) would otherwise be built, and fill
    the memory, before the shapes are compared."""
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=1)
    oversized = [n for n in _integers(spec.get("kwargs", {})) if n > largest]
    if oversized:
        raise CheckpointError(
            f"{path}: the model spec asks for size {oversized[0]}, larger than every stored tensor "
            f"dimension (at most {largest}): the checkpoint is corrupt or was edited"
        )


def load(path: str | Path) -> nn.Module:
    """Rebuild the model saved at ``path`` (eval mode). No pickled code is run."""
    from lipcert.models import build_model

    tensors, meta = read_checkpoint(path)
    spec = meta["model_spec"]
    _check_sizes_fit(spec, tensors, path)
    try:
        model = build_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from {spec}: {err}") from err
    load_into(model, tensors, path)
    return model.eval()
