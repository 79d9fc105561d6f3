"""Red-team review of lipcert's I/O and training plumbing (twentieth session): full disks while a
checkpoint or a run file is written, weights that turn NaN in an epoch's last step, tampered
training state on resume, run names that leave ``runs/``, augmentations of non-image data, empty
and NaN datasets, and a malicious pickle in place of a CIFAR-10 batch. Each bad input gives one
clear error naming the problem, and nothing saved is lost.

CLI cases exit with status 2 and print exactly one ``lipcert: error: ...`` line (no traceback),
as in ``test_bad_inputs.py``.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import resource
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lipcert.checkpoint as checkpoint_module
import lipcert.train as train_module
from lipcert.checkpoint import CheckpointError, flatten, read_checkpoint, unflatten
from lipcert.cli import main
from lipcert.config import parse_config
from lipcert.data import Dataset, Split, load_dataset, read_cifar_binary
from lipcert.data.cifar import CIFAR_FOLDER, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES
from lipcert.data.idx import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from lipcert.train import CHECKPOINT_NAME, CONFIG_NAME, TrainingDiverged, train

#: Steps an epoch of the toy run: 48 training points in batches of 16.
TOY_STEPS = 3


def _toy_data(features: tuple[int, ...] = (1, 4, 4)) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *features, generator=gen)
    y = (x.reshape(64, -1)[:, 0] > 0).long()
    return Dataset("toy", Split(x[:48], y[:48]), Split(x[48:], y[48:]), ("a", "b"))


def _toy_config(**overrides):
    raw = {
        "epochs": 4,
        "eval_every": 2,
        "data": {"batch_size": 16},
        "model": {"name": "sll_mlp", "kwargs": {"width": 8, "inner_width": 8, "depth": 1}},
        "loss": {"name": "multiclass_hkr", "kwargs": {"alpha": 10.0}},
        "certify": {"eps": [0.1]},
    }
    return parse_config(raw | overrides)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """One epoch of the toy config (of 4), to resume."""
    folder = tmp_path_factory.mktemp("toy") / "run"
    train(_toy_config(), folder, data=_toy_data(), stop_after_epochs=1)
    return folder


@pytest.fixture
def toy_copy(toy_run, tmp_path) -> Path:
    return Path(shutil.copytree(toy_run, tmp_path / "run"))


@pytest.fixture
def tiny_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared tiny digits run (conftest), with its config beside it."""
    shutil.copy(tiny_run / "tiny.toml", tmp_path / "tiny.toml")
    return Path(shutil.copytree(tiny_run / "run", tmp_path / "run"))


