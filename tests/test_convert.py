"""convert_fx: scale wiring against a hand-computed integer reference, propagation rules, modes,
bad inputs, storage size and save/load round trips, and the chapter's RGB888 sample."""

from __future__ import annotations

import copy
import io
import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from hq_lightning.march import march_context
from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.convert import NON_TENSOR, QParams, propagate_qparams
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from hq_lightning.quantization.fx.tracer import symbolic_trace
from hq_lightning.quantization.qconfig import (
    default_qat_8bit_fake_quant_qconfig,
    default_qat_8bit_weight_32bit_out_fake_quant_qconfig,
    default_qat_16bit_fake_quant_qconfig,
)
from tests.chapter_samples import insert_centered_yuv2rgb_by_hand, rgb888_converted
from tests.models import resnet18
from tests.reference.integer_ref import (
    ref_bias,
    ref_conv2d,
    ref_conv_output,
    ref_dequantize,
    ref_multipliers,
    ref_quantize,
    ref_relu6,
    ref_requant,
)

QC = default_qat_8bit_fake_quant_qconfig
QC_INT32_OUT = default_qat_8bit_weight_32bit_out_fake_quant_qconfig


def _calibrate(prepared: nn.Module, *inputs: torch.Tensor, steps: int = 3) -> nn.Module:
    """A few QAT-mode forwards (observers and BN statistics update), then VALIDATION."""
    prepared.train()
    with torch.no_grad():
        for _ in range(steps):
            prepared(*inputs)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


