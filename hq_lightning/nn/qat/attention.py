"""QAT attention: ``nn.MultiheadAttention`` and torchvision's Swin window attention, decomposed.

Each attention is the float computation with a fake quant on every tensor the integer model
keeps (docs/integer-arithmetic.md, section 10):

- the in-projections: per-channel weight fake quant (``in_proj_weight_fake_quant`` on the packed
  ``[3E, E]`` weight, the same as one per projection), output fake quants ``q_fake_quant``,
  ``k_fake_quant``, ``v_fake_quant`` (Swin: its ``qkv`` Linear, one output fake quant);
- :class:`AttentionFakeQuant`: ``scores = q @ k^T * c (+ bias, + mask)`` -> ``scores_fake_quant``,
  softmax -> ``softmax_fake_quant``, ``probs @ v`` -> ``context_fake_quant``;
- the out-projection, a QAT ``Linear`` (its output fake quant is the module's output).

Masks: boolean masks (``True`` = not allowed) and ``-inf`` entries of float masks **exclude**
their entries from the softmax (probability exactly 0; a row with every key excluded gives
zeros where torch gives NaN); finite float mask values are added to the scores. Swin's shift mask
(``-100`` between tokens of different regions) is an exclusion: ``exp(-100) ~ 4e-44``.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> mha = MultiheadAttention.from_float(torch.nn.MultiheadAttention(8, 2, batch_first=True), qc)
    >>> out, weights = mha(torch.rand(3, 5, 8), torch.rand(3, 5, 8), torch.rand(3, 5, 8))
    >>> tuple(out.shape), tuple(weights.shape)
    ((3, 5, 8), (3, 5, 5))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hq_lightning.nn.qat.fake_quant_builders import (
    activation_fake_quant,
    qconfig_of,
    weight_fake_quant,
)
from hq_lightning.nn.qat.linear import Linear

__all__ = [
    "AttentionFakeQuant",
    "MultiheadAttention",
    "WindowAttention",
    "attention_masks",
    "batch_first_inputs",
    "constant_fake_quant",
    "linear_from_float",
    "relative_position_bias",
]


def _activation(qconfig: Any, owner: str) -> nn.Module:
    fake_quant = activation_fake_quant(qconfig)
    if fake_quant is None:
        raise ValueError(
            f"Expected the qconfig of `{owner}` to have an activation fake quant (attention keeps "
            f"8/16-bit scores, probabilities and context), but got {qconfig!r}."
        )
    return fake_quant


def _probability_fake_quant(qconfig: Any) -> nn.Module:
    # returned attention weights are probabilities in [0, 1]: a fixed scale (amax 1), so a module
    # called with need_weights=False (never observing them) still converts
    from hq_lightning.dtype import qinfo
    from hq_lightning.nn.qat.fake_quant_builders import fixed_scale_fake_quant

    _activation(qconfig, "attention weights")
    dtype = dict(getattr(qconfig.activation, "keywords", {}) or {}).get("dtype", "qint8")
    info = qinfo(dtype)
    return fixed_scale_fake_quant(qconfig, 2.0 / (info.max - info.min), "attention weights")


def constant_fake_quant(qconfig: Any, ch_axis: int | None = None, owner: str = "constant") -> nn.Module:
    """A weight-like fake quant for a constant operand: the weight fake-quant class and dtype.

    Per channel along ``ch_axis`` (the qconfig's weight observer rebuilt on that axis), or per
    tensor (a min/max observer that follows the current value, averaging constant 1).
    """
    if ch_axis is not None:
        return weight_fake_quant(qconfig, ch_axis=ch_axis, owner=owner)
    from hq_lightning.quantization.observer import MovingAveragePerTensorMinMaxObserver

    factory = getattr(qconfig, "weight", None)
    if factory is None:
        raise ValueError(
            f"Expected the qconfig of `{owner}` to have a weight fake quant (constants are quantized "
            f"like weights), but got {qconfig!r}."
        )
    cls = getattr(factory, "func", factory)
    dtype = dict(getattr(factory, "keywords", {}) or {}).get("dtype", "qint8")
    return cls(observer=MovingAveragePerTensorMinMaxObserver, dtype=dtype, averaging_constant=1)


def linear_from_float(linear: nn.Linear, qconfig: Any) -> Linear:
    """A QAT ``Linear`` sharing the parameters of any ``nn.Linear`` (subclasses included)."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    plain.train(linear.training)
    return Linear.from_float(plain, qconfig)


def batch_first_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    batch_first: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
    """``nn.MultiheadAttention``'s inputs as ``(batch, length, embed)``, and whether they were unbatched."""
    if is_causal and attn_mask is None:
        raise ValueError("Expected `attn_mask` with is_causal=True (it is only a hint), but got None.")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    return query, key, value, key_padding_mask, unbatched


def attention_masks(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    batch: int,
    heads: int,
    target: int,
    source: int,
) -> tuple[Tensor | None, Tensor | None]:
    """``(excluded, additive)`` of ``nn.MultiheadAttention``'s masks, broadcastable to ``[N, H, L, S]``.

    ``excluded``: bool, True where an entry takes no part in the softmax (a True boolean mask
    entry or a ``-inf`` float entry). ``additive``: float32 finite values added to the scores
    (``None`` when there are none).
    """
    excluded: Tensor | None = None
    additive: Tensor | None = None

    def add(mask: Tensor) -> None:
        nonlocal excluded, additive
        if mask.dtype == torch.bool:
            part_excluded, part_add = mask, None
        elif mask.is_floating_point():
            part_excluded = torch.isneginf(mask)
            part_add = mask.masked_fill(part_excluded, 0.0).float()
            if not bool(part_add.ne(0).any()):
                part_add = None
        else:
            raise TypeError(f"Expected an attention mask of dtype bool or float, but got {mask.dtype}.")
        excluded = part_excluded if excluded is None else excluded | part_excluded
        if part_add is not None:
            additive = part_add if additive is None else additive + part_add

    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, source):
            raise ValueError(
                f"Expected `key_padding_mask` of shape {(batch, source)}, but got {tuple(key_padding_mask.shape)}."
            )
        add(key_padding_mask.reshape(batch, 1, 1, source))
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (target, source):
                raise ValueError(f"Expected a 2-D `attn_mask` of shape {(target, source)}, but got {tuple(attn_mask.shape)}.")
            add(attn_mask.reshape(1, 1, target, source))
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (batch * heads, target, source):
                raise ValueError(
                    f"Expected a 3-D `attn_mask` of shape {(batch * heads, target, source)}, but got "
                    f"{tuple(attn_mask.shape)}."
                )
            add(attn_mask.reshape(batch, heads, target, source))
        else:
            raise ValueError(f"Expected `attn_mask` to be 2-D or 3-D, but got {attn_mask.dim()}-D.")
    return excluded, additive


