import json

import pytest
import torch
from torch import nn

from lipcert.checkpoint import (
    CheckpointError,
    flatten,
    load,
    read_checkpoint,
    save,
    unflatten,
    write_checkpoint,
)
from lipcert.models import build_model, register_model


@register_model
def _tiny_test_net(input_shape, num_classes, width: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def _model(width=6):
    torch.manual_seed(0)
    return build_model("_tiny_test_net", input_shape=[4], num_classes=3, width=width)


def test_flatten_round_trip_keeps_types():
    state = {"a": (1, 2.5), 3: [None, "s", torch.arange(3)], "t": {"betas": (0.9, 0.99)}}
    tensors = {}
    back = unflatten(json.loads(json.dumps(flatten(state, tensors))), tensors)
    assert back["a"] == (1, 2.5) and back["t"]["betas"] == (0.9, 0.99)
    assert 3 in back and torch.equal(back[3][2], torch.arange(3))


def test_save_load_same_outputs(tmp_path):
    model = _model()
    save(model, tmp_path / "m.safetensors", config={"k": 1})
    loaded = load(tmp_path / "m.safetensors")
    x = torch.randn(5, 4)
    assert torch.equal(model(x), loaded(x))
    assert read_checkpoint(tmp_path / "m.safetensors")[1]["config"] == {"k": 1}


def test_optimizer_state_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    write_checkpoint(tmp_path / "c.safetensors", model, state={"optimizer": opt.state_dict()})
    tensors, meta = read_checkpoint(tmp_path / "c.safetensors")
    restored = unflatten(meta["state"], tensors)["optimizer"]
    opt2 = torch.optim.Adam(_model().parameters(), lr=0.1)
    opt2.load_state_dict(restored)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["exp_avg"], v["exp_avg"])


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.safetensors")
    path = tmp_path / "m.safetensors"
    save(_model(), path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x80\x04 not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load(tmp_path / "garbage.safetensors")


def test_pickle_is_never_loaded(tmp_path):
    """A torch.save (pickle) file is refused without unpickling it."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.safetensors")
    with pytest.raises(CheckpointError):
        load(tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_other_architecture_is_refused(tmp_path):
    save(_model(width=6), tmp_path / "a.safetensors")
    tensors, _ = read_checkpoint(tmp_path / "a.safetensors")
    from lipcert.checkpoint import load_into

    with pytest.raises(CheckpointError, match="does not fit"):
        load_into(_model(width=7), tensors, tmp_path / "a.safetensors")


def test_save_needs_a_registered_model(tmp_path):
    with pytest.raises(ValueError, match="build_model"):
        save(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save(_model(), path)
    before = path.read_bytes()
    import lipcert.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save(_model(width=6), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_load_run_reads_model_and_config_from_one_version_of_the_file(tmp_path, monkeypatch):
    """A training run replaces last.safetensors atomically while `lipcert certify` loads it: the
    model and the run config must come from the same version (two reads once paired a model
    with the config of the next checkpoint)."""
    import lipcert.checkpoint as checkpoint_module
    from lipcert.cli.common import load_run
    from lipcert.config import parse_config, to_dict
    from lipcert.models import build_model

    def config(width: int) -> dict:
        model = {"name": "sll_mlp", "kwargs": {"width": width}}
        return to_dict(parse_config({"name": f"w{width}", "data": {"dataset": "digits"},
                                     "model": model}))  # fmt: skip

    path, newer = tmp_path / "last.safetensors", tmp_path / "newer.safetensors"

    def model(width: int) -> torch.nn.Module:
        return build_model("sll_mlp", input_shape=[64], num_classes=10, width=width)

    save(model(8), path, config(8))
    save(model(12), newer, config(12))
    read = checkpoint_module.read_checkpoint

    def read_then_replace(*args):
        result = read(*args)
        if newer.exists():
            newer.replace(path)  # the training run's next save lands in between
        return result

    monkeypatch.setattr(checkpoint_module, "read_checkpoint", read_then_replace)
    loaded, run_config, _ = load_run(str(path), None)
    assert run_config.name == "w8"
    shapes = {k: v.shape for k, v in loaded.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model(8).state_dict().items()}
