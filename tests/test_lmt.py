"""LMT training: the power-iteration Lipschitz estimate (measured against dense Jacobians in
float64) and its wiring into the loss, the config and the training loop."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipcert.bounds.network import module_bound
from lipcert.config import LossConfig, parse_config
from lipcert.data import Dataset, Split
from lipcert.lmt import LMTTrainingLoss, PowerIterationLipschitz, pairwise_row_distances
from lipcert.losses import lmt_loss
from lipcert.models import register_model
from lipcert.train import make_loss, train


def _dense_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact spectral norm of the Jacobian of ``layer`` at a random point (float64 SVD)."""
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = torch.func.jacrev(layer)(x).reshape(-1, x.numel())
    return float(torch.linalg.matrix_norm(jac.detach(), ord=2))


def _iterates(estimator: PowerIterationLipschitz, steps: int) -> list[float]:
    estimator.train()
    with torch.no_grad():
        return [float(estimator()) for _ in range(steps)]


LINEAR_MAPS = {
    "linear": (lambda: nn.Linear(7, 5), (7,)),
    "conv_stride_pad": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
    "conv_dilation_groups": (
        lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        (4, 6, 6),
    ),
    "conv_circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 4, stride=2, padding=1), (2, 11)),
}


@pytest.mark.parametrize("name", LINEAR_MAPS)
def test_estimate_converges_to_exact_norm_from_below(name):
    make, shape = LINEAR_MAPS[name]
    torch.manual_seed(0)
    layer = make().double()
    exact = _dense_norm(layer, shape)
    estimator = PowerIterationLipschitz(nn.Sequential(layer), shape, warmup_iterations=0)
    values = _iterates(estimator, 300)
    assert max(values) <= exact * (1 + 1e-12)  # never above: an estimate, not a bound
    assert all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(values))
    assert values[0] < exact * (1 - 1e-4)  # it had something to converge from
    assert values[-1] == pytest.approx(exact, rel=1e-8)


def test_chain_estimate_is_the_product_of_exact_layer_constants():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3)
    pool, head = nn.MaxPool2d(3, stride=1, padding=1), nn.Linear(3 * 4 * 4, 4)
    model = nn.Sequential(conv, bn, nn.ReLU(), pool, nn.Flatten(), head).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 3.0, 0.25]))
    estimator = PowerIterationLipschitz(model, (1, 7, 7), warmup_iterations=300)
    bn_scale = max(abs(g) / math.sqrt(v + bn.eps) for g, v in [(0.5, 1.0), (-2.0, 3.0), (1, 0.25)])
    expected = _dense_norm(conv, (1, 7, 7)) * bn_scale * 3.0 * _dense_norm(head, (48,))
    model.eval()
    assert float(estimator.eval()().detach()) == pytest.approx(expected, rel=1e-8)
    names = [name for name, _ in estimator.layer_estimates()]
    assert names == ["0", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    ("pool", "shape", "coverage"),
    [
        (nn.MaxPool2d(2), (1, 6, 6), 1),
        (nn.MaxPool2d(3, stride=1, padding=1), (1, 6, 6), 9),
        (nn.MaxPool2d(3, stride=2, padding=1), (1, 7, 7), 4),
        (nn.MaxPool2d(3, stride=2, ceil_mode=True), (1, 6, 6), 4),
        (nn.MaxPool2d(2, stride=1, dilation=2), (1, 6, 6), 4),
        (nn.MaxPool1d(5, stride=2, padding=2), (1, 9), 3),
    ],
)
def test_max_pool_constant_is_reached_at_a_spike(pool, shape, coverage):
    """The pools take the sound rule's constant, sqrt(c): it bounds the Jacobian at random points
    and equals it at a spike on a pixel that c windows cover (exact for these shapes)."""
    constant = float(PowerIterationLipschitz(nn.Sequential(pool), shape)())
    assert constant == pytest.approx(math.sqrt(coverage), rel=1e-12)
    assert constant == module_bound(pool, "l2", input_shape=shape)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(1, *shape, dtype=torch.float64, generator=gen)
        jac = torch.func.jacrev(pool)(x).reshape(-1, x.numel())
        assert float(torch.linalg.matrix_norm(jac, ord=2)) <= constant * (1 + 1e-12)
    best = 0.0
    for pixel in range(math.prod(shape)):
        x = -0.01 * torch.rand(math.prod(shape), dtype=torch.float64, generator=gen)
        x[pixel] = 1.0
        jac = torch.func.jacrev(pool)(x.reshape(1, *shape)).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(jac, ord=2)))
    assert best == pytest.approx(constant, rel=1e-12)


def test_gradient_flows_to_the_weights_as_u_v_transpose():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    estimator = PowerIterationLipschitz(nn.Sequential(linear), (6,)).eval()
    estimate = estimator()
    estimate.backward()
    v = estimator.vectors["0"].v.reshape(-1)
    u = linear.weight.detach() @ v
    torch.testing.assert_close(linear.weight.grad, torch.outer(u / u.norm(), v))
    assert linear.bias.grad is None

    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    PowerIterationLipschitz(model, (1, 6, 6))().backward()
    for name in ("0.weight", "1.weight", "4.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_vectors_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3))
    first = PowerIterationLipschitz(model, (1, 5, 5), warmup_iterations=2, seed=0)
    second = PowerIterationLipschitz(model, (1, 5, 5), warmup_iterations=2, seed=1)
    assert not torch.equal(first().detach(), second().detach())
    state = first.state_dict()
    assert sorted(state) == ["vectors.0.v", "vectors.3.v"]
    assert not any(name.startswith("vectors") for name, _ in model.named_buffers())
    second.load_state_dict(state)
    for _ in range(3):  # identical from here on, iteration after iteration
        assert torch.equal(first().detach(), second().detach())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x):
        return x + self.inner(x)


