"""``lipcert export CKPT [--onnx OUT]``: plain torch.nn model (and ONNX) with equal outputs."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("export", help="plain torch.nn model (and ONNX) from a checkpoint")
    p.add_argument("checkpoint", help="a lipcert .safetensors checkpoint")
    p.add_argument("--onnx", help="write ONNX here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from lipcert.checkpoint import load_with_metadata
    from lipcert.cli.common import random_inputs
    from lipcert.export import NOT_EXPORTED, export
    from lipcert.finite import check_finite

    model, meta = load_with_metadata(args.checkpoint)
    shape = meta["model_spec"].get("kwargs", {}).get("input_shape")
    if shape is None:
        raise ValueError(f"{args.checkpoint} does not record its model's input shape")
    shape = tuple(shape)
    # named as in the file
    parameters = ((f"{args.checkpoint}: tensor model.{k}", p) for k, p in model.named_parameters())
    check_finite(parameters, NOT_EXPORTED)
    plain = export(model, onnx_path=args.onnx, input_shape=shape)
    x = random_inputs(model, shape, 4)  # in the model's dtype (float64, half)
    with torch.no_grad():
        diff = (plain(x) - model(x)).abs().max().item()
    print(plain)
    print(f"max |exported - original| on random inputs: {diff:.2e}")
    if args.onnx:
        print(f"ONNX written to {args.onnx}")
