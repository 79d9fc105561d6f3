"""``lipcert bench layers`` (design.md §6).

One process, 2 threads, batch 64 (``--batch``), input 3x32x32, on the CPU (``--device cuda``: on
the GPU, each timed call followed by a device synchronization). Net: conv(3->64) act
conv(64->64) act PixelUnshuffle(2) conv(256->128) act conv(128->128) act global-avg-pool
linear(128->10); the convolutions 3x3 "same" (``--kernel-size``: any odd size).
Train steps (forward + backward + SGD step, the forward inside
:func:`lipcert.nn.precomputed_weights` as in ``lipcert.train``, which computes every
parametrized weight before it: a no-op for plain layers) and eval forwards (no_grad, eval mode)
of plain Conv2d + ReLU, each lipcert family before and after ``export``, and the peers
(deel-torchlip, orthogonium) when installed, timed in 7 interleaved rounds (each round times
every net once, in turn). Ratios are to the plain net: the median over rounds of the ratio
within a round.
lipcert nets use the family's layers, a 1-Lipschitz activation (ReLU, the plain net's, to isolate
the layers' cost; or MaxMin, gradient-norm preserving) and ScaledAvgPool2d + a constrained head.
"AOLConv2d(auto)" rescales the output channels where out < in (conv(256->128)), the cheaper side.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import torch
from torch import nn

import lipcert
from lipcert import nn as lnn
from lipcert.bench.timing import seconds
from lipcert.cli.common import check_device, check_positive
from lipcert.report import format_table

BATCH, INPUT_SHAPE, CLASSES, KERNEL_SIZE = 64, (3, 32, 32), 10, 3
REPEATS, WARMUP, THREADS = 7, 2, 2
#: Channel plan of the benchmark net: (in, out) of its four convolutions.
CONVS = ((3, 64), (64, 64), (256, 128), (128, 128))

ConvFactory = Callable[[int, int], nn.Module]


def _net(conv: ConvFactory, act: Callable[[], nn.Module], pool: nn.Module, head: nn.Module):
    (a, b), (c, d), (e, f), (g, h) = CONVS
    return nn.Sequential(
        conv(a, b),
        act(),
        conv(c, d),
        act(),
        nn.PixelUnshuffle(2),
        conv(e, f),
        act(),
        conv(g, h),
        act(),
        pool,
        nn.Flatten(),
        head,
    )


def _lipcert_net(
    conv: ConvFactory, linear: Callable[[int, int], nn.Module], act: Callable[[], nn.Module]
) -> nn.Module:
    return _net(conv, act, lnn.ScaledAvgPool2d(16), linear(128, CLASSES))


def _sll_conv(c_in: int, c_out: int, k: int) -> nn.Module:
    """SLL blocks keep the channel count; channel changes go through an AOL convolution."""
    if c_in == c_out:
        return lnn.SLLConv2d(c_in, c_in, k)
    return lnn.AOLConv2d(c_in, c_out, k)


def families(k: int = KERNEL_SIZE) -> dict[str, Callable[[], nn.Module]]:
    """Name -> constructor of the benchmark net for each family (peers when importable), with
    k x k convolutions."""
    nets: dict[str, Callable[[], nn.Module]] = {
        "plain Conv2d+ReLU": lambda: _net(
            lambda i, o: nn.Conv2d(i, o, k, padding=k // 2),
            nn.ReLU,
            nn.AdaptiveAvgPool2d(1),
            nn.Linear(128, CLASSES),
        ),
        "lipcert AOLConv2d+ReLU": lambda: _lipcert_net(
            lambda i, o: lnn.AOLConv2d(i, o, k), lnn.AOLLinear, nn.ReLU
        ),
        "lipcert AOLConv2d(auto)+ReLU": lambda: _lipcert_net(
            lambda i, o: lnn.AOLConv2d(i, o, k, rescale="auto"), lnn.AOLLinear, nn.ReLU
        ),
        "lipcert AOLConv2d+MaxMin": lambda: _lipcert_net(
            lambda i, o: lnn.AOLConv2d(i, o, k), lnn.AOLLinear, lnn.MaxMin
        ),
        "lipcert SpectralConv2d": lambda: _lipcert_net(
            lambda i, o: lnn.SpectralConv2d(i, o, k), lnn.SpectralLinear, lnn.MaxMin
        ),
        "lipcert SLLConv2d": lambda: _lipcert_net(
            lambda i, o: _sll_conv(i, o, k), lnn.AOLLinear, lnn.MaxMin
        ),
    }
    nets.update(_peer_families(k))
    return nets


def _peer_families(k: int) -> dict[str, Callable[[], nn.Module]]:
    peers: dict[str, Callable[[], nn.Module]] = {}
    try:
        from deel import torchlip
    except ImportError:
        torchlip = None
    if torchlip is not None:
        peers["deel-torchlip SpectralConv2d"] = lambda: _net(
            lambda i, o: torchlip.SpectralConv2d(i, o, k, padding=k // 2),
            lambda: torchlip.GroupSort2(),
            torchlip.ScaledAdaptiveAvgPool2d((1, 1)),
            torchlip.SpectralLinear(128, CLASSES),
        )
    try:
        from orthogonium.layers import AdaptiveOrthoConv2d
        from orthogonium.layers.conv.AOL.aol import AOLConv2D
    except ImportError:
        return peers
    for name, conv in (("AOLConv2D", AOLConv2D), ("AdaptiveOrthoConv2d", AdaptiveOrthoConv2d)):
        peers[f"orthogonium {name}"] = lambda conv=conv: _net(
            lambda i, o: conv(i, o, k, padding="same"),
            lnn.MaxMin,
            lnn.ScaledAvgPool2d(16),
            lnn.AOLLinear(128, CLASSES),
        )
    return peers


def _train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with lnn.precomputed_weights(net):  # as lipcert.train does; a no-op for plain layers
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    return step


def _eval_forward(net: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            net(x)

    return forward


def _interleaved_ms(
    calls: dict[str, Callable[[], None]], device: torch.device
) -> dict[str, list[float]]:
    """ms of every call in each of REPEATS rounds; a round runs each call once, in turn (the order
    rotated from round to round), so that a slow spell of the machine or a position in the round
    hits every family instead of biasing one."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(REPEATS):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(calls[name], device) * 1e3)
    return times


