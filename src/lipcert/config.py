"""Run configuration: TOML -> validated dataclasses.

An unknown key, a missing required key or a bad value raises :class:`ConfigError` naming the key
(with its section) and what is allowed. ``to_dict`` gives the resolved config saved with each run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import tomllib


class ConfigError(ValueError):
    """A config file or value is invalid."""


class _Missing:
    """The value :func:`config_differences` reports for a key that a config lacks."""

    def __repr__(self) -> str:
        return "unset"


MISSING = _Missing()


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _positive() -> dict:
    return {"positive": True}


def _below(limit: int) -> dict:
    return {"below": limit}


#: Seeds are below 2^40 so that ``train.epoch_generator``'s per-epoch seed, seed * 1_000_003 +
#: epoch (epoch < 2^63), stays below 2^64, the bound of torch.Generator seeds: a larger seed
#: would fail in the first epoch, after the run's files are written.
SEED_LIMIT = 2**40


@dataclass
class DataConfig:
    dataset: str = field(
        default="digits", metadata=_choice("digits", "moons", "mnist", "fashion-mnist", "cifar10")
    )
    data_dir: str = ""
    batch_size: int = field(default=128, metadata=_positive())
    eval_batch_size: int = field(default=1000, metadata=_positive())
    crop_padding: int = 0
    flip: bool = False
    train_subset: int = 0  # 0: the whole training split
    classes: list[int] = field(default_factory=list)  # e.g. [0, 8]: only these, relabelled 0, 1


@dataclass
class ModelConfig:
    name: str = "sll_mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = field(
        default="multiclass_hkr",
        metadata=_choice(
            "multiclass_hkr", "multiclass_hinge", "tau_ce", "ce", "hkr", "kr", "linf_dist", "lmt"
        ),
    )
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = field(default="adam", metadata=_choice("adam", "adamw", "sgd"))
    lr: float = field(default=1e-3, metadata=_positive())
    weight_decay: float = 0.0
    momentum: float = field(default=0.9, metadata=_below(1))
    beta1: float = field(default=0.9, metadata=_below(1))  # Adam's betas and eps
    beta2: float = field(default=0.999, metadata=_below(1))
    eps: float = field(default=1e-8, metadata=_positive())
    schedule: str = field(default="cosine", metadata=_choice("cosine", "constant", "onecycle"))
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0  # 0: off


@dataclass
class CertifyConfig:
    norm: str = field(default="l2", metadata=_choice("l2", "linf"))
    eps: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.58])


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = field(default=0, metadata=_below(SEED_LIMIT))
    epochs: int = field(default=10, metadata=_positive())
    device: str = field(default="cpu", metadata=_choice("cpu", "cuda"))
    amp: bool = False
    eval_every: int = field(default=1, metadata=_positive())
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)


def _check_value(section: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    key = f"{section}{f.name}"
    base = getattr(hint, "__origin__", hint)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is list and isinstance(value, list):
        item = get_args(hint)[0]
        allowed = (int,) if item is int else (int, float)
        if not all(isinstance(v, allowed) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} must be a list of {item.__name__}s, got {value!r}")
        value = [item(v) for v in value]
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {base.__name__}, got {value!r}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        allowed = f.metadata["choices"]
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {allowed}")
    if f.metadata.get("positive") and not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")
    if "below" in f.metadata and not value < f.metadata["below"]:
        raise ConfigError(f"{key} must be < {f.metadata['below']:,}, got {value!r}")
    numbers = value if base is list else [value] if base in (int, float) else []
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    if any(v < 0 for v in numbers):
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if any(isinstance(v, int) and v >= 2**63 for v in numbers):
        raise ConfigError(f"{key} must be < 2^63, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section.rstrip('.')}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}{unknown[0]}; allowed keys: {sorted(fields)}")
    hints = get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{section}{name}.")
        else:
            values[name] = _check_value(section, fields[name], value, hint)
    return cls(**values)


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a decoded TOML document."""
    return _build(TrainConfig, raw, "")


#: First characters of TOML values that are never bare words: an array, a table, a string.
_TOML_OPENERS = ("[", "{", '"', "'")


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``section.key=value`` in a decoded TOML document; the value is a TOML value
    (``epochs=5``, ``model.kwargs.width=32``, ``loss.name="ce"``, ``certify.eps=[0.1, 0.3]``);
    a bare word that is not valid TOML is taken as a string (``data.dataset=mnist``), but a value
    that starts like a TOML array, table or quoted string must be valid TOML."""
    key, sep, text = override.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {override!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as err:
        if text.strip()[:1] in _TOML_OPENERS:
            raise ConfigError(f"--set {override!r}: the value is not valid TOML ({err})") from err
        value = text.strip()
    table = raw
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a table")
    table[path[-1]] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a TOML config file, after applying ``overrides``
    (:func:`apply_override`): an override is validated like a value in the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory, not a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    for override in overrides:
        apply_override(raw, override)
    return parse_config(raw)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data (saved with each run)."""
    return dataclasses.asdict(config)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two :func:`to_dict` configs
    differ (a key that one lacks has the value ``MISSING``), sorted by key."""
    found = []
    for key in sorted(old.keys() | new.keys(), key=str):
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [(f"{key}.{k}", x, y) for k, x, y in config_differences(a, b)]
        elif a != b:
            found.append((str(key), a, b))
    return found
