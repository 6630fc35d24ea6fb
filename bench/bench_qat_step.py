"""QAT training step against the float training step: hq_lightning beside torch.ao's FX QAT.

One step = forward, cross-entropy loss, backward, SGD (momentum) update. For each model we time
the median of repeated steps in one process (steps of all variants interleaved), for

- ``float``: the float model (tests/models.py shapes: ResNet-18 and MobileNetV2, real widths);
- ``hq fuse_bn``: ``prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})``;
- ``hq with_bn``: the same with ``qat_mode="with_bn"`` (BN kept and trained);
- ``torch.ao``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with
  ``get_default_qat_qconfig_mapping("x86")`` (the baseline; only bench/ imports torch.ao).

Time is reported as wall-clock and as process CPU time (``time.process_time``); on a shared
machine the CPU time is the steadier of the two (it does not count time the process waits for a
core), with one intra-op thread it is the step's compute.

Peak memory of a step, relative to the float step. Measured on the step after the warm-up, with
gradients freed (``zero_grad(set_to_none=True)``), as the peak minus the memory in use before the
step (weights and optimizer state are in both, so the delta is gradients + what forward saves for
backward + transient buffers):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()``.
- CPU: glibc's ``mallinfo2()`` bytes in use (``uordblks + hblkhd``: every live heap allocation,
  torch's CPU tensors included), sampled after every aten op of the step by a
  ``TorchDispatchMode`` (forward, backward and optimizer ops all pass through it). tracemalloc
  cannot see torch's allocator and ``ru_maxrss`` mostly measures allocator slack.

Run (quiet machine; results go to bench/results/qat_step.md)::

    .venv/bin/python bench/bench_qat_step.py                 # CPU, 2 threads
    .venv/bin/python bench/bench_qat_step.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hq_lightning.quantization import FakeQuantize, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.models import mobilenet_v2, resnet18

_LIBC = ctypes.CDLL("libc.so.6")
MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
VARIANTS = ("float", "hq fuse_bn", "hq with_bn", "torch.ao")
#: Where the time of "hq fuse_bn" goes: the same prepared model with fake quant and/or observers off.
BREAKDOWN = ("hq fuse_bn (fake quant + observers off)", "hq fuse_bn (observers only)")


def build(model_name: str, variant: str, example: torch.Tensor, device: str) -> torch.nn.Module:
    model = MODELS[model_name]().train()
    if variant.startswith("hq fuse_bn"):
        model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
        for module in model.modules():
            if isinstance(module, FakeQuantize):
                module.fake_quant_enabled = variant == "hq fuse_bn"
                module.observer_enabled = variant != BREAKDOWN[0]
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

    step.optimizer = optimizer
    return step


def inputs(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    target = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x, target


def measure_variants(model_name, variants, args) -> dict[str, tuple[float, int | None]]:
    """(median wall seconds, median CPU seconds, peak step bytes) of each variant; timed steps interleave round-robin
    so that load on a shared machine drifts over all variants alike."""
    x, target = inputs(args.batch, args.size, args.device)
    steps = {v: make_step(build(model_name, v, x.cpu(), args.device), args.device) for v in variants}
    for _ in range(args.warmup):
        for step in steps.values():
            step(x, target)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.steps):
        for variant, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step(x, target)
            times[variant].append(time.perf_counter() - start)
            cpu_times[variant].append(time.process_time() - cpu_start)
    results = {}
    for variant, step in steps.items():
        memory = None if args.no_memory else peak_step_memory(step, step.optimizer, x, target, args.device)
        results[variant] = (statistics.median(times[variant]), statistics.median(cpu_times[variant]), memory)
    return results


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC.mallinfo2.restype = _MallInfo2


def _heap_in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakHeap(TorchDispatchMode):
    """Samples the heap in use after every aten op and keeps the maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def peak_step_memory(step, optimizer, x, target, device) -> int:
    """Peak memory of one step in bytes above what is in use before it (see the module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(x, target)
        return torch.cuda.max_memory_allocated() - before
    before = _heap_in_use()
    with _PeakHeap() as sampler:
        step(x, target)
    return sampler.peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, among {VARIANTS + BREAKDOWN}")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for model_name in args.models.split(","):
        results = measure_variants(model_name, variants, args)
        for variant, (seconds, cpu_seconds, memory) in results.items():
            print(f"{model_name:13s} {variant:11s} {seconds * 1e3:8.1f} ms (CPU {cpu_seconds * 1e3:8.1f} ms)"
                  + ("" if memory is None else f"  peak step memory {memory / 2**20:8.1f} MiB"), flush=True)
        float_s, float_cpu, float_m = results["float"]
        for variant, (seconds, cpu_seconds, memory) in results.items():
            mem_ratio = "" if memory is None or not float_m else f"{memory / float_m:.2f}"
            rows.append((model_name, variant, seconds * 1e3, seconds / float_s, cpu_seconds * 1e3, cpu_seconds / float_cpu,
                         None if memory is None else memory / 2**20, mem_ratio))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads"
    lines = [
        "| model | variant | wall step (ms, median) | / float | CPU step (ms, median) | / float | peak step memory (MiB) | / float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name, variant, ms, ratio, cpu_ms, cpu_ratio, mib, mem_ratio in rows:
        mem = "" if mib is None else f"{mib:.1f}"
        lines.append(f"| {model_name} | {variant} | {ms:.1f} | {ratio:.2f} | {cpu_ms:.1f} | {cpu_ratio:.2f} | {mem} | {mem_ratio} |")
    table = "\n".join(lines)
    header = (f"device: {device}; torch {torch.__version__}; input {args.size}x{args.size}, batch {args.batch}; "
              f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print(header)
    print(table)
    if args.out:
        Path(args.out).write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
