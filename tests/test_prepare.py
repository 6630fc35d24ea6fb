"""prepare_qat_fx and the qconfig tree: chapter samples, ResNet-18 / MobileNetV2 shapes, bad input,
state round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning import set_march
from hq_lightning.march import March
from hq_lightning.nn import qat
from hq_lightning.quantization import (
    CalibFakeQuantize,
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    QConfig,
    QuantStub,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.prepare import UnsupportedOperationError
from hq_lightning.quantization.fx.qconfig_tree import resolve_qconfigs
from hq_lightning.quantization.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
    default_qat_16bit_fake_quant_qconfig,
)
from hq_lightning.utils.fx_helper import wrap
from tests.chapter_samples import RGB888Net
from tests.models import mobilenet_v2, resnet18

QAT8 = default_qat_8bit_fake_quant_qconfig
QAT16 = default_qat_16bit_fake_quant_qconfig


@pytest.fixture(autouse=True)
def _bayes_seed_one_thread():
    set_march(March.BAYES)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: no thread oversubscription
    yield
    torch.set_num_threads(threads)
    set_march(March.BAYES)


class ChapterFusionModel(nn.Module):
    """The chapter's ModelForFusion (conv -> bn -> + y -> relu)."""

    def __init__(self):
        super().__init__()
        self.quantx = QuantStub()
        self.quanty = QuantStub()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.dequant = DeQuantStub()

    def forward(self, x, y):
        x = self.quantx(x)
        y = self.quanty(y)
        x = self.conv(x)
        x = self.bn(x)
        x = x + y
        x = self.relu(x)
        return self.dequant(x)


def test_chapter_prepare_sample_with_module_name_override():
    # "Prepare" of user-guide-expert.md: a global calibration qconfig and a module_name override
    set_march(March.BAYES)
    custom_qconfig = QConfig(
        activation=CalibFakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver, dtype="qint16"),
        weight=default_calib_8bit_fake_quant_qconfig.weight,
    )
    model = ChapterFusionModel()
    qat_model = prepare_qat_fx(
        model,
        {
            "": default_calib_8bit_fake_quant_qconfig,
            "module_name": {"quanty": custom_qconfig},
        },
    )
    assert isinstance(qat_model.quanty, qat.QuantStub)
    assert qat_model.quanty.activation_post_process.dtype == "qint16"
    assert isinstance(qat_model.quantx.activation_post_process, CalibFakeQuantize)
    assert qat_model.quantx.activation_post_process.dtype == "qint8"
    fused = [m for m in qat_model.modules() if isinstance(m, qat.Conv2d)]
    assert len(fused) == 1 and fused[0]._get_name() == "ConvAddReLU2d"
    assert fused[0].weight is not model.conv.weight  # never in place
    qat_model.eval()
    set_fake_quantize(qat_model, FakeQuantState.CALIBRATION)
    out = qat_model(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 6, 6))
    assert out.shape == (2, 3, 6, 6)


def test_chapter_rgb888_sample_up_to_the_qat_forward():
    data = torch.rand(1, 3, 28, 28)
    net = RGB888Net()
    set_march("bayes")
    net.set_qconfig()
    qat_net = prepare_qat_fx(net)
    out = qat_net(data)
    assert out.shape == (1, 3, 26, 26)
    convs = [m for m in qat_net.modules() if isinstance(m, qat.Conv2d)]
    assert [c._get_name() for c in convs] == ["ConvReLU2d"]
    assert isinstance(qat_net.quant, qat.QuantStub)
    # the output is on the fake-quant grid of the conv's output scale
    scale = convs[0].activation_post_process.scale
    codes = out / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


def _small(kind: str) -> nn.Module:
    if kind == "resnet18":
        return resnet18(width=8, num_classes=10)
    return mobilenet_v2(width_mult=0.25, num_classes=10, last_channel=64)


