"""Every public name imports (style.md item 12) and the fixed names of design.md §3 exist."""

import importlib

import pytest

import lipcert

FIXED_LAYERS = [
    "SpectralLinear",
    "SpectralConv2d",
    "OrthoLinear",
    "AOLLinear",
    "AOLConv2d",
    "SLLLinear",
    "SLLConv2d",
    "GroupSort",
    "MaxMin",
    "L2NormPool2d",
    "ScaledAvgPool2d",
    "InvertibleDownsample",
    "LinfDist",
]
FIXED_TOP_LEVEL = [
    "certify",
    "export",
    "lipschitz_upper_bound",
    "lipschitz_lower_bound",
    "save",
    "load",
]


@pytest.mark.parametrize("module", ["lipcert", "lipcert.nn", "lipcert.losses", "lipcert.data"])
def test_all_names_import(module):
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_fixed_public_names():
    for name in FIXED_LAYERS:
        assert name in lipcert.nn.__all__, name
    for name in FIXED_TOP_LEVEL:
        assert callable(getattr(lipcert, name)), name
    assert callable(lipcert.losses.MulticlassHKRLoss)


def test_cli_help_for_every_command(capsys):
    from lipcert.cli import COMMANDS, build_parser

    parser = build_parser()
    for command in COMMANDS:
        name = command.__name__.rsplit(".", 1)[-1]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: lipcert" in capsys.readouterr().out