class ResidualNet(nn.Module):
    """quant -> conv-bn-relu -> conv-bn (+ first conv's output) relu -> maxpool -> fc (int32) -> dequant."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.dequant = DeQuantStub()
        for bn in (self.bn1, self.bn2):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)

    def forward(self, x):
        x = self.quant(x)
        y = F.relu(self.bn1(self.conv1(x)))
        z = F.relu(self.bn2(self.conv2(y)) + y)
        z = torch.flatten(self.pool(z), 1)
        return self.dequant(self.fc(z))


def _prepared_residual(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    prepared = prepare_qat_fx(ResidualNet(), {"": QC, "module_name": {"fc": QC_INT32_OUT}})
    x = torch.randn(4, 3, 6, 6)
    _calibrate(prepared, x)
    return prepared, x


def _qat_modules_in_order(prepared: fx.GraphModule, cls: type) -> list[nn.Module]:
    modules = dict(prepared.named_modules())
    return [
        modules[n.target]
        for n in prepared.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], cls)
    ]


def _ref_weight(weight: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    # docs/integer-arithmetic.md section 2, per output channel, with numpy's half-even rounding
    w = weight.detach().numpy().astype(np.float32)
    inv = (np.float32(1.0) / scale.numpy().astype(np.float32)).reshape([-1] + [1] * (w.ndim - 1))
    return np.clip(np.round((w * inv).astype(np.float32)), -128, 127).astype(np.int64)


def _ref_conv_layer(x_q, module, s_in, s_out, out_dtype="qint8", activation=None, addend=None, s_y=None):
    weight, bias = module.folded_weight_bias()
    s_w = module.weight_fake_quant.scale.detach()
    w_q = _ref_weight(weight, s_w)
    b_q = [ref_bias(float(b), s_in, float(sw)) for b, sw in zip(bias.detach().tolist(), s_w.tolist())]
    stride, padding = module.stride, module.padding
    acc = ref_conv2d(x_q, w_q, stride=stride, padding=padding, groups=module.groups)
    return ref_conv_output(
        acc, b_q, s_in, s_w.tolist(), s_out, out_dtype, activation=activation, addend=addend, s_y=s_y
    )


def test_converted_residual_net_equals_hand_computed_integer_reference():
    prepared, x = _prepared_residual()
    converted = convert_fx(prepared)
    x = x[:1]
    out = converted(x)

    # the reference reads only the prepared model's scales and folded float weights
    s_x = float(prepared.quant.activation_post_process.scale)
    conv1, conv2 = _qat_modules_in_order(prepared, qat.Conv2d)
    (fc,) = _qat_modules_in_order(prepared, qat.Linear)
    s1 = float(conv1.activation_post_process.scale)
    s2 = float(conv2.activation_post_process.scale)
    assert conv2.has_add and fc.activation_post_process is None

    x_q = ref_quantize(x.numpy(), s_x, "qint8")
    y_q = _ref_conv_layer(x_q, conv1, s_x, s1, activation="relu")
    z_q = _ref_conv_layer(y_q, conv2, s1, s2, activation="relu", addend=y_q, s_y=s1)
    pooled = z_q.reshape(1, 4, 3, 2, 3, 2).max(axis=(3, 5)).reshape(1, -1)  # MaxPool2d(2)
    weight, bias = fc.folded_weight_bias()
    s_w = fc.weight_fake_quant.scale.detach()
    w_q = _ref_weight(weight, s_w)
    acc = [
        sum(int(pooled[0, k]) * int(w_q[c, k]) for k in range(w_q.shape[1]))
        + ref_bias(float(bias.detach()[c]), s2, float(s_w[c]))
        for c in range(w_q.shape[0])
    ]
    scales = [float(np.float32(s2 * float(s_w[c]))) for c in range(w_q.shape[0])]
    expected = ref_dequantize(np.array([acc], dtype=np.int64), scales)

    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(expected))


def test_converted_intermediate_tensors_are_integers_with_the_fake_quant_scales():
    prepared, x = _prepared_residual()
    converted = convert_fx(prepared)
    seen: dict[str, torch.dtype] = {}
    for name, module in converted.named_modules():
        if isinstance(module, (nnq.Quantize, nnq.QuantizedConv2d, nnq.QuantizedLinear, nnq.QuantizedMaxPool2d)):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    converted(x)
    assert set(seen.values()) <= {torch.int8, torch.int32}
    assert torch.int32 in seen.values()  # the high-precision fc
    assert converted.quant.scale.item() == prepared.quant.activation_post_process.scale.item()
    assert isinstance(converted.dequant, nnq.DeQuantize)
    assert converted.dequant.scale.numel() == 5  # per-channel s_in * s_w of the int32 fc output


def test_propagation_rules():
    prepared, _ = _prepared_residual()
    env = propagate_qparams(prepared)
    by_name = {n.name: n for n in prepared.graph.nodes}
    modules = dict(prepared.named_modules())
    quant = env[by_name["quant"]]
    assert isinstance(quant, QParams) and quant.dtype.value == "qint8" and not quant.per_channel
    assert torch.equal(quant.scale, prepared.quant.activation_post_process.scale)
    for node in prepared.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.MaxPool2d) or node.target is torch.flatten:
            # scale-preserving: the scale of its input
            assert env[node] is env[node.args[0]]
        if isinstance(module, qat.Linear):
            out = env[node]
            s_w = module.weight_fake_quant.scale
            assert out.dtype.value == "qint32" and out.ch_axis == -1
            assert torch.equal(out.scale, (env[node.args[0]].scale.double() * s_w.double()).float())
        if isinstance(module, qat.Conv2d):
            assert torch.equal(env[node].scale, module.activation_post_process.scale)
    assert env[by_name["x"]] is None
    dequant = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.target == "dequant")
    assert env[dequant] is None


class TwoInputNet(nn.Module):
    """Two stubs, a generated add, a FloatFunctional-style cat and a mul."""

    def __init__(self) -> None:
        super().__init__()
        self.qx, self.qy = QuantStub(), QuantStub()
        self.dequant = DeQuantStub()

    def forward(self, x, y):
        x, y = self.qx(x), self.qy(y)
        s = x + y
        c = torch.cat([s, x], dim=1)
        return self.dequant(c * c)


def test_functional_ops_get_their_input_and_output_scales():
    torch.manual_seed(1)
    prepared = prepare_qat_fx(TwoInputNet(), {"": QC})
    x, y = torch.randn(2, 3, 4), 3 * torch.randn(2, 3, 4)
    _calibrate(prepared, x, y)
    converted = convert_fx(prepared)
    out = converted(x, y)

    modules = dict(prepared.named_modules())
    ops = {n.target: modules[n.args[0].target] for n in prepared.graph.nodes if n.op == "call_method"}
    assert set(ops) == {"add", "cat", "mul"}
    s_x = float(prepared.qx.activation_post_process.scale)
    s_y = float(prepared.qy.activation_post_process.scale)
    s_add, s_cat, s_mul = (float(ops[k].activation_post_process.scale) for k in ("add", "cat", "mul"))

    xq = ref_quantize(x.numpy(), s_x, "qint8")
    yq = ref_quantize(y.numpy(), s_y, "qint8")
    (m_x, m_y), n = ref_multipliers([s_x / s_add, s_y / s_add])
    add = np.vectorize(lambda a, b: max(-128, min(127, ((a * m_x + b * m_y) + (1 << (n - 1))) >> n)))(xq, yq)
    (m_s,), n_s = ref_multipliers([s_add / s_cat])
    (m_c,), n_c = ref_multipliers([s_x / s_cat])
    cat = np.concatenate(
        [np.vectorize(lambda v: ref_requant(int(v), m_s, n_s, "qint8"))(add),
         np.vectorize(lambda v: ref_requant(int(v), m_c, n_c, "qint8"))(xq)],
        axis=1,
    )
    (m_p,), n_p = ref_multipliers([s_cat * s_cat / s_mul])
    mul = np.vectorize(lambda v: ref_requant(int(v) * int(v), m_p, n_p, "qint8"))(cat)
    expected = ref_dequantize(mul, [s_mul])
    assert torch.equal(out, torch.from_numpy(expected))
    # the graph keeps the chapter's form: ops are calls of methods of integer modules
    kinds = {n.target: type(dict(converted.named_modules())[n.args[0].target]) for n in converted.graph.nodes if n.op == "call_method"}
    assert kinds == {"add": nnq.QFunctional, "cat": nnq.QFunctional, "mul": nnq.QFunctional}


def test_sixteen_bit_activations_convert_to_int16():
    torch.manual_seed(2)
    prepared = prepare_qat_fx(ResidualNet(), {"": default_qat_16bit_fake_quant_qconfig})
    x = torch.randn(4, 3, 6, 6)
    _calibrate(prepared, x)
    converted = convert_fx(prepared)
    assert converted.quant(x).dtype == torch.int16
    expected = prepared(x)
    out = converted(x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    (fc,) = _qat_modules_in_order(prepared, qat.Linear)
    s_out = fc.activation_post_process.scale
    assert ((out - expected).abs() <= s_out + 1e-6).float().mean() >= 0.99


def test_input_model_is_untouched_and_training_mode_converts_with_eval_semantics():
    prepared, x = _prepared_residual()
    prepared.train()  # as left by a QAT step: BN would use batch statistics
    before = copy.deepcopy(prepared.state_dict())
    converted = convert_fx(prepared)
    assert prepared.training and all(m.training for m in prepared.modules())
    after = prepared.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not converted.training

    # same as converting the eval-mode model: running statistics, frozen observers
    evaluated = copy.deepcopy(prepared).eval()
    reference = convert_fx(evaluated)
    assert torch.equal(converted(x), reference(x))
    # and the converted model follows the fake-quant model in VALIDATION within one output step
    fake = evaluated(x)
    step = converted.dequant.scale
    assert ((converted(x) - fake).abs() <= step + 1e-6).float().mean() >= 0.99


def test_converted_weights_are_stored_as_integers():
    prepared, _ = _prepared_residual()
    state = convert_fx(prepared).state_dict()
    weights = {k: v for k, v in state.items() if k.endswith(".weight")}
    biases = {k: v for k, v in state.items() if k.endswith(".bias") and v is not None}
    assert weights and all(v.dtype == torch.int8 for v in weights.values())
    assert biases and all(v.dtype == torch.int32 for v in biases.values())
    assert not any(v.is_floating_point() and v.numel() > 16 for v in state.values())


def _saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_saved_converted_model_is_about_a_quarter_of_the_float_model():
    torch.manual_seed(3)
    float_model = resnet18(width=16, num_classes=10)
    prepared = prepare_qat_fx(float_model, {"": QC})
    _calibrate(prepared, torch.randn(2, 3, 32, 32), steps=1)
    converted = convert_fx(prepared)
    ratio = _saved_bytes(converted.state_dict()) / _saved_bytes(float_model.state_dict())
    assert 0.2 < ratio < 0.3, ratio


def test_state_dict_and_whole_module_round_trips_are_exact():
    prepared, x = _prepared_residual()
    converted = convert_fx(prepared)
    expected = converted(x)

    # state_dict into a converted model of the same structure but other weights and scales
    other, _ = _prepared_residual(seed=7)
    target = convert_fx(other)
    assert not torch.equal(target(x), expected)
    target.load_state_dict(converted.state_dict())
    assert torch.equal(target(x), expected)

    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, fx.GraphModule)
    assert torch.equal(loaded(x), expected)
    sd, loaded_sd = converted.state_dict(), loaded.state_dict()
    assert sd.keys() == loaded_sd.keys()
    assert all((sd[k] is None and loaded_sd[k] is None) or torch.equal(sd[k], loaded_sd[k]) for k in sd)


def test_rgb888_sample_from_the_chapter_runs():
    # user-guide-expert.md, "RGB888 数据部署", with horizon_plugin_pytorch -> hq_lightning
    with march_context("bayes"):
        traced = rgb888_converted()
        traced.graph.print_tabular()
        before = [(n.op, str(n.target)) for n in traced.graph.nodes]

        insert_centered_yuv2rgb_by_hand(traced)
        traced.graph.print_tabular()

        ops = [n.op for n in traced.graph.nodes]
        assert [op for op, _ in before] == ["placeholder", "call_module", "call_module", "output"]
        assert ops == ["placeholder", "call_module", "call_function", "call_module", "output"]
        yuv = torch.randint(-128, 128, (1, 3, 28, 28)).float()
        out = traced(yuv)
        assert out.dtype == torch.int8 and out.shape == (1, 3, 26, 26)
        # the stub now passes the centered YUV integers through unchanged (scale 1)
        assert torch.equal(traced.quant(yuv), yuv.to(torch.int8))


def test_unprepared_model_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match="prepare_qat_fx"):
        convert_fx(ResidualNet())
    with pytest.raises(TypeError, match="prepare_qat_fx"):
        convert_fx(symbolic_trace(ResidualNet()))


def test_uncalibrated_observers_are_all_listed():
    prepared = prepare_qat_fx(ResidualNet(), {"": QC, "module_name": {"fc": QC_INT32_OUT}})
    paths = [
        name for name, m in prepared.named_modules()
        if type(m).__name__ in ("FakeQuantize", "CalibFakeQuantize")
    ]
    assert len(paths) >= 6
    with pytest.raises(RuntimeError, match="never did") as info:
        convert_fx(prepared)
    message = str(info.value)
    for path in paths:
        assert path in message


class MaxPool1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()

    def forward(self, x):
        return self.dequant(F.max_pool1d(self.quant(x), 2))


def test_max_pool1d_has_an_integer_kernel():
    prepared = prepare_qat_fx(MaxPool1dNet(), {"": QC})
    x = torch.randn(2, 3, 4)
    _calibrate(prepared, x)
    converted = convert_fx(prepared)
    assert type(converted._generated_max_pool1d_0).__name__ == "QuantizedMaxPool"
    with fake_quant_path():
        assert torch.equal(converted(x), prepared(x))  # a max selects values: exact


class Relu6AfterAddNet(nn.Module):
    """Standalone ReLU6 on integer tensors: after an unfused add (functional) and a mul (module)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv_a, self.conv_b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        x = self.quant(x)
        a, b = self.conv_a(x), self.conv_b(x)
        return self.dequant(torch.cat([F.relu6(a + b), self.relu6(a * b)], 1))


