"""Review 20 of the optimal-transport part: faults found in the W1 lower bound (clouds rounded to
float32 before the bound, float64 rounding of the potential, a head or hooks the per-logit bound
did not see), point clouds numpy stores in other byte orders or as long doubles, counterfactuals
computed in another arithmetic than the model's own, and binary radii of float64 models read
through a float32 Lipschitz bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lipcert.certify import certify, predict, run_model
from lipcert.cli import main
from lipcert.data.normalize import Normalize
from lipcert.explain import counterfactuals
from lipcert.models.hkr import gnp_mlp
from lipcert.ot import (
    as_point_cloud,
    check_one_lipschitz,
    exact_wasserstein1,
    kantorovich_value,
    logit_lipschitz_bound,
    wasserstein1,
)

#: Float64 slack of "the KR value never exceeds the exact W1" (as in test_ot.py).
SOUND_SLACK = 1e-9


def _chain(*scales_and_biases: tuple[float, float]) -> nn.Sequential:
    """A float64 chain of 1 -> 1 linear maps z -> a z + b."""
    layers = [nn.Linear(1, 1).double() for _ in scales_and_biases]
    with torch.no_grad():
        for layer, (scale, bias) in zip(layers, scales_and_biases, strict=True):
            layer.weight.fill_(scale)
            layer.bias.fill_(bias)
    return nn.Sequential(*layers)


# --- the lower bound is about the clouds as given, not their float32 rounding ----------------


def test_kr_value_of_float64_clouds_is_not_taken_on_their_float32_rounding():
    """1e6 and 1e6 + 0.04 are 0.0625 apart in float32: the bound read 0.0625 > W1 = 0.04."""
    x, y = np.array([[1e6 + 0.04]]), np.array([[1e6]])
    identity = _chain((1.0, 0.0))
    value = kantorovich_value(identity, x, y)
    assert value <= 0.04 * (1 + SOUND_SLACK)
    assert value == pytest.approx(0.04, rel=1e-4)  # less the float64 allowance, 5e-7


def test_w1_of_integer_clouds_never_exceeds_their_exact_w1():
    """16777217 rounds to 16777216 in float32: the estimate was 1.998 for an exact W1 of 1."""
    x, y = np.array([[16777217]]), np.array([[16777218]])
    assert wasserstein1(x, y, steps=20).distance <= 1 + SOUND_SLACK
    with pytest.raises(ValueError, match="2\\^53"):
        kantorovich_value(_chain((1.0, 0.0)), np.array([[2**53 + 1]]), np.array([[0]]))


def test_exact_w1_is_of_the_clouds_as_given():
    pytest.importorskip("ot")
    assert exact_wasserstein1(np.array([[16777217]]), np.array([[16777218]])) == 1.0


def test_cli_w1_bound_holds_for_float64_clouds(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.array([[1e6 + 0.04], [1e6 + 0.04]]))
    np.save(tmp_path / "b.npy", np.array([[1e6], [1e6]]))
    assert main(["w1", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--steps", "20"]) == 0
    estimate = float(capsys.readouterr().out.split("W1 estimate: ")[1].split()[0])
    assert estimate <= 0.04 * (1 + 1e-5)  # printed with 6 digits


# --- the bound allows for the float64 rounding of the potential -------------------------------


def test_kr_value_allows_for_the_float64_rounding_of_the_potential():
    """f(z) = (z + 2^53) - 2^53 is exactly z, 1-Lipschitz; float64 rounds 2^53 + 3 to 2^53 + 4,
    so the computed f(3) - f(2) was 2 and the "lower bound" 2 > W1 = 1."""
    potential = _chain((1.0, 2.0**53), (1.0, -(2.0**53)))
    assert logit_lipschitz_bound(potential) <= 1 + 1e-12
    assert kantorovich_value(potential, np.array([[3.0]]), np.array([[2.0]])) <= 1 + SOUND_SLACK


# --- the per-logit bound sees what the head and the chain compute -----------------------------


class _TenfoldLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(input)


def _tenfold_potentials() -> list[nn.Module]:
    """f(z) = 10 z three ways the head shortcut read as 1-Lipschitz."""
    head = _chain((1.0, 0.0), (1.0, 0.0))
    head.register_forward_hook(lambda module, args, out: 10 * out)
    last = _chain((1.0, 0.0), (1.0, 0.0))
    last[1].register_forward_hook(lambda module, args, out: 10 * out)
    overridden = _chain((1.0, 0.0))
    overridden.append(_TenfoldLinear(1, 1).double())
    with torch.no_grad():
        overridden[1].weight.fill_(1.0)
        overridden[1].bias.zero_()
    return [head, last, overridden]


@pytest.mark.parametrize("index", range(3))
def test_logit_bound_sees_hooks_and_overridden_heads(index):
    """The bound was 1 for each, and the KR value of two points 1 apart was 10."""
    potential = _tenfold_potentials()[index]
    x, y = np.array([[1.0]]), np.array([[0.0]])
    assert float(potential(torch.ones(1, 1, dtype=torch.float64))) == 10.0
    try:
        bound = logit_lipschitz_bound(potential)
    except ValueError as err:
        assert "cannot bound" in str(err)
    else:
        assert bound >= 10.0
        assert kantorovich_value(potential, x, y) <= 1 + SOUND_SLACK
    with pytest.raises(ValueError):
        check_one_lipschitz(potential, "the potential")


# --- point clouds as numpy stores them --------------------------------------------------------


def test_big_endian_clouds_are_read():
    """A '>f8' array (np.save of one keeps its byte order) raised torch's byte-order error."""
    native = np.array([[0.0, 1.0], [2.0, 3.0]])
    cloud = as_point_cloud("x", native.astype(">f8"))
    assert torch.equal(cloud, torch.tensor(native, dtype=torch.float32))