def _error(capsys, argv: list) -> str:
    """The one error line of a CLI call that must fail with status 2."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lipcert: error: ") and "\n" not in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (RLIMIT_FSIZE)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# --- F1: a write that fails (full disk) names the file; the old checkpoint stays whole --------


def test_full_disk_while_saving_a_checkpoint_names_it_and_keeps_the_old_one(
    tiny_copy, capsys, monkeypatch
):
    """safetensors raised its own SafetensorError ("Error while serializing: I/O error: File too
    large"), which the CLI printed as a traceback without naming the checkpoint."""
    real_save = checkpoint_module.save_file

    def save_on_a_full_disk(tensors, filename, metadata=None):
        with _file_size_limit(4096):  # the tiny checkpoint is ~23 kB
            real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", save_on_a_full_disk)
    ckpt = tiny_copy / CHECKPOINT_NAME
    before = ckpt.read_bytes()
    argv = ["train", tiny_copy.parent / "tiny.toml", "--run-dir", tiny_copy, "--resume"]
    err = _error(capsys, [*argv, "--set", "epochs=2"])
    assert f"cannot write checkpoint {ckpt}" in err and "File too large" in err, err
    assert ckpt.read_bytes() == before
    assert not list(tiny_copy.glob(".*.tmp"))


def test_full_disk_while_writing_run_files_names_the_file(tiny_copy, capsys, monkeypatch):
    """The error was "[Errno 28] No space left on device", naming no file."""

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    before = _snapshot(tiny_copy)
    argv = ["train", tiny_copy.parent / "tiny.toml", "--run-dir", tiny_copy, "--resume"]
    err = _error(capsys, [*argv, "--set", "epochs=2"])
    assert str(tiny_copy / CONFIG_NAME) in err and "No space left" in err, err
    assert _snapshot(tiny_copy) == before


# --- F2: weights that turn non-finite in an epoch's last step never replace a good checkpoint --


def _poison_first_epoch_end(monkeypatch) -> None:
    """Make the optimizer step that ends the first epoch a call trains leave a NaN weight, as an
    overflowing gradient would."""
    real = train_module.make_optimizer

    def poisoned(cfg, params):
        optimizer = real(cfg, params)
        steps = [0]

        def hook(opt, args, kwargs):
            steps[0] += 1
            if steps[0] == TOY_STEPS:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(hook)
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", poisoned)


def test_nan_weights_after_an_unevaluated_epoch_keep_the_good_checkpoint(toy_copy, monkeypatch):
    """eval_every = 2: epoch 3 is not evaluated, and its NaN weights were saved over epoch 2's
    checkpoint; epoch 4 then stopped saying "the last good checkpoint is kept"."""
    config = _toy_config()
    train(config, toy_copy, data=_toy_data(), resume=True, stop_after_epochs=1)  # epoch 2
    good = _snapshot(toy_copy)
    _poison_first_epoch_end(monkeypatch)  # epoch 3's last step
    with pytest.raises(TrainingDiverged, match=r"parameter .* non-finite .*epoch 3") as info:
        train(config, toy_copy, data=_toy_data(), resume=True)
    assert "last good checkpoint is kept" in str(info.value)
    assert _snapshot(toy_copy)[CHECKPOINT_NAME] == good[CHECKPOINT_NAME]
    tensors, meta = read_checkpoint(toy_copy / CHECKPOINT_NAME)
    assert unflatten(meta["state"], tensors)["epoch"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


# --- F3: tampered training state is refused on resume, naming what does not fit --------------


def _edit_state(path: Path, edit: Callable[[dict, dict], None]) -> None:
    """Rewrite ``path`` with its training state and weights passed through
    ``edit(state, weights)``, which changes them in place (a tampered file)."""
    tensors, meta = read_checkpoint(path)
    state = unflatten(meta["state"], tensors)
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    edit(state, weights)
    with safe_open(path, "pt") as handle:
        raw = handle.metadata()
    skeleton = flatten(state, weights)  # the state's tensors join the weights
    save_file(weights, path, metadata=dict(raw, state=json.dumps(skeleton)))


def _set(*keys, value):
    """An edit setting ``state[keys[0]][keys[1]]...`` to ``value``."""

    def edit(state, weights):
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return edit


def _nan_weight(state, weights):
    weights["model.1.bias"] = torch.full_like(weights["model.1.bias"], float("nan"))


TAMPERED_STATE = [
    ("epoch a float", _set("epoch", value=0.5), "epoch"),
    ("epoch negative", _set("epoch", value=-3), "epoch"),
    ("history a string", _set("history", value="abc"), "history"),
    ("history missing rows", _set("history", value=[]), "history"),
    (
        "Adam moment shape",
        _set("optimizer", "state", 0, "exp_avg", value=torch.zeros(3)),
        "exp_avg",
    ),
    ("Adam step shape", _set("optimizer", "state", 0, "step", value=torch.ones(2)), "step"),
    ("learning rate a string", _set("optimizer", "param_groups", 0, "lr", value="fast"), "lr"),
    ("schedule position a string", _set("scheduler", "last_epoch", value="x"), "last_epoch"),
    ("schedule base_lrs emptied", _set("scheduler", "base_lrs", value=[]), "base_lrs"),
    ("schedule key injected", _set("scheduler", "optimizer", value=None), "optimizer"),
    ("NaN weight", _nan_weight, "model.1.bias"),
]


@pytest.mark.parametrize("name, edit, named", TAMPERED_STATE, ids=[c[0] for c in TAMPERED_STATE])
def test_tampered_training_state_is_refused_on_resume(toy_copy, name, edit, named):
    """Each failed steps later with a TypeError, RuntimeError or AttributeError (a traceback on
    the CLI), a misleading divergence message, or (a negative epoch) trained epochs -3..4."""
    ckpt = toy_copy / CHECKPOINT_NAME
    _edit_state(ckpt, edit)
    before = _snapshot(toy_copy)
    with pytest.raises(CheckpointError, match=str(ckpt)) as info:
        train(_toy_config(), toy_copy, data=_toy_data(), resume=True)
    assert named in str(info.value), str(info.value)
    assert _snapshot(toy_copy) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


#: Resumes refused by a check: (name, damage to the checkpoint, config overrides, error part).
#: Each asks for another config.json (epochs) than the run's, which a write would save.
REFUSED_RESUMES = [
    ("checkpoint missing", Path.unlink, {"epochs": 6}, "not found"),
    ("checkpoint truncated", _truncate, {"epochs": 6}, "not a readable"),
    ("fewer epochs than trained", Path.exists, {"epochs": 1}, "more than epochs = 1"),
    ("seed changed", Path.exists, {"epochs": 6, "seed": 7}, "seed: 0 in the checkpoint"),
]


@pytest.mark.parametrize(
    "name, damage, overrides, named", REFUSED_RESUMES, ids=[c[0] for c in REFUSED_RESUMES]
)
def test_a_refused_resume_leaves_config_json_as_it_was(toy_copy, name, damage, overrides, named):
    """config.json is written only after every resume check passed: a refused resume leaves it
    (and every other run file) byte for byte."""
    train(_toy_config(), toy_copy, data=_toy_data(), resume=True, stop_after_epochs=1)  # 2 of 4
    damage(toy_copy / CHECKPOINT_NAME)
    before = _snapshot(toy_copy)
    with pytest.raises(CheckpointError, match=named):
        train(_toy_config(**overrides), toy_copy, data=_toy_data(), resume=True)
    assert _snapshot(toy_copy) == before


def test_untampered_resume_still_runs(toy_copy):
    _, history = train(_toy_config(), toy_copy, data=_toy_data(), resume=True)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]


def _other_torch_version(state, weights):
    """The state as another torch version saves it: an optimizer setting it did not know yet,
    a scheduler entry only it saves, one it does not."""
    del state["optimizer"]["param_groups"][0]["decoupled_weight_decay"]
    state["scheduler"]["verbose"] = False
    del state["scheduler"]["_is_initial"]


def test_resume_takes_the_state_another_torch_version_saved(toy_copy):
    """The form check compared the stored settings key for key with a fresh optimizer's:
    a checkpoint without a setting a newer torch added (and fills with its default) was refused."""
    _edit_state(toy_copy / CHECKPOINT_NAME, _other_torch_version)
    _, history = train(_toy_config(), toy_copy, data=_toy_data(), resume=True)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]


