"""Integer inference benchmark: integer modules against their float counterparts (CPU, 1 thread).

Section 1 (here): model-free micro benchmark of conv layers with ResNet-18 / MobileNetV2 shapes
at 32x32 input, batch 32: time of ``QuantizedConv2d`` (exact int32 accumulation + requant) over
``torch.nn.Conv2d``. Section 2 (converted vs float models, with torch.ao's converted model as a
baseline) is added as another ``section_*`` function once ``convert_fx`` exists.

Run: ``PYTHONPATH=. .venv/bin/python bench/bench_integer_inference.py [--repeat 3]``; writes
``bench/results/integer_inference.md``.
"""

from __future__ import annotations

import argparse
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


def _time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@torch.no_grad()
def section_layers(repeat: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    rows = [
        "| layer | float conv ms | integer conv ms | ratio | chunks |",
        "|---|---|---|---|---|",
    ]
    for name, c_in, c_out, k, stride, groups, size in LAYERS:
        pad = k // 2
        float_conv = torch.nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups).eval()
        x_float = torch.randn(BATCH, c_in, size, size, generator=gen)
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
        x_int = torch.randint(-128, 128, x_float.shape, generator=gen, dtype=torch.int8)
        t_float = _time(lambda: float_conv(x_float), repeat)  # noqa: B023
        t_int = _time(lambda: int_conv(x_int), repeat)  # noqa: B023
        chunks = len(int_conv._plan.chunks)
        rows.append(f"| {name} | {t_float:.2f} | {t_int:.2f} | {t_int / t_float:.2f} | {chunks} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "integer_inference.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Integer inference benchmark",
        "",
        f"torch {torch.__version__}, CPU, 1 thread, batch {BATCH}, best of {args.repeat}; shared 2-core "
        "machine, so absolute times are noisy. Integer conv = exact int32 accumulation (float32 "
        "chunks, docs/integer-arithmetic.md section 7) + bias + per-channel requant + ReLU, int8 in/out.",
        "",
        "## Conv layers (model-free)",
        "",
        *section_layers(args.repeat),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