def test_long_double_clouds_get_a_one_line_error(tmp_path, capsys):
    """A long-double array raised torch's TypeError (a traceback from the CLI)."""
    with pytest.raises(ValueError, match=r"x .*float64"):
        as_point_cloud("x", np.zeros((2, 2), dtype=np.longdouble))
    np.save(tmp_path / "a.npy", np.zeros((2, 2), dtype=np.longdouble))
    np.save(tmp_path / "b.npy", np.ones((2, 2)))
    assert main(["w1", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--steps", "1"]) == 2
    assert "a.npy" in capsys.readouterr().err


# --- counterfactuals --------------------------------------------------------------------------


def test_counterfactuals_flip_in_the_models_own_arithmetic():
    """Under CPU autocast (bfloat16) 94 of 200 claimed flips did not flip the float32 model."""
    torch.manual_seed(0)
    model = gnp_mlp([2], 2, width=16, depth=2, binary=True).eval()
    x = torch.randn(200, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = counterfactuals(model, x)
    assert bool(result.flipped.all())
    assert torch.equal(predict(run_model(model, result.points)), result.new_classes)


class _FlatLogit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[:, 0]  # (B,), not (B, 1)


def test_counterfactuals_name_bad_model_outputs_and_inputs():
    """An IndexError ('tuple index out of range') and torch's matmul error before."""
    with pytest.raises(ValueError, match=r"\(B, C\) logits"):
        counterfactuals(_FlatLogit(), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(4, 2\)"):
        counterfactuals(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 2))


# --- binary certificates of float64 models -----------------------------------------------------


def _float64_binary_models() -> list[tuple[nn.Module, dict]]:
    """f(z) = w z with w = 1 + 2^-24 - 2^-40, which float32 rounds down to 1: without a linear
    head (or with ``lipschitz`` given) the pair bound was a float32 tensor."""
    w = 1 + 2.0**-24 - 2.0**-40
    return [
        (_chain((w, 0.0)), {"lipschitz": w}),
        (nn.Sequential(_chain((w, 0.0)), Normalize(0.0, 1.0).double()), {}),
    ]


@pytest.mark.parametrize("index", range(2))
def test_binary_radius_of_a_float64_model_is_not_read_through_a_float32_bound(index):
    """x = 1 - 2^-30 is x away from f = 0; the radius was 1.0 and f < 0 at distance 1 - 1e-12."""
    model, kwargs = _float64_binary_models()[index]
    x = torch.tensor([[1 - 2.0**-30]], dtype=torch.float64)
    radius = certify(model, x, torch.tensor([1]), **kwargs)
    assert 0 < float(radius) <= float(x)
    with torch.no_grad():
        inside = model(x - radius.double() * (1 - 1e-12))
    assert predict(inside).item() == 1


# --- potentials of another dtype or input size --------------------------------------------------


def test_float64_potential_is_trained_in_its_own_dtype():
    """A float64 potential raised torch's 'mat1 and mat2 must have the same dtype'."""
    x, y = np.zeros((4, 2)), np.ones((4, 2))
    potential = gnp_mlp([2], 2, width=8, depth=1, binary=True).double()
    estimate = wasserstein1(x, y, potential=potential, steps=50)
    assert 0 < estimate.distance <= np.sqrt(2) * (1 + SOUND_SLACK)


def test_potential_of_another_input_size_gets_a_value_error():
    """kantorovich_value raised torch's 'mat1 and mat2 shapes cannot be multiplied'."""
    potential = gnp_mlp([3], 2, width=8, depth=1, binary=True)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(1, 2\)"):
        kantorovich_value(potential, np.zeros((4, 2)), np.ones((4, 2)))


def test_exact_w1_refuses_a_plan_pot_stopped_before_optimality():
    """With max_iterations=10, 'exact' W1 of two 200-point clouds was 0.090 (exact 1.452),
    with only POT's UserWarning."""
    pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 2)), rng.standard_normal((200, 2)) + 1
    with pytest.raises(ValueError, match="max_iterations"):
        exact_wasserstein1(x, y, max_iterations=10)
    assert exact_wasserstein1(x, y) == pytest.approx(1.45197, abs=1e-5)


def test_a_potential_whose_bound_is_nan_is_not_one_lipschitz():
    """A NaN slope makes the sound bound NaN, and ``NaN > 1`` is False: the check let such a
    potential through (twentieth session's SLL review)."""
    potential = nn.Sequential(_chain((0.5, 0.0)), nn.LeakyReLU(negative_slope=math.nan))
    assert math.isnan(logit_lipschitz_bound(potential))
    with pytest.raises(ValueError, match="not 1-Lipschitz"):
        check_one_lipschitz(potential, "the potential")
