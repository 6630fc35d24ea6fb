"""Integer attention: the core (scores, masked softmax, context), ``nn.MultiheadAttention`` and
torchvision's Swin window attention. Rules: docs/integer-arithmetic.md, section 10.

Example:
    >>> import torch
    >>> core = QuantizedAttention(0.05, 0.05, 0.05, factor=0.5, head_dim=4, scores_scale=0.02,
    ...     probs_scale=1 / 127.5, context_scale=0.05)
    >>> q = torch.randint(-128, 128, (1, 2, 3, 4), dtype=torch.int8)
    >>> context, probs = core(q, q, q)
    >>> context.dtype, tuple(probs.shape), bool((probs >= 0).all())
    (torch.int8, (1, 2, 3, 3), True)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import (
    quantize_multiplier,
    quantize_multipliers,
    requantize,
)
from hq_lightning.functional.integer.attention import (
    masked_softmax,
    matmul_multiplier,
    softmax_exp_table,
    softmax_reciprocal,
)
from hq_lightning.functional.integer.matmul import exact_matmul
from hq_lightning.functional.integer.rounding import rounding_right_shift, saturate
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor

__all__ = [
    "QuantizedAttention",
    "QuantizedMultiheadAttention",
    "QuantizedWindowAttention",
    "WindowLayout",
    "merge_windows",
    "partition_windows",
    "window_shift_mask",
]

_MAGNITUDE = {torch.int8: 2**7, torch.int16: 2**15}


def window_shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], device: Any = None) -> Tensor:
    """torchvision's shifted-window region mask as booleans ``[nW, N, N]``: True = other region."""
    mask = torch.zeros((pad_h, pad_w), device=device)
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    return (mask.unsqueeze(1) - mask.unsqueeze(2)) != 0


class WindowLayout(NamedTuple):
    """Where :func:`partition_windows` cut a ``[B, H, W, C]`` map (for :func:`merge_windows`)."""

    batch: int
    height: int
    width: int
    pad_h: int
    pad_w: int
    window: list[int]
    shift: list[int]

    @property
    def shifted(self) -> bool:
        return sum(self.shift) > 0

    def excluded(self, device: Any = None) -> Tensor | None:
        """The shift mask per window, ``[B * nW, 1, N, N]`` (True: other region), or ``None``."""
        if not self.shifted:
            return None
        mask = window_shift_mask(self.pad_h, self.pad_w, self.window, self.shift, device)  # [nW, N, N]
        return mask.unsqueeze(1).repeat(self.batch, 1, 1, 1)


def partition_windows(x: Tensor, window_size: list[int], shift_size: list[int]) -> tuple[Tensor, WindowLayout]:
    """torchvision Swin's window cut: pad ``[B, H, W, C]`` to whole windows, roll by the shift (none
    where a window covers the map), then ``[B * nW, wh * ww, C]``. Moves values only (codes too)."""
    batch, height, width, channels = x.shape
    window = list(window_size)
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(shift_size)
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    layout = WindowLayout(batch, height, width, pad_h, pad_w, window, shift)
    if layout.shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window[0] * window[1], channels), layout


