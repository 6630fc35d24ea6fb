"""FloatFunctional methods, their graph shape, and the functional-ops pass of fuse_fx."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional as TorchFloatFunctional

from hq_lightning.nn.quantized import FloatFunctional
from hq_lightning.quantization import fuse_fx
from hq_lightning.quantization.fx.functional_ops import generate_functional_modules
from hq_lightning.quantization.fx.tracer import symbolic_trace

_A = torch.tensor([[1.5, -2.0], [0.25, 3.0]])
_B = torch.tensor([[0.5, 4.0], [-1.0, 2.0]])


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "expected"),
    [
        ("add", (_A, _B), {}, _A + _B),
        ("sub", (_A, _B), {}, _A - _B),
        ("mul", (_A, _B), {}, _A * _B),
        ("add_scalar", (_A, 0.5), {}, _A + 0.5),
        ("mul_scalar", (_A, -3), {}, _A * -3),
        ("cat", ([_A, _B],), {"dim": 1}, torch.cat([_A, _B], 1)),
        ("concatenate", ([_A, _B],), {}, torch.cat([_A, _B], 0)),
        ("stack", ([_A, _B],), {"dim": 2}, torch.stack([_A, _B], 2)),
        ("matmul", (_A, _B), {}, _A @ _B),
        ("mean", (_A,), {}, _A.mean()),
        ("mean", (_A,), {"dim": 1, "keepdim": True}, _A.mean(1, keepdim=True)),
        ("sum", (_A,), {"dim": (0, 1)}, _A.sum((0, 1))),
        ("maximum", (_A, _B), {}, torch.maximum(_A, _B)),
        ("minimum", (_A, _B), {}, torch.minimum(_A, _B)),
    ],
)
def test_methods_compute_the_torch_result_through_activation_post_process(
    method, args, kwargs, expected
):
    ff = FloatFunctional()
    seen = []
    ff.activation_post_process.register_forward_hook(lambda m, i, o: seen.append(o))
    out = getattr(ff, method)(*args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(seen) == 1 and seen[0] is out
    assert isinstance(ff.activation_post_process, nn.Identity)


def test_forward_is_not_callable():
    with pytest.raises(RuntimeError, match="call one of its operator methods"):
        FloatFunctional()(_A)


def _method_nodes(gm):
    return [
        (n.args[0].target, n.target, len(n.args) - 1, dict(n.kwargs))
        for n in gm.graph.nodes
        if n.op == "call_method" and n.args[0].op == "get_attr"
    ]


def test_tracing_records_call_method_on_get_attr_for_ours_and_torchs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ours = FloatFunctional()
            self.theirs = TorchFloatFunctional()

        def forward(self, x, y):
            z = self.ours.cat([x, y], dim=1)
            z = self.ours.concatenate([z, z])
            return self.theirs.add(self.theirs.mul_scalar(z, 2.0), z)

    net = Net()
    gm = symbolic_trace(net)
    assert _method_nodes(gm) == [
        ("ours", "cat", 1, {"dim": 1}),
        ("ours", "cat", 1, {"dim": 0}),
        ("theirs", "mul_scalar", 2, {}),
        ("theirs", "add", 2, {}),
    ]
    # torch's class is restored after tracing
    assert TorchFloatFunctional.add.__module__.startswith("torch")
    x, y = torch.randn(1, 2), torch.randn(1, 3)
    torch.testing.assert_close(gm(x, y), net(x, y))
    # fuse_fx swaps torch's FloatFunctional for ours (same graph shape)
    fused = fuse_fx(net)
    assert type(fused.theirs) is FloatFunctional
    torch.testing.assert_close(fused(x, y), net(x, y))


class _Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        a = x + y
        a += x
        b = torch.add(a, 1) * 0.5
        c = x - 2
        d = torch.cat([a, b, c], dim=1)
        e = torch.stack([x, y]).sum(0)
        f = self.fc(x) @ y.t()
        g = d.mean(dim=1, keepdim=True) + torch.mul(e, y).mean()
        n = x.size(1) * 2 + x.shape[0]  # shape arithmetic stays Python
        h = torch.matmul(x, y.t()) - f
        return g * n, h, torch.maximum(x, y), d.sum()


def test_operators_become_generated_modules_and_keep_the_output():
    model = _Ops()
    gm = generate_functional_modules(symbolic_trace(model))
    generated = sorted(name for name, _ in gm.named_children() if name.startswith("_generated_"))
    assert generated == sorted(
        [
            "_generated_add_0", "_generated_add_1", "_generated_add_2",
            "_generated_add_scalar_0", "_generated_add_scalar_1",
            "_generated_mul_scalar_0", "_generated_mul_0",
            "_generated_cat_0", "_generated_stack_0", "_generated_sum_0", "_generated_sum_1",
            "_generated_matmul_0", "_generated_matmul_1", "_generated_mean_0", "_generated_mean_1",
            "_generated_sub_0", "_generated_maximum_0",
        ]
    )  # fmt: skip
    for name in generated:
        assert type(getattr(gm, name)) is FloatFunctional
    calls = {
        (n.args[0].target, n.target)
        for n in gm.graph.nodes
        if n.op == "call_method" and n.args[0].op == "get_attr"
    }
    assert ("_generated_add_scalar_1", "add_scalar") in calls  # x - 2 -> add_scalar(x, -2)
    scalar_args = [
        n.args[2] for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_scalar"
    ]
    assert sorted(scalar_args) == [-2, 1]
    # the shape arithmetic is untouched, and so is a tensor times a dynamic Python int
    remaining = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert remaining.count(operator.mul) == 2 and remaining.count(operator.add) == 1
    assert "size" in [n.target for n in gm.graph.nodes if n.op == "call_method"]
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    for out, ref in zip(gm(x, y), model(x, y)):
        torch.testing.assert_close(out, ref)


def test_generated_modules_remember_the_module_that_called_them():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x) * 2

    fused = fuse_fx(Net().eval())
    assert fused._generated_add_0._hq_owner_path == "block"
    assert fused._generated_mul_scalar_0._hq_owner_path == ""
    # re-tracing the flat fused model keeps the owner in the node meta
    again = symbolic_trace(fused)
    paths = {
        n.target: n.meta["hq_module_path"]
        for n in again.graph.nodes
        if n.op in ("get_attr", "call_module")
    }
    assert paths["_generated_add_0"] == "block" and paths["_generated_mul_scalar_0"] == ""


@pytest.mark.filterwarnings("ignore:`nn.functional.upsample` is deprecated")
def test_functional_pooling_and_resize_become_modules_scale_preserving_ops_stay():
    class Net(nn.Module):
        def forward(self, x):
            a = F.avg_pool2d(x, 2, stride=2)
            b = F.adaptive_avg_pool2d(x, 1)
            c = F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=False)
            d = F.upsample(a, size=(4, 4), mode="nearest")
            e = F.max_pool2d(F.relu(x), 2)
            return torch.flatten(b, 1), c + d, e.permute(0, 1, 3, 2).reshape(1, -1)

    model = Net()
    gm = generate_functional_modules(symbolic_trace(model))
    children = dict(gm.named_children())
    assert isinstance(children["_generated_avg_pool2d_0"], nn.AvgPool2d)
    assert children["_generated_avg_pool2d_0"].kernel_size == 2
    assert isinstance(children["_generated_adaptive_avg_pool2d_0"], nn.AdaptiveAvgPool2d)
    up = children["_generated_interpolate_0"]
    assert isinstance(up, nn.Upsample) and up.mode == "bilinear" and up.scale_factor == 2.0
    # F.upsample forwards to F.interpolate, which is what the trace records
    assert isinstance(children["_generated_interpolate_1"], nn.Upsample)
    assert children["_generated_interpolate_1"].size == (4, 4)
    functions = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {F.relu, torch.flatten} <= functions
    assert any("max_pool2d" in getattr(f, "__name__", "") for f in functions)
    methods = {n.target for n in gm.graph.nodes if n.op == "call_method"}
    assert {"permute", "reshape"} <= methods
    x = torch.randn(1, 2, 4, 4)
    for out, ref in zip(gm(x), model(x)):
        torch.testing.assert_close(out, ref)


def test_dynamic_arguments_are_left_alone_or_passed_at_run_time():
    class Net(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, x.shape[-1]) + x.size(0)

    gm = generate_functional_modules(symbolic_trace(Net()))
    assert not [name for name, _ in gm.named_children()]  # a kernel size cannot be kept

    class Resize(nn.Module):
        def forward(self, x, y):
            return F.interpolate(x, size=y.shape[-2:])

    gm = generate_functional_modules(symbolic_trace(Resize()))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert node.target == "_generated_interpolate_0" and "size" in node.kwargs  # read when it runs
    x, y = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 5, 7)
    assert torch.equal(gm(x, y), F.interpolate(x, size=(5, 7)))
