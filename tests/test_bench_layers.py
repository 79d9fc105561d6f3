"""``lipcert bench layers`` on two tiny nets: interleaved rounds, ratios to the plain net."""

from __future__ import annotations

from torch import nn

import lipcert.nn as lnn
from lipcert.bench import layers


def _tiny(conv) -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_rows_give_ratios_to_the_plain_net(monkeypatch):
    monkeypatch.setattr(layers, "BATCH", 4)
    monkeypatch.setattr(layers, "INPUT_SHAPE", (3, 6, 6))
    monkeypatch.setattr(layers, "CLASSES", 2)
    monkeypatch.setattr(layers, "REPEATS", 3)
    monkeypatch.setattr(
        layers,
        "families",
        lambda: {
            "plain": lambda: _tiny(lambda i, o: nn.Conv2d(i, o, 3, padding=1)),
            "lipcert AOL": lambda: _tiny(lambda i, o: lnn.AOLConv2d(i, o, 3)),
        },
    )
    rows = layers.measure()
    assert [r["family"] for r in rows] == ["plain", "lipcert AOL"]
    assert rows[0]["train_ratio"] == rows[0]["eval_ratio"] == 1.0
    assert "exported_eval_ratio" not in rows[0]
    aol = rows[1]
    assert all(aol[k] > 0 for k in ("train_ms", "eval_ms", "train_ratio", "exported_eval_ratio"))
