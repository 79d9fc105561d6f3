"""Benchmarks (``lipcert bench ...``): ratios measured in one run against a plain network."""

from __future__ import annotations


def run_bench(what: str, as_json: bool = False) -> None:
    """Run the benchmark ``what`` and print its table (or JSON)."""
    if what == "layers":
        from lipcert.bench.layers import main

        main(as_json=as_json)
    elif what == "linf":
        from lipcert.bench.linf import main as linf_main

        linf_main(as_json=as_json)
    else:
        raise ValueError(f"unknown benchmark {what!r}; choose 'layers' or 'linf'")
