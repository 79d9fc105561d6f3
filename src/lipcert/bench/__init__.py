"""Benchmarks (``lipcert bench ...``): ratios measured in one run against a plain network."""

from __future__ import annotations


def run_bench(
    what: str,
    as_json: bool = False,
    checkpoint: str | None = None,
    device: str | None = None,
    batch: int | None = None,
    kernel_size: int | None = None,
) -> None:
    """Run the benchmark ``what`` on ``device`` and print its table (or JSON); ``certify`` needs a
    ``checkpoint``; ``batch`` and ``kernel_size`` set the batch and convolutions of ``layers``."""
    for option, value in (("--batch", batch), ("--kernel-size", kernel_size)):
        if value is not None and what != "layers":
            raise ValueError(f"{option} applies to bench layers only, not bench {what}")
    if what == "layers":
        from lipcert.bench.layers import main

        main(as_json=as_json, device=device or "cpu", batch=batch, kernel_size=kernel_size)
    elif what == "linf":
        from lipcert.bench.linf import main as linf_main

        linf_main(as_json=as_json, device=device)
    elif what == "certify":
        if checkpoint is None:
            raise ValueError("lipcert bench certify needs a checkpoint: lipcert bench certify CKPT")
        from lipcert.bench.certify import main as certify_main

        certify_main(checkpoint, as_json=as_json, device=device or "cpu")
    else:
        raise ValueError(f"unknown benchmark {what!r}; choose 'layers', 'linf' or 'certify'")
