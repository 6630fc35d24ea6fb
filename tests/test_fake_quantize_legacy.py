"""The fake quant of the previous release, kept verbatim as the reference of the faster one.

Issue 15 cut the per-call cost of fake quant (one op fewer per mask, a one-op backward, no aten
kernel for small tensors, one clamp less per scale). Outputs, gradients and scales must stay bit
for bit what the previous implementation computed for finite input; this file holds a copy of it
(``_LegacyPlainFakeQuantize`` and helpers below are unchanged from git history, the dispatch and
the scale formula reproduced) and compares on every path: per tensor and per channel, small
(formerly the aten kernel) and large tensors, leaf / ``leaf * constant`` / other inputs, qint8 and
qint16, float32 and float64, codes at the half-integer edges. Non-finite input follows the one
rule of test_nonfinite.py instead.
"""

from __future__ import annotations

import pytest
import torch

from hq_lightning.quantization import FakeQuantize, MovingAveragePerChannelMinMaxObserver
from hq_lightning.quantization.fake_quantize import fake_quantize
from hq_lightning.quantization.qparams import compute_scale

QRANGE = {"qint8": (-128, 127), "qint16": (-32768, 32767)}


def _in_range_(codes: torch.Tensor, qmin: int, qmax: int, out_of_place: bool = False) -> torch.Tensor:
    """Overwrite rounded ``codes`` with 1.0 where ``qmin <= code <= qmax``, else 0.0 (NaN: 0.0);
    ``out_of_place`` writes a new tensor instead (one pass less than a clone).

    ``|code - mid| <= half`` with ``mid = (qmin + qmax) / 2`` is that test for integer-valued
    codes: ``code - mid`` is exact below 2**22 and farther codes stay outside. In-place float ops
    are vectorised; comparisons producing ``bool`` are not (measured 3-4x slower on CPU).
    """
    mid = (qmin + qmax) / 2.0
    centred = torch.sub(codes, mid) if out_of_place else codes.sub_(mid)
    return centred.abs_().le_((qmax - qmin) / 2.0)


def _leaf_times_constant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(leaf, factor)`` when ``x`` was computed as ``leaf * factor`` from a float32 leaf that
    needs a gradient and a float32 constant (the BN-folded weight of a ``with_bn`` module in
    training), else ``None``. The multiply's node already keeps both, so recomputing the STE mask
    from them in backward costs no memory, where saving a mask costs 1 byte per element."""
    node = x.grad_fn
    if type(node).__name__ != "MulBackward0" or node.next_functions[1][0] is not None:
        return None
    leaf = getattr(node.next_functions[0][0], "variable", None)
    factor = getattr(node, "_saved_other", None)
    if not isinstance(leaf, torch.Tensor) or not isinstance(factor, torch.Tensor):
        return None
    if leaf.dtype != torch.float32 or factor.dtype != torch.float32 or x.dtype != torch.float32:
        return None
    if torch.broadcast_shapes(leaf.shape, factor.shape) != x.shape:
        return None
    return leaf, factor


class _LegacyPlainFakeQuantize(torch.autograd.Function):
    """The formula in float32 with plain torch ops, in few passes over one temporary.

    Forward: ``q = x * inv_scale``, then in place ``round_``, ``clamp_``, ``mul_(scale)``. For the
    backward it keeps either nothing new or a 1-byte mask:

    * a leaf input (a weight parameter) is alive until backward anyway, so only a reference to it
      is kept and the in-range mask is recomputed from it in backward; likewise for an input
      computed as ``leaf * constant`` (see :func:`_leaf_times_constant`), recomputing the product;
    * any other input keeps a ``bool`` mask of in-range codes (1 byte per element);
    * an input that needs no gradient keeps nothing.

    Backward is ``grad * mask`` (as the aten kernels: a NaN gradient stays NaN).
    """

    @staticmethod
    def forward(ctx, x, scale, inv_scale, qmin, qmax):
        q = torch.mul(x if x.dtype == torch.float32 else x.float(), inv_scale)
        q.round_()
        ctx.qrange = (qmin, qmax)
        ctx.recompute_mask = False
        ctx.recompute_product = False
        if ctx.needs_input_grad[0]:
            product = None if x.is_leaf else _leaf_times_constant(x)
            if x.is_leaf:
                ctx.recompute_mask = True
                ctx.save_for_backward(x, inv_scale)
            elif product is not None:
                ctx.recompute_mask = ctx.recompute_product = True
                ctx.save_for_backward(*product, inv_scale)
            else:
                ctx.save_for_backward(_in_range_(q, qmin, qmax, out_of_place=True).to(torch.bool))
        q.clamp_(qmin, qmax).mul_(scale)
        return q if x.dtype == torch.float32 else q.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.recompute_mask:
            with torch.no_grad():  # a constant even under create_graph=True
                if ctx.recompute_product:
                    leaf, factor, inv_scale = ctx.saved_tensors
                    mask = torch.mul(leaf, factor).mul_(inv_scale)  # the forward's two roundings
                else:
                    x, inv_scale = ctx.saved_tensors
                    mask = torch.mul(x if x.dtype == torch.float32 else x.float(), inv_scale)
                _in_range_(mask.round_(), *ctx.qrange)
        else:
            (mask,) = ctx.saved_tensors
        mask = mask.to(grad.dtype)
        return mask.mul_(grad), None, None, None, None



def _legacy_aten(x, scale, qmin, qmax, axis):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros(1, dtype=torch.int32), qmin, qmax)
    shape = [1] * x.dim()
    shape[axis] = scale.numel()
    bound = (scale * 2.0**40).view(shape)
    x = torch.clamp(x, -bound, bound)
    zero_point = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def legacy_fake_quantize(x, scale, dtype, ch_axis=None):
    """The previous dispatch: aten for per-tensor float32 CPU inputs of <= 8192 elements, else plain."""
    qmin, qmax = QRANGE[dtype]
    scale = scale.to(torch.float32)
    axis = None if ch_axis is None else ch_axis % x.dim()
    if x.dtype == torch.float32 and axis is None and x.numel() <= 8192:
        return _legacy_aten(x, scale.reshape(1), qmin, qmax, None)
    if axis is None:
        view = scale.reshape(())
    else:
        shape = [1] * x.dim()
        shape[axis] = scale.numel()
        view = scale.view(shape)
    return _LegacyPlainFakeQuantize.apply(x, view, torch.reciprocal(view), qmin, qmax)


def legacy_compute_scale(amax, dtype):
    qmin, qmax = QRANGE[dtype]
    return (amax.float().clamp_min(0.0) / ((qmax - qmin) / 2.0)).clamp_min(torch.finfo(torch.float32).eps)


def _values(shape, scale, qmin, qmax, seed):
    """Random codes over 1.3x the range plus half-integer ties and the saturation edges."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) * 2 - 1) * (qmax - qmin) / 2 * 1.3
    flat = x.view(-1)
    edges = torch.tensor([qmin - 0.5, qmin - 1.5, qmax + 0.5, qmax - 0.5, 0.5, -0.5, 2.5, -0.0, 0.0, 2.0**24])
    flat[: edges.numel()] = edges
    return x * scale


