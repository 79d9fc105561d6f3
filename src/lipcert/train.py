"""The training loop: config in, checkpoints + metrics + certified accuracy out.

One epoch = a seeded permutation of the training set (the seed is derived from the run seed and
the epoch, so a resumed run sees exactly the batches an uninterrupted one would), optional tensor
augmentation, one optimizer step per batch, then evaluation (clean + certified accuracy) and an
atomic checkpoint. ``torchrun`` runs it data-parallel (DDP): each rank takes its share of every
global batch and rank 0 evaluates, logs and writes checkpoints.

A resumed run keeps the config saved in its checkpoint: every other value (seed, lr, optimizer,
schedule, loss, data, model, certify, amp) is refused, naming each differing key, since the run
would not continue the same trajectory and its ``config.json`` would not describe it. Only
:data:`RESUMABLE_KEYS` may change.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from lipcert import losses
from lipcert.certify import certified_accuracy, certify_batched, predict
from lipcert.checkpoint import (
    CheckpointError,
    check_dtypes,
    load_into,
    read_checkpoint,
    unflatten,
    write_checkpoint,
)
from lipcert.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_differences,
    parse_config,
    to_dict,
)
from lipcert.data import Dataset, Split, load_dataset, random_crop, random_flip
from lipcert.finite import first_nonfinite
from lipcert.lmt import LMTTrainingLoss
from lipcert.models import build_model
from lipcert.nn import precomputed_weights, retract_after_steps
from lipcert.outputs import check_output_folder, output_file

CHECKPOINT_NAME = "last.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
#: Offset mixed into per-epoch seeds so the data order differs from the model-init stream
#: (``config.SEED_LIMIT`` keeps seed * stride + epoch within torch's 64-bit seeds).
_EPOCH_SEED_STRIDE = 1_000_003
#: Config keys a resumed run may change. None of them changes the training trajectory: where the
#: run computes (``device``), how often and in what batches it evaluates (``eval_every``,
#: ``data.eval_batch_size``), where its dataset files are (``data.data_dir``), its ``name``
#: (only the default run folder). ``epochs`` extends (or ends) the run: the learning-rate
#: schedule and the training-progress schedules are then stretched to the new length from the
#: resumed step on, so the run is no longer the uninterrupted run of either length; it cannot go
#: below the epochs already trained.
RESUMABLE_KEYS = frozenset(
    {"epochs", "eval_every", "device", "name", "data.data_dir", "data.eval_batch_size"}
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device: torch.device) -> Iterator[Distributed]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), and leave it cleanly.

    On exit a garbage collection frees the DDP wrapper, which sits in a reference cycle holding
    the group; then a group this call created is destroyed. A gloo group still held at
    interpreter shutdown can abort the process (SIGABRT in 9 of 60 two-rank runs without the
    collection, 0 of 60 with it). When training raised, the frames of the exception's traceback
    are cleared of their local variables first (the traceback still prints): they held the
    wrapper past the collection, to interpreter shutdown.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Distributed()
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size())
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        gc.collect()
        if created:
            dist.destroy_process_group()


def make_loss(cfg: LossConfig) -> nn.Module:
    """The training loss named in the config (kwargs passed through)."""
    factories = {
        "multiclass_hkr": losses.MulticlassHKRLoss,
        "multiclass_hinge": losses.MulticlassHingeLoss,
        "tau_ce": losses.TauCrossEntropyLoss,
        "ce": nn.CrossEntropyLoss,
        "hkr": losses.HKRLoss,
        "kr": losses.KRLoss,
        "linf_dist": losses.LinfDistLoss,
        "lmt": LMTTrainingLoss,
    }
    try:
        return factories[cfg.name](**cfg.kwargs)
    except TypeError as err:
        raise ValueError(f"loss.kwargs do not fit loss {cfg.name!r}: {err}") from err


def bind_loss(loss_fn: nn.Module, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Give a loss that follows the trained model its model: losses with a
    ``bind(model, input_shape)`` hook (LMT's Lipschitz estimate) are bound once, before training
    and before a resumed run restores their state."""
    hook = getattr(loss_fn, "bind", None)
    if callable(hook):
        hook(model, tuple(input_shape))


