"""keep_freed_memory: glibc's malloc keeps freed memory, so reallocating it faults no pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lipcert.allocator import ENV_SWITCH, _mallopt

#: Allocates and frees a 64 MiB tensor (twice, to let glibc settle), then prints the page faults
#: of each of five more rounds; with ``keep`` it calls keep_freed_memory first and prints its
#: result.
PROBE = """
import resource, sys, torch
from lipcert.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def round_trip():
    torch.ones(2**24).sum()  # 64 MiB written, then freed
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip(); round_trip()
counts = []
for _ in range(ROUNDS):
    before = faults()
    round_trip()
    counts.append(faults() - before)
print(kept, *counts)
"""
#: Rounds measured; 64 MiB is 16,384 pages.
ROUNDS, PAGES = 5, 16384

glibc_only = pytest.mark.skipif(_mallopt() is None, reason="needs glibc's mallopt (Linux)")


def _faults(mode: str, **env: str) -> tuple[str, list[int]]:
    """Whether keep_freed_memory took, and the page faults of each round."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.replace("ROUNDS", str(ROUNDS)), mode],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    kept, *faults = result.stdout.split()
    return kept, [int(f) for f in faults]


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    """By default glibc unmaps the 64 MiB at every free, and every round faults its pages in
    again; kept, they are reused. (One CI run on a busy machine saw one round of three fault its
    pages in again, cause not found: the median round must not.)"""
    _, default_faults = _faults("default")
    kept, kept_faults = _faults("keep")
    assert kept == "True"
    assert min(default_faults) > PAGES // 2
    assert sorted(kept_faults)[ROUNDS // 2] < 200  # the median round


@glibc_only
def test_the_environment_switch_turns_it_off():
    kept, faults = _faults("keep", **{ENV_SWITCH: "0"})
    assert kept == "False"
    assert min(faults) > PAGES // 2