def _summaries(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float]]:
    """(median ms, median over rounds of the ratio to ``base`` in the same round) per name."""
    return {
        name: (
            statistics.median(ms),
            statistics.median(t / b for t, b in zip(ms, times[base], strict=True)),
        )
        for name, ms in times.items()
    }


def check_kernel_size(k: int) -> int:
    """``k`` if it is an odd positive int (a "same" convolution needs one); ValueError else."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"--kernel-size must be an odd positive integer, got {k!r}")
    return k


def measure(
    device: str = "cpu", batch: int | None = None, kernel_size: int = KERNEL_SIZE
) -> list[dict]:
    """Rows of {family, train_ms, eval_ms, exported_eval_ms, ratios} for every family, timed on
    ``device`` with ``batch`` inputs (default BATCH) and ``kernel_size`` convolutions."""
    device = check_device(device)
    batch = BATCH if batch is None else check_positive("--batch", batch)
    kernel_size = check_kernel_size(kernel_size)
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *INPUT_SHAPE), generator=gen).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    nets = {}
    for name, build in families(kernel_size).items():
        torch.manual_seed(0)
        nets[name] = build().to(device)
    base = next(iter(nets))
    for net in nets.values():
        net.train()
    steps = {n: _train_step(m, x, y) for n, m in nets.items()}
    train = _summaries(_interleaved_ms(steps, device), base)
    evals = {name: _eval_forward(net.eval(), x) for name, net in nets.items()}
    for name, net in nets.items():
        if name.startswith("lipcert"):
            evals[f"{name} exported"] = _eval_forward(lipcert.export(net).eval(), x)
    evaluated = _summaries(_interleaved_ms(evals, device), base)
    rows = []
    for name in nets:
        (train_ms, train_ratio), (eval_ms, eval_ratio) = train[name], evaluated[name]
        row = {
            "family": name,
            "train_ms": train_ms,
            "eval_ms": eval_ms,
            "train_ratio": train_ratio,
            "eval_ratio": eval_ratio,
        }
        if f"{name} exported" in evaluated:
            row["exported_eval_ms"], row["exported_eval_ratio"] = evaluated[f"{name} exported"]
        rows.append(row)
    return rows


def main(
    as_json: bool = False,
    device: str = "cpu",
    batch: int | None = None,
    kernel_size: int | None = None,
) -> None:
    batch = BATCH if batch is None else batch
    kernel_size = KERNEL_SIZE if kernel_size is None else kernel_size
    rows = measure(device, batch, kernel_size)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    header = ("family", "train ms", "train x", "eval ms", "eval x", "exported eval x")
    table = [
        (
            r["family"],
            f"{r['train_ms']:.1f}",
            f"{r['train_ratio']:.2f}",
            f"{r['eval_ms']:.1f}",
            f"{r['eval_ratio']:.2f}",
            f"{r.get('exported_eval_ratio', float('nan')):.2f}",
        )
        for r in rows
    ]
    print(format_table(header, table))
    print(
        f"batch {batch}, input {INPUT_SHAPE}, {kernel_size}x{kernel_size} convolutions, "
        f"{device} ({THREADS} CPU threads), "
        f"{REPEATS} interleaved rounds; "
        "ratios: median over rounds of the ratio to the plain Conv2d+ReLU net in the same round"
    )
