"""Converted / float inference and QAT / float training step, for a CNN and a ViT (issue 10).

Models, random init, ``num_classes=10``, wrapped ``QuantStub -> model -> DeQuantStub``, march BAYES,
``default_qat_8bit_fake_quant_qconfig``:

- ``mobilenet_v3_small`` (torchvision), 32x32 input;
- ``vit_small``: torchvision's ``VisionTransformer(image_size=32, patch_size=8, num_layers=4,
  num_heads=4, hidden_dim=128, mlp_dim=256)`` (16 patches + the class token), which exercises
  ``nn.MultiheadAttention``, the class-token ``cat``, the position-embedding ``add``, LayerNorm
  and GELU.

Inference: the float model vs ``convert_fx`` of the calibrated model (``torch.no_grad``). Step:
forward, cross-entropy, backward, SGD update, float vs the prepared model in QAT. Median of the
timed repetitions after warm-up, all variants interleaved round-robin (load drifts over all of
them alike), one intra-op thread.

Run (writes bench/results/ops.md)::

    .venv/bin/python bench/bench_ops.py --batch 8 --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torchvision  # noqa: E402
from bench_qat_step import Stubbed  # noqa: E402
from torch import nn  # noqa: E402

from hq_lightning.march import set_march  # noqa: E402
from hq_lightning.quantization import (  # noqa: E402
    FakeQuantState,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig  # noqa: E402


def build(name: str) -> nn.Module:
    if name == "mobilenet_v3_small":
        return torchvision.models.mobilenet_v3_small(num_classes=10)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=10
    )


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def measure(name: str, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    float_model = Stubbed(build(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = prepare_qat_fx(float_model, {"": default_qat_8bit_fake_quant_qconfig})
    qat.eval()
    set_fake_quantize(qat, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        qat(x)
    converted = convert_fx(qat)
    qat.train()
    set_fake_quantize(qat, FakeQuantState.QAT)
    float_train = Stubbed(build(name)).train()
    float_model.eval()

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)

        return run

    variants = {
        "float inference": infer(float_model),
        "converted inference": infer(converted),
        "float step": step_fn(float_train, x, y),
        "QAT step": step_fn(qat, x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):  # warm-up
        for fn in variants.values():
            fn()
    for _ in range(repeats):
        for key, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ops.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_march("bayes")
    rows = []
    for name in ("mobilenet_v3_small", "vit_small"):
        t = measure(name, args.batch, args.repeats)
        rows.append(
            f"| {name} | {t['float inference']:.1f} | {t['converted inference']:.1f} | "
            f"{t['converted inference'] / t['float inference']:.2f}x | {t['float step']:.1f} | "
            f"{t['QAT step']:.1f} | {t['QAT step'] / t['float step']:.2f}x |"
        )
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Converted and QAT cost of a CNN and a ViT (issue 10)",
        "",
        f"`bench/bench_ops.py --batch {args.batch} --repeats {args.repeats}`: 32x32 input, batch {args.batch}, "
        f"1 intra-op thread, median ms, torch {torch.__version__}, {platform.machine()} "
        "(a shared 2-core machine: ratios are steadier than absolute times).",
        "",
        "| model | float inference | converted inference | converted / float | float step | QAT step | QAT / float |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "vit_small: torchvision VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4, "
        "hidden_dim=128, mlp_dim=256). The converted ViT runs every piece on integers: exact int64 matmuls "
        "(float32 / float64 where proved exact), the exp-table softmax, LayerNorm and GELU tables.",
        "",
    ])  # fmt: skip
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
