"""Where the time of lipcert's GPU paths goes (torch.profiler), for the device tool's sessions.

Profiles (1) one train step of the ``lipcert bench layers`` nets (plain and AOLConv2d(auto)) at a
batch of 512, (2) ``certify_batched`` with the bound cached and one eval pass over a checkpoint's
test split, and prints the top operators by device time and by host time, with the count of
host-device synchronizations (``cudaStreamSynchronize`` / ``cudaMemcpy*`` calls).

    python benchmarks/gpu_profile.py [CKPT ...]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from lipcert.bench import layers
from lipcert.bench.certify import _eval_pass
from lipcert.certify import certify_batched
from lipcert.cli.common import load_run

ROWS = 12


def _report(name: str, fn, repeats: int = 5) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key)
    print(f"==== {name}: {repeats} calls, {syncs} sync/memcpy runtime calls")
    print(events.table(sort_by="cuda_time_total", row_limit=ROWS))
    print(events.table(sort_by="self_cpu_time_total", row_limit=ROWS))


def main(checkpoints: list[str]) -> None:
    device = torch.device("cuda")
    x = torch.rand(512, *layers.INPUT_SHAPE, device=device)
    y = torch.randint(0, layers.CLASSES, (512,), device=device)
    nets = layers.families()
    for name in ("plain Conv2d+ReLU", "lipcert AOLConv2d(auto)+ReLU"):
        torch.manual_seed(0)
        net = nets[name]().to(device).train()
        _report(f"train step, {name}, batch 512", layers._train_step(net, x, y))
    for checkpoint in checkpoints:
        _profile_certify(checkpoint, device)


def _profile_certify(checkpoint: str, device: torch.device) -> None:
    model, config, data = load_run(checkpoint, None, device.type)
    x, y = data.test.x.to(device), data.test.y.to(device)
    batch = config.data.eval_batch_size
    _report(f"eval pass {checkpoint}", lambda: _eval_pass(model, x, batch))
    _report(f"certify {checkpoint}", lambda: certify_batched(model, x, y, "l2", batch))


if __name__ == "__main__":
    main(sys.argv[1:])
