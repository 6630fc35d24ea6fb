"""fuse_fx: every pattern of the table fuses and keeps the float output; the chapter's sample."""

from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional as TorchFloatFunctional
from torch.quantization import DeQuantStub

from hq_lightning.nn.quantized import FloatFunctional
from hq_lightning.quantization import QuantStub, fuse_fx, register_fusion_pattern
from hq_lightning.quantization.fx.patterns import FROZEN_BN_TYPES, FUSION_PATTERNS, MatchAllNode

_SHAPES = {  # weighted type -> (factory, input shape)
    nn.Conv1d: (lambda: nn.Conv1d(2, 4, 3, padding=1), (3, 2, 5)),
    nn.Conv2d: (lambda: nn.Conv2d(2, 4, 3, padding=1), (3, 2, 5, 5)),
    nn.Conv3d: (lambda: nn.Conv3d(2, 4, 3, padding=1), (3, 2, 3, 3, 3)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(2, 4, 3, padding=1, groups=2), (3, 2, 5, 5)),
    nn.Linear: (lambda: nn.Linear(3, 4), (3, 3)),
}
_ADD_SPELLINGS = ("operator", "torch", "ours", "torch_ff")
_STEM = {nn.Conv1d: ("Conv", "1d"), nn.Conv2d: ("Conv", "2d"), nn.Conv3d: ("Conv", "3d"),
         nn.ConvTranspose2d: ("ConvTranspose", "2d"), nn.Linear: ("Linear", "")}  # fmt: skip
_TABLE = [p for p in FUSION_PATTERNS.values() if p.fused is None and p.conv in _SHAPES]


class Chain(nn.Module):
    def __init__(self, conv_type, bn_type, add, act, index):
        super().__init__()
        factory, _ = _SHAPES[conv_type]
        self.conv = factory()
        self.bn = bn_type(4) if bn_type is not None else None
        if self.bn is not None:
            with torch.no_grad():  # non-trivial statistics so folding is really tested
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-1, 1)
        self.add = add
        self.add_spelling = _ADD_SPELLINGS[index % len(_ADD_SPELLINGS)]
        if self.add_spelling == "ours":
            self.skip = FloatFunctional()
        elif self.add_spelling == "torch_ff":
            self.skip = TorchFloatFunctional()
        self.functional_act = index % 2 == 1
        self.act = act() if act is not None and not self.functional_act else None
        self.act_type = act

    def forward(self, x, y):
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        if self.add is not None:
            a, b = (out, y) if self.add == "add" else (y, out)
            if self.add_spelling == "operator":
                out = a + b
            elif self.add_spelling == "torch":
                out = torch.add(a, b)
            else:
                out = self.skip.add(a, b)
        if self.act_type is not None:
            if self.act is not None:
                out = self.act(out)
            else:
                out = F.relu(out) if self.act_type is nn.ReLU else F.relu6(out)
        return out


def _inputs(conv_type, model):
    torch.manual_seed(3)
    x = torch.randn(_SHAPES[conv_type][1])
    y = torch.randn_like(model.conv(x)) * 2
    return x, y


def _expected_name(pattern, fold_bn):
    stem, dim = _STEM[pattern.conv]
    fold_bn = fold_bn or pattern.bn in FROZEN_BN_TYPES  # fixed statistics: always folded
    if fold_bn and pattern.bn is not None and pattern.add is None and pattern.act is None:
        return pattern.conv.__name__  # conv+bn folded: the conv itself
    bn = "BN" if pattern.bn is not None and not fold_bn else ""
    add = "Add" if pattern.add is not None else ""
    act = "" if pattern.act is None else pattern.act.__name__
    return f"{stem}{bn}{add}{act}{dim}"


@pytest.mark.parametrize("fold_bn", [True, False], ids=["fold", "keep_bn"])
@pytest.mark.parametrize(
    "index",
    range(len(_TABLE)),
    ids=[
        f"{p.conv.__name__}-{getattr(p.bn, '__name__', 'nobn')}-{p.add or 'noadd'}-"
        f"{getattr(p.act, '__name__', 'noact')}"
        for p in _TABLE
    ],
)
def test_every_pattern_of_the_table_fuses_and_keeps_the_output(index, fold_bn):
    pattern = _TABLE[index]
    model = Chain(pattern.conv, pattern.bn, pattern.add, pattern.act, index).eval()
    x, y = _inputs(pattern.conv, model)
    reference = model(x, y)
    before = copy.deepcopy(model.state_dict())

    fused = fuse_fx(model, fold_bn=fold_bn)

    calls = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert len(calls) == 1, fused.code
    module = fused.get_submodule(calls[0].target)
    assert type(module).__name__ == _expected_name(pattern, fold_bn)
    expected_args = 2 if pattern.add is not None else 1
    assert len(calls[0].args) == expected_args and calls[0].args[0].name == "x"
    if pattern.add is not None:
        assert calls[0].args[1].name == "y"
        assert calls[0].target.startswith("_generated_add_") or calls[0].target == "skip"
    if type(module).__name__ != pattern.conv.__name__:
        assert type(module.conv) is pattern.conv
        kept = pattern.bn is not None and not fold_bn and pattern.bn not in FROZEN_BN_TYPES
        assert (module.bn is not None) == kept
        act = None if module.relu is None else type(module.relu)
        assert act is pattern.act
        assert module.has_add == (pattern.add is not None)
    if calls[0].target != "conv":
        assert isinstance(fused.conv, nn.Identity)
    if pattern.bn is not None and calls[0].target != "bn":
        assert isinstance(fused.bn, nn.Identity)
    out = fused(x, y)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # never in place, nothing shared
    assert type(model.conv) is pattern.conv
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    fused_params = {id(p) for p in fused.parameters()}
    assert not fused_params & {id(p) for p in model.parameters()}


