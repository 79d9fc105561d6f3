"""Reliability under hard kills (issue 8): SIGKILL mid-epoch and mid-checkpoint-write.

A killed run loses at most the epoch in progress, its checkpoint stays readable, and
``--resume`` finishes the run with every epoch recorded once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import write_tiny_config

from lipcert.checkpoint import read_checkpoint, unflatten
from lipcert.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _saved_epoch(path: Path) -> int:
    tensors, meta = read_checkpoint(path)
    return unflatten(meta["state"], tensors)["epoch"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_loses_at_most_one_epoch_and_resumes(tmp_path):
    epochs = 40
    config = write_tiny_config(tmp_path, epochs)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lipcert", "train", str(config), "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_metrics(run)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = _saved_epoch(run / "last.safetensors")  # readable, not half-written
    recorded = len(_metrics(run))
    assert 3 <= done < epochs and recorded in (done - 1, done)
    assert main(["train", str(config), "--run-dir", str(run), "--resume"]) == 0
    assert [row["epoch"] for row in _metrics(run)] == list(range(1, epochs + 1))


KILL_DURING_WRITE = """
import os, signal, sys
import lipcert.checkpoint as ck
from lipcert.models.registry import build_model

model = build_model("sll_mlp", input_shape=[4], num_classes=3, width=8, inner_width=8, depth=1)
ck.write_checkpoint(sys.argv[1], model, state={"epoch": 1})
real_save = ck.save_file

def save_half_then_die(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as handle:
        handle.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

ck.save_file = save_half_then_die
ck.write_checkpoint(sys.argv[1], model, state={"epoch": 2})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_WRITE, str(path)], env=_env(), capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the half-written file should be a temporary one"
    assert _saved_epoch(path) == 1
