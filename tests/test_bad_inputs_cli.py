"""Bad inputs of the CLI and the data loading (fourth review): point clouds, exports, plots,
dataset files. Each gives one clear error naming the problem and leaves no half-written file.

CLI cases exit with status 2 and print exactly one ``lipcert: error: ...`` line (no traceback),
as in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys
import tarfile

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lipcert
from lipcert.cli import export as cli_export
from lipcert.cli import main
from lipcert.data import load_dataset
from lipcert.data.download import SOURCES, _extract, fetch
from lipcert.data.idx import IDX_IMAGES_MAGIC, read_idx
from lipcert.models.registry import build_model
from lipcert.ot import as_point_cloud


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run):
    """A trained digits run, checkpoints with a NaN / an inf weight, and broken point clouds."""
    root = tmp_path_factory.mktemp("bad_cli")
    (root / "run").symlink_to(tiny_run / "run")
    ckpt = root / "run" / "last.safetensors"
    _write_with_value(ckpt, root / "nan.safetensors", "model.1.bias", float("nan"))
    _write_with_value(ckpt, root / "inf.safetensors", "model.1.bias", float("inf"))
    rng = np.random.default_rng(0)
    np.save(root / "a2.npy", rng.normal(size=(20, 2)))
    np.save(root / "a3.npy", rng.normal(size=(20, 3)))
    (root / "empty.npy").write_bytes(b"")
    np.save(root / "scalar.npy", np.array(3.0))
    np.save(root / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(root / "objects.npy", np.array([[1.0, None]], dtype=object), allow_pickle=True)
    nan = rng.normal(size=(20, 2))
    nan[3, 1] = np.nan
    np.save(root / "nan.npy", nan)
    np.savez(root / "archive.npz", a=np.zeros((3, 2)))
    (root / "folder.npy").mkdir()
    (root / "plots").mkdir()
    (root / "a_file").write_text("not a folder")
    cfg = json.loads((root / "run" / "config.json").read_text())
    cfg["data"]["dataset"] = "mnist"
    mnist_model = build_model("sll_mlp", input_shape=[1, 28, 28], num_classes=10, width=8)
    lipcert.save(mnist_model, root / "mnist.safetensors", config=cfg)
    return root


def _write_with_value(source, target, key: str, value: float) -> None:
    """A copy of a checkpoint whose tensor ``key`` has ``value`` as its first entry."""
    tensors = load_file(source)
    with safe_open(source, "pt") as handle:
        meta = handle.metadata()
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, target, metadata=meta)


def _run_cli(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 with one ``lipcert: error:`` line, and return that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("lipcert: error: ") and "\n" not in err, err
    return err


CLI_CASES = [
    ("w1: empty .npy", ["w1", "{root}/empty.npy", "{root}/a2.npy"], "empty.npy is empty"),
    ("w1: scalar .npy", ["w1", "{root}/scalar.npy", "{root}/a2.npy"], "single number"),
    ("w1: strings", ["w1", "{root}/strings.npy", "{root}/a2.npy"], "real numbers"),
    ("w1: objects", ["w1", "{root}/objects.npy", "{root}/a2.npy"], "objects.npy is not a .npy"),
    ("w1: NaN", ["w1", "{root}/a2.npy", "{root}/nan.npy"], "nan.npy contains NaN"),
    ("w1: dimensions", ["w1", "{root}/a2.npy", "{root}/a3.npy"], "a3.npy (20, 3): the two"),
    ("w1: .npz", ["w1", "{root}/archive.npz", "{root}/a2.npy"], ".npz archive"),
    ("w1: folder", ["w1", "{root}/folder.npy", "{root}/a2.npy"], "is a directory"),
    ("export: NaN weight", ["export", "{root}/nan.safetensors"], "tensor model.1.bias holds NaN"),
    ("export: inf weight", ["export", "{root}/inf.safetensors"], "tensor model.1.bias holds NaN"),
    ("export: ONNX under a file",
     ["export", "{root}/run/last.safetensors", "--onnx", "{root}/a_file/m.onnx"],
     "a_file is a file, not a folder"),
    ("lipschitz: negative samples",
     ["lipschitz", "{root}/run/last.safetensors", "--samples", "-2"], "--samples"),
    ("lipschitz: zero samples",
     ["lipschitz", "{root}/run/last.safetensors", "--samples", "0"], "--samples"),
    ("certify: --plot a folder",
     ["certify", "{root}/run/last.safetensors", "--plot", "{root}/plots"], "--plot"),
    ("certify: --plot of an unknown type",
     ["certify", "{root}/run/last.safetensors", "--plot", "{root}/curve.foo"], "curve.foo"),
    ("explain: --out a folder",
     ["explain", "{root}/run/last.safetensors", "--out", "{root}/plots"], "--out"),
    ("certify: dataset files missing",
     ["certify", "{root}/mnist.safetensors", "--data-dir", "{root}/nodata"], "--data-dir"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(files, capsys, name, argv, pattern):
    err = _run_cli([a.format(root=files) for a in argv] + _fast(argv), capsys)
    assert pattern.lower() in err.lower(), err
    assert ".tmp" not in err, err  # the user's path is named, not a temporary file
    assert not list(files.glob("**/*.tmp")) and not (files / "plots.png").exists()


def _fast(argv: list[str]) -> list[str]:
    return ["--steps", "1"] if argv[0] == "w1" else []


def test_scalar_point_cloud_is_named_as_such():
    with pytest.raises(ValueError, match="single number"):
        as_point_cloud("x", np.array(3.0))
    with pytest.raises(ValueError, match="single number"):
        as_point_cloud("x", torch.tensor(3.0))


# --- export -----------------------------------------------------------------------------------


def _model():
    return build_model("sll_mlp", input_shape=[4], num_classes=3, width=8, inner_width=8, depth=1)


def test_export_refuses_nan_weights_by_name(tmp_path):
    model = _model()
    with torch.no_grad():
        model[-1].bias[1] = float("nan")
    name = next(k for k, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
    with pytest.raises(ValueError, match=f"parameter {name} holds NaN"):
        lipcert.export(model, onnx_path=tmp_path / "m.onnx", input_shape=(4,))
    assert list(tmp_path.iterdir()) == []


def test_export_names_layer_and_shapes_of_a_wrong_input_shape(tmp_path):
    with pytest.raises(ValueError) as info:
        lipcert.export(_model(), onnx_path=tmp_path / "m.onnx", input_shape=(7,))
    message = str(info.value)
    assert "input_shape (7,)" in message and "(Linear)" in message and "4" in message, message
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_creates_a_missing_folder(files, capsys):
    """As plots and checkpoints do: the folder is created (it named the temp file before)."""
    target = files / "new" / "sub" / "m.onnx"
    assert main(["export", str(files / "run" / "last.safetensors"), "--onnx", str(target)]) == 0
    assert target.is_file() and [p.name for p in target.parent.iterdir()] == ["m.onnx"]


# --- plots ------------------------------------------------------------------------------------


def test_plot_is_written_atomically(files, capsys, monkeypatch):
    """A write that fails half-way leaves the previous plot whole and no temporary file."""
    plot = files / "curve.png"
    args = ["certify", str(files / "run" / "last.safetensors"), "--plot", str(plot)]
    assert main(args) == 0
    before = plot.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    err = _run_cli(args, capsys)
    assert "No space left" in err and str(plot) in err and ".tmp" not in err, err
    assert plot.read_bytes() == before
    assert sorted(p.name for p in files.glob("*curve*")) == ["curve.png"]


# --- dataset files ----------------------------------------------------------------------------


def test_missing_dataset_is_one_line(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    for part in ("mnist", str(tmp_path / "mnist"), "--data-dir", "download('mnist'"):
        assert part in message, message


def test_idx_header_with_huge_sizes(tmp_path):
    """2^31 * 2^31 * 4 wraps to 0 in int64: the empty payload must not pass as its size (the
    2^64 bytes are now refused before any inflating: more than a gzip file can hold)."""
    path = tmp_path / "huge-idx3-ubyte.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(struct.pack(">I3I", IDX_IMAGES_MAGIC, 2**31, 2**31, 4))
    with pytest.raises(ValueError, match=r"huge-idx3-ubyte\.gz: the header declares") as info:
        read_idx(path, IDX_IMAGES_MAGIC)
    assert str(2**64) in str(info.value) and "can hold" in str(info.value)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_archive_is_named(tmp_path, damage):
    member = SOURCES["cifar10"].extract[0]
    good = _tar_gz({member: np.random.default_rng(0).bytes(300_000)})
    raw = b"garbage " * 64 if damage == "garbage" else good[: len(good) // 2]
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(raw)
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz: not a readable tar") as info:
        _extract(archive, [member], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_failed_download_is_one_line(tmp_path):
    missing = [(tmp_path / name).as_uri() for name in ("gone1", "gone2")]
    with pytest.raises(OSError) as info:
        fetch(missing, tmp_path / "file", "0" * 32)
    assert "\n" not in str(info.value) and "gone2" in str(info.value)


def test_output_piped_into_head_stops_quietly(monkeypatch, capsys):
    """`lipcert ... | head`: the reader goes away; exit 141 without an error line."""

    def run(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_export, "run", run)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the handler's devnull
    assert main(["export", "any.safetensors"]) == 141
    assert "error" not in capsys.readouterr().err