def make_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    betas = (cfg.beta1, cfg.beta2)
    return optimizer(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine / constant / one-cycle."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # one-cycle's linear decay after the warmup ramp


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)


def evaluate(model: nn.Module, data: Dataset, config: TrainConfig) -> dict[str, float]:
    """Clean and certified accuracy of ``model`` on the test split."""
    radii = certify_batched(
        model, data.test.x, data.test.y, config.certify.norm, config.data.eval_batch_size
    )
    acc = certified_accuracy(radii, [0.0, *config.certify.eps])
    return {("clean_acc" if e == 0 else f"cert_acc@{e:g}"): v for e, v in acc.items()}


def _batches(data: Dataset, config: TrainConfig, epoch: int, ddp: Distributed):
    """Yield (x, y) of this rank's share of every global batch of ``epoch``."""
    gen = epoch_generator(config.seed, epoch)
    x_all, y_all = data.train.x, data.train.y
    order = torch.randperm(len(y_all), generator=gen)
    batch = config.data.batch_size
    n_batches = max(1, len(order) // batch)
    for i in range(n_batches):
        idx = order[i * batch : (i + 1) * batch][ddp.rank :: ddp.world_size]
        x = x_all[idx]
        if config.data.crop_padding:
            x = random_crop(x, config.data.crop_padding, gen)
        if config.data.flip:
            x = random_flip(x, gen)
        yield x, y_all[idx]


def subset_train(data: Dataset, size: int, seed: int) -> Dataset:
    """``data`` with a seeded random subset of ``size`` training points (for quick runs)."""
    if size > len(data.train):
        available = len(data.train)
        raise ValueError(f"data.train_subset = {size} exceeds the {available} training points")
    keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:size]
    train = Split(data.train.x[keep], data.train.y[keep])
    return Dataset(data.name, train, data.test, data.class_names)


def select_classes(data: Dataset, classes: list[int]) -> Dataset:
    """Only the samples of ``classes`` (``data.classes``; all when empty), relabelled 0, 1, ...
    in the order given: ``[0, 8]`` makes MNIST a binary 0-vs-8 task with 8 as class 1."""
    if not classes:
        return data
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"data.classes must list at least 2 distinct classes, got {classes}")
    if not all(0 <= c < data.num_classes for c in classes):
        raise ValueError(f"data.classes {classes} must lie in 0..{data.num_classes - 1}")
    relabel = torch.full((data.num_classes,), -1, dtype=torch.int64)
    relabel[classes] = torch.arange(len(classes))

    def keep(split: Split) -> Split:
        mask = relabel[split.y] >= 0
        return Split(split.x[mask], relabel[split.y[mask]])

    names = tuple(data.class_names[c] for c in classes)
    return Dataset(data.name, keep(data.train), keep(data.test), names)


def _check_augmentation(cfg: DataConfig, data: Dataset) -> None:
    """ValueError naming ``data.crop_padding`` / ``data.flip`` when they are set for inputs that
    are not images ``(C, H, W)`` (moons' points): they crop and mirror images; or when the
    padding is not below the image's height and width: a crop at offset o (0 .. 2p) of the
    padded image shows image rows o - p .. o - p + H - 1, none when o <= p - H, an offset drawn
    when p >= H; and the padded batch grows as (H + 2p) (W + 2p)."""
    keys = ("crop_padding", "flip")
    set_keys = [f"data.{key} = {getattr(cfg, key)!r}" for key in keys if getattr(cfg, key)]
    if set_keys and len(data.input_shape) != 3:
        raise ValueError(
            f"{' and '.join(set_keys)}: these augmentations act on images (C, H, W), but "
            f"{data.name}'s inputs have shape {data.input_shape}; remove them"
        )
    smallest = min(data.input_shape[1:], default=0)
    if cfg.crop_padding and cfg.crop_padding >= smallest:
        raise ValueError(
            f"data.crop_padding = {cfg.crop_padding} must lie below {smallest}, the smaller side "
            f"of {data.name}'s {data.input_shape} images (a crop would miss the image)"
        )


