"""A tiny digits training config for tests that need a real run (CLI, resume, benchmarks)."""

from __future__ import annotations

from pathlib import Path

#: SLL MLP on scikit-learn digits: a second or so an epoch on one core.
TINY_CONFIG = """
name = "tiny"
epochs = {epochs}
[data]
dataset = "digits"
batch_size = 32
[model]
name = "sll_mlp"
kwargs = {{ width = 16, inner_width = 16, depth = 1 }}
[loss]
name = "multiclass_hkr"
kwargs = {{ alpha = 10.0, margin = 0.2 }}
[certify]
eps = [0.1]
"""


def write_tiny_config(folder: Path, epochs: int = 1) -> Path:
    """Write the tiny config into ``folder``; returns its path."""
    path = folder / "tiny.toml"
    path.write_text(TINY_CONFIG.format(epochs=epochs))
    return path
