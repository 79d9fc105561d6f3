"""``lipcert bench certify CKPT`` (design.md §6; issue 6): what certifying a test set costs.

Times, on the checkpoint's test split in batches of ``eval_batch_size``: one eval pass (model
forward, no grad), ``certify_batched`` on a cold cache (the sound bound computed once, then one
forward per batch) and on a warm cache (bound reused). The target: certification of the test set
<= 1.1x one eval pass, the bound computed once. The cold pass: median of ``repeats`` runs, each
after clearing the cache. The warm pass and the eval pass: ``pairs`` rounds of both, their order
alternating from round to round (whichever runs second finds the caches the first one left), after
one untimed run of each; the ratio is that of the medians, with the quartiles of the per-round
ratios as the spread the machine's noise gives it.
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


def _quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, q3


def measure(checkpoint: str, repeats: int = 3, pairs: int = 9, data_dir: str | None = None) -> dict:
    model, config, data = load_run(checkpoint, data_dir)
    x, y, norm, batch = data.test.x, data.test.y, config.certify.norm, config.data.eval_batch_size
    cold = []
    for _ in range(repeats):
        clear_summary_cache(model)
        cold.append(_seconds(lambda: certify_batched(model, x, y, norm, batch)))
    passes = {
        "plain": lambda: _eval_pass(model, x, batch),
        "warm": lambda: certify_batched(model, x, y, norm, batch),
    }
    times = {name: [] for name in passes}
    for fn in passes.values():
        fn()
    for round_index in range(pairs):
        order = list(passes) if round_index % 2 == 0 else list(reversed(passes))
        for name in order:
            times[name].append(_seconds(passes[name]))
    plain, warm = statistics.median(times["plain"]), statistics.median(times["warm"])
    cold_s = statistics.median(cold)
    ratios = [w / p for w, p in zip(times["warm"], times["plain"], strict=True)]
    radii = certify_batched(model, x, y, norm, batch)
    return {
        "checkpoint": checkpoint,
        "points": len(y),
        "norm": norm,
        "rounds": pairs,
        "eval_s": plain,
        "certify_cold_s": cold_s,
        "certify_warm_s": warm,
        "cold_ratio": cold_s / plain,
        "warm_ratio": warm / plain,
        "warm_ratio_quartiles": _quartiles(ratios),
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
    q1, q3 = row["warm_ratio_quartiles"]
    print(
        f"{row['points']} test points ({row['norm']}), {checkpoint}; bound cached: median of "
        f"{row['rounds']} alternating rounds, per-round ratio quartiles {q1:.2f}-{q3:.2f}"
    )
