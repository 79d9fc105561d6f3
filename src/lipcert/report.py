"""Tables and plots of certification results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lipcert.outputs import check_output_file, output_file


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
    return save_figure(fig, path)


def figure_path(path: str | Path, what: str = "the plot path") -> Path:
    """Where :func:`save_figure` writes ``path``: checked (not a folder, its folders not files:
    :func:`lipcert.outputs.check_output_file`; an image type matplotlib writes), with ``.png``
    added when it has no suffix."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = check_output_file(path, what)
    path = path if path.suffix else check_output_file(path.with_suffix(".png"), what)
    known = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in known:
        raise ValueError(
            f"{what} {path}: unknown image type {path.suffix} (use one of {', '.join(known)})"
        )
    return path


def save_figure(fig, path: str | Path, what: str = "the plot path") -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` (:func:`figure_path`) atomically, in the
    image type its suffix names, and close it. Returns the path written."""
    import matplotlib.pyplot as plt

    try:
        path = figure_path(path, what)
        with output_file(path, what) as tmp:
            fig.savefig(tmp, format=path.suffix[1:].lower())
    finally:
        plt.close(fig)
    return path
