"""Converted (integer) model inference against float inference, and the time of ``convert_fx``.

For ResNet-18 and MobileNetV2 (``tests/models.py``, real widths, 10 classes) at 32x32, batch 32,
CPU, ``torch.set_num_threads(2)``:

- ``float``: the float model in eval mode (BN statistics set from data, see ``warm_batch_norm``);
- ``hq converted``: ``convert_fx`` of the calibrated ``prepare_qat_fx`` model (exact integer
  arithmetic between the stubs);
- ``VALIDATION``: the calibrated prepared model itself in ``FakeQuantState.VALIDATION``, which
  runs its cached integer model (issue 13); the bench checks that its output equals the
  converted model's bit for bit;
- ``torch.ao converted``: torch.ao's post-training static FX flow (``get_default_qconfig_mapping
  ("x86")``, x86 int8 kernels), as the reference of what int8 kernels cost (only bench/ imports
  torch.ao).

Candidates run interleaved (float, hq, torch.ao, float, ...) and each reports the median and the
best of ``--rounds`` times, because the machine is shared; ratios are the stable output. With 2
threads (the brief's setting) the clock is wall time; a second pass with 1 thread uses the
process CPU time, which does not count the time the process waits for a core.
Also measured: ``convert_fx`` itself (median of 3), the exactness checks (the converted output is
batch invariant and deterministic: what an exact integer pipeline must be) and, with
``--profile``, where the converted model spends its time (per integer module type).

Run: ``PYTHONPATH=. .venv/bin/python bench/bench_convert.py [--rounds 9] [--profile] [--threads 2 1]``;
writes ``bench/results/convert.md`` (keeping its hand-written ``## Analysis`` section).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

# On a shared, oversubscribed machine OpenMP threads that spin while waiting for a descheduled
# sibling make every 2-thread region 5-30x slower (measured: float ResNet-18 350-1760 ms instead
# of 55-76 ms). Sleeping waiters keep 2-thread timings meaningful; set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hq_lightning.quantization import convert_fx
from tests.calibrate import calibrated
from tests.models import mobilenet_v2, resnet18

BATCH, SIZE, THREADS = 32, 32, 2
ANALYSIS = "## Analysis"
MODELS = {
    "ResNet-18": lambda: resnet18(num_classes=10),
    "MobileNetV2": lambda: mobilenet_v2(num_classes=10),
}


def _calibration_batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def warm_batch_norm(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set BN running statistics from data, as in a trained model.

    With the initial statistics (mean 0, var 1) a random ResNet's activations decay through the
    blocks into float32 denormals, which makes the float baseline several times slower on x86.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def hq_converted(
    float_model: nn.Module, batches: list[torch.Tensor], repeats: int = 3
) -> tuple[nn.Module, float, nn.Module]:
    """The converted model, the median ``convert_fx`` time, and the prepared model in VALIDATION."""
    prepared = calibrated(float_model, batches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        converted = convert_fx(prepared)
        times.append(time.perf_counter() - start)
    return converted, statistics.median(times), prepared


def convert_time(repeats: int) -> list[str]:
    """The convert-time section alone: ``convert_fx`` and the first forward after it (1 thread).

    Both are timed because derived state an integer module builds lazily moves from
    ``convert_fx`` into the first call; wall clock and process CPU time, median of ``repeats``.
    """
    torch.set_num_threads(1)
    batches = _calibration_batches()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    lines = [
        f"## convert_fx time, 1 thread, median of {repeats}",
        "",
        "| model | convert_fx wall s | convert_fx CPU s | first forward (batch 1) wall s | second forward wall s |",
        "|---|---|---|---|---|",
    ]
    for name, build in MODELS.items():
        prepared = calibrated(warm_batch_norm(build(), batches), batches)
        walls, cpus, firsts, seconds = [], [], [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            converted = convert_fx(prepared)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            with torch.inference_mode():
                for store in (firsts, seconds):
                    start = time.perf_counter()
                    converted(x)
                    store.append(time.perf_counter() - start)
        row = [statistics.median(v) for v in (walls, cpus, firsts, seconds)]
        print(name, " ".join(f"{v:.3f}" for v in row), flush=True)
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return lines + [""]


def torch_ao_converted(float_model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx as ao_convert_fx
        from torch.ao.quantization.quantize_fx import prepare_fx as ao_prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = ao_prepare_fx(
            float_model.eval(), get_default_qconfig_mapping("x86"), (batches[0],)
        )
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return ao_convert_fx(prepared)


def _medians(fns: dict, x: torch.Tensor, rounds: int, clock=time.perf_counter) -> dict:
    with torch.inference_mode():
        for model in fns.values():
            model(x)
        times: dict = {name: [] for name in fns}
        for _ in range(rounds):
            for name, model in fns.items():
                start = clock()
                model(x)
                times[name].append(clock() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def exactness(converted: nn.Module, x: torch.Tensor) -> dict:
    with torch.inference_mode():
        whole = converted(x)
        again = converted(x)
        pieces = torch.cat([converted(x[i : i + 4]) for i in range(0, len(x), 4)])
    return {"deterministic": torch.equal(whole, again), "batch invariant": torch.equal(whole, pieces)}


def profile(converted: nn.Module, x: torch.Tensor, rounds: int = 5) -> dict:
    """Wall time per integer module type (forward hooks), summed over the model, median of rounds."""
    totals: dict = defaultdict(list)
    starts: dict = {}
    handles = []
    for name, module in converted.named_modules():
        if module is converted or len(list(module.children())):
            continue
        kind = type(module).__name__
        handles.append(module.register_forward_pre_hook(lambda m, i, name=name: starts.__setitem__(name, time.perf_counter())))
        handles.append(
            module.register_forward_hook(
                lambda m, i, o, name=name, kind=kind: current[kind].__setitem__(
                    0, current[kind][0] + time.perf_counter() - starts[name]
                )
            )
        )
    current: dict = defaultdict(lambda: [0.0])
    with torch.inference_mode():
        converted(x)  # warm-up
        for _ in range(rounds):
            current.clear()
            start = time.perf_counter()
            converted(x)
            total = time.perf_counter() - start
            for kind, value in current.items():
                totals[kind].append(value[0])
            totals["(total)"].append(total)
    for handle in handles:
        handle.remove()
    return {kind: statistics.median(v) for kind, v in totals.items()}


def run(threads: int, rounds: int, want_profile: bool) -> list[str]:
    """Measure every model with ``threads`` intra-op threads; returns the markdown section."""
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    clock_name = "process CPU time" if threads == 1 else "wall clock"
    torch.manual_seed(0)
    batches = _calibration_batches()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    rows, convert_rows, exact_rows, profiles = [], [], [], {}
    for name, build in MODELS.items():
        float_model = warm_batch_norm(build(), batches)
        converted, convert_seconds, prepared = hq_converted(float_model, batches)
        ao_model = torch_ao_converted(copy.deepcopy(float_model), batches)
        medians = _medians(
            {"float": float_model, "hq": converted, "val": prepared, "ao": ao_model}, x, rounds, clock
        )
        rows.append((name, medians))
        convert_rows.append((name, convert_seconds))
        checks = exactness(converted, x)
        with torch.inference_mode():
            checks["VALIDATION == converted"] = torch.equal(prepared(x), converted(x))
        exact_rows.append((name, checks))
        if want_profile:
            profiles[name] = profile(converted, x)
        shown = {k: f"{v[0] * 1e3:.1f} ms (best {v[1] * 1e3:.1f})" for k, v in medians.items()}
        print(f"{threads} thread(s)", name, shown, f"convert_fx {convert_seconds:.3f} s", flush=True)

    lines = [
        f"## {threads} thread(s), {clock_name}",
        "",
        f"Median (best) of {rounds} interleaved rounds; the ratios divide the medians (bests).",
        "",
        "| model | float ms | hq converted ms | hq / float | VALIDATION ms | VALIDATION / float "
        "| torch.ao converted ms | torch.ao / float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        (f_med, f_min), (h_med, h_min), (a_med, a_min) = m["float"], m["hq"], m["ao"]
        v_med, v_min = m["val"]
        lines.append(
            f"| {name} | {f_med * 1e3:.1f} ({f_min * 1e3:.1f}) | {h_med * 1e3:.1f} ({h_min * 1e3:.1f}) | "
            f"{h_med / f_med:.2f} ({h_min / f_min:.2f}) | {v_med * 1e3:.1f} ({v_min * 1e3:.1f}) | "
            f"{v_med / f_med:.2f} ({v_min / f_min:.2f}) | {a_med * 1e3:.1f} ({a_min * 1e3:.1f}) | "
            f"{a_med / f_med:.2f} ({a_min / f_min:.2f}) |"
        )
    lines += ["", "convert_fx wall time, median of 3:", "", "| model | seconds |", "|---|---|"]
    lines += [f"| {name} | {s:.3f} |" for name, s in convert_rows]
    lines += [
        "", "Exactness checks of the converted model:", "",
        "| model | deterministic | batch invariant | VALIDATION == converted |", "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {e['deterministic']} | {e['batch invariant']} | {e['VALIDATION == converted']} |"
        for name, e in exact_rows
    ]
    for name, prof in profiles.items():
        total = prof.pop("(total)")
        lines += ["", f"Where the converted {name} spends its time (forward hooks, median of 5):", "", "| module type | ms | share |", "|---|---|---|"]
        for kind, seconds in sorted(prof.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {seconds * 1e3:.1f} | {seconds / total:.0%} |")
        lines.append(f"| (whole forward) | {total * 1e3:.1f} | 100% |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[THREADS, 1],
        help="intra-op thread counts; with 1 the clock is the process CPU time (immune to descheduling)",
    )
    parser.add_argument(
        "--convert-only", action="store_true",
        help="print only the convert-time section (convert_fx and the first forward); writes nothing",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert.md")
    args = parser.parse_args()
    if args.convert_only:
        print("\n".join(convert_time(repeats=5)))
        return
    lines = [
        "# convert_fx: converted-model inference and conversion time",
        "",
        f"torch {torch.__version__}, CPU, batch {BATCH}, {SIZE}x{SIZE} input, 10 classes, real widths "
        "(tests/models.py), on a shared 2-core machine: absolute times are noisy, ratios less so. "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. Produced by `bench/bench_convert.py`.",
        "",
    ]
    for threads in args.threads:
        lines += run(threads, args.rounds, args.profile)
    lines += convert_time(repeats=5)
    # the hand-written "## Analysis" section of an earlier run is kept (it reads these tables)
    if args.out.exists() and ANALYSIS in args.out.read_text():
        lines += [ANALYSIS + args.out.read_text().split(ANALYSIS, 1)[1].rstrip("\n")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
