"""The operator registry: one entry per op, the page generated from it, the lookups the passes use."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.functional_ops import generate_functional_modules
from hq_lightning.quantization.fx.tracer import symbolic_trace
from hq_lightning.quantization.ops import (
    OpKind,
    OpSpec,
    all_ops,
    lookup_function,
    lookup_functional,
    lookup_method,
    lookup_module,
    lookup_spelling,
    register_op,
    render_operator_table,
    unregister_op,
)
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC

ROOT = Path(__file__).resolve().parents[1]


def test_docs_operators_page_is_generated_from_the_registry():
    page = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")
    assert page == render_operator_table(), (
        "docs/operators.md is stale: run `python -m hq_lightning.quantization.ops docs/operators.md`"
    )


def test_every_entry_is_complete():
    names = [spec.name for spec in all_ops()]
    assert len(names) == len(set(names))
    for spec in all_ops():
        assert spec.summary, spec.name
        assert spec.spellings_text(), f"{spec.name} matches no spelling"
        if spec.kind in (OpKind.WEIGHTED, OpKind.REQUANTIZE):
            assert spec.qat is not None and spec.integer is not None, spec.name
        if spec.error == "bit-exact" and spec.integer is not None:
            assert spec.reference, f"{spec.name} is bit-exact against what?"


def test_lookups_cover_every_spelling_of_an_op():
    conv = lookup_module(nn.Conv2d(1, 1, 1))
    assert conv.name == "conv2d" and lookup_module(qat.Conv2d) is conv  # QAT subclasses match too
    assert lookup_function(operator.add) is lookup_method("add") is lookup_functional("add")
    assert lookup_function(torch.flatten) is lookup_method("flatten")
    assert [s.name for s, _ in lookup_spelling(F.interpolate)] == ["upsample"]
    assert lookup_module(nn.Upsample(scale_factor=2)).preserves_scale(nn.Upsample(scale_factor=2))
    assert not lookup_module(nn.Upsample(scale_factor=2, mode="bilinear")).preserves_scale(
        nn.Upsample(scale_factor=2, mode="bilinear")
    )
    assert lookup_module(nn.LSTM(2, 2)) is None


def test_spelling_binds_positional_keyword_and_refuses_run_time_values():
    spelling = lookup_spelling(F.avg_pool2d)[0][1]
    x, ctor = spelling.bind(("x", 3), {"stride": 1})
    assert x == "x" and ctor["kernel_size"] == 3 and ctor["stride"] == 1 and ctor["padding"] == 0
    assert spelling.bind(("x",), {}) is None  # kernel_size is required
    assert spelling.bind(("x", 2), {"bogus": 1}) is None
    graph = torch.fx.Graph()
    node = graph.placeholder("k")
    assert spelling.bind(("x", node), {}) is None  # computed at run time
    interpolate = lookup_spelling(F.interpolate)[0][1]
    assert interpolate.bind(("x",), {"scale_factor": 2, "antialias": True}) is None  # fixed must hold


def test_duplicate_name_is_refused_unless_replaced():
    spec = lookup_module(nn.ReLU())
    with pytest.raises(ValueError, match="registered already"):
        register_op(spec)
    assert register_op(spec, replace=True) is spec


class _Halve(nn.Module):
    """A user's own op: halves its input (a requantizing op with an integer kernel)."""

    def forward(self, x):
        return x * 0.5


class _QATHalve(_Halve):
    def __init__(self, qconfig=None):
        super().__init__()
        self.qconfig = qconfig
        self.activation_post_process = qconfig.activation()

    @classmethod
    def from_float(cls, mod, qconfig=None):
        return cls(qconfig or mod.qconfig)

    def forward(self, x):
        return self.activation_post_process(super().forward(x))


class _IntHalve(nn.Module):
    def __init__(self, s_in, s_out):
        super().__init__()
        self.factor = float(s_in) * 0.5 / float(s_out)

    def forward(self, q):
        return torch.round(q.double() * self.factor).clamp(-128, 127).to(torch.int8)


def test_one_entry_adds_an_op_end_to_end():
    """A newcomer's op: one register_op call makes it prepare, calibrate and convert."""
    register_op(
        OpSpec(
            "test_halve", OpKind.REQUANTIZE, "q * s_in / 2 requantized", modules=(_Halve,),
            qat=_QATHalve,
            integer=lambda ctx: _IntHalve(ctx.input.scale, ctx.output.scale),
            reference="tests/test_ops_registry.py::test_one_entry_adds_an_op_end_to_end",
        ),
        replace=True,
    )
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.halve = QuantStub(), DeQuantStub(), _Halve()

        def forward(self, x):
            return self.dequant(self.halve(self.quant(x)))

    try:
        prepared = prepare_qat_fx(Net(), {"": QC})
        assert isinstance(prepared.halve, _QATHalve)
        prepared.eval()
        set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
        x = torch.randn(4, 8)
        prepared(x)
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        converted = convert_fx(prepared)
        assert isinstance(converted.halve, _IntHalve)
        s_out = prepared.halve.activation_post_process.scale
        assert (converted(x) - prepared(x)).abs().max() <= s_out + 1e-6
        assert qat_mapping.qat_class_for(_Halve()) is _QATHalve
    finally:
        unregister_op("test_halve")
    assert lookup_module(_Halve()) is None and qat_mapping.qat_class_for(_Halve()) is None


def test_generated_modules_come_from_registry_spellings():
    class Net(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2) + F.interpolate(x, scale_factor=1)

    gm = generate_functional_modules(symbolic_trace(Net()))
    children = dict(gm.named_children())
    assert isinstance(children["_generated_avg_pool2d_0"], nn.AvgPool2d)
    assert isinstance(children["_generated_interpolate_0"], nn.Upsample)
    assert "_generated_add_0" in children