# --- F4: the run name makes one folder under runs/ ---------------------------------------------


@pytest.mark.parametrize("name", ["", "..", "../elsewhere", "{tmp}/elsewhere", "a/b"])
def test_run_name_that_leaves_runs_is_refused(tiny_copy, capsys, monkeypatch, name):
    """``name = "/some/folder"`` wrote config.json, metrics.jsonl and a checkpoint there (over a
    config.json already there), ``name = ""`` into runs/ itself."""
    name = name.format(tmp=tiny_copy.parent)  # an absolute path
    monkeypatch.chdir(tiny_copy.parent)
    err = _error(capsys, ["train", "tiny.toml", "--set", f"name={json.dumps(name)}"])
    assert f"name = {name!r}" in err and "--run-dir" in err, err
    assert sorted(p.name for p in tiny_copy.parent.iterdir()) == ["run", "tiny.toml"]


def test_plain_run_name_makes_its_folder_under_runs(tiny_copy, capsys, monkeypatch):
    monkeypatch.chdir(tiny_copy.parent)
    assert main(["train", "tiny.toml", "--set", 'name="tiny-2.v1"']) == 0
    assert (tiny_copy.parent / "runs" / "tiny-2.v1" / CHECKPOINT_NAME).is_file()


# --- F5: augmentations of non-image inputs are refused by config key, before any file ----------