def test_standalone_relu6_converts_to_an_integer_clamp_at_the_integer_for_six():
    torch.manual_seed(10)
    prepared = prepare_qat_fx(Relu6AfterAddNet(), {"": QC})
    x = torch.randn(8, 2, 4, 4) * 10  # a + b and a * b range well beyond 6
    _calibrate(prepared, x)
    converted = convert_fx(prepared)
    relu6_modules = [m for m in converted.modules() if isinstance(m, nnq.QuantizedReLU6)]
    assert len(relu6_modules) == 2 and isinstance(converted.relu6, nnq.QuantizedReLU6)
    add = prepared._generated_add_0.activation_post_process
    mul = prepared._generated_mul_0.activation_post_process
    scales = sorted(float(m.scale) for m in relu6_modules)
    assert scales == sorted([float(add.scale), float(mul.scale)])
    # bit for bit against the reference on every int8 code
    codes = torch.arange(-128, 128, dtype=torch.int8)
    for module in relu6_modules:
        expect = ref_relu6(codes.numpy(), float(module.scale), "qint8")
        assert module(codes).tolist() == expect.tolist()
        assert int(module(codes).max()) == round(6.0 / float(module.scale)) < 127
    # end to end against the fake-quant model: within one output step, clamped where it matters
    with torch.no_grad():
        got, fake = converted(x), prepared(x)
    step = torch.tensor([float(add.scale)] * 3 + [float(mul.scale)] * 3).view(1, 6, 1, 1)
    assert (fake > 5.5).any() and float(got.max()) <= 6.0 + step.max() / 2
    assert ((got - fake).abs() <= step / 2 + 1e-6).float().mean() >= 0.99
    assert ((got - fake).abs() <= step + 1e-6).all()


