"""keep_freed_memory: glibc's malloc keeps freed memory, so reallocating it faults no pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lipcert.allocator import ENV_SWITCH, _mallopt

#: Allocates and frees a 64 MiB tensor (twice, to let glibc settle), then prints the page faults
#: of three more rounds; with ``keep`` it calls keep_freed_memory first and prints its result.
PROBE = """
import resource, sys, torch
from lipcert.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def round_trip():
    torch.ones(2**24).sum()  # 64 MiB written, then freed
round_trip(); round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_trip()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(_mallopt() is None, reason="needs glibc's mallopt (Linux)")


def _faults(mode: str, **env: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    kept, faults = result.stdout.split()
    return kept, int(faults)


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    _, default_faults = _faults("default")
    kept, kept_faults = _faults("keep")
    assert kept == "True"
    assert default_faults > 3 * 16384 // 2  # 64 MiB = 16,384 pages, unmapped at every free
    assert kept_faults < 200


@glibc_only
def test_the_environment_switch_turns_it_off():
    kept, faults = _faults("keep", **{ENV_SWITCH: "0"})
    assert kept == "False"
    assert faults > 3 * 16384 // 2
