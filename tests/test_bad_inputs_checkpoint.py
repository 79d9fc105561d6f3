"""Bad inputs of train resume and checkpoint reading: each gives one clear error naming the
problem, and nothing saved is lost.

CLI cases exit with status 2 and print exactly one ``lipcert: error: ...`` line (no traceback),
as in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import write_tiny_config

import lipcert
import lipcert.checkpoint as checkpoint_module
from lipcert.checkpoint import _HOST, CheckpointError, read_checkpoint, temp_path, unflatten
from lipcert.cli import main
from lipcert.config import ConfigError, load_config, parse_config
from lipcert.data import Dataset, Split
from lipcert.models import build_model
from lipcert.train import CHECKPOINT_NAME, CONFIG_NAME, train

#: A pid no process can have (above Linux's largest pid_max, 2^22).
DEAD_PID = 999_999_999


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with the tiny config and a one-epoch run of it in ``run/``."""
    folder = tmp_path_factory.mktemp("ckpt")
    config = write_tiny_config(folder)
    assert main(["train", str(config), "--run-dir", str(folder / "run")]) == 0
    return folder


@pytest.fixture
def run(root, tmp_path) -> Path:
    """A private copy of the one-epoch run (tests may resume or break it)."""
    return Path(shutil.copytree(root / "run", tmp_path / "run"))


