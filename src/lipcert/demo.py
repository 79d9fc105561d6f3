"""``lipcert demo``: train a certified SLL net on scikit-learn digits, certify, table and plot.

Uses the same path as ``lipcert train`` (config -> train -> checkpoint -> certify), on data that
ships inside scikit-learn, so it runs anywhere in under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lipcert.certify import certified_accuracy, certify_batched
from lipcert.checkpoint import load
from lipcert.config import parse_config
from lipcert.data import load_dataset
from lipcert.report import accuracy_table, plot_certified_curve
from lipcert.train import CHECKPOINT_NAME, CONFIG_NAME, train

#: The demo's run: digits are 8x8 images in [0, 1], so l2 radii are small compared with MNIST's.
DEMO_CONFIG = {
    "name": "demo",
    "seed": 0,
    "epochs": 40,
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "sll_mlp", "kwargs": {"width": 128, "inner_width": 256, "depth": 3}},
    "loss": {"name": "multiclass_hkr", "kwargs": {"alpha": 50.0, "margin": 0.5}},
    "optim": {"name": "adam", "lr": 0.005, "schedule": "cosine", "warmup_epochs": 1.0},
    "certify": {"norm": "l2", "eps": [0.1, 0.25, 0.5]},
}


def _check_no_other_run(out_dir: Path) -> None:
    """Refuse an ``out_dir`` whose checkpoint is not a previous demo's: the demo replaces it."""
    if not (out_dir / CHECKPOINT_NAME).exists():
        return
    try:
        name = json.loads((out_dir / CONFIG_NAME).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    if name != DEMO_CONFIG["name"]:
        held = f"run {name!r}" if name else "a checkpoint without a demo config"
        raise ValueError(
            f"{out_dir} holds {held}; the demo would replace its checkpoint: choose another --out"
        )


def run_demo(out_dir: Path, epochs: int | None = None) -> dict[float, float]:
    """Train, certify and report; returns {eps: accuracy} (eps 0 = clean)."""
    started = time.perf_counter()
    raw = dict(DEMO_CONFIG, epochs=DEMO_CONFIG["epochs"] if epochs is None else epochs)
    config = parse_config(raw)
    _check_no_other_run(out_dir)
    (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # a previous demo's: train afresh
    data = load_dataset("digits")
    train(config, out_dir, data=data)
    model = load(out_dir / CHECKPOINT_NAME)
    radii = certify_batched(model, data.test.x, data.test.y, config.certify.norm)
    accuracy = certified_accuracy(radii, [0.0, *config.certify.eps])
    print(accuracy_table(accuracy, config.certify.norm))
    plot = plot_certified_curve(radii, out_dir / "certified_accuracy.png", "l2", "digits demo")
    print(
        f"checkpoint {out_dir / CHECKPOINT_NAME}, metrics {out_dir / 'metrics.jsonl'}, "
        f"plot {plot}; {time.perf_counter() - started:.1f} s"
    )
    return accuracy
