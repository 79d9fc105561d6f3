import pytest

from lipcert.config import ConfigError, load_config, parse_config, to_dict


def test_defaults_and_round_trip():
    config = parse_config({"epochs": 3, "optim": {"lr": 1}})
    assert config.epochs == 3 and config.optim.lr == 1.0
    assert parse_config(to_dict(config)) == config


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"epoch": 3}, ["epoch", "allowed keys"]),
        ({"optim": {"learning_rate": 1e-3}}, ["optim.learning_rate"]),
        ({"optim": {"name": "adagrad"}}, ["optim.name", "adam"]),
        ({"epochs": 0}, ["epochs", "> 0"]),
        ({"epochs": "ten"}, ["epochs", "int"]),
        ({"amp": "yes"}, ["amp", "bool"]),
        ({"certify": {"eps": ["a"]}}, ["certify.eps"]),
        ({"certify": {"norm": "l1"}}, ["certify.norm", "l2"]),
        ({"data": {"batch_size": -4}}, ["data.batch_size"]),
        ({"data": 3}, ["[data]"]),
        ({"device": "tpu"}, ["device", "cuda"]),
        ({"optim": {"beta2": 1.0}}, ["optim.beta2", "< 1"]),
        ({"optim": {"eps": 0.0}}, ["optim.eps", "> 0"]),
    ],
)
def test_bad_values_name_the_key(raw, names):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    for name in names:
        assert name in str(err.value)


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        'name = "x"\nepochs = 2\n[model]\nname = "sll_mlp"\n[model.kwargs]\nwidth = 8\n'
    )
    assert load_config(good).model.kwargs == {"width": 8}


def test_overrides_are_toml_values_validated_like_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('epochs = 3\n[model]\nname = "sll_mlp"\nkwargs = { width = 8 }\n')
    config = load_config(
        path, ["epochs=5", "model.kwargs.width=32", "data.dataset=mnist", "certify.eps=[0.1]"]
    )
    assert config.epochs == 5
    assert config.model.kwargs == {"width": 32}
    assert config.data.dataset == "mnist"
    assert config.certify.eps == [0.1]
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        load_config(path, ["epochs=0"])
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr"):
        load_config(path, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(path, ["epochs"])
