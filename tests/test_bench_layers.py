"""``lipcert bench layers`` on two tiny nets: interleaved rounds, ratios to the plain net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipcert.nn as lnn
from lipcert.bench import layers
from lipcert.cli import main


def test_ratio_is_the_median_over_rounds_of_the_ratio_within_a_round():
    times = {"plain": [10.0, 20.0, 30.0], "other": [20.0, 20.0, 90.0]}
    summary = layers._summaries(times, "plain")
    assert summary["plain"] == (20.0, 1.0)
    assert summary["other"] == (20.0, 2.0)  # round ratios 2, 1, 3 (the ratio of medians is 1)


class _ModeProbe(nn.Module):
    """Identity that records (train mode, grad enabled) at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x


def _tiny(conv, probe: nn.Module) -> nn.Module:
    return nn.Sequential(conv(3, 4), probe, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_nets_are_timed_in_train_then_eval_mode(monkeypatch):
    probe = _ModeProbe()
    for name, value in (("BATCH", 4), ("INPUT_SHAPE", (3, 6, 6)), ("CLASSES", 2), ("REPEATS", 3)):
        monkeypatch.setattr(layers, name, value)
    monkeypatch.setattr(
        layers,
        "families",
        lambda k: {
            "plain": lambda: _tiny(lambda i, o: nn.Conv2d(i, o, k, padding=k // 2), probe),
            "lipcert AOL": lambda: _tiny(lambda i, o: lnn.AOLConv2d(i, o, k), nn.Identity()),
        },
    )
    rows = layers.measure()
    assert [r["family"] for r in rows] == ["plain", "lipcert AOL"]
    runs = layers.WARMUP + layers.REPEATS
    assert probe.calls == [(True, True)] * runs + [(False, False)] * runs
    assert rows[0]["train_ratio"] == rows[0]["eval_ratio"] == 1.0
    assert "exported_eval_ratio" not in rows[0] and "exported_eval_ratio" in rows[1]
    assert all(rows[1][k] > 0 for k in ("train_ms", "eval_ms", "train_ratio", "eval_ratio"))


def test_batch_option_sets_the_timed_batch(monkeypatch):
    shapes: list[int] = []

    class _BatchProbe(nn.Identity):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(len(x))
            return x

    for name, value in (("INPUT_SHAPE", (3, 6, 6)), ("CLASSES", 2), ("REPEATS", 1)):
        monkeypatch.setattr(layers, name, value)
    monkeypatch.setattr(
        layers,
        "families",
        lambda k: {
            "plain": lambda: _tiny(lambda i, o: nn.Conv2d(i, o, k, padding=1), _BatchProbe())
        },
    )
    layers.measure(batch=5)
    assert shapes and set(shapes) == {5}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "layers", "--batch", "0"], "--batch must be a positive integer, got 0"),
        (["bench", "linf", "--batch", "8"], "--batch applies to bench layers only"),
        (["bench", "layers", "--kernel-size", "4"], "--kernel-size must be an odd positive"),
        (["bench", "layers", "--kernel-size", "0"], "--kernel-size must be an odd positive"),
        (["bench", "linf", "--kernel-size", "5"], "--kernel-size applies to bench layers only"),
    ],
)
def test_bench_options_are_checked(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_on_a_missing_gpu_says_so(capsys):
    assert main(["bench", "layers", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_every_family_takes_the_kernel_size():
    """``--kernel-size`` reaches every convolution of every family, with "same" padding."""
    for name, build in layers.families(5).items():
        convs = [m for m in build().modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.kernel_size == (5, 5) for m in convs), name
        x = torch.zeros(1, 3, 8, 8)
        assert convs[0](x).shape[-2:] == (8, 8), name
