"""QAT training step against the float training step: hq_lightning beside torch.ao's FX QAT.

One step = forward, cross-entropy loss, backward, SGD (momentum) update. For each model and each
configuration (input size, batch, intra-op threads) we time the median of repeated steps in one
process, the steps of all variants interleaved round-robin, so that load on a shared machine
drifts over all variants alike and the ratios stay comparable (``--schedule blocked`` runs each
variant's steps back to back instead, as a training run does: interleaving makes each step start
from the other model's allocator and cache state, which costs the step that allocates more;
``--rounds R`` repeats the blocks R times in turn, so that a shared machine's load drifts over all
variants alike here too, and leaves each block's first step out of the timing):

- ``float``: the float model;
- ``hq fuse_bn``: ``prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})``;
- ``hq with_bn``: the same with ``qat_mode="with_bn"`` (BN kept and trained);
- ``torch.ao``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with
  ``get_default_qat_qconfig_mapping("x86")`` (the baseline; only bench/ imports torch.ao);
- ``... compiled``: the same model under ``torch.compile`` (``float compiled``,
  ``hq fuse_bn compiled``, ``torch.ao compiled``); compile time is spent in the warm-up.

Models (``--source``): ``torchvision`` (default) builds ``torchvision.models.resnet18`` /
``mobilenet_v2`` with ``num_classes=10`` wrapped as ``QuantStub -> model -> DeQuantStub``;
``tests`` uses the torchvision-shaped models of ``tests/models.py``. March BAYES.

Time is reported as wall-clock and as process CPU time (``time.process_time``); on a shared
machine with one intra-op thread the CPU time is the steadier of the two (it does not count time
the process waits for a core).

Peak memory of a step, relative to the float step. Measured on the step after the timed steps,
with gradients freed (``zero_grad(set_to_none=True)``), as the peak minus the memory in use before
the step (weights and optimizer state are in both, so the delta is gradients + what forward saves
for backward + transient buffers):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()``.
- CPU: glibc's ``mallinfo2()`` bytes in use (``uordblks + hblkhd``: every live heap allocation,
  torch's CPU tensors included), sampled after every aten op of the step by a
  ``TorchDispatchMode``. Not measured for compiled variants on CPU (the dispatch mode would
  not see inside compiled kernels); on CUDA the allocator's peak covers them.

Minor page faults per step (CPU, ``getrusage``): glibc's malloc gives freed memory back to the
system when the free block at the top of its heap outgrows its trim threshold (which it adjusts
from the sizes freed so far), and the next step faults the pages in again. Whether a process falls
into that cycle depends on its allocation history: the same step then costs 10-25 ms more
(ResNet-18, 32x32, 2 threads: 13,800 faults, 54 MB, per QAT step). A row with faults measured the
allocator; ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``
fixes both thresholds, and no step faults.

Run (results go to bench/results/qat_step.md)::

    .venv/bin/python bench/bench_qat_step.py --configs 32x32:32:1,32x32:32:2,112x112:16:1,112x112:16:2
    .venv/bin/python bench/bench_qat_step.py --device cuda --configs 224x224:64:0 \\
        --variants "float,hq fuse_bn,torch.ao,float compiled,hq fuse_bn compiled,torch.ao compiled"

A configuration is ``HxW:batch:threads`` (threads 0 keeps torch's default).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import platform
import resource
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

from hq_lightning.march import set_march
from hq_lightning.quantization import DeQuantStub, FakeQuantize, QuantStub, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig

VARIANTS = ("float", "hq fuse_bn", "hq with_bn", "torch.ao")
COMPILED = ("float compiled", "hq fuse_bn compiled", "torch.ao compiled")
#: Where the time of "hq fuse_bn" goes: the same prepared model with fake quant and/or observers off.
BREAKDOWN = ("hq fuse_bn (fake quant + observers off)", "hq fuse_bn (observers only)", "hq fuse_bn (observers frozen)")


class Stubbed(torch.nn.Module):
    """``QuantStub -> model -> DeQuantStub``: how a user marks a torchvision model's quantized part."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.model = model
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.model(self.quant(x)))


def float_model(source: str, name: str, num_classes: int) -> torch.nn.Module:
    if source == "torchvision":
        import torchvision

        return Stubbed(getattr(torchvision.models, name)(num_classes=num_classes))
    from tests import models

    return getattr(models, name)(num_classes=num_classes)


