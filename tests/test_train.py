import gc
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lipcert.checkpoint import load, read_checkpoint
from lipcert.config import parse_config
from lipcert.data import Dataset, Split
from lipcert.models import register_model
from lipcert.train import CHECKPOINT_NAME, TrainingDiverged, train


@register_model
def _tiny_train_net(input_shape, num_classes, width: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def _data(n_train=96, n_test=32) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 5, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Dataset(
        "toy", Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), ("a", "b", "c")
    )


def _config(**overrides):
    raw = {
        "epochs": 4,
        "seed": 3,
        "data": {"batch_size": 16},
        "model": {"name": "_tiny_train_net"},
        "loss": {"name": "ce"},
        "optim": {"name": "adam", "lr": 0.01, "warmup_epochs": 1.0},
        "certify": {"eps": [0.1]},
    }
    raw.update(overrides)
    return parse_config(raw)


def _weights(path):
    tensors, _ = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


RETRACTED_GNP = {"name": "gnp_mlp", "kwargs": {"width": 8, "depth": 2, "retraction": 2}}


# LMT carries state outside the model (its power-iteration vectors), retraction acts after every
# optimizer step: resume must reproduce both.
@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": {"name": "ce"}},
        {"loss": {"name": "lmt", "kwargs": {"eps": 0.3}}},
        {"loss": {"name": "multiclass_hkr", "kwargs": {"alpha": 10.0}}, "model": RETRACTED_GNP},
    ],
)
def test_resume_matches_uninterrupted_run(tmp_path, overrides):
    train(_config(**overrides), tmp_path / "full", data=_data())
    train(_config(**overrides), tmp_path / "split", data=_data(), stop_after_epochs=2)
    assert read_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)[1]["state"]
    train(_config(**overrides), tmp_path / "split", data=_data(), resume=True)
    full, split = (
        _weights(tmp_path / "full" / CHECKPOINT_NAME),
        _weights(tmp_path / "split" / CHECKPOINT_NAME),
    )
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)
    metrics = (tmp_path / "split" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert "cert_acc@0.1" in rows[-1] and "clean_acc" in rows[-1]
    assert json.loads((tmp_path / "full" / "config.json").read_text())["seed"] == 3


def test_existing_run_needs_resume(tmp_path):
    train(_config(epochs=1), tmp_path, data=_data())
    with pytest.raises(ValueError, match="--resume"):
        train(_config(epochs=1), tmp_path, data=_data())


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    train(_config(), tmp_path, data=_data(), stop_after_epochs=1)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    bad = _data()
    bad.train.x[:] = float("nan")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(_config(), tmp_path, data=bad, resume=True)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert load(tmp_path / CHECKPOINT_NAME) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    """Set this process up as rank ``rank`` of ``world`` the way torchrun does, one thread."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _live_ddp_wrappers() -> list:
    return [o for o in gc.get_objects() if isinstance(o, nn.parallel.DistributedDataParallel)]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    _as_rank(rank, world, port)
    gc.disable()  # only train's own collection may free the DDP wrapper's reference cycle
    train(_config(epochs=2), run_dir, data=_data())
    assert not torch.distributed.is_initialized(), "train leaves the process group it joined"
    assert not _live_ddp_wrappers(), "a live DDP wrapper holds the group: gloo can abort at exit"


def _ddp_diverging_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Training that raises (NaN inputs) under DDP: the error reaches the caller, the group is
    gone, and no DDP wrapper survives, though the error's traceback is still held."""
    _as_rank(rank, world, port)
    gc.disable()
    bad = _data()
    bad.train.x[:] = float("nan")
    with pytest.raises(TrainingDiverged) as raised:
        train(_config(epochs=2), run_dir, data=bad)
    assert "train" in "".join(traceback.format_tb(raised.value.__traceback__))
    assert not torch.distributed.is_initialized()
    assert not _live_ddp_wrappers(), "the traceback's frames kept the DDP wrapper past the group"


def test_ddp_training_that_raises_leaves_no_wrapper_behind(tmp_path):
    mp.spawn(_ddp_diverging_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)


def test_ddp_two_processes_match_one(tmp_path):
    train(_config(epochs=2), tmp_path / "one", data=_data())
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one, two = (
        _weights(tmp_path / "one" / CHECKPOINT_NAME),
        _weights(tmp_path / "two" / CHECKPOINT_NAME),
    )
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-4)