class AttentionFakeQuant(nn.Module):
    """``softmax(q @ k^T * factor + bias + mask) @ v`` with the integer model's fake quants.

    Args:
        qconfig: its ``activation`` builds ``scores_fake_quant``, ``softmax_fake_quant`` and
            ``context_fake_quant``.
    """

    def __init__(self, qconfig: Any) -> None:
        super().__init__()
        self.scores_fake_quant = _activation(qconfig, "attention scores")
        self.softmax_fake_quant = _activation(qconfig, "attention probabilities")
        self.context_fake_quant = _activation(qconfig, "attention context")

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        factor: float,
        bias: Tensor | None = None,
        excluded: Tensor | None = None,
        additive: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """``(context, probabilities)``; ``q [..., L, d]``, ``k [..., S, d]``, ``v [..., S, d_v]``."""
        logits = torch.matmul(q, k.transpose(-2, -1)) * factor
        if bias is not None:
            logits = logits + bias
        if additive is not None:
            logits = logits + additive
        if excluded is not None:
            logits = logits.masked_fill(excluded, 0.0)  # excluded entries do not shape the scale
        logits = self.scores_fake_quant(logits)
        if excluded is not None:
            logits = logits.masked_fill(excluded, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if excluded is not None:
            probs = probs.nan_to_num(0.0)  # a row with every key excluded
        probs = self.softmax_fake_quant(probs)
        used = F.dropout(probs, dropout_p, self.training) if dropout_p > 0 else probs
        context = self.context_fake_quant(torch.matmul(used, v))
        return context, probs


class MultiheadAttention(nn.MultiheadAttention):
    """QAT ``nn.MultiheadAttention`` (same parameters and call signature, see the module docstring).

    Extra modules: ``in_proj_weight_fake_quant`` (or ``q/k/v_proj_weight_fake_quant`` when
    ``kdim``/``vdim`` differ), ``q_fake_quant``, ``k_fake_quant``, ``v_fake_quant``,
    ``attention`` (:class:`AttentionFakeQuant`), ``out_proj`` (QAT ``Linear``) and
    ``weights_fake_quant`` (the returned weights: probabilities, a fixed scale for ``[0, 1]``).
    """

    @classmethod
    def from_float(cls, mod: nn.MultiheadAttention, qconfig: Any = None) -> MultiheadAttention:
        """Build from a float ``nn.MultiheadAttention`` (parameters shared, not copied)."""
        qconfig = qconfig_of(mod, qconfig)
        if mod.bias_k is not None or mod.add_zero_attn:
            raise ValueError(
                "Expected nn.MultiheadAttention with add_bias_kv=False and add_zero_attn=False, but "
                f"got add_bias_kv={mod.bias_k is not None}, add_zero_attn={mod.add_zero_attn}: those "
                "have no integer form. Keep the module float (qconfig None)."
            )
        qat = cls.__new__(cls)
        nn.Module.__init__(qat)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn", "in_proj_bias", "bias_k", "bias_v"):  # fmt: skip
            setattr(qat, name, getattr(mod, name))
        if mod._qkv_same_embed_dim:
            qat.in_proj_weight = mod.in_proj_weight
            qat.register_parameter("q_proj_weight", None)
            qat.register_parameter("k_proj_weight", None)
            qat.register_parameter("v_proj_weight", None)
            qat.in_proj_weight_fake_quant = weight_fake_quant(qconfig, 0, "in_proj_weight")
        else:
            qat.register_parameter("in_proj_weight", None)
            for name in ("q", "k", "v"):
                setattr(qat, f"{name}_proj_weight", getattr(mod, f"{name}_proj_weight"))
                setattr(qat, f"{name}_proj_weight_fake_quant", weight_fake_quant(qconfig, 0, f"{name}_proj_weight"))
        qat.out_proj = linear_from_float(mod.out_proj, qconfig)
        qat.q_fake_quant = _activation(qconfig, "q projection")
        qat.k_fake_quant = _activation(qconfig, "k projection")
        qat.v_fake_quant = _activation(qconfig, "v projection")
        qat.attention = AttentionFakeQuant(qconfig)
        qat.weights_fake_quant = _probability_fake_quant(qconfig)
        qat.qconfig = qconfig
        owner = getattr(mod, "_hq_owner_path", None)
        if owner is not None:
            qat._hq_owner_path = owner
        qat.train(mod.training)
        return qat

    def projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The fake-quantized q, k, v projection weights."""
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight_fake_quant(self.in_proj_weight)
            e = self.embed_dim
            return w[:e], w[e : 2 * e], w[2 * e :]
        return (
            self.q_proj_weight_fake_quant(self.q_proj_weight),
            self.k_proj_weight_fake_quant(self.k_proj_weight),
            self.v_proj_weight_fake_quant(self.v_proj_weight),
        )

    def projection_biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.in_proj_bias is None:
            return None, None, None
        e = self.embed_dim
        b = self.in_proj_bias
        return b[:e], b[e : 2 * e], b[2 * e :]

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
        query, key, value, key_padding_mask, unbatched = batch_first_inputs(
            query, key, value, key_padding_mask, attn_mask, self.batch_first, is_causal
        )
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        wq, wk, wv = self.projection_weights()
        bq, bk, bv = self.projection_biases()
        q = self.q_fake_quant(F.linear(query, wq, bq))
        k = self.k_fake_quant(F.linear(key, wk, bk))
        v = self.v_fake_quant(F.linear(value, wv, bv))
        q = q.reshape(batch, target, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
        excluded, additive = attention_masks(key_padding_mask, attn_mask, batch, heads, target, source)
        context, probs = self.attention(
            q, k, v, 1.0 / math.sqrt(head_dim), excluded=excluded, additive=additive, dropout_p=self.dropout
        )
        out = self.out_proj(context.transpose(1, 2).reshape(batch, target, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = self.weights_fake_quant(probs.mean(dim=1) if average_attn_weights else probs)
        return out, weights.squeeze(0) if unbatched else weights

    def output_qparams(self) -> tuple[tuple[Tensor, str, None], tuple[Tensor, str, None]]:
        """``(scale, dtype, ch_axis)`` of the output and of the weights, for ``convert_fx``.

        The weights (head-averaged, or per head with ``average_attn_weights=False``) pass through
        ``weights_fake_quant``.
        """
        out = self.out_proj.activation_post_process
        weights = self.weights_fake_quant
        return (out.scale.detach().clone(), out.dtype, None), (weights.scale.detach().clone(), weights.dtype, None)

    def _get_name(self) -> str:
        return "QATMultiheadAttention"


def relative_position_bias(table: Tensor, index: Tensor, window_size: list[int]) -> Tensor:
    """torchvision's ``_get_relative_position_bias``: ``[1, heads, N, N]`` from the bias table."""
    tokens = window_size[0] * window_size[1]
    bias = table[index].view(tokens, tokens, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


class WindowAttention(nn.Module):
    """QAT form of torchvision's ``ShiftedWindowAttention`` (Swin V1), same parameters and forward.

    ``qkv`` and ``proj`` are QAT ``Linear``s; the relative position bias is a constant operand
    with ``bias_fake_quant`` (weight-like, per tensor); the shift mask is an exclusion (module
    docstring). Built with :meth:`from_float`.
    """

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> WindowAttention:
        """Build from a torchvision ``ShiftedWindowAttention`` (parameters shared)."""
        qconfig = qconfig_of(mod, qconfig)
        if hasattr(mod, "logit_scale") or hasattr(mod, "cpb_mlp"):
            raise ValueError(
                f"Expected torchvision's ShiftedWindowAttention (Swin V1), but got {type(mod).__name__} "
                "(cosine attention with a continuous position bias), which has no integer form. "
                "Keep it float (qconfig None)."
            )
        qat = cls()
        qat.window_size = list(mod.window_size)
        qat.shift_size = list(mod.shift_size)
        qat.num_heads = mod.num_heads
        qat.attention_dropout = mod.attention_dropout
        qat.dropout = mod.dropout
        qat.qkv = linear_from_float(mod.qkv, qconfig)
        qat.proj = linear_from_float(mod.proj, qconfig)
        qat.relative_position_bias_table = mod.relative_position_bias_table
        qat.register_buffer("relative_position_index", mod.relative_position_index)
        qat.bias_fake_quant = constant_fake_quant(qconfig, None, "relative position bias")
        qat.attention = AttentionFakeQuant(qconfig)
        qat.qconfig = qconfig
        owner = getattr(mod, "_hq_owner_path", None)
        if owner is not None:
            qat._hq_owner_path = owner
        qat.train(mod.training)
        return qat

    def get_relative_position_bias(self) -> Tensor:
        return relative_position_bias(self.relative_position_bias_table, self.relative_position_index, self.window_size)

    def forward(self, x: Tensor) -> Tensor:
        from hq_lightning.nn.quantized.attention import merge_windows, partition_windows

        channels = x.shape[-1]
        x, layout = partition_windows(x, self.window_size, self.shift_size)
        tokens, heads = x.shape[1], self.num_heads
        qkv = self.qkv(x).reshape(x.shape[0], tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.bias_fake_quant(self.get_relative_position_bias())
        context, _ = self.attention(
            q, k, v, (channels // heads) ** -0.5, bias=bias, excluded=layout.excluded(x.device),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # fmt: skip
        x = context.transpose(1, 2).reshape(x.shape[0], tokens, channels)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        return merge_windows(x, layout)

    @property
    def activation_post_process(self) -> nn.Module:
        """The output fake quant (``proj``'s), which ``convert_fx`` reads for the output scale."""
        return self.proj.activation_post_process

    def _get_name(self) -> str:
        return "QATWindowAttention"