class SharedAddNet(nn.Module):
    """One FloatFunctional called twice with inputs of different scales."""

    def __init__(self) -> None:
        super().__init__()
        from hq_lightning.nn.quantized import FloatFunctional

        self.qx, self.qy = QuantStub(), QuantStub()
        self.ff = FloatFunctional()
        self.dequant = DeQuantStub()

    def forward(self, x, y):
        x, y = self.qx(x), self.qy(y)
        return self.dequant(self.ff.add(self.ff.add(x, y), y))


def test_shared_float_functional_gets_one_integer_module_per_call():
    torch.manual_seed(4)
    prepared = prepare_qat_fx(SharedAddNet(), {"": QC})
    x, y = torch.randn(3, 5), 4 * torch.randn(3, 5)
    _calibrate(prepared, x, y)
    converted = convert_fx(prepared)
    owners = [n.args[0].target for n in converted.graph.nodes if n.op == "call_method"]
    assert len(owners) == 2 and len(set(owners)) == 2
    modules = dict(converted.named_modules())
    first, second = (modules[o] for o in owners)
    s_x = prepared.qx.activation_post_process.scale
    s_y = prepared.qy.activation_post_process.scale
    s_out = prepared.ff.activation_post_process.scale
    assert torch.equal(first.input_scale, torch.cat([s_x, s_y]))
    assert torch.equal(second.input_scale, torch.cat([s_out, s_y]))
    expected = prepared(x, y)
    assert ((converted(x, y) - expected).abs() <= s_out + 1e-6).float().mean() >= 0.95


