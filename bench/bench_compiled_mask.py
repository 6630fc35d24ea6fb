"""Compiled QAT step, the fake quant's STE mask recomputed in backward against merged into forward.

``_TracedFakeQuantize.backward`` recomputes the in-range mask as ``round(inv_scale * x)``; written
with the forward's own ``x * inv_scale``, AOTAutograd's CSE merges the recomputation into the
forward and the partitioner then keeps the masks for backward (bench/results/qat_step.md,
"Issue 15, third pass"). This A/B compiles the same prepared model twice in one process, once with
each backward (the previous one patched in), beside the compiled float step, and prints the median
step of each (and with ``--profile``, the top kernels of both QAT variants).

Run::

    .venv/bin/python bench/bench_compiled_mask.py --device cpu --size 32 --batch 32 --threads 1
    python3 bench/bench_compiled_mask.py --device cuda --size 224 --batch 64 --profile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_qat_step  # noqa: E402

from hq_lightning.quantization import fake_quantize as fake_quantize_module  # noqa: E402

RECOMPUTED_IN_BACKWARD = fake_quantize_module._TracedFakeQuantize.backward


@staticmethod
def _merged_into_forward(ctx, grad):
    """The previous backward: the forward's ``x * inv_scale``, which CSE merges into the forward."""
    x, inv_scale = ctx.saved_tensors
    with torch.no_grad():
        q = torch.round(torch.mul(x.float(), inv_scale))
        mask = fake_quantize_module._float_in_range(q, torch.clamp(q, *ctx.qrange))
    return torch.mul(grad, mask.to(grad.dtype)), None, None, None, None


VARIANTS = {"float compiled": None, "mask recomputed in backward": RECOMPUTED_IN_BACKWARD,
            "mask merged into forward": _merged_into_forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, target = bench_qat_step.inputs(args.batch, args.size, 10, args.device)
    torch.manual_seed(0)
    model = bench_qat_step.float_model("torchvision", args.model, 10)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    medians = {}
    for name, backward in VARIANTS.items():
        if backward is not None:
            fake_quantize_module._TracedFakeQuantize.backward = backward
        torch._dynamo.reset()
        started = time.perf_counter()
        variant = "float compiled" if backward is None else "hq fuse_bn compiled"
        step = bench_qat_step.make_step(
            bench_qat_step.build(model, variant, x.cpu(), args.device), args.device
        )
        for _ in range(3):  # compiles
            step(x, target)
        sync()
        warmup = time.perf_counter() - started
        times = []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            step(x, target)
            sync()
            times.append(time.perf_counter() - start)
        medians[name] = sorted(times)[len(times) // 2]
        print(f"{name}: {1000 * medians[name]:.2f} ms median step, "
              f"{medians[name] / medians['float compiled']:.2f}x compiled float "
              f"(compile + warm-up {warmup:.0f} s)", flush=True)
        if args.profile and backward is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(2):
                    step(x, target)
                sync()
            key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=110))
    fake_quantize_module._TracedFakeQuantize.backward = RECOMPUTED_IN_BACKWARD


if __name__ == "__main__":
    main()
