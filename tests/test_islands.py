"""Float islands (issue 11, items 2 and 3): ops that run in float inside the integer model.

Every island goes prepare -> calibrate -> QAT step -> convert, the converted model stays one
GraphModule, and is within one output step of the fake-quant path. The strict mode
(``allow_float_islands=False``) names each op, why it cannot run on integers and what to do;
every remedy it offers is applied here to the failing model and goes through.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import fx, nn

from hq_lightning import set_march
from hq_lightning.deploy import export_onnx, export_torchscript, run_onnx, run_stages, split_stages
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization import (
    DeQuantStub,
    FloatIslandWarning,
    QuantStub,
    float_islands,
    ops,
)
from hq_lightning.quantization.fx.islands import REMEDIES
from hq_lightning.quantization.fx.prepare import UnsupportedOperationError
from hq_lightning.quantization.ops import registry
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC
from hq_lightning.utils.fx_helper import wrap
from tests.test_graph_coverage import _steps, _through


@pytest.fixture(autouse=True)
def _bayes():
    set_march("bayes")
    yield
    set_march("bayes")


@pytest.fixture
def restore_registry():
    saved = {k: copy.copy(v) for k, v in vars(registry._REGISTRY).items()}
    yield
    for k, v in saved.items():
        setattr(registry._REGISTRY, k, v)


class CumSum(nn.Module):
    """An op no march has an integer form of."""

    def forward(self, x):
        return torch.cumsum(x, dim=1)


@wrap()
def running_sum(x):
    return torch.cumsum(x, dim=1)


def cumsum_function(x):
    return torch.cumsum(x, dim=1)


torch.fx.wrap("cumsum_function")  # a library's helper torch.fx keeps whole


class Sandwich(nn.Module):
    """Conv -> <op> -> Conv, the issue's failing shape; ``how`` picks the op's spelling."""

    def __init__(self, how: str = "module"):
        super().__init__()
        self.how = how
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.op = CumSum()
        if how.startswith("stubs"):
            self.pre, self.post = DeQuantStub(), QuantStub()

    def forward(self, x):
        x = self.conv1(self.quant(x))
        if self.how == "module":
            x = self.op(x)
        elif self.how == "wrap":
            x = running_sum(x)
        elif self.how == "fx_wrap":
            x = cumsum_function(x)
        elif self.how == "stubs":
            x = self.post(self.op(self.pre(x)))
        elif self.how == "stubs_relu":
            x = self.post(torch.relu(self.pre(x)))
        elif self.how == "none":
            pass
        return self.dequant(self.conv2(x))


X = torch.randn(8, 3, 5, 5)


def _islands(model, qconfig_dict=None):
    with pytest.warns(FloatIslandWarning):
        prepared, converted = _through(model, X, qconfig=QC) if qconfig_dict is None else _through_dict(model, qconfig_dict)
    assert isinstance(converted, fx.GraphModule)
    assert _steps(converted, prepared, X) <= 1.0
    return prepared, converted


def _through_dict(model, qconfig_dict):
    from hq_lightning.quantization import (
        FakeQuantState,
        convert_fx,
        prepare_qat_fx,
        set_fake_quantize,
    )

    torch.manual_seed(0)
    prepared = prepare_qat_fx(model, qconfig_dict)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        prepared(X)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    prepared(X).square().mean().backward()
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared, convert_fx(prepared)


@pytest.mark.parametrize(
    ("how", "qconfig_dict", "kind"),
    [
        ("module", None, "no_integer_form"),
        ("wrap", None, "user_float"),
        ("fx_wrap", None, "opaque_leaf"),
        ("stubs", None, "user_stubs"),
        ("none", {"": QC, "module_name": {"conv1": None}}, "user_float"),
    ],
)
def test_each_kind_of_island_converts_to_one_graph(how, qconfig_dict, kind):
    prepared, converted = _islands(Sandwich(how), qconfig_dict)
    (island,) = float_islands(prepared)
    assert island.reasons == (kind,)
    assert float_islands(converted) == [island]
    kinds = {type(converted.get_submodule(p)).__name__ for p in island.entries + island.exits}
    assert kinds <= {"DeQuantize", "Quantize"}
    if how == "none":  # the float conv: the model's input is dequantized, conv1 runs in float
        assert type(converted.conv1) is nn.Conv2d


def test_the_models_own_stub_pair_is_an_island_and_reentry_is_observed_and_trained():
    prepared, converted = _islands(Sandwich("stubs_relu"))
    (island,) = float_islands(prepared)
    assert island.reasons == ("user_stubs",) and island.entries == ("pre",) and island.exits == ("post",)
    # an inserted re-entry stub is a QuantStub like the model's own: observed, then trained
    prepared, _ = _islands(Sandwich("module"))
    (island,) = float_islands(prepared)
    (exit_path,) = island.exits
    stub = prepared.get_submodule(exit_path)
    assert stub.activation_post_process.activation_post_process.initialized


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_run_as_islands_and_deploy_in_three_stages(rnn, tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv, self.fc = nn.Conv1d(4, 8, 1), nn.Linear(8, 2)
            self.rnn = rnn(8, 8, batch_first=True)

        def forward(self, x):
            y, _ = self.rnn(self.conv(self.quant(x)).transpose(1, 2))
            return self.dequant(self.fc(y[:, -1]))

    x = torch.randn(8, 4, 10)
    with pytest.warns(FloatIslandWarning, match=rnn.__name__):
        prepared, converted = _through(Net(), x)
    (island,) = float_islands(prepared)
    assert [op.what for op in island.ops] == [f"nn.{rnn.__name__}"]
    assert type(converted.rnn) is rnn
    assert _steps(converted, prepared, x) <= 1.0
    stages = split_stages(converted, "auto")
    assert len(stages) == 3  # integer, float (the island), integer
    assert not any(isinstance(m, rnn) for m in stages[0].modules())
    assert any(isinstance(m, rnn) for m in stages[1].modules())
    assert isinstance(stages[2].get_submodule(island.exits[0]), nnq.Quantize)
    for seed in range(2):
        y = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run_stages(stages, y), converted(y))
    traced = export_torchscript(converted, (x,), tmp_path / "island.pt")
    assert torch.equal(traced(x), converted(x))
    if rnn is nn.LSTM:  # ONNX carries the island too (onnxruntime's float LSTM: within a step)
        path = export_onnx(converted, (x,), tmp_path / "island.onnx", optimize=False, atol=1e-6)
        (got,) = run_onnx(path, x)
        assert float(((got - converted(x)).abs() / converted.dequant.scale).max()) <= 1.0001


def _strict(model, **kwargs):
    from hq_lightning.quantization import prepare_qat_fx

    with pytest.raises(UnsupportedOperationError) as info:
        prepare_qat_fx(model, kwargs.pop("qconfig_dict", {"": QC}), allow_float_islands=False)
    return str(info.value)


def _strict_ok(model, qconfig_dict=None):
    """The remedy worked: prepare in strict mode, calibrate, QAT step, convert."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatIslandWarning)
        prepared, converted = _through(model, X, allow_float_islands=False) if qconfig_dict is None else (None, None)
    if qconfig_dict is not None:
        from hq_lightning.quantization import prepare_qat_fx

        prepare_qat_fx(model, qconfig_dict, allow_float_islands=False)
        return
    assert float_islands(prepared) == [] and _steps(converted, prepared, X) <= 1.0