def test_bernoulli_power_of_two_scales_convert_to_pure_shifts():
    with march_context("bernoulli"):
        torch.manual_seed(5)
        prepared = prepare_qat_fx(ResidualNet(), {"": QC})
        x = torch.randn(4, 3, 6, 6)
        _calibrate(prepared, x)
        converted = convert_fx(prepared)
    for module in converted.modules():
        if isinstance(module, nnq.QuantizedConv2d):
            scales = torch.cat([module.input_scale, module.output_scale, module.weight_scale])
            assert all(math.log2(s).is_integer() for s in scales.tolist())
    (fc,) = _qat_modules_in_order(prepared, qat.Linear)
    s_out = fc.activation_post_process.scale
    assert ((converted(x) - prepared(x)).abs() <= s_out + 1e-6).float().mean() >= 0.99


def test_getitem_and_float_region_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)  # float, before the stub
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            x = self.quant(torch.tanh(self.pre(x)))
            x = x.reshape(x.size(0), 2, -1).flatten(1)  # sizes are no tensors
            parts = torch.split(self.fc(x), 2, dim=1)
            return self.dequant(operator.getitem(parts, 1)).sum(dim=1)

    torch.manual_seed(6)
    prepared = prepare_qat_fx(Net(), {"": QC, "module_name": {"pre": None}})
    x = torch.randn(8, 4)
    _calibrate(prepared, x)
    env = propagate_qparams(prepared)
    by_target = {str(n.target): env[n] for n in prepared.graph.nodes}
    assert by_target["size"] is NON_TENSOR and isinstance(by_target["reshape"], QParams)
    converted = convert_fx(prepared)
    assert type(converted.pre) is nn.Linear
    s_out = prepared.fc.activation_post_process.scale
    diff = (converted(x) - prepared(x)).abs()
    assert (diff <= 2 * s_out + 1e-6).all()