@pytest.mark.parametrize("kind", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("qat_mode", ["fuse_bn", "with_bn"])
def test_model_prepares_matches_float_and_trains(kind, qat_mode):
    float_model = _small(kind)
    x = torch.randn(6, 3, 16, 16)
    target = torch.randint(0, 10, (6,))
    # float statistics that differ from the defaults, so folding is exercised
    float_model.train()
    with torch.no_grad():
        float_model(x)
    qat_model = prepare_qat_fx(float_model, {"": QAT8}, qat_mode=qat_mode)
    weighted = [m for m in qat_model.modules() if isinstance(m, qat.FusedWeightedMixin)]
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in float_model.modules())
    assert len(weighted) == n_float
    assert all((m.bn is not None) == (qat_mode == "with_bn" and isinstance(m, qat.Conv2d)) for m in weighted)
    assert any(m.has_add for m in weighted)

    # FLOAT state reproduces the float model (eval; and train for with_bn, BN in batch mode)
    set_fake_quantize(qat_model, FakeQuantState.FLOAT)
    float_model.eval()
    qat_model.eval()
    torch.testing.assert_close(qat_model(x), float_model(x), rtol=1e-4, atol=1e-4)
    if qat_mode == "with_bn":
        reference = copy.deepcopy(float_model).train()
        qat_model.train()
        torch.manual_seed(1)  # same dropout mask
        qat_out = qat_model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(qat_out, reference(x), rtol=1e-5, atol=1e-5)

    qat_model.train()
    set_fake_quantize(qat_model, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(qat_model(x), target)
        loss.backward()
        if not losses:
            for m in weighted:
                assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
                if m.bn is not None:
                    assert m.bn.weight.grad.abs().sum() > 0 and m.bn.bias.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("qat_mode", ["fuse_bn", "with_bn"])
def test_strict_state_dict_round_trip_before_and_after_data(qat_mode):
    float_model = _small("resnet18")
    prepared = prepare_qat_fx(float_model, {"": QAT8}, qat_mode=qat_mode)
    fresh = prepare_qat_fx(float_model, {"": QAT8}, qat_mode=qat_mode)
    fresh.load_state_dict(prepared.state_dict(), strict=True)  # per-channel scales still empty
    prepared.train()
    prepared(torch.randn(4, 3, 16, 16))
    fresh = prepare_qat_fx(float_model, {"": QAT8}, qat_mode=qat_mode)
    fresh.load_state_dict(prepared.state_dict(), strict=True)
    prepared.eval()
    fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh(x), prepared(x))


def test_qconfig_priority_and_propagation():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.fc = nn.Linear(2, 2)

    net = nn.Module()
    net.a, net.b, net.c = Block(), Block(), Block()
    net.c.qconfig = None
    net.b.fc.qconfig = QAT8
    tree = resolve_qconfigs(
        net, {"": QAT8, "module_type": [(nn.Linear, QAT16)], "module_name": {"b": QAT16, "b.fc": None}}
    )
    assert tree["a.conv"] is QAT8  # global
    assert tree["a.fc"] is QAT16  # module_type over global
    assert tree["b.conv"] is QAT16  # module_name propagates to children
    assert tree["b.fc"] is QAT8  # the attribute beats module_name
    assert tree["c.conv"] is None and tree["c"] is None  # None skips a subtree
    dict_form = resolve_qconfigs(net, {"": QAT8, "module_type": {nn.Linear: QAT16}})
    assert dict_form["a.fc"] is QAT16