def _error(capsys, argv: list[str]) -> str:
    """The one error line of a CLI call that must fail with status 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lipcert: error: ") and "\n" not in err, err
    return err


def _resume(root: Path, run: Path, *sets: str) -> list[str]:
    argv = ["train", root / "tiny.toml", "--run-dir", run, "--resume"]
    return [*argv, *[arg for value in sets for arg in ("--set", value)]]


def _edited(source: Path, target: Path, tensors=None, **metadata: str) -> Path:
    """A copy of a checkpoint with other tensors and/or metadata fields (a tampered file)."""
    stored = load_file(source)
    with safe_open(source, "pt") as handle:
        meta = handle.metadata()
    save_file(stored if tensors is None else tensors, target, metadata=dict(meta, **metadata))
    return target


def _state_tensor_names(path: Path, entry: str) -> list[str]:
    """Names of the stored tensors under ``entry`` ("optimizer", "loss") of the training state."""
    tensors, meta = read_checkpoint(path)
    names = {id(t): name for name, t in tensors.items()}
    found, stack = [], [unflatten(meta["state"], tensors)[entry]]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            found.append(names[id(item)])
        elif isinstance(item, dict):
            stack.extend(item.values())
    return sorted(found)


def _as_int32(path: Path, names) -> dict:
    return {k: v.to(torch.int32) if k in names else v for k, v in load_file(path).items()}


# F1: a resume with other settings than the run's is refused, each differing key named.
CHANGED_SETTINGS = [
    ("optim.lr=0.5", "optim.lr", "0.001", "0.5"),
    ("seed=7", "seed", "0", "7"),
    ("data.batch_size=16", "data.batch_size", "32", "16"),
    ('optim.schedule="constant"', "optim.schedule", "'cosine'", "'constant'"),
    ("loss.kwargs.alpha=5.0", "loss.kwargs.alpha", "10.0", "5.0"),
    ('optim.name="adamw"', "optim.name", "'adam'", "'adamw'"),
    ("certify.eps=[0.2]", "certify.eps", "[0.1]", "[0.2]"),
    ('loss.kwargs.reduction="sum"', "loss.kwargs.reduction", "unset", "'sum'"),
]


@pytest.mark.parametrize(
    "change, key, old, new", CHANGED_SETTINGS, ids=[c[1] for c in CHANGED_SETTINGS]
)
def test_resume_refuses_changed_settings(root, run, capsys, change, key, old, new):
    before = {name: (run / name).read_bytes() for name in (CHECKPOINT_NAME, CONFIG_NAME)}
    err = _error(capsys, _resume(root, run, change, "epochs=2"))
    assert f"{key}: {old} in the checkpoint, {new} now" in err, err
    assert "epochs" not in err.split("only")[0], err  # an allowed change is not listed
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_names_every_changed_key_in_one_message(root, run, capsys):
    err = _error(capsys, _resume(root, run, "optim.lr=0.5", "seed=7", "model.kwargs.width=32"))
    for key in ("optim.lr", "seed", "model.kwargs.width"):
        assert f"{key}:" in err, err


def test_resume_allows_more_epochs_and_evaluation_settings(root, run, capsys):
    sets = ("epochs=2", "eval_every=2", "data.eval_batch_size=100")
    assert main([str(a) for a in _resume(root, run, *sets)] + ["--device", "cpu"]) == 0
    config = json.loads((run / CONFIG_NAME).read_text())
    assert config["epochs"] == 2 and config["eval_every"] == 2 and config["seed"] == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]
    capsys.readouterr()
    err = _error(capsys, _resume(root, run, "epochs=1"))  # 2 epochs are trained
    assert "epochs >= 2" in err, err


# F2, F3: corrupt metadata is named, with the file, not a traceback.
@pytest.mark.parametrize("spec", ['"sll_mlp"', "[1, 2]", '{"name": "sll_mlp", "kwargs": 3}'])
@pytest.mark.parametrize("command", ["certify", "lipschitz", "export"])
def test_model_spec_not_an_object_is_named(root, tmp_path, capsys, spec, command):
    path = _edited(root / "run" / CHECKPOINT_NAME, tmp_path / "spec.safetensors", model_spec=spec)
    err = _error(capsys, [command, path])
    assert str(path) in err and "metadata 'model_spec'" in err, err


@pytest.mark.parametrize(
    "field, text",
    [
        ("config", "[" * 100_000 + "]" * 100_000),  # beyond the JSON decoder's recursion
        ("state", '{"a": ' + "[" * 500 + "]" * 500 + "}"),  # decodes, then too deep to rebuild
        ("model_spec", '{"name": "sll_mlp", "kwargs": {"w": ' + "[" * 500 + "]" * 500 + "}}"),
    ],
)
def test_deeply_nested_metadata_is_corrupt(root, tmp_path, capsys, field, text):
    path = _edited(root / "run" / CHECKPOINT_NAME, tmp_path / "deep.safetensors", **{field: text})
    err = _error(capsys, ["certify", path])
    assert f"corrupt metadata '{field}'" in err and str(path) in err, err


def test_resume_with_deeply_nested_state_is_corrupt(root, run, capsys):
    ckpt = run / CHECKPOINT_NAME
    _edited(ckpt, ckpt, state='{"__dict__": [["epoch", ' + "[" * 900 + "]" * 900 + "]]}")
    err = _error(capsys, _resume(root, run))
    assert "corrupt metadata 'state'" in err, err


# F5: the message says what the path is.
def test_directory_as_checkpoint_says_directory(tmp_path, capsys):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    err = _error(capsys, ["certify", folder])
    assert "is a directory" in err and "not found" not in err, err


def test_unreadable_checkpoint_says_not_readable(root, tmp_path, capsys, monkeypatch):
    path = tmp_path / "locked.safetensors"
    shutil.copy(root / "run" / CHECKPOINT_NAME, path)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: the open that a user would meet, refused
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(checkpoint_module, "open", refusing_open, raising=False)
    err = _error(capsys, ["certify", path])
    assert "not readable" in err and "Permission denied" in err and "No such file" not in err, err


# F7: tensors of another dtype are refused on every load path, not cast.
def test_integer_weights_are_refused_by_load_and_certify(root, tmp_path, capsys):
    source = root / "run" / CHECKPOINT_NAME
    weight = "model.1.bias"
    path = _edited(source, tmp_path / "int.safetensors", tensors=_as_int32(source, {weight}))
    with pytest.raises(CheckpointError, match=r"model\.1\.bias \(stored torch\.int32"):
        lipcert.load(path)
    err = _error(capsys, ["certify", path])
    assert "1.bias" in err and "int32" in err and "float32" in err, err


def test_resume_refuses_integer_weights_and_optimizer_state(root, run, capsys):
    ckpt = run / CHECKPOINT_NAME
    original = ckpt.read_bytes()
    _edited(ckpt, ckpt, tensors=_as_int32(ckpt, {"model.1.bias"}))
    assert "model.1.bias" in _error(capsys, _resume(root, run, "epochs=2"))
    ckpt.write_bytes(original)
    moments = _state_tensor_names(ckpt, "optimizer")
    _edited(ckpt, ckpt, tensors=_as_int32(ckpt, set(moments)))
    err = _error(capsys, _resume(root, run, "epochs=2"))
    assert "optimizer state" in err and "int32" in err, err


def test_resume_refuses_integer_loss_state(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=gen)
    y = (x[:, 0, 0, 0] > 0).long()
    data = Dataset("toy", Split(x[:48], y[:48]), Split(x[48:], y[48:]), ("a", "b"))
    raw = {
        "epochs": 2,
        "data": {"batch_size": 16},
        "model": {"name": "plain_cnn", "kwargs": {"channels": [2], "hidden": 4, "pool": False}},
        "loss": {"name": "lmt", "kwargs": {"eps": 0.1}},
        "certify": {"eps": [0.1]},
    }
    config = parse_config(raw)
    train(config, tmp_path, data=data, stop_after_epochs=1)
    ckpt = tmp_path / CHECKPOINT_NAME
    vectors = _state_tensor_names(ckpt, "loss")  # LMT's power-iteration vectors
    assert vectors
    _edited(ckpt, ckpt, tensors=_as_int32(ckpt, set(vectors)))
    with pytest.raises(CheckpointError, match=r"loss\..*stored torch\.int32"):
        train(config, tmp_path, data=data, resume=True)


def test_load_keeps_a_float64_model(tmp_path):
    model = build_model("sll_mlp", input_shape=[4], num_classes=3, width=8, inner_width=8, depth=1)
    model = model.double()
    lipcert.save(model, tmp_path / "f64.safetensors")
    loaded = lipcert.load(tmp_path / "f64.safetensors")
    own, back = model.state_dict(), loaded.state_dict()
    assert all(back[k].dtype == own[k].dtype and torch.equal(back[k], own[k]) for k in own)


# F12: config errors name the key, the --set argument or the checkpoint.
def test_seed_too_large_for_the_epoch_seeds_is_refused_before_any_file(root, tmp_path, capsys):
    out = tmp_path / "seed"
    err = _error(capsys, ["train", root / "tiny.toml", "--run-dir", out, "--set", f"seed={2**62}"])
    assert "seed must be <" in err, err
    assert not out.exists()


def test_bad_model_kwarg_value_names_the_key(root, tmp_path, capsys):
    argv = ["train", root / "tiny.toml", "--run-dir", tmp_path / "w"]
    err = _error(capsys, [*argv, "--set", "model.kwargs.width=-4"])
    assert "model.kwargs.width = -4" in err, err


def test_invalid_config_in_a_checkpoint_names_the_checkpoint(root, tmp_path, capsys):
    source = root / "run" / CHECKPOINT_NAME
    config = read_checkpoint(source)[1]["config"]
    config["optim"]["lr"] = -1.0
    path = _edited(source, tmp_path / "badconfig.safetensors", config=json.dumps(config))
    err = _error(capsys, ["certify", path])
    assert str(path) in err and "optim.lr" in err, err


@pytest.mark.parametrize("value", ["certify.eps=[0.1,", 'loss.name="ce', "model.kwargs={width=3"])
def test_set_value_with_toml_syntax_error_names_the_argument(root, tmp_path, capsys, value):
    argv = ["train", root / "tiny.toml", "--run-dir", tmp_path / "t", "--set", value]
    err = _error(capsys, argv)
    assert f"--set {value!r}" in err and "TOML" in err, err


# F14: temp files of a killed writer neither break the next save nor stay; renames are synced.
def test_stale_temp_files_are_removed_and_do_not_break_resume(root, run, capsys):
    stale = [temp_path(run / name, DEAD_PID) for name in (CHECKPOINT_NAME, CONFIG_NAME)]
    live = temp_path(run / CHECKPOINT_NAME, os.getppid())  # a writer still running
    elsewhere = run / f".{CHECKPOINT_NAME}.otherhost.{DEAD_PID}.tmp"  # another machine's writer
    odd = [run / f".{CHECKPOINT_NAME}.{_HOST}.{pid}.tmp" for pid in ("9" * 20, "\u00b2")]
    for path in [*stale, live, elsewhere, *odd]:
        path.write_bytes(b"half a file")
    assert main([str(a) for a in _resume(root, run, "epochs=2")]) == 0
    assert not any(path.exists() for path in stale)
    assert live.exists() and elsewhere.exists() and all(path.exists() for path in odd)
    assert lipcert.load(run / CHECKPOINT_NAME) is not None


def test_atomic_save_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    model = build_model("sll_mlp", input_shape=[4], num_classes=3, width=8, inner_width=8, depth=1)
    lipcert.save(model, tmp_path / "m.safetensors")
    assert synced == [False, True]  # the file, then the folder after the rename


def test_checkpoint_gets_the_mode_of_a_new_file(tmp_path):
    """safetensors writes 0600; a checkpoint is readable like the config.json beside it."""
    model = build_model("gnp_mlp", input_shape=(4,), num_classes=3, width=4, depth=1)
    lipcert.save(model, tmp_path / "m.safetensors")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_config_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