def _check_schedules(model: nn.Module) -> None:
    """ConfigError naming ``model.kwargs.ramp_end`` when an l_p schedule ends at progress 1:
    training sets progress = step / steps, below 1 at the last step, so p would never reach inf
    (a model trained, saved and certified at p = 997.5 after 2000 steps)."""
    for module in model.modules():
        schedule = getattr(module, "p_schedule", None)
        if schedule is not None and schedule.ramp_end >= 1:
            raise ConfigError(
                f"model.kwargs.ramp_end = {schedule.ramp_end}: p reaches inf at ramp_end, and "
                "training progress stays below 1; take ramp_end < 1 (e.g. 0.95)"
            )


def _steps_per_epoch(data: Dataset, config: TrainConfig) -> int:
    return max(1, len(data.train.y) // config.data.batch_size)


def _build_configured_model(cfg: ModelConfig, data: Dataset) -> nn.Module:
    """The model of ``cfg`` for ``data``'s input shape and classes; ValueError naming the config
    keys and their values when the kwargs do not fit the model."""
    given = {"input_shape", "num_classes"} & set(cfg.kwargs)
    if given:
        raise ValueError(f"model.kwargs.{sorted(given)[0]} is set from the dataset: remove it")
    try:
        return build_model(
            cfg.name, input_shape=list(data.input_shape), num_classes=data.num_classes, **cfg.kwargs
        )
    except (TypeError, ValueError) as err:
        values = ", ".join(f"model.kwargs.{k} = {v!r}" for k, v in cfg.kwargs.items())
        raise ValueError(
            f"model.kwargs do not fit model {cfg.name!r} ({values or 'none given'}): {err}"
        ) from err


def _diverged(what: str, ckpt: Path) -> TrainingDiverged:
    kept = (
        f"the last good checkpoint is kept at {ckpt}"
        if ckpt.exists()
        else "no checkpoint was written before it"
    )
    return TrainingDiverged(
        f"{what}; stopping: {kept} (lower the learning rate or enable optim.grad_clip)"
    )


def _check_finite(value: Tensor, what: str, epoch: int, step: int, ckpt: Path) -> None:
    if not torch.isfinite(value).all():
        raise _diverged(f"{what} became non-finite at epoch {epoch + 1}, step {step}", ckpt)


def _nonfinite_parameter(model: nn.Module) -> str | None:
    """The name of the first parameter of ``model`` holding NaN or inf, if any."""
    found = first_nonfinite(model.named_parameters())
    return None if found is None else found[0]


def _check_weights(model: nn.Module, epoch: int, ckpt: Path) -> None:
    """TrainingDiverged naming a parameter that an optimizer step left NaN or inf: the next
    step's logits would tell, but an epoch's last step is followed by its checkpoint, which
    must not replace the last good one."""
    bad = _nonfinite_parameter(model)
    if bad is not None:
        raise _diverged(f"parameter {bad} became non-finite in epoch {epoch + 1}", ckpt)


def set_progress(modules: list[nn.Module], progress: float) -> None:
    """Tell every module with a ``set_progress(progress)`` hook how far training is (0 -> 1).

    Schedules that depend on training progress (the l_p -> l_inf relaxation of LinfDist layers,
    the decaying loss mix of LinfDistLoss) live in the modules and read it from here, so they are
    a function of the global step and survive resume exactly.
    """
    for module in modules:
        hook = getattr(module, "set_progress", None)
        if callable(hook):
            hook(progress)


def train_one_epoch(model, loss_fn, optimizer, scheduler, data, config, epoch, device, ddp, ckpt):
    model.train()
    scheduled = [*model.modules(), *loss_fn.modules()]
    steps = _steps_per_epoch(data, config)
    total_loss, correct, seen = 0.0, 0, 0
    amp = config.amp and device.type == "cuda"
    bar = tqdm(
        _batches(data, config, epoch, ddp),
        total=steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=None if ddp.is_main else True,  # None: off when stdout is not a terminal
        leave=False,
    )
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        set_progress(scheduled, (epoch * steps + step) / (config.epochs * steps))
        with precomputed_weights(model), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(x)
        _check_finite(logits, "the logits", epoch, step, ckpt)
        loss = loss_fn(logits.float(), y)
        _check_finite(loss, "the loss", epoch, step, ckpt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        correct += int((predict(logits) == y).sum())
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


def stored_config(meta: dict, path: str | Path) -> TrainConfig:
    """The run config saved in a checkpoint's metadata; CheckpointError naming the file when it
    is missing or invalid."""
    if not meta.get("config"):
        raise CheckpointError(f"{path} has no run config (saved by lipcert.save without one)")
    try:
        return parse_config(meta["config"])
    except ConfigError as err:
        raise CheckpointError(
            f"{path}: the run config stored in it is invalid ({err}); the checkpoint is corrupt "
            "or was edited"
        ) from err


def _check_same_run(ckpt: Path, meta: dict, config: TrainConfig) -> None:
    """CheckpointError naming every key (both values) where ``config`` differs from the config
    saved in ``ckpt``, but for :data:`RESUMABLE_KEYS`."""
    saved = to_dict(stored_config(meta, ckpt))
    changed = [d for d in config_differences(saved, to_dict(config)) if d[0] not in RESUMABLE_KEYS]
    if changed:
        listed = "; ".join(
            f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed
        )
        raise CheckpointError(
            f"{ckpt} cannot be resumed with this config, which differs from the run's in {listed}. "
            "A resumed run keeps its settings (another optimizer, loss, schedule, seed, data or "
            f"model would not continue it); only {', '.join(sorted(RESUMABLE_KEYS))} may change: "
            "restore these values, or start a new run dir"
        )


def _check_form(expected: Any, stored: Any, where: str) -> None:
    """ValueError naming ``where`` unless ``stored`` has the form of ``expected`` (the state of a
    fresh optimizer's settings or schedule): the same types, dict keys and list lengths,
    recursively, tensors of the same shape. ``load_state_dict`` takes any value (a schedule's
    even sets attributes of any name), and a wrong one fails steps later, mid-training."""
    if torch.is_tensor(expected) and torch.is_tensor(stored):
        if stored.shape != expected.shape:
            shapes = f"{tuple(stored.shape)}, expected {tuple(expected.shape)}"
            raise ValueError(f"{where} has shape {shapes}")
    elif type(stored) is not type(expected):
        raise ValueError(f"{where} is {stored!r:.60}, expected {type(expected).__name__}")
    elif isinstance(expected, dict):
        if stored.keys() != expected.keys():
            extra, lacking = stored.keys() - expected.keys(), expected.keys() - stored.keys()
            problems = [f"the unexpected keys {sorted(extra, key=str)}"] if extra else []
            problems += [f"no {sorted(lacking, key=str)}"] if lacking else []
            raise ValueError(f"{where} has {' and '.join(problems)}")
        for key, value in expected.items():
            _check_form(value, stored[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        if len(stored) != len(expected):
            raise ValueError(f"{where} has {len(stored)} entries, expected {len(expected)}")
        for index, (value, given) in enumerate(zip(expected, stored, strict=True)):
            _check_form(value, given, f"{where}.{index}")


def _check_schedule(scheduler: Any, stored: Any) -> None:
    """ValueError unless ``stored`` fits ``scheduler``: the entries both have of the form of its
    own (:func:`_check_form`), and no entry naming one of its attributes that it does not save
    (``load_state_dict`` sets every entry as an attribute: an injected 'optimizer' replaced its
    optimizer). Entries one torch version saves and another does not (``_is_initial``,
    ``verbose``) may be missing or extra: a missing one keeps its fresh value."""
    if not isinstance(stored, dict):
        raise ValueError(f"scheduler is {stored!r:.60}, expected dict")
    own = scheduler.state_dict()
    clobbered = sorted(k for k in stored if k not in own and hasattr(scheduler, str(k)))
    if clobbered:
        raise ValueError(f"scheduler has the entries {clobbered}, which are not its state")
    shared = [key for key in own if key in stored]
    _check_form({k: own[k] for k in shared}, {k: stored[k] for k in shared}, "scheduler")


def _restore_optimizer(optimizer: torch.optim.Optimizer, stored: Any, ckpt: Path) -> None:
    """Load ``stored`` into ``optimizer``: its settings of the form of the optimizer's own
    (:func:`_check_form`), each state tensor of its parameter's shape or of none (a step count)
    and of the dtype stored (``load_state_dict`` casts it to the parameter's)."""
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(stored)
    if set(optimizer.param_groups[0]) != set(groups[0]):  # an Adam state loads into SGD
        raise ValueError("the checkpoint was trained with another optimizer")
    # As loaded: torch fills the settings an older version did not save with their defaults.
    _check_form(groups, optimizer.state_dict()["param_groups"], "optimizer.param_groups")
    loaded = optimizer.state_dict()["state"]
    for index, entries in stored.get("state", {}).items():
        check_dtypes(loaded.get(index, {}), entries, ckpt, f"optimizer state {index}.")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                shapes = f"{tuple(value.shape)}, expected () or {tuple(param.shape)}"
                raise ValueError(f"optimizer state {index}.{name} has shape {shapes}")


def _check_progress(epoch: Any, history: Any, config: TrainConfig, ckpt: Path) -> None:
    """ValueError unless ``epoch`` counts the epochs trained and ``history`` holds one metrics
    row for each; CheckpointError when ``config`` asks for fewer epochs."""
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"epoch is {epoch!r:.60}, not a count of epochs")
    rows = history if isinstance(history, list) else []
    if len(rows) != epoch or not all(isinstance(row, dict) for row in rows):
        reason = f"not one metrics row for each of the {epoch} epochs trained"
        raise ValueError(f"history is {history!r:.60}, {reason}")
    if epoch > config.epochs:
        raise CheckpointError(
            f"{ckpt} has trained {epoch} epochs, more than epochs = {config.epochs}: resume "
            f"with epochs >= {epoch}"
        )


def _restore(
    ckpt: Path, config: TrainConfig, model, optimizer, scheduler, loss_fn
) -> tuple[int, list[dict]]:
    """Model, optimizer, schedule and loss state of ``ckpt``; CheckpointError when ``config`` is
    not the run's (:func:`_check_same_run`) or its training state does not fit (another
    optimizer, a file saved without training state, tensors of another dtype or shape, values
    of another type, NaN weights)."""
    tensors, meta = read_checkpoint(ckpt)
    _check_same_run(ckpt, meta, config)
    load_into(model, tensors, ckpt)
    bad = _nonfinite_parameter(model)
    if bad is not None:
        raise CheckpointError(
            f"{ckpt}: tensor model.{bad} holds NaN or inf values (a run saves finite weights): "
            "the checkpoint is corrupt or was edited"
        )
    try:
        state = unflatten(meta["state"], tensors)
        _restore_optimizer(optimizer, state["optimizer"], ckpt)
        _check_schedule(scheduler, state["scheduler"])
        scheduler.load_state_dict(state["scheduler"])
        if "loss" in state:  # checkpoints written before losses had state lack it
            check_dtypes(loss_fn.state_dict(), state["loss"], ckpt, "loss.")
            loss_fn.load_state_dict(state["loss"])
        epoch, history = state["epoch"], state["history"]
        _check_progress(epoch, history, config, ckpt)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{ckpt}: its training state does not fit this config, so it cannot be resumed (same "
            f"optimizer, loss and schedule needed; missing or mismatched: {err})"
        ) from err
    return epoch, history


def _write_atomically(path: Path, text: str) -> None:
    """Write a run file (config, metrics) atomically; an error names it (:func:`output_file`)."""
    with output_file(path, "run file") as tmp:
        tmp.write_text(text)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    _write_atomically(run_dir / METRICS_NAME, "".join(json.dumps(row) + "\n" for row in history))


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    data: Dataset | None = None,
    stop_after_epochs: int | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train per ``config`` into ``run_dir``; returns the model and the metrics history.

    ``resume`` continues from ``run_dir/last.safetensors``, with the config saved in it: only
    the :data:`RESUMABLE_KEYS` of ``config`` may differ (``epochs`` to extend the run).
    ``stop_after_epochs`` ends the call early (as an interruption would), leaving a checkpoint to
    resume from.
    """
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available; use device = 'cpu'")
    with distributed(device) as ddp:  # the DDP wrapper lives in _train's frame, gone on exit
        return _train(config, run_dir, resume, data, stop_after_epochs, device, ddp)


def _train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool,
    data: Dataset | None,
    stop_after_epochs: int | None,
    device: torch.device,
    ddp: Distributed,
) -> tuple[nn.Module, list[dict]]:
    if ddp.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL collectives and barriers use the current device
    run_dir = check_output_folder(run_dir, "run dir")
    ckpt = run_dir / CHECKPOINT_NAME
    data = data or load_dataset(config.data.dataset, config.data.data_dir or None)
    data = select_classes(data, config.data.classes)
    if config.data.train_subset:
        data = subset_train(data, config.data.train_subset, config.seed)
    _check_augmentation(config.data, data)
    torch.manual_seed(config.seed)
    model = _build_configured_model(config.model, data).to(device)
    _check_schedules(model)
    optimizer = make_optimizer(config.optim, model.parameters())
    retract_after_steps(optimizer, model)  # OrthoLinear(retraction=k) layers, if any
    steps = _steps_per_epoch(data, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config.optim, s, steps * config.epochs, steps)
    )
    loss_fn = make_loss(config.loss)
    bind_loss(loss_fn, model, data.input_shape)
    start_epoch, history = 0, []
    if resume:
        start_epoch, history = _restore(ckpt, config, model, optimizer, scheduler, loss_fn)
    elif ddp.is_main and ckpt.exists():
        raise ValueError(f"{ckpt} exists: pass --resume to continue it or choose another run dir")
    train_model = model
    if ddp.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model)
    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / CONFIG_NAME, json.dumps(to_dict(config), indent=2))
        _write_metrics(run_dir, history)
    last_epoch = config.epochs if stop_after_epochs is None else start_epoch + stop_after_epochs
    for epoch in range(start_epoch, min(config.epochs, last_epoch)):
        started = time.perf_counter()
        row = {"epoch": epoch + 1}
        row |= train_one_epoch(
            train_model, loss_fn, optimizer, scheduler, data, config, epoch, device, ddp, ckpt
        )
        row["lr"] = scheduler.get_last_lr()[0]
        row["epoch_seconds"] = time.perf_counter() - started
        _check_weights(model, epoch, ckpt)
        if ddp.is_main:
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                row |= evaluate(model, data, config)
            history.append(row)
            state = {
                "epoch": epoch + 1,
                "history": history,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loss": loss_fn.state_dict(),  # e.g. LMT's power-iteration vectors
            }
            write_checkpoint(ckpt, model, to_dict(config), state)
            _write_metrics(run_dir, history)
            tqdm.write(_summary_line(row))
        if ddp.world_size > 1:
            dist.barrier()
    return model, history


def _summary_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in row.items() if k.endswith("acc") or "@" in k]
    return " | ".join(parts)
