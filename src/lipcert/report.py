"""Tables and plots of certification results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (numbers as given, strings left-aligned)."""
    cells = [[str(c) for c in header], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def accuracy_table(accuracies: dict[float, float], norm: str) -> str:
    """Clean (eps = 0) and certified accuracy at each eps."""
    rows = [
        ("clean" if eps == 0 else f"certified ({norm}, eps={eps:g})", f"{100 * acc:.2f}%")
        for eps, acc in accuracies.items()
    ]
    return format_table(("metric", "accuracy"), rows)


def plot_certified_curve(radii: Tensor, path: str | Path, norm: str, title: str = "") -> Path:
    """PNG of certified accuracy as a function of eps (a step curve over the radii)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = radii.detach().double().cpu()
    positive = torch.sort(radii[radii > 0]).values
    eps = torch.cat([torch.zeros(1, dtype=radii.dtype), positive])
    acc = (len(positive) - torch.arange(len(eps)).clamp(max=len(positive)) + 0.0) / len(radii)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.step(eps.numpy(), acc.numpy(), where="post")
    ax.set_xlabel(f"{norm} radius eps")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "certified accuracy vs eps")
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib would write path.png
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
