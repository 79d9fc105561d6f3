"""lipcert's Lipschitz certificate against the verifier auto_LiRPA (issue 6), developer-only.

The checkpoint's model is exported to plain ``torch.nn`` (:func:`lipcert.export`) and the first
``--points`` test points are certified in the l2 ball of radius eps (no [0, 1] box, as lipcert):

* lipcert: :func:`lipcert.certify` (sound whole-network bound + one forward); one call gives the
  radius, so its time serves every eps. A point counts at eps when its radius is >= eps.
* auto_LiRPA (Xu et al., NeurIPS 2020): IBP (Gowal et al. 2018), CROWN (Zhang et al. 2018) and
  CROWN-IBP (Zhang et al. 2020) lower bounds of the margins f_y - f_j (j != y) through the
  specification matrix C (rows e_y - e_j); a point is certified when every lower bound is > 0.
  These bounds are computed in float32 without rounding control: sound up to its float rounding.

auto_LiRPA is not a lipcert dependency: PyPI's 0.3 wants torch < 1.13, so it lives in its own venv
(``.venv-lirpa``, set up as docs/bounds.md says) with the run-time shims below.

    OMP_NUM_THREADS=1 .venv-lirpa/bin/python benchmarks/autolirpa_compare.py --points 200 [--json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

import lipcert
from lipcert.cli.common import check_eps, check_positive, load_run
from lipcert.report import format_table

EPS = (0.5, 1.0, 1.58)
METHODS = ("IBP", "CROWN-IBP", "CROWN")
SETUP_HINT = "run with .venv-lirpa/bin/python, see the auto_LiRPA section of docs/bounds.md"


def _node_attribute(node: torch._C.Node, key: str) -> object:
    """``node[key]``: the attribute read through its typed getter (``node.f``, ``node.i``, ...)."""
    return getattr(node, node.kindOf(key))(key)


def _set_opset_version(version: int) -> None:
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    GLOBALS.export_onnx_opset_version = version


def import_auto_lirpa() -> ModuleType:
    """auto_LiRPA 0.3 after two shims for torch 2.x, or SystemExit saying how to get it."""
    # auto_LiRPA 0.3 (2022) targets torch < 1.13, which still had these two ONNX helpers:
    # 1. its graph parser imports torch.onnx.symbolic_helper._set_opset_version (removed in torch 2;
    #    the opset now lives in the TorchScript exporter's GLOBALS);
    import torch.onnx.symbolic_helper as symbolic_helper

    if not hasattr(symbolic_helper, "_set_opset_version"):
        symbolic_helper._set_opset_version = _set_opset_version
    # 2. it reads node attributes as node[name], a __getitem__ that old torch.onnx attached to
    #    torch._C.Node at import time and torch 2 no longer does.
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = _node_attribute
    try:
        # Recorded and dropped: its import compiles helpers with torch.jit.script, which torch
        # 2.13 deprecates (a filter would not do: the import puts simplefilter("once") first).
        with warnings.catch_warnings(record=True):
            import auto_LiRPA
    except ImportError as err:
        raise SystemExit(f"auto_LiRPA is not importable ({err}): {SETUP_HINT}") from None
    return auto_LiRPA


def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """(B, C - 1, C) specification matrix: rows e_y - e_j for every j != y."""
    eye = torch.eye(num_classes)
    others = torch.stack([torch.cat([eye[:k], eye[k + 1 :]]) for k in range(num_classes)])
    return eye[y][:, None, :] - others[y]  # (B, C - 1, C)


def lirpa_certified(
    lirpa: ModuleType, bounded: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, batch: int
) -> tuple[Tensor, float]:
    """Which points ``method`` certifies in the l2 ball of radius ``eps``, and the seconds taken
    (``bounded``: the model as an auto_LiRPA ``BoundedModule``)."""
    num_classes = bounded(x[:1]).shape[1]
    certified, started = [], time.perf_counter()
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        ball = lirpa.PerturbationLpNorm(norm=2, eps=eps)
        lower, _ = bounded.compute_bounds(
            x=(lirpa.BoundedTensor(xb, ball),),
            C=margin_spec(yb, num_classes),
            method=method,
            bound_upper=False,
        )  # (B, C - 1): lower bounds of f_y - f_j
        certified.append((lower > 0).all(dim=1))
    return torch.cat(certified), time.perf_counter() - started


def compare(
    lirpa: ModuleType, model: nn.Module, x: Tensor, y: Tensor, eps: tuple[float, ...], batch: int
) -> list[dict]:
    """One record per (method, eps): certified accuracy, seconds, and agreement with lipcert."""
    bounded = lirpa.BoundedModule(model, x[:batch], device="cpu")
    started = time.perf_counter()
    radii = lipcert.certify(model, x, y, norm="l2")  # bound (computed once) + one forward
    lipcert_seconds = time.perf_counter() - started
    records = []
    for e in eps:
        by_lipcert = (radii > 0) & (radii >= e)
        records.append(_record("lipcert", e, by_lipcert, lipcert_seconds, by_lipcert))
        for method in METHODS:
            with torch.no_grad():
                certified, seconds = lirpa_certified(lirpa, bounded, x, y, e, method, batch)
            records.append(_record(method, e, certified, seconds, by_lipcert))
    return records


def _record(method: str, eps: float, certified: Tensor, seconds: float, by_lipcert: Tensor) -> dict:
    return {
        "method": method,
        "eps": eps,
        "certified_accuracy": float(certified.float().mean()),
        "seconds": seconds,
        "ms_per_point": 1000 * seconds / len(certified),
        "only_lipcert": int((by_lipcert & ~certified).sum()),
        "only_this": int((certified & ~by_lipcert).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/mnist_lmt_e60/last.safetensors")
    parser.add_argument("--data-dir", help="dataset folder (default: the config's, then search)")
    parser.add_argument("--points", type=int, default=200, help="first N test points")
    parser.add_argument("--batch-size", type=int, default=50, help="auto_LiRPA batch")
    parser.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    parser.add_argument("--json", action="store_true", help="also print the records as JSON")
    args = parser.parse_args()
    try:
        check_positive("--points", args.points)
        check_positive("--batch-size", args.batch_size)
        check_eps(args.eps)
    except ValueError as err:
        parser.error(str(err))
    lirpa = import_auto_lirpa()  # fail before the checkpoint loads
    model, _, data = load_run(args.checkpoint, args.data_dir)
    plain = lipcert.export(model)
    x, y = data.test.x[: args.points], data.test.y[: args.points]
    records = compare(lirpa, plain, x, y, tuple(args.eps), args.batch_size)
    header = ("method", "eps", "certified", "ms/point", "only lipcert", "only this")
    rows = [
        (r["method"], f"{r['eps']:g}", f"{100 * r['certified_accuracy']:.1f}%",
         f"{r['ms_per_point']:.2f}", r["only_lipcert"], r["only_this"])
        for r in records
    ]  # fmt: skip
    print(format_table(header, rows))
    with torch.no_grad():
        clean = float((plain(x).argmax(dim=1) == y).float().mean())
    print(
        f"{len(y)} points (clean accuracy {100 * clean:.1f}%), {torch.get_num_threads()} "
        "thread(s); lipcert's time is one certify call (bound + forward) for every eps"
    )
    if args.json:
        print(json.dumps(records))


if __name__ == "__main__":
    main()