def merge_windows(x: Tensor, layout: WindowLayout) -> Tensor:
    """The inverse of :func:`partition_windows`: back to ``[B, H, W, C]`` (roll back, crop the pad)."""
    window, channels = layout.window, x.shape[-1]
    x = x.view(layout.batch, layout.pad_h // window[0], layout.pad_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(layout.batch, layout.pad_h, layout.pad_w, channels)
    if layout.shifted:
        x = torch.roll(x, shifts=(layout.shift[0], layout.shift[1]), dims=(1, 2))
    return x[:, : layout.height, : layout.width, :].contiguous()


class QuantizedAttention(nn.Module):
    """``softmax(q @ k^T * factor + bias + mask) @ v`` on integer codes.

    Args:
        q_scale, k_scale, v_scale: scales of the q, k, v codes.
        factor: the constant factor of the scores (``1 / sqrt(head_dim)``).
        head_dim: the contraction length of ``q @ k^T``.
        scores_scale / scores_dtype: the requantized scores.
        probs_scale / probs_dtype: the softmax output.
        context_scale / context_dtype: ``probs @ v``.
        bias: int codes added to the scores inside their rounding (Swin's relative position bias),
            broadcastable to ``[B, H, L, S]``; ``bias_scale`` its scale.
        input_dtype: dtype of q, k, v.
    """

    def __init__(
        self,
        q_scale: Tensor | float,
        k_scale: Tensor | float,
        v_scale: Tensor | float,
        *,
        factor: float,
        head_dim: int,
        scores_scale: Tensor | float,
        probs_scale: Tensor | float,
        context_scale: Tensor | float,
        scores_dtype: QuantDType | str = "qint8",
        probs_dtype: QuantDType | str = "qint8",
        context_dtype: QuantDType | str = "qint8",
        input_dtype: QuantDType | str = "qint8",
        bias: Tensor | None = None,
        bias_scale: Tensor | float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale),
                            ("scores_scale", scores_scale), ("probs_scale", probs_scale),
                            ("context_scale", context_scale)):  # fmt: skip
            self.register_buffer(name, scale_tensor(value, name))
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        self.scores_dtype = activation_dtype(scores_dtype, "scores_dtype")
        self.probs_dtype = activation_dtype(probs_dtype, "probs_dtype")
        self.context_dtype = activation_dtype(context_dtype, "context_dtype")
        self.factor = float(factor)
        self.head_dim = int(head_dim)
        code = torch_dtype(self.input_dtype)
        real = self.q_scale.double() * self.k_scale.double() * self.factor / self.scores_scale.double()
        bound = self.head_dim * _MAGNITUDE[code] ** 2
        if bias is not None:
            if bias.dtype not in (torch.int8, torch.int16):
                raise TypeError(f"Expected `bias` to be int8/int16 codes, but got {bias.dtype}.")
            if bias_scale is None:
                raise ValueError("Expected `bias_scale` with `bias`, but got None.")
            self.register_buffer("bias", bias.detach().clone())
            self.register_buffer("bias_scale", scale_tensor(bias_scale, "bias_scale"))
            (m1, m2), n = quantize_multipliers(
                real, self.bias_scale.double() / self.scores_scale.double(),
                magnitudes=(bound, _MAGNITUDE[bias.dtype]),
            )  # fmt: skip
            self.register_buffer("bias_multiplier", m2)
        else:
            self.register_buffer("bias", None)
            self.register_buffer("bias_scale", None)
            self.register_buffer("bias_multiplier", None)
            (m1,), n = quantize_multipliers(real, magnitudes=(bound,))
        self.register_buffer("scores_multiplier", m1)
        self.register_buffer("scores_shift", n)
        self.register_buffer("exp_table", softmax_exp_table(self.scores_scale, self.scores_dtype))
        m_r, n_r = softmax_reciprocal(self.probs_scale)
        self.register_buffer("reciprocal_multiplier", m_r)
        self.register_buffer("reciprocal_shift", n_r)
        self._context_factors: dict[int, tuple[Tensor, Tensor]] = {}

    def scores(self, q: Tensor, k: Tensor, additive: Tensor | None = None) -> Tensor:
        """``sat(RHU_n(acc m_1 + bias m_2 + RNE(mask / s_scores * 2^n)))``: one rounding.

        The mask term is computed in float64 (the quotient rounded once, then scaled by ``2^n``
        exactly), clamped to ``+/-2^62``, like ``add_scalar``'s constant.
        """
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"Expected q and k with head_dim {self.head_dim}, but got {q.shape[-1]}.")
        value = exact_matmul(q, k.transpose(-2, -1)) * self.scores_multiplier
        if self.bias is not None:
            value = value + self.bias.to(torch.int64) * self.bias_multiplier
        if additive is not None:
            term = torch.ldexp(additive.to(torch.float64) / self.scores_scale.double(), self.scores_shift)
            value = value + torch.round(term).clamp(-(2.0**62), 2.0**62).to(torch.int64)
        qmin, qmax = bounds(self.scores_dtype)
        return saturate(rounding_right_shift(value, self.scores_shift), qmin, qmax, torch_dtype(self.scores_dtype))

    def context_factors(self, length: int) -> tuple[Tensor, Tensor]:
        """``(m, n)`` of ``s_p s_v / s_c`` for a context sum over ``length`` keys."""
        found = self._context_factors.get(length)
        if found is None:
            real = self.probs_scale.double() * self.v_scale.double() / self.context_scale.double()
            found = matmul_multiplier(real, length, torch_dtype(self.probs_dtype), torch_dtype(self.input_dtype))
            self._context_factors[length] = found
        return found

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, excluded: Tensor | None = None, additive: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(context, probs)`` codes; ``q [..., L, d]``, ``k [..., S, d]``, ``v [..., S, d_v]``."""
        scores = self.scores(q, k, additive)
        keep = None if excluded is None else ~excluded
        probs = masked_softmax(
            scores, self.exp_table, keep, self.reciprocal_multiplier, self.reciprocal_shift, self.probs_dtype
        )
        m, n = self.context_factors(v.shape[-2])
        qmin, qmax = bounds(self.context_dtype)
        context = requantize(exact_matmul(probs, v), m, n, qmin, qmax, torch_dtype(self.context_dtype))
        return context, probs

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, factor={self.factor:.6g}, scores={self.scores_dtype.value}, "
            f"probs={self.probs_dtype.value}, context={self.context_dtype.value}, bias={self.bias is not None}"
        )


class QuantizedMultiheadAttention(nn.Module):
    """Integer ``nn.MultiheadAttention``: integer in-projections, :class:`QuantizedAttention`,
    integer out-projection; same call signature and outputs as the float module.

    Args:
        q_proj, k_proj, v_proj, out_proj: ``QuantizedLinear`` modules.
        attention: the :class:`QuantizedAttention` core.
        num_heads: heads.
        batch_first: the float module's layout.
        weights_scale / weights_dtype: scale of the returned attention weights.
    """

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        attention: QuantizedAttention,
        num_heads: int,
        batch_first: bool,
        weights_scale: Tensor | float,
        weights_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.attention = attention
        self.num_heads = int(num_heads)
        self.batch_first = bool(batch_first)
        self.register_buffer("weights_scale", scale_tensor(weights_scale, "weights_scale"))
        self.weights_dtype = activation_dtype(weights_dtype, "weights_dtype")
        ratio = attention.probs_scale.double() / self.weights_scale.double()
        self.register_buffer("head_multiplier", torch.stack(quantize_multiplier(ratio)))
        self.register_buffer("mean_multiplier", torch.stack(quantize_multiplier(ratio / self.num_heads)))

    def forward(  # noqa: D102 - nn.MultiheadAttention's signature
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        from hq_lightning.nn.qat.attention import attention_masks, batch_first_inputs

        query, key, value, key_padding_mask, unbatched = batch_first_inputs(
            query, key, value, key_padding_mask, attn_mask, self.batch_first, is_causal
        )
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        heads = self.num_heads
        q = self.q_proj(query)
        head_dim = q.shape[-1] // heads
        q = q.reshape(batch, target, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(batch, source, heads, head_dim).transpose(1, 2)
        excluded, additive = attention_masks(key_padding_mask, attn_mask, batch, heads, target, source)
        context, probs = self.attention(q, k, v, excluded, additive)
        out = self.out_proj(context.transpose(1, 2).reshape(batch, target, heads * head_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        qmin, qmax = bounds(self.weights_dtype)
        if average_attn_weights:
            total, factors = probs.to(torch.int64).sum(dim=1), self.mean_multiplier
        else:
            total, factors = probs, self.head_multiplier
        weights = requantize(total, factors[0], factors[1], qmin, qmax, torch_dtype(self.weights_dtype))
        return out, weights.squeeze(0) if unbatched else weights


class QuantizedWindowAttention(nn.Module):
    """Integer torchvision ``ShiftedWindowAttention`` ([B, H, W, C] codes in and out).

    Zero padding (the integer 0), the cyclic shift and the window partition move codes; the
    ``qkv`` and ``proj`` Linears are integer; the relative position bias is the core's ``bias``;
    the shift mask excludes pairs of tokens from different regions.
    """

    def __init__(
        self,
        qkv: nn.Module,
        proj: nn.Module,
        attention: QuantizedAttention,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
    ) -> None:
        super().__init__()
        self.qkv, self.proj, self.attention = qkv, proj, attention
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = int(num_heads)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[-1]
        x, layout = partition_windows(x, self.window_size, self.shift_size)
        tokens = x.shape[1]
        heads = self.num_heads
        qkv = self.qkv(x).reshape(x.shape[0], tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        context, _ = self.attention(q, k, v, layout.excluded(x.device))
        x = context.transpose(1, 2).reshape(x.shape[0], tokens, channels)
        return merge_windows(self.proj(x), layout)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"
