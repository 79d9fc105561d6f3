"""Catalogue of bad inputs (issue 8): each gives one clear error naming the problem.

API cases raise a specific exception whose message matches; CLI cases exit with status 2 and
print exactly one ``lipcert: error: ...`` line (no traceback).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import write_tiny_config
from torch import nn

import lipcert
import lipcert.nn as lnn
from lipcert import losses
from lipcert.checkpoint import CheckpointError
from lipcert.cli import main
from lipcert.config import ConfigError, load_config
from lipcert.data import load_dataset
from lipcert.data.cifar import read_cifar_binary
from lipcert.models.registry import build_model
from lipcert.nn.linf import LinfDist
from lipcert.ot import wasserstein1


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run):
    """A trained digits checkpoint, its config, and a few broken files."""
    root = tmp_path_factory.mktemp("bad")
    config = write_tiny_config(root)
    (root / "run").symlink_to(tiny_run / "run")
    ckpt = root / "run" / "last.safetensors"
    (root / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:1000])
    torch.save({"weight": torch.ones(2)}, root / "pickle.safetensors")
    np.save(root / "a2.npy", np.random.default_rng(0).normal(size=(20, 2)))
    np.save(root / "a3.npy", np.random.default_rng(0).normal(size=(20, 3)))
    nan = np.zeros((20, 2))
    nan[3, 1] = np.nan
    np.save(root / "nan.npy", nan)
    (root / "bad.toml").write_text("epochs = [\n")
    (root / "badvalue.toml").write_text(config.read_text() + "[optim]\nlr = -1.0\n")
    _write_edited_spec(ckpt, root / "huge.safetensors", width=10**9)
    lipcert.save(_mlp(), root / "noconfig.safetensors")
    return root


def _write_edited_spec(source, target, **kwargs) -> None:
    """A copy of a checkpoint whose model spec asks for other kwargs (a tampered file)."""
    tensors = load_file(source)
    with safe_open(source, "pt") as handle:
        meta = handle.metadata()
    spec = json.loads(meta["model_spec"])
    spec["kwargs"].update(kwargs)
    save_file(tensors, target, metadata=dict(meta, model_spec=json.dumps(spec)))


def _mlp() -> nn.Module:
    return build_model("sll_mlp", input_shape=[4], num_classes=3, width=8, inner_width=8, depth=1)


X4, Y3 = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])

API_CASES = [
    ("certify: NaN input", lambda: lipcert.certify(_mlp(), X4.clone().fill_(math.nan), Y3), "NaN"),
    ("certify: label count", lambda: lipcert.certify(_mlp(), X4, Y3[:3]), "y must have shape"),
    ("certify: float labels", lambda: lipcert.certify(_mlp(), X4, Y3.float()), "int"),
    ("certify: unknown norm", lambda: lipcert.certify(_mlp(), X4, Y3, norm="l3"), "l3"),
    (
        "certify: lipschitz < 0",
        lambda: lipcert.certify(_mlp(), X4, Y3, lipschitz=-1.0),
        "lipschitz",
    ),
    (
        "certify: input shape",
        lambda: lipcert.certify(_mlp(), torch.rand(5, 7), Y3),
        "expects input",
    ),
    ("certify: label range", lambda: lipcert.certify(_mlp(), X4, Y3 + 5), "labels"),
    (
        "certify: empty batch",
        lambda: lipcert.certify(_mlp(), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        "empty",
    ),
    ("certify: int input", lambda: lipcert.certify(_mlp(), X4.long(), Y3), "float"),
    ("LinfDist: p < 1", lambda: LinfDist(4, 3, p=0.5), "p"),
    ("LinfDist: features", lambda: LinfDist(4, 3)(torch.rand(2, 5)), "expects input"),
    ("AOLLinear: features", lambda: lnn.AOLLinear(4, 3)(torch.rand(2, 5)), "4"),
    ("SLLConv2d: 2-D input", lambda: lnn.SLLConv2d(3, 6)(torch.rand(2, 3)), "expects input"),
    ("GroupSort: odd width", lambda: lnn.GroupSort(2)(torch.rand(2, 3)), "3"),
    (
        "hKR: target range",
        lambda: losses.MulticlassHKRLoss(1.0)(torch.rand(4, 3), torch.tensor([0, 1, 2, 3])),
        "range",
    ),
    (
        "hKR: 1-D logits",
        lambda: losses.MulticlassHKRLoss(1.0)(torch.rand(4), torch.tensor([0, 1, 2, 0])),
        "logits",
    ),
    ("hKR: alpha < 0", lambda: losses.MulticlassHKRLoss(-1.0), "alpha"),
    ("tau CE: tau = 0", lambda: losses.TauCrossEntropyLoss(0.0), "tau"),
    ("load: missing file", lambda: lipcert.load("/nonexistent/x.safetensors"), "not found"),
    ("config: missing file", lambda: load_config("/nonexistent/x.toml"), "not found"),
    (
        "W1: empty cloud",
        lambda: wasserstein1(torch.zeros(0, 2), torch.rand(5, 2), steps=1),
        "empty",
    ),
    (
        "W1: dimensions",
        lambda: wasserstein1(torch.rand(5, 2), torch.rand(5, 3), steps=1),
        "dimension",
    ),
    (
        "W1: NaN",
        lambda: wasserstein1(torch.rand(5, 2).fill_(math.nan), torch.rand(5, 2), steps=1),
        "NaN",
    ),
    ("bound: input shape", lambda: lipcert.lipschitz_upper_bound(_mlp(), (7,)), "7"),
    ("certify: a string as model", lambda: lipcert.certify("model", X4, Y3), "nn.Module"),
    ("certify: NumPy input", lambda: lipcert.certify(_mlp(), X4.numpy(), Y3), "numpy.ndarray"),
    ("export: None as model", lambda: lipcert.export(None), "nn.Module"),
    ("bound: a string as model", lambda: lipcert.lipschitz_upper_bound("m", (4,)), "nn.Module"),
    (
        "certified accuracy: negative eps",
        lambda: lipcert.certified_accuracy(torch.ones(3), [-1.0]),
        "eps",
    ),
    ("dataset: unknown", lambda: load_dataset("imagenet"), "imagenet"),
    (
        "model: unknown",
        lambda: build_model("resnet9000", input_shape=[4], num_classes=3),
        "resnet9000",
    ),
]


@pytest.mark.parametrize("name, call, pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_has_a_clear_error(name, call, pattern):
    with pytest.raises((ValueError, TypeError, FileNotFoundError, CheckpointError)) as info:
        call()
    assert pattern.lower() in str(info.value).lower(), str(info.value)


def test_api_bad_files_have_clear_errors(files, tmp_path):
    with pytest.raises(CheckpointError):
        lipcert.load(files / "truncated.safetensors")
    with pytest.raises(CheckpointError):
        lipcert.load(files / "pickle.safetensors")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(files / "bad.toml")
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        load_config(tmp_path / "latin1.toml")
    with pytest.raises(FileNotFoundError, match="mnist"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x01" * 100)
    with pytest.raises(ValueError, match="3073"):
        read_cifar_binary(tmp_path / "data_batch_1.bin")


CLI_CASES = [
    ("certify: missing checkpoint", ["certify", "{root}/nope.safetensors"], "not found"),
    ("certify: truncated checkpoint", ["certify", "{root}/truncated.safetensors"], "checkpoint"),
    ("certify: pickle file", ["certify", "{root}/pickle.safetensors"], "checkpoint"),
    ("certify: NaN eps", ["certify", "{root}/run/last.safetensors", "--eps", "nan"], "eps"),
    ("certify: negative eps", ["certify", "{root}/run/last.safetensors", "--eps", "-1"], "eps"),
    ("attack: NaN eps", ["attack", "{root}/run/last.safetensors", "--eps", "nan"], "eps"),
    ("attack: zero steps", ["attack", "{root}/run/last.safetensors", "--steps", "0"], "steps"),
    (
        "certify: other norm, no eps",
        ["certify", "{root}/run/last.safetensors", "--norm", "linf"],
        "--eps",
    ),
    ("train: missing config", ["train", "{root}/nope.toml"], "not found"),
    ("train: invalid TOML", ["train", "{root}/bad.toml"], "TOML"),
    ("train: bad value", ["train", "{root}/badvalue.toml", "--run-dir", "{root}/r1"], "lr"),
    ("train: bad override", ["train", "{root}/tiny.toml", "--set", "epochs"], "section.key=value"),
    ("train: unknown override", ["train", "{root}/tiny.toml", "--set", "model.nme=x"], "model.nme"),
    ("train: existing run", ["train", "{root}/tiny.toml", "--run-dir", "{root}/run"], "--resume"),
    ("w1: dimensions", ["w1", "{root}/a2.npy", "{root}/a3.npy", "--steps", "1"], "dimension"),
    ("w1: NaN", ["w1", "{root}/nan.npy", "{root}/a2.npy", "--steps", "1"], "NaN"),
    ("w1: missing file", ["w1", "{root}/none.npy", "{root}/a2.npy"], "none.npy"),
    ("export: missing checkpoint", ["export", "{root}/nope.safetensors"], "not found"),
    ("export: ONNX path a folder", ["export", "{root}/run/last.safetensors", "--onnx", "{root}"],
     "directory"),
    ("certify: edited model spec", ["certify", "{root}/huge.safetensors"], "edited"),
    ("certify: no run config", ["certify", "{root}/noconfig.safetensors"], "no run config"),
    ("demo: --out holds another run", ["demo", "--out", "{root}/run"], "another --out"),
    ("lipschitz: negative size",
     ["lipschitz", "{root}/run/last.safetensors", "--input-shape", "-1"], "input-shape"),
    ("train: infinite lr",
     ["train", "{root}/tiny.toml", "--run-dir", "{root}/r2", "--set", "optim.lr=inf"], "finite"),
    ("train: model kwargs typo",
     ["train", "{root}/tiny.toml", "--run-dir", "{root}/r3", "--set", "model.kwargs.widht=3"],
     "model.kwargs"),
    ("train: negative certify eps",
     ["train", "{root}/tiny.toml", "--run-dir", "{root}/r4", "--set", "certify.eps=[-1]"],
     "certify.eps"),
    ("train: resume with another optimizer",
     ["train", "{root}/tiny.toml", "--run-dir", "{root}/run", "--resume", "--set",
      'optim.name="sgd"'], "another optimizer"),
]  # fmt: skip
if not torch.cuda.is_available():
    CLI_CASES.append(
        ("attack: no GPU", ["attack", "{root}/run/last.safetensors", "--device", "cuda"], "cuda")
    )


@pytest.mark.parametrize("name, argv, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(files, capsys, name, argv, pattern):
    code = main([a.format(root=files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lipcert: error: ") and "\n" not in err, err
    assert pattern.lower() in err.lower(), err