def build(model: torch.nn.Module, variant: str, example: torch.Tensor, device: str,
          backend: str = "inductor") -> torch.nn.Module:
    base = variant.removesuffix(" compiled")
    model = copy.deepcopy(model).train()
    if base.startswith("hq fuse_bn"):
        model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
        if base == BREAKDOWN[2]:
            model(example)  # one observed batch gives every scale, then the observers freeze
        for module in model.modules():
            if isinstance(module, FakeQuantize):
                module.fake_quant_enabled = base in ("hq fuse_bn", BREAKDOWN[2])
                module.observer_enabled = base not in (BREAKDOWN[0], BREAKDOWN[2])
    elif base == "hq with_bn":
        model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig}, qat_mode="with_bn")
    elif base == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qat_qconfig_mapping
            from torch.ao.quantization.quantize_fx import prepare_qat_fx as ao_prepare_qat_fx

            model = ao_prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), example_inputs=(example,))
    elif base != "float":
        raise ValueError(f"Expected a variant among {VARIANTS + COMPILED + BREAKDOWN}, but got {variant!r}.")
    model = model.to(device).train()
    if variant.endswith(" compiled"):
        if base.startswith("hq"):
            # observers shape their buffers on their first batch; seen eagerly here, so the
            # compiled step compiles once instead of twice (warm-up time only)
            model(example.to(device))
        model = torch.compile(model, backend=backend)
    return model


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