def test_refuses_what_it_cannot_estimate():
    with pytest.raises(TypeError, match="LayerNorm"):
        PowerIterationLipschitz(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), (3,))
    with pytest.raises(TypeError, match="_Residual"):
        PowerIterationLipschitz(_Residual(), (2,))
    with pytest.raises(ValueError, match="running statistics"):
        PowerIterationLipschitz(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), (3,))
    with pytest.raises(ValueError, match=r"input_shape \(4,\).*layer 1 \(Linear\)"):
        PowerIterationLipschitz(nn.Sequential(nn.Linear(4, 5), nn.Linear(3, 2)), (4,))
    with pytest.raises(ValueError, match="n_iterations"):
        PowerIterationLipschitz(nn.Sequential(nn.Linear(3, 3)), (3,), n_iterations=0)
    with pytest.raises(ValueError, match="head_pairs = false"):
        LMTTrainingLoss(eps=0.1).bind(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (3,))


def test_pairwise_row_distances_match_cdist_with_finite_gradients():
    weight = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight[3] = weight[1]  # two equal rows
    weight.requires_grad_(True)
    distances = pairwise_row_distances(weight)
    torch.testing.assert_close(distances, torch.cdist(weight, weight), atol=1e-6, rtol=1e-9)
    distances.sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_head_pairs_margin_is_the_certified_one_and_no_larger_than_sqrt2_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    pairs, plain = LMTTrainingLoss(0.7).eval(), LMTTrainingLoss(0.7, head_pairs=False).eval()
    pairs.bind(model, (4,))
    plain.bind(model, (4,))
    logits = model(x)
    body = pairs.estimator()
    rows = model[2].weight
    margins = 0.7 * body * (rows[y][:, None, :] - rows[None]).norm(dim=2)  # (B, C)
    expected = F.cross_entropy(logits + margins, y)
    torch.testing.assert_close(pairs(logits, y), expected)
    # ||w_y - w_j|| <= sqrt(2) ||W||_2: the pair loss never exceeds the global-constant one.
    assert float(pairs(logits, y).detach()) <= float(plain(logits, y).detach())
    torch.testing.assert_close(plain(logits, y), lmt_loss(logits, y, 0.7, plain.estimator()))


def test_eps_warmup_ramps_the_margin_with_training_progress():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = LMTTrainingLoss(0.8, eps_warmup=0.5).eval()
    loss.bind(model, (4,))
    assert loss.current_eps() == 0.8  # no trainer: the full eps
    loss.set_progress(0.0)
    torch.testing.assert_close(loss(model(x), y), F.cross_entropy(model(x), y))
    loss.set_progress(0.25)
    assert loss.current_eps() == pytest.approx(0.4)
    loss.set_progress(0.9)
    assert loss.current_eps() == 0.8
    with pytest.raises(ValueError, match="eps_warmup"):
        LMTTrainingLoss(0.8, eps_warmup=1.5)


def test_config_builds_lmt_and_rejects_bad_kwargs():
    config = parse_config({"loss": {"name": "lmt", "kwargs": {"eps": 1.58, "n_iterations": 2}}})
    loss = make_loss(config.loss)
    assert isinstance(loss, LMTTrainingLoss) and loss.eps == 1.58 and loss.n_iterations == 2
    with pytest.raises(ValueError, match=r"loss\.kwargs do not fit loss 'lmt'"):
        make_loss(LossConfig(name="lmt", kwargs={"epsilon": 1.0}))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        make_loss(LossConfig(name="lmt", kwargs={"eps": -1.0}))
    with pytest.raises(ValueError, match="head_pairs"):
        make_loss(LossConfig(name="lmt", kwargs={"eps": 1.0, "head_pairs": "yes"}))
    with pytest.raises(RuntimeError, match="bind"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1]))


@register_model
def _lmt_tiny_cnn(input_shape, num_classes) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, num_classes),
    )


def _images(n: int = 64) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 6, 6, generator=gen)
    y = (x[:, 0, :3].mean(dim=(1, 2)) > x[:, 0, 3:].mean(dim=(1, 2))).long()
    half = n // 2
    return Dataset("toy", Split(x[:half], y[:half]), Split(x[half:], y[half:]), ("a", "b"))


def _final_estimate(tmp_path, eps: float) -> float:
    config = parse_config(
        {
            "epochs": 3,
            "eval_every": 3,  # no evaluation: training does not need the sound Conv2d bound
            "data": {"batch_size": 8},
            "model": {"name": "_lmt_tiny_cnn"},
            "loss": {"name": "lmt", "kwargs": {"eps": eps}},
            "optim": {"lr": 0.05},
        }
    )
    model, _ = train(config, tmp_path / f"eps{eps}", data=_images(), stop_after_epochs=2)
    return float(PowerIterationLipschitz(model, (1, 6, 6), warmup_iterations=200)())


def test_lmt_training_runs_and_pushes_the_lipschitz_estimate_down(tmp_path):
    plain, lmt = _final_estimate(tmp_path, 0.0), _final_estimate(tmp_path, 2.0)
    assert math.isfinite(lmt) and lmt < 0.5 * plain