def test_generated_ops_inherit_the_qconfig_of_the_calling_module_and_none_stays_float():
    class Head(nn.Module):
        def forward(self, x, y):
            return x * y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.head = Head()
            self.skip = nn.Conv2d(2, 2, 1)
            self.dequant = DeQuantStub()

        def forward(self, x):
            x = self.quant(x)
            return self.dequant(self.head(x, x) - x), self.skip(self.dequant(x))

    qat_net = prepare_qat_fx(Net(), {"": QAT8, "module_name": {"head": QAT16, "skip": None}})
    functionals = {n: m for n, m in qat_net.named_modules() if isinstance(m, qat.FloatFunctional)}
    dtypes = {str(m.activation_post_process.dtype) for m in functionals.values()}
    assert dtypes == {"qint8", "qint16"}, functionals
    mul = [m for n, m in functionals.items() if "mul" in n]
    assert len(mul) == 1 and mul[0].activation_post_process.dtype == "qint16"
    assert type(qat_net.skip) is nn.Conv2d  # qconfig None: stays float
    assert "qconfig" not in qat_net.skip.__dict__
    assert qat_net(torch.rand(1, 2, 4, 4))[0].shape == (1, 2, 4, 4)


def test_modules_called_only_inside_wrapped_methods_are_prepared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.conv = nn.Conv2d(2, 2, 1)
            self.post = nn.Linear(2, 2)
            self.dequant = DeQuantStub()

        def forward(self, x):
            return self._post(self.dequant(self.conv(self.quant(x))))

        @wrap()
        def _post(self, x):
            if x.sum() > 0:  # data-dependent: only traceable because wrapped
                x = x.mean((2, 3))
            return self.post(x.flatten(1)[:, :2])

    qat_net = prepare_qat_fx(Net(), {"": QAT8})
    assert isinstance(qat_net.post, qat.Linear)
    assert qat_net(torch.rand(1, 2, 3, 3) + 0.1).shape == (1, 2)


def test_untraceable_model_error_names_wrap():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()

        def forward(self, x):
            x = self.quant(x)
            if x.sum() > 0:
                return x
            return -x

    from hq_lightning.quantization.fx.tracer import UntraceableError

    with pytest.raises(UntraceableError, match="wrap"):
        prepare_qat_fx(Net(), {"": QAT8})


def test_unsupported_ops_are_listed_together():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.conv = nn.Conv2d(2, 4, 1)
            self.rnn = nn.RNN(4, 4)  # ops no BPU has an integer form of
            self.dequant = DeQuantStub()

        def forward(self, x):
            x = self.conv(self.quant(x))
            a = torch.cumsum(x, 1)
            b, _ = self.rnn(x.flatten(2).permute(2, 0, 1))
            c = torch.erfinv(x)
            return self.dequant(a), self.dequant(b), self.dequant(c)

    with pytest.raises(UnsupportedOperationError) as info:
        prepare_qat_fx(Net(), {"": QAT8}, allow_float_islands=False)
    message = str(info.value)
    first_line = message.splitlines()[0]
    assert "3 cannot" in first_line
    for name in ("torch.cumsum (cumsum)", "nn.RNN (rnn)", "torch.erfinv (erfinv)"):
        assert name in first_line
    assert message.count("why: no integer form on this march") == 3
    assert "allow_float_islands=True" in message and "DeQuantStub" in message
    # by default they run as float islands (tests/test_islands.py proves each remedy end to end)
    with pytest.warns(UserWarning, match="float island"):
        islands = prepare_qat_fx(Net(), {"": QAT8})
    assert isinstance(islands.conv, qat.Conv2d) and type(islands.rnn) is nn.RNN


def test_float_ops_after_a_dequant_stub_are_accepted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.conv = nn.Conv2d(2, 4, 1)
            self.dequant = DeQuantStub()

        def forward(self, x):
            return self.dequant(self.conv(self.quant(x))).sigmoid()

    prepared = prepare_qat_fx(Net(), {"": QAT8})
    out = prepared(torch.randn(2, 2, 4, 4))
    assert out.min() >= 0 and out.max() <= 1


def test_mixed_calibration_and_qat_qconfigs_are_refused():
    with pytest.raises(ValueError, match="two prepares of the float model"):
        prepare_qat_fx(
            ChapterFusionModel(), {"": default_calib_8bit_fake_quant_qconfig, "module_name": {"conv": QAT8}}
        )