class TwoStageNet(nn.Module):
    """A QuantStub after a split point (segmented deployment): stage 2 starts at ``quant2``."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.quant2, self.dequant = QuantStub(), QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv2d(2, 3, 1)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.dequant(self.conv2(self.quant2(self.conv1(self.quant(x)))))


def test_quant_stub_at_a_split_point_requantizes_integers_and_quantizes_floats():
    torch.manual_seed(8)
    prepared = prepare_qat_fx(TwoStageNet(), {"": QC})
    x = torch.randn(4, 2, 3, 3)
    _calibrate(prepared, x)
    converted = convert_fx(prepared)
    stub = converted.quant2
    conv1, conv2 = _qat_modules_in_order(prepared, qat.Conv2d)
    assert type(stub) is nnq.Quantize and type(converted.quant) is nnq.Quantize
    assert converted.quant.input_scale is None  # the model's input stub takes float only
    assert torch.equal(stub.scale, prepared.quant2.activation_post_process.scale)
    assert torch.equal(stub.input_scale, conv1.activation_post_process.scale)
    s_in = float(conv1.activation_post_process.scale)
    s_out = float(stub.scale)
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 1, 16, 16)
    (m,), n = ref_multipliers([s_in / s_out])
    expected = [ref_requant(int(v), m, n, "qint8") for v in codes.flatten().tolist()]
    assert stub(codes).flatten().tolist() == expected
    # stage 2 traced on its own gets float input: quantized with the stored scale
    floats = torch.randn(1, 3, 2, 2)
    assert torch.equal(stub(floats), nnq.Quantize(stub.scale, "qint8")(floats))
    with pytest.raises(TypeError, match="Expected `x` to be a float tensor"):
        converted.quant(codes)
    s_final = conv2.activation_post_process.scale
    assert ((converted(x) - prepared(x)).abs() <= s_final + 1e-6).float().mean() >= 0.99


def test_kept_batch_norm_is_folded_with_running_statistics():
    torch.manual_seed(9)
    prepared = prepare_qat_fx(
        ResidualNet(), {"": QC, "module_name": {"fc": QC_INT32_OUT}}, qat_mode="with_bn"
    )
    x = torch.randn(4, 3, 6, 6)
    _calibrate(prepared, x)
    assert any(getattr(m, "bn", None) is not None for m in _qat_modules_in_order(prepared, qat.Conv2d))
    converted = convert_fx(prepared)
    step = converted.dequant.scale
    assert ((converted(x) - prepared(x)).abs() <= step + 1e-6).float().mean() >= 0.99


class Int32FlattenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.dequant(torch.flatten(F.relu(self.conv(self.quant(x))), 1))


def test_per_channel_int32_output_may_not_be_reshaped():
    prepared = prepare_qat_fx(Int32FlattenNet(), {"": QC, "module_name": {"conv": QC_INT32_OUT}})
    _calibrate(prepared, torch.randn(2, 2, 3, 3))
    with pytest.raises(RuntimeError, match="Expected the input of `flatten` to have a per-tensor scale"):
        convert_fx(prepared)


def test_converted_model_is_in_eval_mode_throughout():
    prepared = prepare_qat_fx(MaxPool1dNet(), {"": QC})
    prepared.train()
    _calibrate(prepared, torch.randn(2, 3, 4))
    prepared.train()
    converted = convert_fx(prepared)
    assert not any(m.training for m in converted.modules())