def _inputs(kind, base):
    if kind == "leaf":
        x = base.clone().requires_grad_(True)
        return x, x
    if kind == "product":  # with_bn's folded weight: leaf * constant
        leaf = (base / 2).requires_grad_(True)
        return leaf * torch.tensor(2.0), leaf
    leaf = base.clone().requires_grad_(True)
    if kind == "relu":  # an activation its producer keeps for backward: the mask is recomputed
        return torch.relu(leaf * 1.0), leaf
    return leaf * 1.0 + 0.0, leaf  # an activation: neither a leaf nor leaf * constant


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("numel", [40, 8192, 8193, 70000])
@pytest.mark.parametrize("kind", ["leaf", "product", "activation", "relu"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_outputs_and_gradients_equal_the_previous_implementation(dtype, numel, kind, per_channel):
    qmin, qmax = QRANGE[dtype]
    channels = 5
    shape = (channels, numel // channels) if per_channel else (numel,)
    scale = torch.tensor([0.02, 1e-3, 2.0**-5, 0.7, 3e-5]) if per_channel else torch.tensor([0.013])
    view = scale.view(-1, 1) if per_channel else scale
    base = _values(shape, view, qmin, qmax, seed=numel)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    results = []
    for implementation in (fake_quantize, legacy_fake_quantize):
        x, leaf = _inputs(kind, base)
        y = implementation(x, scale, dtype, 0 if per_channel else None)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    (y_new, g_new), (y_old, g_old) = results
    assert torch.equal(y_new, y_old)
    assert torch.equal(g_new, g_old)
    assert (g_new == 0).any() and (g_new != 0).any()  # both sides of the saturation exercised


@pytest.mark.parametrize("dt", [torch.float64, torch.float16])
def test_other_dtypes_equal_the_previous_implementation(dt):
    base = _values((3000,), torch.tensor(0.05), -128, 127, seed=5).to(dt)
    grad = torch.randn(3000).to(dt)
    results = []
    for implementation in (fake_quantize, legacy_fake_quantize):
        leaf = base.clone().requires_grad_(True)
        y = implementation(leaf * 1.0, torch.tensor([0.05]), "qint8")
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_scale_formula_equals_the_previous_one(dtype):
    amax = torch.cat([torch.rand(1000) * 10, torch.tensor([0.0, -0.0, -3.0, 1e-30, 3e38, 127.5])])
    assert torch.equal(compute_scale(amax, dtype, "bayes"), legacy_compute_scale(amax, dtype))


@pytest.mark.parametrize("averaging_constant", [0.01, 1.0, 0.0])
def test_fake_quantize_module_steps_equal_the_previous_moving_average(averaging_constant):
    """Observer update and scale of FakeQuantize over several batches, per tensor and per channel."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 6, 5, generator=g) * (i + 1) for i in range(5)]
    for per_channel in (False, True):
        kwargs = {"observer": MovingAveragePerChannelMinMaxObserver, "ch_axis": 1} if per_channel else {}
        fq = FakeQuantize(averaging_constant=averaging_constant, **kwargs).train()
        lo = hi = None
        for x in batches:
            if per_channel:
                flat = x.movedim(1, 0).reshape(6, -1)
                cur_lo, cur_hi = flat.amin(1), flat.amax(1)
            else:
                cur_lo, cur_hi = torch.aminmax(x)
                cur_lo, cur_hi = cur_lo.reshape(1), cur_hi.reshape(1)
            if lo is None:
                lo, hi = cur_lo.clone(), cur_hi.clone()
            elif averaging_constant == 1.0:
                lo, hi = lo + (cur_lo - lo), hi + (cur_hi - hi)
            elif averaging_constant != 0.0:
                lo, hi = lo + averaging_constant * (cur_lo - lo), hi + averaging_constant * (cur_hi - hi)
            y = fq(x)
            expected_scale = legacy_compute_scale(torch.maximum(-lo, hi).clamp_min(0.0), "qint8")
            assert torch.equal(fq.scale, expected_scale)
            assert torch.equal(y, legacy_fake_quantize(x, expected_scale, "qint8", 1 if per_channel else None))
