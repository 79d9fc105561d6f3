"""``lipcert bench layers`` on two tiny nets: interleaved rounds, ratios to the plain net."""

from __future__ import annotations

import torch
from torch import nn

import lipcert.nn as lnn
from lipcert.bench import layers


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
        lambda: {
            "plain": lambda: _tiny(lambda i, o: nn.Conv2d(i, o, 3, padding=1), probe),
            "lipcert AOL": lambda: _tiny(lambda i, o: lnn.AOLConv2d(i, o, 3), nn.Identity()),
        },
    )
    rows = layers.measure()
    assert [r["family"] for r in rows] == ["plain", "lipcert AOL"]
    runs = layers.WARMUP + layers.REPEATS
    assert probe.calls == [(True, True)] * runs + [(False, False)] * runs
    assert rows[0]["train_ratio"] == rows[0]["eval_ratio"] == 1.0
    assert "exported_eval_ratio" not in rows[0] and "exported_eval_ratio" in rows[1]
    assert all(rows[1][k] > 0 for k in ("train_ms", "eval_ms", "train_ratio", "eval_ratio"))
