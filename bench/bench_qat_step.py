"""QAT training step against the float training step: hq_lightning beside torch.ao's FX QAT.

One step = forward, cross-entropy loss, backward, SGD (momentum) update. For each model we time
the median of repeated steps in one process, for

- ``float``: the float model (tests/models.py shapes: ResNet-18 and MobileNetV2, real widths);
- ``hq fuse_bn``: ``prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})``;
- ``hq with_bn``: the same with ``qat_mode="with_bn"`` (BN kept and trained);
- ``torch.ao``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with
  ``get_default_qat_qconfig_mapping("x86")`` (the baseline; only bench/ imports torch.ao).

Peak memory of a step, relative to the float step:

- CUDA: ``torch.cuda.max_memory_allocated()`` during the timed steps minus the memory allocated
  before them (weights, gradients and optimizer state are allocated by the warm-up steps).
- CPU: each variant runs in a fresh subprocess; we report ``ru_maxrss`` after three steps minus
  the resident set size once the model and optimizer are built (before any step). That is the
  step's peak working set (activations saved for backward, gradients, optimizer state, allocator
  slack), measured the same way for every variant. tracemalloc cannot see torch's allocator.

Run (quiet machine; results go to bench/results/qat_step.md)::

    .venv/bin/python bench/bench_qat_step.py                 # CPU, 2 threads
    .venv/bin/python bench/bench_qat_step.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from hq_lightning.quantization import prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.models import mobilenet_v2, resnet18

MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
VARIANTS = ("float", "hq fuse_bn", "hq with_bn", "torch.ao")


def build(model_name: str, variant: str, example: torch.Tensor, device: str) -> torch.nn.Module:
    model = MODELS[model_name]().train()
    if variant == "hq fuse_bn":
        model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
    elif variant == "hq with_bn":
        model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig}, qat_mode="with_bn")
    elif variant == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qat_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_qat_fx as ao_prepare_qat_fx

            model = ao_prepare_qat_fx(
                copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), example_inputs=(example,)
            )
    return model.to(device).train()


def make_step(model, device):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(x, target):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def inputs(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    target = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, target


def time_variant(model_name, variant, args) -> float:
    x, target = inputs(args.batch, args.size, args.device)
    step = make_step(build(model_name, variant, x.cpu(), args.device), args.device)
    for _ in range(args.warmup):
        step(x, target)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(x, target)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_variant(model_name, variant, args) -> int:
    """Peak step memory in bytes (see the module docstring for what is measured)."""
    x, target = inputs(args.batch, args.size, args.device)
    step = make_step(build(model_name, variant, x.cpu(), args.device), args.device)
    if args.device == "cuda":
        for _ in range(2):
            step(x, target)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(x, target)
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes()
    for _ in range(3):
        step(x, target)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def memory_in_subprocess(model_name, variant, args) -> int:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([model_name, variant]),
           "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_child:
        model_name, variant = json.loads(args.memory_child)
        print(memory_variant(model_name, variant, args))
        return

    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for model_name in args.models.split(","):
        results = {}
        for variant in variants:
            seconds = time_variant(model_name, variant, args)
            memory = None if args.no_memory else memory_in_subprocess(model_name, variant, args)
            results[variant] = (seconds, memory)
            print(f"{model_name:13s} {variant:11s} {seconds * 1e3:8.1f} ms"
                  + ("" if memory is None else f"  peak step memory {memory / 2**20:8.1f} MiB"), flush=True)
        float_s, float_m = results["float"]
        for variant, (seconds, memory) in results.items():
            mem_ratio = "" if memory is None or not float_m else f"{memory / float_m:.2f}"
            rows.append((model_name, variant, seconds * 1e3, seconds / float_s,
                         None if memory is None else memory / 2**20, mem_ratio))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads"
    lines = [
        "| model | variant | step (ms, median) | / float | peak step memory (MiB) | / float |",
        "|---|---|---|---|---|---|",
    ]
    for model_name, variant, ms, ratio, mib, mem_ratio in rows:
        mem = "" if mib is None else f"{mib:.1f}"
        lines.append(f"| {model_name} | {variant} | {ms:.1f} | {ratio:.2f} | {mem} | {mem_ratio} |")
    table = "\n".join(lines)
    header = (f"device: {device}; torch {torch.__version__}; input {args.size}x{args.size}, batch {args.batch}; "
              f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print(header)
    print(table)
    if args.out:
        Path(args.out).write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
