"""``lipcert certify`` and ``lipcert attack`` on a real (tiny) run: tables, device choice."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import write_tiny_config

from lipcert.cli import main

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = write_tiny_config(root, epochs=6)  # 69% clean, 35% certified at 0.1 (of 450)
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return str(root / "run" / "last.safetensors")


@pytest.mark.parametrize("device", DEVICES)
def test_certify_prints_the_table_and_json(checkpoint, capsys, device):
    assert main(["certify", checkpoint, "--eps", "0.05", "0.1", "--json", "--device", device]) == 0
    out = capsys.readouterr().out
    numbers = json.loads(out.strip().splitlines()[-1])
    assert numbers["norm"] == "l2"
    accuracies = list(numbers["accuracy"].values())
    assert len(accuracies) == 3 and accuracies == sorted(accuracies, reverse=True)
    assert f"({device})" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_certify_agrees_across_devices(checkpoint, capsys):
    results = []
    for device in DEVICES:
        assert main(["certify", checkpoint, "--eps", "0.1", "--json", "--device", device]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"])
    # float32 sums in another order may move a point lying right at eps: one point of ~360 at most
    for key, value in results[0].items():
        assert abs(results[1][key] - value) <= 0.003, (key, results)


@pytest.mark.parametrize("device", DEVICES)
def test_attack_breaks_no_certified_point(checkpoint, capsys, device):
    argv = ["attack", checkpoint, "--eps", "0.1", "--steps", "10", "--restarts", "1"]
    assert main([*argv, "--limit", "50", "--device", device]) == 0
    certified = re.search(r"certified points broken: 0 of (\d+)", capsys.readouterr().out)
    assert certified and int(certified[1]) >= 10


def test_attack_tightness_prints_the_distribution_and_breaks_nothing(checkpoint, capsys):
    argv = ["attack", checkpoint, "--eps", "0.1", "--steps", "10", "--restarts", "1"]
    assert main([*argv, "--limit", "40", "--tightness"]) == 0
    line = re.search(
        r"tightness \(l2.*?over (\d+) of (\d+).*?: 0% ([\d.]+).*?broken: 0 of",
        capsys.readouterr().out,
    )
    assert line and int(line[2]) >= 10 and int(line[1]) >= 1 and float(line[3]) >= 1


def test_eps_default_to_the_runs_config(checkpoint, capsys):
    assert main(["certify", checkpoint, "--json"]) == 0  # the tiny config certifies at 0.1
    assert list(json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"]) == ["0.0", "0.1"]


def test_audit_script_totals_the_attacks(checkpoint):
    """``make audit`` (benchmarks/audit.sh): every matching checkpoint attacked, one total."""
    script = Path(__file__).parents[1] / "benchmarks" / "audit.sh"
    lipcert = f"{sys.executable} -m lipcert"
    env = {**os.environ, "RUNS": checkpoint, "LIMIT": "30", "LIPCERT": lipcert}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    total = re.search(r"audit: 0 broken of (\d+) certified points", done.stdout)
    assert total and int(total[1]) >= 10, done.stdout
    env["RUNS"] = str(Path(checkpoint).parent / "nothing*.safetensors")
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "no checkpoint matches" in missing.stderr