def inputs(batch: int, size: int, num_classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    target = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, target


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warmed_steps(model_name, variants, size, batch, args):
    """The training step of each variant, built from one float model and run ``--warmup`` times
    (a compiled variant compiles in its first step), with the batch it ran on."""
    x, target = inputs(batch, size, args.num_classes, args.device)
    torch.manual_seed(0)
    model = float_model(args.source, model_name, args.num_classes)
    steps = {v: make_step(build(model, v, x.cpu(), args.device, args.compile_backend), args.device) for v in variants}
    for _ in range(args.warmup):
        for step in steps.values():
            step(x, target)
    return steps, x, target


def measure_variants(model_name, variants, size, batch, args) -> dict[str, tuple[float, float, int | None, float]]:
    """(median wall seconds, median CPU seconds, peak step bytes, median minor page faults) of each
    variant; timed steps interleave round-robin (``--schedule interleaved``) or run back to back
    per variant."""
    steps, x, target = warmed_steps(model_name, variants, size, batch, args)
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    if args.schedule == "interleaved":
        order = [v for _ in range(args.steps) for v in variants]
    else:  # each variant's steps back to back, as in a training run; blocks in turn over rounds
        order = [v for _ in range(args.rounds) for v in variants for _ in range(args.steps + (args.rounds > 1))]
    previous = None
    for variant in order:
        start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
        steps[variant](x, target)
        if args.schedule == "blocked" and args.rounds > 1 and variant != previous:
            previous = variant  # a block's first step starts from the other model's state: untimed
            continue
        previous = variant
        times[variant].append(time.perf_counter() - start)
        cpu_times[variant].append(time.process_time() - cpu_start)
        faults[variant].append(_minor_faults() - faults_start)
    results = {}
    for variant, step in steps.items():
        memory = None
        if not args.no_memory and (args.device == "cuda" or not variant.endswith(" compiled")):
            memory = peak_step_memory(step, step.optimizer, x, target, args.device)
        results[variant] = (statistics.median(times[variant]), statistics.median(cpu_times[variant]), memory,
                            statistics.median(faults[variant]))
    return results


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
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


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    configs = []
    for item in text.split(","):
        try:
            size, batch, threads = item.strip().split(":")
            height, width = size.lower().split("x")
            if height != width:
                raise ValueError
            configs.append((int(height), int(batch), int(threads)))
        except ValueError:
            raise SystemExit(f"Expected --configs items like '32x32:32:1' (HxW:batch:threads), but got {item!r}.") from None
    return configs


def run(args: argparse.Namespace) -> str:
    """Measure every configuration, print rows to stderr as they come, return the markdown report."""
    set_march("bayes")
    variants = [v for v in args.variants.split(",") if v]
    if "float" not in variants:
        variants.insert(0, "float")
    sections, summary = [], []
    for size, batch, threads in parse_configs(args.configs):
        if threads:
            torch.set_num_threads(threads)
        rows = []
        for model_name in args.models.split(","):
            results = measure_variants(model_name, variants, size, batch, args)
            compiled_float = results.get("float compiled")
            for variant, (seconds, cpu_seconds, memory, step_faults) in results.items():
                base_s, base_cpu, base_m, _ = compiled_float if variant.endswith(" compiled") and compiled_float else results["float"]
                mem_ratio = "" if memory is None or not base_m else f"{memory / base_m:.2f}"
                row = (model_name, variant, seconds * 1e3, seconds / base_s, cpu_seconds * 1e3, cpu_seconds / base_cpu,
                       None if memory is None else memory / 2**20, mem_ratio, step_faults)
                rows.append(row)
                print(f"{size}x{size} b{batch} t{torch.get_num_threads()} {model_name:13s} {variant:24s} "
                      f"{seconds * 1e3:8.1f} ms / float {row[3]:.2f} (CPU {cpu_seconds * 1e3:8.1f} ms / float {row[5]:.2f})"
                      + ("" if memory is None else f"  peak {memory / 2**20:8.1f} MiB / float {mem_ratio}")
                      + f"  page faults {step_faults:.0f}",
                      file=sys.stderr, flush=True)
                summary.append((model_name, f"{size}x{size}", batch, torch.get_num_threads(), variant, row[3], row[5], mem_ratio))
        rounds = args.rounds if args.schedule == "blocked" else 1  # interleaving has no blocks to repeat
        device = (torch.cuda.get_device_name() if args.device == "cuda"
                  else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
        lines = [
            f"device: {device}; torch {torch.__version__}; input {size}x{size}, batch {batch}; "
            f"{args.steps * rounds} timed steps ({args.schedule}"
            + (f", {rounds} rounds of {args.steps}" if rounds > 1 else "")
            + f") after {args.warmup} warm-up steps; compiled variants relative to "
            "`float compiled`",
            "",
            "| model | variant | wall step (ms, median) | / float | CPU step (ms, median) | / float | peak step memory (MiB) | / float "
            "| minor page faults / step (median) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model_name, variant, ms, ratio, cpu_ms, cpu_ratio, mib, mem_ratio, step_faults in rows:
            mem = "" if mib is None else f"{mib:.1f}"
            lines.append(f"| {model_name} | {variant} | {ms:.1f} | {ratio:.2f} | {cpu_ms:.1f} | {cpu_ratio:.2f} | {mem} | {mem_ratio} "
                         f"| {step_faults:.0f} |")
        sections.append("\n".join(lines))
    head = ["| model | input | batch | threads | variant | wall / float | CPU / float | memory / float |",
            "|---|---|---|---|---|---|---|---|"]
    head += [f"| {m} | {s} | {b} | {t} | {v} | {r:.2f} | {c:.2f} | {mem} |"
             for m, s, b, t, v, r, c, mem in summary if v != "float" and v != "float compiled"]
    return "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n"


def warm(args: argparse.Namespace) -> None:
    """``--warm-only``: build and warm up every variant (compiled ones compile into torch.compile's
    on-disk caches), measure nothing."""
    import torch._inductor.config as inductor_config

    # the suite warms its graphs side by side: Triton's autotuning of a kernel measured under that
    # contention is not kept, so the measuring process tunes its kernels alone (not in the key)
    inductor_config.autotune_local_cache = False
    set_march("bayes")
    variants = [v for v in args.variants.split(",") if v]
    for size, batch, threads in parse_configs(args.configs):
        if threads:
            torch.set_num_threads(threads)
        for model_name in args.models.split(","):
            start = time.perf_counter()
            warmed_steps(model_name, variants, size, batch, args)
            print(f"{size}x{size} b{batch} {model_name}: {', '.join(variants)} warmed in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", default="32x32:32:1", help="comma-separated HxW:batch:threads")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--source", default="torchvision", choices=("torchvision", "tests"))
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, among {VARIANTS + COMPILED + BREAKDOWN}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled variants")
    parser.add_argument("--schedule", default="interleaved", choices=("interleaved", "blocked"),
                        help="interleaved: one step of each variant in turn (load drifts over all alike); "
                             "blocked: each variant's steps back to back (the allocator and caches as in training)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --schedule blocked: repeat every variant's block this many times, in turn "
                             "(interleaved: ignored)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--warm-only", action="store_true",
                        help="build and run the warm-up steps of --variants (without the float step they are "
                             "measured against), measure nothing, write no report: fills torch.compile's "
                             "on-disk caches, so a later process that measures the same variants loads their "
                             "compiled graphs instead of compiling them (bench/gpu_suite.sh runs these in parallel)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print it to stdout)")
    args = parser.parse_args(argv)
    if args.warm_only:
        warm(args)
        return
    report = run(args)  # progress goes to stderr, so stdout holds the report alone
    if args.out:
        Path(args.out).write_text(report)
    else:
        print(report)


if __name__ == "__main__":
    main()
