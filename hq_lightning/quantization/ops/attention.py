"""Registry entries: ``nn.MultiheadAttention`` and torchvision's Swin ``ShiftedWindowAttention``.

Both are leaves of the traced graph: their QAT modules (:mod:`hq_lightning.nn.qat.attention`)
decompose them into projections, scores, softmax and context with a fake quant each, and their
integer modules (:mod:`hq_lightning.nn.quantized.attention`) compute the same pieces on integer
codes (docs/integer-arithmetic.md, section 10). torchvision's class is registered when
torchvision is installed.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> lookup_module(torch.nn.MultiheadAttention(8, 2)).name
    'multihead_attention'
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hq_lightning.dtype import as_dtype
from hq_lightning.functional.integer import quantize
from hq_lightning.nn import quantized as nnq
from hq_lightning.nn.qat import attention as qat_attention
from hq_lightning.nn.quantized.attention import (
    QuantizedAttention,
    QuantizedMultiheadAttention,
    QuantizedWindowAttention,
)
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_multihead_attention", "build_window_attention", "integer_linear"]

_REF = "tests/reference/attention_ref.py::ref_attention, ref_softmax, ref_matmul"


def _scale(fake_quant: nn.Module) -> tuple[Tensor, Any]:
    return fake_quant.scale.detach().to(torch.float32).reshape(-1)[:1].clone(), as_dtype(fake_quant.dtype)


def integer_linear(
    weight: Tensor, bias: Tensor | None, weight_scale: Tensor, input_scale: Tensor, input_dtype: Any, output: nn.Module
) -> nn.Module:
    """``QuantizedLinear`` from a float weight, its per-channel scale and the output fake quant."""
    out_scale, out_dtype = _scale(output)
    return nnq.QuantizedLinear.from_float_params(
        weight.detach().float(), None if bias is None else bias.detach().float(),
        weight_scale.detach().float().reshape(-1), input_scale, out_scale,
        input_dtype=input_dtype, output_dtype=out_dtype,
    )  # fmt: skip


def _qat_linear(module: nn.Module, input_scale: Tensor, input_dtype: Any) -> nn.Module:
    weight, bias = module.folded_weight_bias()
    return integer_linear(weight, bias, module.weight_fake_quant.scale, input_scale, input_dtype, module.activation_post_process)


def _core(core: nn.Module, q_fq: nn.Module, k_fq: nn.Module, v_fq: nn.Module, head_dim: int, **extra: Any) -> QuantizedAttention:
    s_q, d_q = _scale(q_fq)
    s_k, d_k = _scale(k_fq)
    s_v, d_v = _scale(v_fq)
    if len({d_q, d_k, d_v}) != 1:
        raise RuntimeError(f"Expected q, k and v of one dtype, but got {d_q.value}, {d_k.value}, {d_v.value}.")
    s_a, d_a = _scale(core.scores_fake_quant)
    s_p, d_p = _scale(core.softmax_fake_quant)
    s_c, d_c = _scale(core.context_fake_quant)
    return QuantizedAttention(
        s_q, s_k, s_v, factor=1.0 / math.sqrt(head_dim), head_dim=head_dim,
        scores_scale=s_a, scores_dtype=d_a, probs_scale=s_p, probs_dtype=d_p,
        context_scale=s_c, context_dtype=d_c, input_dtype=d_q, **extra,
    )  # fmt: skip


def build_multihead_attention(ctx: ConvertContext) -> nn.Module:
    """QAT ``MultiheadAttention`` -> :class:`~hq_lightning.nn.quantized.attention.QuantizedMultiheadAttention`."""
    from hq_lightning.quantization.fx.convert import QParams

    m = ctx.module
    tensors = [q for q in ctx.inputs[:3]]
    query, key, value = (per_tensor(ctx, q, name) for q, name in zip(tensors, ("query", "key", "value")))
    if not all(isinstance(q, QParams) for q in tensors):
        raise RuntimeError(f"Expected quantized query, key and value for `{ctx.path}`.")
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        w_scale = m.in_proj_weight_fake_quant.scale.reshape(-1)
        weights = (m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e], m.in_proj_weight[2 * e :])
        scales = (w_scale[:e], w_scale[e : 2 * e], w_scale[2 * e :])
    else:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        scales = tuple(getattr(m, f"{n}_proj_weight_fake_quant").scale.reshape(-1) for n in "qkv")
    biases = m.projection_biases()
    projections = [
        integer_linear(w, b, s, x.scale, x.dtype, fq)
        for w, b, s, x, fq in zip(weights, biases, scales, (query, key, value), (m.q_fake_quant, m.k_fake_quant, m.v_fake_quant))
    ]  # fmt: skip
    core = _core(m.attention, m.q_fake_quant, m.k_fake_quant, m.v_fake_quant, m.head_dim)
    s_c, d_c = _scale(m.attention.context_fake_quant)
    out_proj = _qat_linear(m.out_proj, s_c, d_c)
    s_w, d_w = _scale(m.weights_fake_quant)
    return QuantizedMultiheadAttention(*projections, out_proj, core, m.num_heads, m.batch_first, s_w, d_w)


def build_window_attention(ctx: ConvertContext) -> nn.Module:
    """QAT ``WindowAttention`` -> :class:`~hq_lightning.nn.quantized.attention.QuantizedWindowAttention`."""
    m = ctx.module
    x = per_tensor(ctx, ctx.input, "input")
    qkv = _qat_linear(m.qkv, x.scale, x.dtype)
    s_qkv = m.qkv.activation_post_process
    s_c, d_c = _scale(m.attention.context_fake_quant)
    proj = _qat_linear(m.proj, s_c, d_c)
    bias_scale, bias_dtype = _scale(m.bias_fake_quant)
    with torch.no_grad():
        bias = quantize(m.get_relative_position_bias().float(), bias_scale, bias_dtype)
    head_dim = m.qkv.out_features // 3 // m.num_heads
    core = _core(m.attention, s_qkv, s_qkv, s_qkv, head_dim, bias=bias, bias_scale=bias_scale)
    return QuantizedWindowAttention(qkv, proj, core, m.window_size, m.shift_size, m.num_heads)


register_op(OpSpec(
    "multihead_attention", OpKind.REQUANTIZE,
    "integer in-projections; exact int64 q @ k^T requantized with 1/sqrt(d) folded into the "
    "multiplier; softmax by an exp table, int64 row sum and one rounded division (masked "
    "entries excluded); exact probs @ v; integer out-projection",
    modules=(nn.MultiheadAttention,), qat=qat_attention.MultiheadAttention,
    integer=build_multihead_attention, reference=_REF,
))  # fmt: skip

try:  # torchvision is optional: its Swin attention is registered when it is installed
    from torchvision.models.swin_transformer import (
        ShiftedWindowAttention as _ShiftedWindowAttention,
    )
except ImportError:  # pragma: no cover - torchvision is installed in the project's environment
    _ShiftedWindowAttention = None

if _ShiftedWindowAttention is not None:
    register_op(OpSpec(
        "window_attention", OpKind.REQUANTIZE,
        "torchvision's Swin ShiftedWindowAttention: integer qkv/proj, padding/roll/windows move "
        "codes, relative position bias added inside the scores' rounding, shift mask excludes "
        "pairs of regions, softmax and matmuls as multihead_attention",
        modules=(_ShiftedWindowAttention, qat_attention.WindowAttention), qat=qat_attention.WindowAttention,
        integer=build_window_attention, reference=_REF,
    ))  # fmt: skip
