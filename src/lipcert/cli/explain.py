"""``lipcert explain CKPT [--baseline CKPT]``: counterfactuals along the gradient, as a PNG.

Image data: a grid of inputs, gradient maps and counterfactuals, the baseline's beside. 2-D data
(two moons): the level sets of f, its decision boundary, certified radii and counterfactuals.
Prints, per model, the label-flip rate and the tightness (flip distance / certified radius).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Test points explained by default (the rates and medians are over these).
DEFAULT_LIMIT = 500
#: Rows of the image grid by default.
DEFAULT_ROWS = 8


def register(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="counterfactuals along the gradient (PNG) with flip rate and certificate tightness",
    )
    p.add_argument("checkpoint", help="a 1-Lipschitz (e.g. hKR) lipcert checkpoint")
    p.add_argument("--baseline", help="a checkpoint of any model trained on the same data")
    p.add_argument("--out", help="PNG path (default beside the checkpoint)")
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"test points explained (default {DEFAULT_LIMIT})",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=DEFAULT_ROWS,
        help=f"rows of the image grid (default {DEFAULT_ROWS})",
    )
    p.add_argument("--data-dir", help="dataset folder (default: the config's, then search)")
    p.set_defaults(run=run)


def _same_task(config, baseline_config) -> bool:
    return (config.data.dataset, config.data.classes) == (
        baseline_config.data.dataset,
        baseline_config.data.classes,
    )


def _load_models(args: argparse.Namespace):
    """[(label, model, logit bound)] and the dataset; the first model must be 1-Lipschitz."""
    from lipcert.cli.common import load_run
    from lipcert.ot import check_one_lipschitz, logit_lipschitz_bound

    model, config, data = load_run(args.checkpoint, args.data_dir)
    bound = check_one_lipschitz(model, f"{args.checkpoint} (explain needs e.g. an hKR net)")
    label = Path(args.checkpoint).parent.name or "model"
    models = [(label, model, bound)]
    if args.baseline:
        baseline, baseline_config, _ = load_run(args.baseline, args.data_dir)
        if not _same_task(config, baseline_config):
            raise ValueError(f"{args.baseline} was trained on other data than {args.checkpoint}")
        try:
            baseline_bound = logit_lipschitz_bound(baseline)
        except ValueError:
            baseline_bound = float("nan")  # no sound bound: no certified radius either
        baseline_label = Path(args.baseline).parent.name
        if baseline_label in ("", label):
            baseline_label = f"{label} (baseline)"
        models.append((baseline_label, baseline, baseline_bound))
    return models, data


def _summary_row(label: str, bound: float, result, labels) -> tuple[str, ...]:
    flipped = result.flipped
    return (
        label,
        f"{bound:.4g}",
        f"{(result.classes == labels).float().mean():.2%}",
        f"{result.flip_rate():.2%}",
        f"{result.median_tightness():.3f}",
        f"{result.distances[flipped].median():.4f}" if flipped.any() else "-",
        f"{result.radii.nanmedian():.4f}",
    )


def run(args: argparse.Namespace) -> None:
    from lipcert.explain import counterfactuals, plot_counterfactual_grid, plot_decision_2d
    from lipcert.report import figure_path, format_table

    if args.limit < 1 or args.rows < 1:
        raise ValueError(f"--limit and --rows must be >= 1, got {args.limit} and {args.rows}")
    ckpt = Path(args.checkpoint)
    out = figure_path(args.out or ckpt.with_name(f"{ckpt.stem}.explain.png"), "--out")
    models, data = _load_models(args)
    x, y = data.test.x[: args.limit], data.test.y[: args.limit]
    results = {label: counterfactuals(model, x) for label, model, _ in models}
    rows = [_summary_row(label, bound, results[label], y) for label, _, bound in models]
    header = ("model", "logit Lip.", "accuracy", "flip rate", "median tightness", "median dist.")
    print(format_table((*header, "median radius"), rows))
    if data.input_shape != (2,):
        plot_counterfactual_grid(results, out, args.rows, data.class_names)
        print(f"{len(x)} test points explained; figure written to {out}")
        return
    for i, (label, model, _) in enumerate(models):  # 2-D data: one plane figure a model
        path = out if i == 0 else out.with_name(f"{out.stem}.baseline{out.suffix}")
        plot_decision_2d(model, x, y, results[label], path, title=label)
        print(f"{len(x)} test points explained; {label}: figure written to {path}")