def test_module_name_that_does_not_exist_lists_close_candidates():
    with pytest.raises(ValueError, match=r"no module 'quantz'.*quantx"):
        prepare_qat_fx(ChapterFusionModel(), {"": QAT8, "module_name": {"quantz": QAT16}})


def test_bad_qat_mode_and_bad_qconfig_values():
    with pytest.raises(ValueError, match="qat_mode"):
        prepare_qat_fx(ChapterFusionModel(), {"": QAT8}, qat_mode="fold")
    with pytest.raises(TypeError, match="QConfig or None"):
        prepare_qat_fx(ChapterFusionModel(), {"": "qat8"})
    with pytest.raises(ValueError, match="keys of `qconfig_dict`"):
        prepare_qat_fx(ChapterFusionModel(), {"object_type": []})


def test_model_without_quant_stub_warns():
    net = nn.Sequential(nn.Conv2d(1, 1, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_qat_fx(net, {"": QAT8})
    assert any("QuantStub" in str(w.message) for w in caught)


def test_march_is_read_at_prepare():
    set_march(March.BERNOULLI)
    qat_net = prepare_qat_fx(ChapterFusionModel(), {"": QAT8})
    set_march(March.BAYES)
    fake_quants = [m for m in qat_net.modules() if isinstance(m, FakeQuantize)]
    assert fake_quants and all(m.march == March.BERNOULLI for m in fake_quants)
    qat_net(torch.rand(1, 3, 6, 6), torch.rand(1, 3, 4, 4))
    scale = qat_net.quantx.activation_post_process.scale
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())


def test_per_channel_weight_observer_ch_axis_for_conv_transpose():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub()
            self.up = nn.ConvTranspose2d(2, 3, 2, 2)
            self.dequant = DeQuantStub()

        def forward(self, x):
            return self.dequant(F.relu(self.up(self.quant(x))))

    qc = QConfig(
        activation=QAT8.activation,
        weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1),
    )
    qat_net = prepare_qat_fx(Net(), {"": qc})
    modules = [m for m in qat_net.modules() if isinstance(m, qat.ConvTranspose2d)]
    assert len(modules) == 1 and modules[0].weight_fake_quant.ch_axis == 1
    qat_net(torch.rand(1, 2, 3, 3))
    assert modules[0].weight_fake_quant.scale.shape == (3,)


def test_freeze_bn_over_a_prepared_model_keeps_parameters_and_statistics():
    qat_model = prepare_qat_fx(_small("resnet18"), {"": QAT8}, qat_mode="with_bn")
    params = [id(p) for p in qat_model.parameters()]
    assert qat.freeze_bn(qat_model) == 20
    qat_model.train()
    stats = {k: v.clone() for k, v in qat_model.state_dict().items() if "running_" in k}
    qat_model(torch.randn(2, 3, 16, 16))
    assert all(torch.equal(qat_model.state_dict()[k], v) for k, v in stats.items())
    assert [id(p) for p in qat_model.parameters()] == params
    assert qat.unfreeze_bn(qat_model) == 20
    qat_model(torch.randn(2, 3, 16, 16))
    assert not all(torch.equal(qat_model.state_dict()[k], v) for k, v in stats.items())


def test_torch_stubs_are_prepared_like_ours():
    import torch.ao.quantization as tq  # the chapter's samples use torch's DeQuantStub

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.conv = nn.Conv2d(2, 2, 1)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.conv(self.quant(x)))

    qat_net = prepare_qat_fx(Net(), {"": QAT8})
    assert type(qat_net.quant) is qat.QuantStub and qat_net.quant.scale is None
    assert type(qat_net.dequant) is qat.DeQuantStub
    assert qat_net(torch.rand(1, 2, 3, 3)).shape == (1, 2, 3, 3)
