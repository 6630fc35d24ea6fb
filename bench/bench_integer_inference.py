"""Integer inference benchmark: integer modules against their float counterparts (CPU).

Section 1 (here): model-free micro benchmark of conv layers with ResNet-18 / MobileNetV2 shapes
at 32x32 input, batch 32: time of ``QuantizedConv2d`` (exact int32 accumulation + requant) over
``torch.nn.Conv2d`` (with bias, no BN/ReLU: a stricter baseline than a float model, whose BN and
ReLU are extra passes). ``int64 epilogue`` times the same module through its int64 requantization
(``_forward_int64``, the only path before the exact float64 epilogue, and still the fallback).
Section 2: whole models (``tests/models.py`` ResNet-18 and MobileNetV2, 10 classes, 32x32, batch
32): float model in eval mode (BN and ReLU as separate modules) against the model from
``prepare_qat_fx`` + calibration on random data + ``convert_fx``, and the same converted model with
every float epilogue switched off (the int64 requantization everywhere).

The machine is shared, so the candidates run interleaved (float, integer, int64, float, ...) and
each reports the median of ``--rounds``; ratios are the stable output, absolute times are noisy.
With one thread the clock is the process CPU time (immune to being descheduled); with more
threads it is wall time.

Run: ``PYTHONPATH=. .venv/bin/python bench/bench_integer_inference.py [--rounds 9] [--passes 3]
[--threads 1 2]``;
writes ``bench/results/integer_inference.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from hq_lightning.nn.quantized import QuantizedConv2d

# (name, C_in, C_out, kernel, stride, groups, H) at batch 32, CIFAR-sized ResNet-18 / MobileNetV2.
LAYERS = [
    ("resnet18 conv1 3->64 3x3", 3, 64, 3, 1, 1, 32),
    ("resnet18 layer1 64->64 3x3", 64, 64, 3, 1, 1, 32),
    ("resnet18 layer2 128->128 3x3", 128, 128, 3, 1, 1, 16),
    ("resnet18 layer3 256->256 3x3", 256, 256, 3, 1, 1, 8),
    ("resnet18 layer4 512->512 3x3", 512, 512, 3, 1, 1, 4),
    ("mobilenetv2 expand 24->144 1x1", 24, 144, 1, 1, 1, 16),
    ("mobilenetv2 depthwise 144 3x3", 144, 144, 3, 1, 144, 16),
    ("mobilenetv2 project 144->24 1x1", 144, 24, 1, 1, 1, 16),
    ("mobilenetv2 last 320->1280 1x1", 320, 1280, 1, 1, 1, 4),
]
BATCH = 32


def _medians(fns: dict, rounds: int, clock) -> dict:
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def _layer(c_in, c_out, k, stride, groups, size, gen):
    pad = k // 2
    float_conv = torch.nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups).eval()
    int_conv = QuantizedConv2d.from_float_params(
        float_conv.weight,
        float_conv.bias,
        float_conv.weight.abs().amax(dim=(1, 2, 3)) / 127.5,
        0.03,
        0.05,
        stride=stride,
        padding=pad,
        groups=groups,
        activation="relu",
    )
    # the float model's own layer: conv, eval BatchNorm and ReLU as separate modules
    block = torch.nn.Sequential(float_conv, torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()).eval()
    x_float = torch.randn(BATCH, c_in, size, size, generator=gen)
    x_int = torch.randint(-128, 128, x_float.shape, generator=gen, dtype=torch.int8)
    return float_conv, block, int_conv, x_float, x_int


@torch.no_grad()
def section_layers(rounds: int, threads: int, passes: int) -> list[str]:
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    layers = [(name, *_layer(*shape, gen)) for name, *shape in LAYERS]
    samples: dict = {name: [] for name, *_ in layers}
    for _ in range(
        passes
    ):  # whole passes over the layers, so slow phases of the machine spread out
        for name, float_conv, block, int_conv, x_float, x_int in layers:
            assert torch.equal(int_conv(x_int), int_conv._forward_int64(x_int, None))
            samples[name].append(
                _medians(
                    {
                        "float": lambda: float_conv(x_float),  # noqa: B023
                        "block": lambda: block(x_float),  # noqa: B023
                        "int": lambda: int_conv(x_int),  # noqa: B023
                        "int64": lambda: int_conv._forward_int64(x_int, None),  # noqa: B023
                    },
                    rounds,
                    clock,
                )
            )
    rows = [
        f"### {threads} thread{'s' if threads > 1 else ''} "
        f"({'process CPU time' if threads == 1 else 'wall time'}; per pass the median of "
        f"{rounds} interleaved calls, then the median over {passes} passes)",
        "",
        "| layer | float conv ms | integer ms | ratio (min-max over passes) | ratio over float "
        "conv+BN+ReLU | int64 epilogue ratio | chunks | epilogue |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _, int_conv, _, _ in layers:
        runs = samples[name]
        ratios = [r["int"] / r["float"] for r in runs]
        t_float = statistics.median(r["float"] for r in runs)
        t_int = statistics.median(r["int"] for r in runs)
        ratio_int64 = statistics.median(r["int64"] / r["float"] for r in runs)
        ratio_block = statistics.median(r["int"] / r["block"] for r in runs)
        path = "float64" if int_conv._float_requant is not None else "int64"
        rows.append(
            f"| {name} | {t_float:.2f} | {t_int:.2f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {ratio_block:.2f} | {ratio_int64:.2f} | "
            f"{len(int_conv._plan.chunks)} | {path} |"
        )
        print(rows[-1], flush=True)
    return [*rows, ""]


def _converted(float_model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    from hq_lightning.quantization import convert_fx
    from tests.calibrate import calibrated

    return convert_fx(calibrated(float_model, [torch.randn(BATCH, 3, 32, 32, generator=gen) for _ in range(2)]))


@torch.no_grad()
def section_models(rounds: int, passes: int) -> list[str]:
    from hq_lightning.nn.quantized._weighted import QuantizedWeightedModule
    from tests.models import mobilenet_v2, resnet18

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = [
        f"## Whole models (1 thread, process CPU time; median of {rounds} interleaved calls per "
        f"pass, median over {passes} passes)",
        "",
        "| model | float ms | converted ms | ratio (min-max) | int64 epilogue everywhere ratio "
        "| layers on the float64 epilogue |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in [
        ("resnet18", resnet18(num_classes=10)),
        ("mobilenet_v2", mobilenet_v2(num_classes=10)),
    ]:
        float_model = model.eval()
        converted = _converted(copy.deepcopy(float_model), gen)
        forced = copy.deepcopy(converted)
        weighted = [m for m in forced.modules() if isinstance(m, QuantizedWeightedModule)]
        on_float = sum(
            m._float_requant is not None
            for m in converted.modules()
            if isinstance(m, QuantizedWeightedModule)
        )
        for module in weighted:
            module._float_requant = None
        x = torch.randn(BATCH, 3, 32, 32, generator=gen)
        assert torch.equal(converted(x), forced(x))
        runs = [
            _medians(
                {
                    "float": lambda: float_model(x),  # noqa: B023
                    "int": lambda: converted(x),  # noqa: B023
                    "int64": lambda: forced(x),  # noqa: B023
                },
                rounds,
                time.process_time,
            )
            for _ in range(passes)
        ]
        ratios = [r["int"] / r["float"] for r in runs]
        rows.append(
            f"| {name} | {statistics.median(r['float'] for r in runs):.1f} | "
            f"{statistics.median(r['int'] for r in runs):.1f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{statistics.median(r['int64'] / r['float'] for r in runs):.2f} | "
            f"{on_float}/{len(weighted)} |"
        )
        print(rows[-1], flush=True)
    return [*rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "integer_inference.md"
    )
    args = parser.parse_args()
    lines = [
        "# Integer inference benchmark",
        "",
        f"torch {torch.__version__}, CPU, batch {BATCH}. Integer conv = exact int32 accumulation "
        "(float32 chunks) + bias + per-channel requant + ReLU, int8 in/out "
        "(docs/integer-arithmetic.md section 7). Ratios are over a float Conv2d with bias.",
        "",
        "## Conv layers (model-free)",
        "",
    ]
    for threads in args.threads:
        lines += section_layers(args.rounds, threads, args.passes)
    if not args.skip_models:
        lines += section_models(args.rounds, args.passes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