def test_strict_error_names_the_ops_says_why_and_offers_remedies_that_work(restore_registry):
    message = _strict(Sandwich("module"))
    first = message.splitlines()[0]
    assert first.endswith("but 1 cannot: torch.cumsum (cumsum)")
    assert f"why: no integer form on this march. Remedy: {REMEDIES['no_integer_form']}." in message
    # remedy 1: let it run as a float island (the default)
    _islands(Sandwich("module"))

    # remedy 2: move it out of the quantized region (here: after the model's DeQuantStub)
    class OpAfter(Sandwich):
        def forward(self, x):
            return self.op(self.dequant(self.conv2(self.conv1(self.quant(x)))))

    _strict_ok(OpAfter())

    # remedy 3: give it an integer form (here: a scale-preserving op registered for the module)
    class Shift(nn.Module):
        def forward(self, x):
            return torch.roll(x, 1, 1)

    class Registered(Sandwich):
        def __init__(self):
            super().__init__()
            self.op = Shift()

    ops.register_op(ops.OpSpec("test_shift", ops.OpKind.PRESERVE, "rolls integer codes", modules=(Shift,)))
    _strict_ok(Registered())


def test_strict_runtime_argument_and_its_remedy():
    class Pool(Sandwich):
        def forward(self, x):
            x = self.conv1(self.quant(x))
            return self.dequant(self.conv2(torch.nn.functional.avg_pool2d(x, x.shape[-1])))

    message = _strict(Pool())
    assert "avg_pool2d" in message.splitlines()[0]
    assert "why: argument computed at run time that cannot be kept" in message
    assert "argument `kernel_size` is computed at run time" in message
    _islands(Pool())  # remedy: a float island

    class Adaptive(Sandwich):  # remedy: a constant argument
        def forward(self, x):
            x = self.conv1(self.quant(x))
            return self.dequant(self.conv2(torch.nn.functional.adaptive_avg_pool2d(x, 1)))

    _strict_ok(Adaptive())


def test_strict_opaque_leaf_and_its_remedies():
    message = _strict(Sandwich("fx_wrap"))
    assert "cumsum_function" in message.splitlines()[0] and "why: leaf that cannot be seen into" in message
    _islands(Sandwich("fx_wrap"))  # remedy: a float island

    class Outside(Sandwich):  # remedy: out of the quantized region
        def forward(self, x):
            return cumsum_function(self.dequant(self.conv2(self.conv1(self.quant(x)))))

    _strict_ok(Outside())


def test_strict_user_float_and_user_stubs_and_their_remedies():
    message = _strict(Sandwich("none"), qconfig_dict={"": QC, "module_name": {"conv1": None}})
    assert "nn.Conv2d (conv1)" in message.splitlines()[0] and "why: kept in float on purpose" in message
    _strict_ok(Sandwich("none"))  # remedy: drop the None qconfig
    message = _strict(Sandwich("stubs_relu"))
    assert "why: between the model's own DeQuantStub and QuantStub" in message
    _strict_ok(Sandwich("none"))  # remedy: drop the pair (the same model without it)
    _islands(Sandwich("stubs_relu"))  # remedy: allow the island
