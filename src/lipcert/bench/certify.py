"""``lipcert bench certify CKPT`` (design.md §6; issue 6): what certifying a test set costs.

Times, on the checkpoint's test split in batches of ``eval_batch_size``: one eval pass (model
forward, no grad), ``certify_batched`` on a cold cache (the sound bound computed once, then one
forward per batch) and on a warm cache (bound reused). The target: certification of the test set
<= 1.1x one eval pass, the bound computed once.

The cold pass: ``repeats`` runs, each after clearing the bound cache and the constrained weights
that the model caches in eval mode (Björck, AOL, ...), each paired with an eval pass that computes
those weights too (after :func:`~lipcert.nn.constraint.clear_caches`): a first certification after
training against a first evaluation. The two passes of a pair run one after the other, their order
alternating from pair to pair, and the cold ratio is the median of the per-pair ratios (a slow
phase of the machine then slows both passes of a pair), with their quartiles. The warm pass and
the eval pass: ``pairs`` rounds of both, their order alternating from round to round (whichever
runs second finds the caches the first one left), after one untimed run of each; the ratio is that
of the medians, with the quartiles of the per-round ratios as the spread the machine's noise gives
it. ``--device cuda`` runs it all on the GPU, each timed pass
ending with a device synchronization.
"""

from __future__ import annotations

import json
import statistics

import torch

from lipcert.bench.timing import seconds
from lipcert.certify import certified_accuracy, certify_batched, clear_summary_cache
from lipcert.cli.common import load_run
from lipcert.modes import eval_mode
from lipcert.nn.constraint import clear_caches
from lipcert.report import format_table


def _eval_pass(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])


def _quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles, interpolated between the measured values ("inclusive"): the
    default "exclusive" method extrapolates beyond them, and two ratios of 0.5 and 5 gave a first
    quartile below 0."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def measure(
    checkpoint: str,
    repeats: int = 7,
    pairs: int = 9,
    data_dir: str | None = None,
    device: str = "cpu",
) -> dict:
    model, config, data = load_run(checkpoint, data_dir, device)
    x, y = data.test.x.to(device), data.test.y.to(device)
    norm, batch = config.certify.norm, config.data.eval_batch_size
    first_passes = {
        "eval": lambda: _eval_pass(model, x, batch),
        "certify": lambda: certify_batched(model, x, y, norm, batch),
    }
    first = {name: [] for name in first_passes}
    for pair_index in range(repeats):
        order = list(first_passes) if pair_index % 2 == 0 else list(reversed(first_passes))
        for name in order:
            clear_caches(model)
            clear_summary_cache(model)
            first[name].append(seconds(first_passes[name], x.device))
    cold, eval_cold = first["certify"], first["eval"]
    cold_ratios = [c / e for c, e in zip(cold, eval_cold, strict=True)]
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
            times[name].append(seconds(passes[name], x.device))
    plain, warm = statistics.median(times["plain"]), statistics.median(times["warm"])
    cold_s, eval_cold_s = statistics.median(cold), statistics.median(eval_cold)
    ratios = [w / p for w, p in zip(times["warm"], times["plain"], strict=True)]
    radii = certify_batched(model, x, y, norm, batch)
    return {
        "checkpoint": checkpoint,
        "device": str(x.device),
        "points": len(y),
        "norm": norm,
        "rounds": pairs,
        "cold_pairs": repeats,
        "eval_s": plain,
        "eval_cold_s": eval_cold_s,
        "certify_cold_s": cold_s,
        "certify_warm_s": warm,
        "cold_ratio": cold_s / plain,
        "cold_ratio_to_cold_eval": statistics.median(cold_ratios),
        "cold_ratio_quartiles": _quartiles(cold_ratios),
        "warm_ratio": warm / plain,
        "warm_ratio_quartiles": _quartiles(ratios),
        "accuracy": certified_accuracy(radii, [0.0, *config.certify.eps]),
    }


def main(checkpoint: str, as_json: bool = False, device: str = "cpu") -> None:
    row = measure(checkpoint, device=device)
    if as_json:
        print(json.dumps(row, indent=2))
        return
    header = ("pass", "seconds", "x eval", "x eval, weights computed")
    table = [
        ("eval (forward only)", f"{row['eval_s']:.3f}", "1.00", "-"),
        (
            "eval, constrained weights computed",
            f"{row['eval_cold_s']:.3f}",
            f"{row['eval_cold_s'] / row['eval_s']:.2f}",
            "1.00",
        ),
        (
            "certify, bound computed",
            f"{row['certify_cold_s']:.3f}",
            f"{row['cold_ratio']:.2f}",
            f"{row['cold_ratio_to_cold_eval']:.2f}",
        ),
        ("certify, bound cached", f"{row['certify_warm_s']:.3f}", f"{row['warm_ratio']:.2f}", "-"),
    ]
    print(format_table(header, table))
    q1, q3 = row["warm_ratio_quartiles"]
    c1, c3 = row["cold_ratio_quartiles"]
    print(
        f"{row['points']} test points ({row['norm']}), {checkpoint}, {row['device']}; "
        f"bound cached: median of {row['rounds']} alternating rounds, "
        f"per-round ratio quartiles {q1:.2f}-{q3:.2f}; bound computed: median of "
        f"{row['cold_pairs']} pairs with a first eval, per-pair ratio quartiles {c1:.2f}-{c3:.2f}"
    )