def test_keep_bn_in_training_mode_matches_batch_statistics():
    torch.manual_seed(0)
    model = Chain(nn.Conv2d, nn.BatchNorm2d, "add", nn.ReLU, 0).train()
    x, y = _inputs(nn.Conv2d, model)
    fused = fuse_fx(model, fold_bn=False)
    assert type(fused._generated_add_0).__name__ == "ConvBNAddReLU2d"
    torch.testing.assert_close(fused(x, y), model(x, y))
    torch.testing.assert_close(fused._generated_add_0.bn.running_mean, model.bn.running_mean)


class ModelForFusion(torch.nn.Module):
    def __init__(
        self,
    ):
        super(ModelForFusion, self).__init__()  # noqa: UP008 - the chapter's code
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
        x = self.dequant(x)

        return x


_CHAPTER_STRUCTURE = """ModelForFusion(
  (quantx): QuantStub()
  (quanty): QuantStub()
  (conv): Identity()
  (bn): Identity()
  (relu): Identity()
  (dequant): DeQuantStub()
  (_generated_add_0): ConvAddReLU2d(
    (conv): Conv2d(3, 3, kernel_size=(3, 3), stride=(1, 1))
    (relu): ReLU()
  )
)"""


def test_chapter_fusion_sample_prints_the_chapter_structure():
    float_model = ModelForFusion()
    fused_model = fuse_fx(float_model)
    printed = str(fused_model)
    assert printed.startswith(_CHAPTER_STRUCTURE + "\n")
    code = printed[len(_CHAPTER_STRUCTURE) :]
    assert "def forward(self, x, y):" in code
    assert "self._generated_add_0(quantx, quanty)" in code
    assert "self.conv(" not in code and "self.bn(" not in code and "self.relu(" not in code
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        fused_model.eval()(x, y), float_model.eval()(x, y), rtol=1e-5, atol=1e-5
    )


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(self.conv(x))))


class _SharedBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class _BranchOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(y), y


def test_shared_modules_and_branches_are_not_fused():
    x = torch.randn(1, 2, 3, 3)
    for model in (_Twice().eval(), _SharedBn().eval(), _BranchOut().eval()):
        fused = fuse_fx(model)
        for node in fused.graph.nodes:
            if node.op == "call_module":
                assert not type(fused.get_submodule(node.target)).__module__.startswith(
                    "hq_lightning.nn.intrinsic"
                ), (type(model).__name__, fused)
        torch.testing.assert_close(fused(x), model(x))
    # the shared conv is kept, but its second call's BN + ReLU need no conv: not fused either
    assert isinstance(fuse_fx(_Twice().eval()).bn, nn.BatchNorm2d)


def test_frozen_and_statistics_free_bn_are_not_fused():
    class Net(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = bn

        def forward(self, x):
            return self.bn(self.conv(x))

    frozen = Net(nn.BatchNorm2d(2)).train()
    frozen.bn.eval()
    no_stats = Net(nn.BatchNorm2d(2, track_running_stats=False)).eval()
    for model in (frozen, no_stats):
        fused = fuse_fx(model)
        assert isinstance(fused.conv, nn.Conv2d) and isinstance(fused.bn, nn.BatchNorm2d)


def test_shared_relu_module_is_copied_not_removed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x)) + self.relu(x)

    model = Net().eval()
    fused = fuse_fx(model)
    assert isinstance(fused.relu, nn.ReLU)
    # the ReLU module is still called on x, so the fused module takes the conv's name
    assert type(fused.conv).__name__ == "ConvReLU2d" and fused.conv.relu is not fused.relu
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(fused(x), model(x))


def test_register_fusion_pattern_for_a_custom_conv_and_class():
    class MyConv(nn.Conv2d):
        pass

    @register_fusion_pattern((operator.add, MatchAllNode, (nn.BatchNorm2d, MyConv)))
    class MyFused(nn.Module):
        def __init__(self, conv, bn, relu):
            super().__init__()
            self.conv, self.bn, self.relu = conv, bn, relu

        def forward(self, x, other):
            return self.conv(x) + other

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = MyConv(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    try:
        model = Net().eval()
        fused = fuse_fx(model)
        assert isinstance(fused._generated_add_0, MyFused) and fused._generated_add_0.bn is None
        x = torch.randn(1, 2, 3, 3)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    finally:
        del FUSION_PATTERNS[(MyConv, nn.BatchNorm2d, "added", None)]


def test_fused_model_fuses_again_to_the_same_structure():
    model = ModelForFusion().eval()
    once = fuse_fx(model)
    twice = fuse_fx(once)
    assert str(twice).split("\n\n\n")[0] == str(once).split("\n\n\n")[0]
    x, y = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(twice(x, y), model(x, y), rtol=1e-5, atol=1e-5)


def test_fused_model_saves_and_loads_whole():
    model = ModelForFusion().eval()
    fused = fuse_fx(model, fold_bn=False)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert str(loaded) == str(fused)
    x, y = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(loaded(x, y), model(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_frozen_batchnorm_is_always_folded(fold_bn):
    """torchvision's FrozenBatchNorm2d (detection backbones) has fixed statistics: folded in every mode."""
    misc = pytest.importorskip("torchvision.ops.misc")
    torch.manual_seed(0)
    bn = misc.FrozenBatchNorm2d(4)
    bn.weight.uniform_(0.5, 2)
    bn.bias.uniform_(-1, 1)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU())
    fused = fuse_fx(model, fold_bn=fold_bn)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert "FrozenBatchNorm2d" not in kinds and "ConvReLU2d" in kinds