@pytest.mark.parametrize("key", ["crop_padding", "flip"])
def test_augmentation_of_feature_vectors_names_the_key_before_any_file(tmp_path, key):
    """random_crop / random_flip failed inside the first epoch, after config.json and
    metrics.jsonl were written, naming the function rather than the config key."""
    value = 2 if key == "crop_padding" else True
    config = _toy_config(data={"batch_size": 16, key: value})
    with pytest.raises(ValueError, match=rf"data\.{key} = {value!r}.*images.*\(16,\)"):
        train(config, tmp_path / "run", data=_toy_data(features=(16,)))
    assert not (tmp_path / "run").exists()


def test_crop_padding_as_large_as_the_image_is_refused_before_any_file(tmp_path):
    """data.crop_padding = 10^6 on the 8x8 digits tried to allocate 512 TB in the first epoch
    (a RuntimeError traceback, config.json and metrics.jsonl already written); a padding of
    the image's size or more lets a crop miss the image entirely (an all-zero input)."""
    config = _toy_config(data={"batch_size": 16, "crop_padding": 4})
    with pytest.raises(ValueError, match=r"data\.crop_padding = 4 .*below 4"):
        train(config, tmp_path / "run", data=_toy_data())  # 4x4 images
    assert not (tmp_path / "run").exists()
    config = _toy_config(epochs=1, data={"batch_size": 16, "crop_padding": 3})
    assert train(config, tmp_path / "run", data=_toy_data())[1]


def test_run_dir_that_is_a_file_is_named_before_any_work(tiny_copy, capsys):
    """The error was "[Errno 17] File exists", after loading the data and building the model."""
    target = tiny_copy.parent / "tiny.toml"
    err = _error(capsys, ["train", target, "--run-dir", target])
    assert f"{target} is a file, not a folder" in err, err


# --- F6: empty dataset files are refused by name -----------------------------------------------


def test_empty_cifar_batch_is_refused(tmp_path):
    """A 0-byte batch (an aborted copy) read as 0 images; training then failed in the loss."""
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_1\.bin.*no records"):
        read_cifar_binary(tmp_path / "data_batch_1.bin")


def test_idx_files_without_images_are_refused(tmp_path):
    """IDX files declaring 0 images loaded as an empty MNIST; training then failed in the loss
    ("multiclass_hkr_loss: empty batch")."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in IDX_FILES:
        images = "images" in name
        header = struct.pack(">I3I", IDX_IMAGES_MAGIC, 0, 28, 28) if images else b""
        header = header or struct.pack(">II", IDX_LABELS_MAGIC, 0)
        (folder / name).write_bytes(gzip.compress(header))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz holds no images"):
        load_dataset("mnist", data_dir=tmp_path)


# --- F7: NaN inputs are named where the data is made ------------------------------------------


def test_nan_inputs_are_refused_by_the_split():
    """A NaN input passed; training then stopped with "the logits became non-finite ... lower
    the learning rate", blaming the optimizer for the data."""
    x = torch.rand(8, 1, 4, 4)
    x[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Split\.x holds NaN or inf values \(1 of 128"):
        Split(x, torch.zeros(8, dtype=torch.long))


# --- held: a CIFAR-10 batch that is a malicious pickle is never unpickled ---------------------


class _Marker:
    """Unpickling it creates the file ``path`` (the harm a malicious pickle would do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_malicious_pickle_as_cifar_batch_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({b"data": _Marker(marker), b"labels": [0]})
    payload += b"." * (-len(payload) % 3073)  # a whole number of records
    folder = tmp_path / "cifar10" / CIFAR_FOLDER
    folder.mkdir(parents=True)
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        (folder / name).write_bytes(payload)
    with pytest.raises(ValueError, match=r"data_batch_1\.bin: label byte 128"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: loading it does create the file
    assert marker.exists()
    os.remove(marker)
