"""``lipcert bench certify CKPT`` (design.md §6; issue 6): what certifying a test set costs.

Times, on the checkpoint's test split in batches of ``eval_batch_size``: one eval pass (model
forward, no grad), ``certify_batched`` on a cold cache (the sound bound computed once, then one
forward per batch) and on a warm cache (bound reused). The target: certification of the test set
<= 1.1x one eval pass, the bound computed once. Median of ``repeats`` rounds, each round timing
the three back to back (the cold cache is cleared before its run).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from lipcert.certify import certified_accuracy, certify_batched, clear_summary_cache
from lipcert.cli.common import load_run
from lipcert.modes import eval_mode
from lipcert.report import format_table


def _eval_pass(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(checkpoint: str, repeats: int = 3, data_dir: str | None = None) -> dict:
    model, config, data = load_run(checkpoint, data_dir)
    x, y, norm, batch = data.test.x, data.test.y, config.certify.norm, config.data.eval_batch_size
    rounds = []
    for _ in range(repeats):
        clear_summary_cache(model)
        cold = _seconds(lambda: certify_batched(model, x, y, norm, batch))
        warm = _seconds(lambda: certify_batched(model, x, y, norm, batch))
        plain = _seconds(lambda: _eval_pass(model, x, batch))
        rounds.append((plain, cold, warm))
    plain, cold, warm = (statistics.median(r[i] for r in rounds) for i in range(3))
    radii = certify_batched(model, x, y, norm, batch)
    return {
        "checkpoint": checkpoint,
        "points": len(y),
        "norm": norm,
        "eval_s": plain,
        "certify_cold_s": cold,
        "certify_warm_s": warm,
        "cold_ratio": cold / plain,
        "warm_ratio": warm / plain,
        "accuracy": certified_accuracy(radii, [0.0, *config.certify.eps]),
    }


def main(checkpoint: str, as_json: bool = False) -> None:
    row = measure(checkpoint)
    if as_json:
        print(json.dumps(row, indent=2))
        return
    header = ("pass", "seconds", "x eval")
    table = [
        ("eval (forward only)", f"{row['eval_s']:.3f}", "1.00"),
        ("certify, bound computed", f"{row['certify_cold_s']:.3f}", f"{row['cold_ratio']:.2f}"),
        ("certify, bound cached", f"{row['certify_warm_s']:.3f}", f"{row['warm_ratio']:.2f}"),
    ]
    print(format_table(header, table))
    print(f"{row['points']} test points ({row['norm']}), median of 3 rounds, {checkpoint}")
