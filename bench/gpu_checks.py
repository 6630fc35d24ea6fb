"""Per-op figures for the GPU suite (bench/gpu_suite.sh): fake quant against a plain copy, and the
converted (integer) model against the float model.

``fakequant``: forward + backward of ``fake_quantize`` on an activation (per tensor) and a weight
(per channel) against ``x.clone()`` forward + backward of the same tensor: the cheapest op that reads
and writes every element and has a backward. Eager, and compiled (``torch.compile`` of the
function; the formula fuses into one kernel each way).

``converted``: inference of the converted model (``prepare_qat_fx`` + calibration on random data +
``convert_fx``) against the float model in eval mode, same input, same device.

Medians of ``--repeats`` timed runs after a warm-up; CUDA times use ``torch.cuda.synchronize``
around each run. Markdown goes to stdout (the suite appends it to gpu.md).

Run: ``python bench/gpu_checks.py fakequant --device cuda`` / ``... converted --device cuda``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch

from hq_lightning.march import set_march
from hq_lightning.quantization.fake_quantize import fake_quantize


def _timed(fn, device: str, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fake_quant_rows(device: str, batch: int, size: int, repeats: int, backend: str) -> list[str]:
    """Rows: tensor, mode, fake quant fwd+bwd (ms), copy fwd+bwd (ms), ratio."""
    activation = torch.randn(batch, 64, size, size, device=device)
    weight = torch.randn(512, 512, 3, 3, device=device)
    cases = [
        (f"activation {tuple(activation.shape)}, per tensor", activation, torch.tensor([0.02], device=device), None),
        (f"weight {tuple(weight.shape)}, per channel", weight, torch.rand(512, device=device) * 0.01 + 1e-3, 0),
    ]
    rows = ["| tensor | mode | fake quant fwd+bwd (ms) | copy fwd+bwd (ms) | / copy |", "|---|---|---|---|---|"]
    for label, tensor, scale, axis in cases:
        leaf = tensor.clone().requires_grad_(True)
        grad = torch.ones_like(tensor)

        def quant(x, scale=scale, axis=axis):
            return fake_quantize(x, scale, "qint8", axis)

        def copy(x):
            return x.clone()

        for mode in ("eager", "compiled"):
            fq, cp = (quant, copy) if mode == "eager" else (
                torch.compile(quant, backend=backend), torch.compile(copy, backend=backend))

            def run(function, leaf=leaf, grad=grad):
                def step():
                    leaf.grad = None
                    function(leaf * 1.0).backward(grad)  # a non-leaf input, as an activation is
                return step

            t_fq = _timed(run(fq), device, repeats)
            t_cp = _timed(run(cp), device, repeats)
            rows.append(f"| {label} | {mode} | {t_fq * 1e3:.3f} | {t_cp * 1e3:.3f} | {t_fq / t_cp:.2f} |")
    return rows


def converted_rows(device: str, batch: int, size: int, repeats: int, models: list[str]) -> list[str]:
    """Rows: model, float inference (ms), converted inference (ms), ratio."""
    import torchvision
    from bench_qat_step import Stubbed

    from hq_lightning.quantization import convert_fx
    from tests.calibrate import calibrated

    rows = ["| model | float eval (ms) | converted (ms) | / float |", "|---|---|---|---|"]
    x = torch.randn(batch, 3, size, size)
    for name in models:
        torch.manual_seed(0)
        model = Stubbed(getattr(torchvision.models, name)(num_classes=10)).eval()
        prepared = calibrated(model, [torch.randn(batch, 3, size, size) for _ in range(2)])
        converted = convert_fx(prepared).to(device)
        model = model.to(device)
        xd = x.to(device)
        with torch.no_grad():
            t_float = _timed(lambda model=model, xd=xd: model(xd), device, repeats)
            t_int = _timed(lambda converted=converted, xd=xd: converted(xd), device, repeats)
        rows.append(f"| {name} | {t_float * 1e3:.2f} | {t_int * 1e3:.2f} | {t_int / t_float:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("fakequant", "converted"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=56, help="activation H = W (fakequant), input size (converted)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    args = parser.parse_args(argv)
    set_march("bayes")
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the smoke run: spinning intra-op threads on a shared CPU
    if args.what == "fakequant":
        rows = fake_quant_rows(args.device, args.batch, args.size, args.repeats, args.compile_backend)
    else:
        rows = converted_rows(args.device, args.batch, args.size, args.repeats, args.models.split(","))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
