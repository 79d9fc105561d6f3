"""Does LinfDistLoss's hinge measure certification? The toy of ``tests/test_linf_training.py``.

Trains the toy net (3 classes in 8 dimensions, width 16, depth 3, theta = 1, 150 full-batch Adam
steps, ``_trained`` there) with the loss unbound (the hinge reads the raw margin m) and bound
(``LinfDistLoss.bind``: behind a linear head the hinge reads m', twice the certified radius), then
reports on 300 fresh points: the share at zero hinge (the trained loss's own hinge), the share
certified at theta / 2 = 0.5 and the median l_inf radius (``lipcert.certify``), with the head as
trained and scaled by 10. Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/linf_head_hinge.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lipcert.certify import certify
from lipcert.losses import LinfDistLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_linf_training import FEATURES, _scale_head, _toy, _trained

THRESHOLD = 1.0


def _row(model: nn.Sequential, head: str, bind: bool, scale: float) -> str:
    x, y = _toy(300, seed=2)
    loss = LinfDistLoss(hinge_threshold=THRESHOLD)
    if bind:
        loss.bind(model, (FEATURES,))
    with torch.no_grad():
        logits = model(x)
        zero = ((THRESHOLD - loss.margins(logits, y)).clamp(0, THRESHOLD) == 0).float().mean()
    radii = certify(model, x, y, norm="linf").clamp_min(0)
    certified = (radii >= THRESHOLD / 2).float().mean()
    return (
        f"{head:6s}  {'bound' if bind else 'raw':5s}  x{scale:<3g}  {zero:9.3f}  "
        f"{certified:13.3f}  {radii.median():12.3f}"
    )


def main() -> None:
    print("head    hinge  head  hinge = 0  certified@0.5  median radius")
    for head in ("linear", "negate"):
        for bind in (False, True):
            model = _trained(head, bind=bind)
            for scale in (1.0, 10.0) if head == "linear" else (1.0,):
                _scale_head(model, scale)
                print(_row(model, head, bind, scale))
                _scale_head(model, 1 / scale)


if __name__ == "__main__":
    main()
