"""End to end (issue 10): seven torchvision classifiers, random init, batch 8, march BAYES, each
wrapped ``QuantStub -> model -> DeQuantStub``, go through calibration -> one QAT step -> convert
with no float op left between the stubs (no float island), and the converted model agrees with
VALIDATION (>= 99 % of outputs within one output step).

Inputs are the smallest each model takes: 32x32 (ViT-B/16 built with ``image_size=32``: 2x2
patches + the class token; Swin-T pads its 8x8 patch grid to its 7x7 windows, so 32 works too).
A model that still needs an op is a strict xfail naming it, so the test flips to a failure
(remove the mark) the day that op lands; none does today.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from hq_lightning.march import March, march_context
from hq_lightning.quantization import (
    FakeQuantState,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from hq_lightning.quantization.fx.islands import float_islands
from hq_lightning.quantization.ops import lookup_module
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.models import Stubbed

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

MODELS = {
    "mobilenet_v3_small": ({}, None),
    "efficientnet_b0": ({}, None),
    "regnet_y_400mf": ({}, None),
    "densenet121": ({}, None),
    "convnext_tiny": ({}, None),
    "vit_b_16": ({"image_size": 32}, None),
    "swin_t": ({}, None),
}


def _params(name):
    kwargs, missing = MODELS[name]
    marks = [pytest.mark.xfail(strict=True, reason=missing)] if missing else []
    return pytest.param(name, kwargs, marks=marks, id=name)


@pytest.mark.parametrize(("name", "kwargs"), [_params(n) for n in MODELS])
def test_classifier_converts_fully_integer(name, kwargs):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with march_context(March.BAYES):
            model = Stubbed(getattr(torchvision.models, name)(num_classes=10, **kwargs))
            x = torch.randn(8, 3, 32, 32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
            islands = [str(op) for island in float_islands(prepared) for op in island.ops]
            assert islands == [], "float ops between the stubs:\n" + "\n".join(islands)

            prepared.eval()  # calibration: observers see data, fake quant off
            set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
            with torch.no_grad():
                prepared(x)
            prepared.train()  # one QAT step
            set_fake_quantize(prepared, FakeQuantState.QAT)
            optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
            loss = nn.functional.cross_entropy(prepared(x), torch.randint(0, 10, (8,)))
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)

            prepared.eval()
            set_fake_quantize(prepared, FakeQuantState.VALIDATION)
            converted = convert_fx(prepared)
            _assert_integer_between_stubs(converted)
            with torch.no_grad():
                out = converted(x)
                validation = prepared(x)
                with fake_quant_path():
                    fake_quant = prepared(x)
            step = float(converted.dequant.scale)
            within = ((out - validation).abs() <= step * 1.001).float().mean().item()
            assert within >= 0.99, f"{within:.4f} of outputs within one step of VALIDATION"
            fq_within = ((out - fake_quant).abs() <= step * 1.001).float().mean().item()
            print(f"{name}: {time.perf_counter() - start:.1f} s on 1 thread; converted vs "
                  f"fake-quant path: {fq_within:.4f} within one step")  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _assert_integer_between_stubs(converted: nn.Module) -> None:
    """Every module the converted graph calls is integer or moves codes (no float module left)."""
    modules = dict(converted.named_modules())
    floating = []
    for node in converted.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[str(node.target)]
        kind = type(module).__module__
        if kind.startswith("hq_lightning.nn.quantized") or kind.startswith("hq_lightning.quantization.stubs"):
            continue
        spec = lookup_module(module)
        if spec is not None and spec.preserves_scale(module) and spec.integer is None:
            continue  # moves or selects integer codes as it is (Identity, ReLU, StochasticDepth...)
        if kind.startswith("torchvision.ops.misc") and type(module).__name__ == "Permute":
            continue
        floating.append(f"{node.target}: {type(module).__name__}")
    assert floating == [], "float modules in the converted model: " + ", ".join(floating)
