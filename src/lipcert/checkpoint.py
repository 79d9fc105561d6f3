"""Self-describing checkpoints in safetensors: no pickle, so loading never runs code.

A file holds tensors plus string metadata. The model's state_dict goes under ``model.``; nested
training state (optimizer, scheduler, loss buffers, counters; no RNG state: training draws its
random numbers from generators seeded by the run's seed and the epoch, :mod:`lipcert.train`) is
flattened by :func:`flatten`: tensors under ``state.<n>``, the rest as JSON with
``{"__tensor__": "state.<n>"}`` placeholders. The metadata also
records how to rebuild the model (its registry spec, :mod:`lipcert.models`) and the run's config,
so ``lipcert.load(path)`` needs nothing else. Writes are atomic: a temp file, fsync, rename, then
fsync of the folder; temp files left by a killed writer are removed by the next write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
from collections.abc import Iterator, Mapping
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
#: Deepest nesting of lists and objects accepted in the JSON metadata. Real training state nests
#: 13 levels (state -> optimizer -> per-parameter state -> tensor placeholder); deeper
#: metadata is corrupt, and would exhaust Python's recursion on decoding or rebuilding.
MAX_METADATA_DEPTH = 100
#: This machine's name as it appears in temp file names (letters, digits, '-' and '_').
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
#: Errors of ``fsync`` on a folder that mean "not supported here", not "not written".
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


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


def _process_is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (POSIX; elsewhere: assume it runs)."""
    if os.name != "posix":
        return False  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process
        return False
    return False


def temp_path(path: Path, pid: int | None = None) -> Path:
    """The temp file beside ``path`` that process ``pid`` (default: this one) on this machine
    writes before its rename: the host is part of the name, so that a folder shared by machines
    never has another host's live temp file taken for a dead one."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid() if pid is None else pid}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files of ``path`` written on this machine by a process that died before
    its rename (SIGKILL, power loss); a live writer's, another host's and any file whose name is
    not exactly :func:`temp_path`'s are left alone. Never raises: a folder that cannot be listed
    is left as it is (the write itself then reports the problem)."""
    prefix, suffix = f".{path.name}.{_HOST}.", ".tmp"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name.removeprefix(prefix).removesuffix(suffix)
        named = entry.name == f"{prefix}{pid}{suffix}"
        if named and _is_pid(pid) and _process_is_gone(int(pid)):
            entry.unlink(missing_ok=True)


def _is_pid(text: str) -> bool:
    """ASCII digits, at most 10 (a pid fits a C int: no OverflowError from ``os.kill``)."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 2**31


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; skipped where folders cannot be opened (no
    ``O_DIRECTORY``) or synced (some network file systems)."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | flag)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; then synced and renamed over
    ``path`` (readers see the old file or the new one, never half) and the folder synced, or
    removed on an error. Temp files of ``path`` left by dead writers are removed first."""
    path = Path(path)
    _remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file atomically (:func:`atomic_path`). A failed write (full disk, no
    permission) raises an ``OSError`` naming ``path``, the file before it left whole: safetensors
    reports its I/O errors as a ``SafetensorError`` naming no file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            os.chmod(tmp, _new_file_mode())  # safetensors writes 0600; a checkpoint is shared
            # like the config.json beside it
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or err
        raise OSError(f"cannot write checkpoint {path}: {reason}") from err


def _new_file_mode() -> int:
    """The mode ``open`` gives a new file: 0o666 less the process umask (read through
    ``os.umask``, its only interface, and restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


def _check_readable_file(path: Path) -> None:
    """CheckpointError saying what ``path`` is when it is not a file this process can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint not found: {path}") from err
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err.strerror}") from err
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"checkpoint {path} is a directory, not a .safetensors file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} is not readable: {err.strerror}") from err


def _nesting_depth(value: Any) -> int:
    """How deeply lists and dicts nest in a decoded JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """The JSON fields of a checkpoint's metadata, each checked for its type and nesting."""
    meta = {}
    for key in ("model_spec", "config", "state"):
        try:
            meta[key] = json.loads(raw[key])
        except (KeyError, json.JSONDecodeError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else err
            raise CheckpointError(f"{path}: corrupt metadata {key!r} ({reason})") from err
        if not isinstance(meta[key], dict):
            kind = type(meta[key]).__name__
            raise CheckpointError(
                f"{path}: corrupt metadata {key!r} (a JSON {kind}, not an object)"
            )
        if _nesting_depth(meta[key]) > MAX_METADATA_DEPTH:
            raise CheckpointError(
                f"{path}: corrupt metadata {key!r} (nested deeper than {MAX_METADATA_DEPTH} levels)"
            )
    spec = meta["model_spec"]
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs"), dict):
        raise CheckpointError(
            f"{path}: corrupt metadata 'model_spec' (needs a string 'name' and an object "
            f"'kwargs', got {spec!r:.200})"
        )
    return meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a lipcert checkpoint; clear errors for bad files."""
    path = Path(path)
    _check_readable_file(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({err})") from err
    if raw.get("format") != f"lipcert-{FORMAT_VERSION}":
        raise CheckpointError(f"{path} is not a lipcert checkpoint (format {raw.get('format')!r})")
    return tensors, _decode_metadata(raw, path)


def model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def check_dtypes(
    expected: Mapping[str, Any], stored: Mapping[str, Any], path: str | Path, what: str
) -> None:
    """CheckpointError naming the tensors of ``stored`` whose dtype is not that of the same key
    in ``expected``: ``load_state_dict`` would cast them silently (int32 weights to float32)."""
    bad = [
        f"{what}{k} (stored {stored[k].dtype}, expected {expected[k].dtype})"
        for k in sorted(set(expected) & set(stored), key=str)
        if torch.is_tensor(stored[k])
        and torch.is_tensor(expected[k])
        and stored[k].dtype != expected[k].dtype
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{path}: tensors of the wrong dtype: {', '.join(bad[:3])}{more}; the checkpoint is "
            "corrupt or was edited"
        )


def load_into(model: nn.Module, tensors: dict[str, Tensor], path: str | Path) -> None:
    """Load the checkpoint's weights into ``model``; a mismatch names the differing keys (names,
    shapes, dtypes)."""
    state = model_state(tensors)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{path} does not fit this architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {sorted(bad_shapes)[:5]}"
        )
    check_dtypes(own, state, path, "model.")
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


def _to_stored_dtype(model: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """``model`` cast to the one floating dtype of the stored weights when it has others (a model
    saved after ``.double()`` comes back in float64); mixed stored dtypes are left to
    :func:`load_into` to compare."""
    stored = {t.dtype for t in model_state(tensors).values() if t.is_floating_point()}
    own = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    return model.to(stored.pop()) if len(stored) == 1 and own != stored else model


def load(path: str | Path) -> nn.Module:
    """Rebuild the model saved at ``path`` (eval mode, in the stored floating dtype). No pickled
    code is run; tensors of another shape or dtype than the rebuilt model's are refused."""
    return load_with_metadata(path)[0]


def load_with_metadata(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load` and the checkpoint's metadata (model spec, run config, ...), from one read of
    the file: two reads could meet two versions of a checkpoint a running training replaces."""
    from lipcert.models import build_model

    tensors, meta = read_checkpoint(path)
    spec = meta["model_spec"]
    _check_sizes_fit(spec, tensors, path)
    try:
        model = build_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the model from {spec}: {err}") from err
    model = _to_stored_dtype(model, tensors)
    load_into(model, tensors, path)
    return model.eval(), meta
