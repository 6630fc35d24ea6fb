"""Shared machinery of the integer Conv/ConvTranspose/Linear modules (docs/integer-arithmetic.md §4-5)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, as_dtype, torch_dtype
from hq_lightning.functional.integer import (
    ACCUMULATOR_MAGNITUDE,
    EXACT_FLOAT64_BOUND,
    ConvPlan,
    channel_view,
    float_requant_factors,
    quantize,
    quantize_bias,
    quantize_multipliers,
    relu6_upper_bound,
    requantize_float,
    rounding_offset,
)
from hq_lightning.nn.quantized._common import (
    activation_dtype,
    bounds,
    check_int_input,
    scale_tensor,
)

_ACTIVATIONS = (None, "relu", "relu6")


def _rebuild_plan_after_load(module: QuantizedWeightedModule, _incompatible_keys) -> None:
    # A top-level function (not a lambda) so whole-module torch.save can pickle the hook; the name
    # stays for modules saved before the plan became lazy. Loading copies into the buffers in
    # place (which the staleness check sees anyway); dropping the plan also makes an export
    # straight after a load ask for the real run it needs instead of using the old plan.
    module._drop_plan()


class QuantizedWeightedModule(nn.Module):
    """Base of integer weighted layers; subclasses set ``_kind``, ``_weight_ch_axis``, ``_out_axis``.

    Buffers (all in ``state_dict``): ``weight`` int8, ``bias`` int32 or None, ``weight_scale``,
    ``input_scale``, ``output_scale`` (``[1]``, or ``[C]`` = ``s_in * s_w`` for a high-precision
    output), ``addend_scale`` (fused add only), and the derived ``multiplier``, ``shift``,
    ``offset``, ``addend_multiplier``, ``clamp_min``, ``clamp_max``. The float32 weight chunks and
    the float64 requantization factors of the fast path (docs/integer-arithmetic.md, section 7) are
    derived from these buffers on the first forward (not at construction: that is most of
    ``convert_fx``'s time), rebuilt whenever one of them is replaced or changed in place, and
    never saved. Under ``torch.export`` (ONNX export) buffers are fake tensors, so the module must
    have run once on a real input before (``hq_lightning.deploy.export_onnx`` does that).
    """

    _kind = "conv2d"
    _weight_ch_axis = 0
    _out_axis = 1
    #: output elements per batch slice of the float epilogue (2 MiB of float64 scratch; measured
    #: against 2^16..2^20, see ``_forward_float_requant``)
    _slice_elements = 2**18

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        weight_scale: Tensor | float,
        input_scale: Tensor | float,
        output_scale: Tensor | float | None,
        *,
        input_dtype: QuantDType | str = "qint8",
        output_dtype: QuantDType | str = "qint8",
        activation: str | None = None,
        addend_scale: Tensor | float | None = None,
        addend_dtype: QuantDType | str = "qint8",
        groups: int = 1,
    ) -> None:
        super().__init__()
        if weight.dtype != torch.int8:
            raise TypeError(
                f"Expected `weight` to be a torch.int8 tensor, but got {weight.dtype}; "
                "use `from_float_params` to quantize a float weight."
            )
        if bias is not None and bias.dtype != torch.int32:
            raise TypeError(f"Expected `bias` to be a torch.int32 tensor, but got {bias.dtype}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"Expected `activation` to be one of {_ACTIVATIONS}, but got {activation!r}."
            )
        self.groups = groups
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        out = as_dtype(output_dtype)
        self.high_precision = output_scale is None or out == QuantDType.qint32
        self.output_dtype = (
            QuantDType.qint32 if self.high_precision else activation_dtype(out, "output_dtype")
        )
        self.activation = activation
        self.has_addend = addend_scale is not None
        self.addend_dtype = activation_dtype(addend_dtype, "addend_dtype")
        if self.has_addend and self.high_precision:
            raise ValueError(
                "Expected `output_scale` for a fused add (the sum is requantized once), but got a "
                "high-precision (int32) output; give the add's output scale and dtype."
            )
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight_scale", scale_tensor(weight_scale, "weight_scale"))
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        s_acc = self.accumulator_scale()
        if self.high_precision:
            self.register_buffer("output_scale", s_acc.to(torch.float32))
        else:
            self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        self.register_buffer(
            "addend_scale", scale_tensor(addend_scale, "addend_scale") if self.has_addend else None
        )
        self._derive(s_acc)
        self._drop_plan()
        self.register_load_state_dict_post_hook(_rebuild_plan_after_load)

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_float_params(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        weight_scale: Tensor | float,
        input_scale: Tensor | float,
        output_scale: Tensor | float | None,
        **kwargs: Any,
    ):
        """Quantize a float (BN-folded) weight per channel and a float bias, then build the module.

        ``weight_q = sat_8(round_half_even(w * fp32(1 / s_w)))`` on the output-channel axis and
        ``bias_q = sat_32(round_half_even(b / (s_in * s_w)))``; other arguments as ``__init__``.
        """
        w_scale = scale_tensor(weight_scale, "weight_scale")
        axis = cls._weight_ch_axis if w_scale.numel() > 1 else None
        q_weight = quantize(weight.detach(), w_scale, "qint8", axis)
        module = cls(q_weight, None, w_scale, input_scale, output_scale, **kwargs)
        if bias is not None:
            module.bias = quantize_bias(bias.detach(), module.accumulator_scale())
        return module

    def _out_channels(self) -> int:
        if self._weight_ch_axis == 1:
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    def accumulator_scale(self) -> Tensor:
        """``s_in * s_w[c]`` per output channel, float64 (exact)."""
        channels = self._out_channels()
        w_scale = self.weight_scale.to(torch.float64)
        if w_scale.numel() == 1:
            w_scale = w_scale.expand(channels)
        elif w_scale.numel() * self.groups == channels and w_scale.numel() != channels:
            w_scale = w_scale.repeat(self.groups)  # ConvTranspose: [C_out/groups] per group
        if w_scale.numel() != channels:
            raise ValueError(
                f"Expected `weight_scale` to have 1 or {channels} elements (output channels), "
                f"but got {self.weight_scale.numel()}."
            )
        return self.input_scale.to(torch.float64) * w_scale

    def _derive(self, s_acc: Tensor) -> None:
        channels = s_acc.numel()
        if self.high_precision:
            lo, hi = bounds(QuantDType.qint32)
            lo_t = torch.full((channels,), lo, dtype=torch.int64)
            hi_t = torch.full((channels,), hi, dtype=torch.int64)
            if self.activation is not None:
                lo_t.zero_()
            if self.activation == "relu6":
                hi_t = torch.round(6.0 / s_acc).clamp(max=hi).to(torch.int64)
            self.register_buffer("clamp_min", lo_t)
            self.register_buffer("clamp_max", hi_t)
            for name in ("multiplier", "shift", "offset", "addend_multiplier"):
                self.register_buffer(name, None)
            return
        s_out = self.output_scale.to(torch.float64)
        reals = [s_acc / s_out]
        magnitudes = [ACCUMULATOR_MAGNITUDE]
        if self.has_addend:
            # each term keeps its own 31 bits, aligned on the finer shift (docs section 3)
            reals.append((self.addend_scale.to(torch.float64) / s_out).expand(channels))
            magnitudes.append(-bounds(self.addend_dtype)[0])
        mults, shift = quantize_multipliers(*reals, magnitudes=magnitudes)
        self.register_buffer("multiplier", mults[0])
        self.register_buffer("shift", shift)
        self.register_buffer("offset", rounding_offset(shift))
        self.register_buffer("addend_multiplier", mults[1] if self.has_addend else None)
        lo, hi = bounds(self.output_dtype)
        if self.activation is not None:
            lo = 0
        hi_t = torch.tensor([hi], dtype=torch.int64)
        if self.activation == "relu6":
            hi_t = relu6_upper_bound(self.output_scale, self.output_dtype)
        self.register_buffer("clamp_min", torch.tensor([lo], dtype=torch.int64))
        self.register_buffer("clamp_max", hi_t)

    _PLAN_SOURCES = (
        "weight",
        "bias",
        "multiplier",
        "shift",
        "addend_multiplier",
        "clamp_min",
        "clamp_max",
    )

    def _plan_key(self) -> tuple:
        # the tensors themselves (held, so a freed buffer's id cannot be reused by a new one) and
        # their in-place versions: everything the derived fast path depends on
        tensors = [getattr(self, name) for name in self._PLAN_SOURCES]
        return tuple((t, t._version) if t is not None else None for t in tensors)

    def _plan_is_current(self) -> bool:
        # runs on every forward: reads the buffer dict directly (nn.Module.__getattr__ per buffer
        # cost more than a small layer's epilogue)
        built = self._plan_built_for
        if built is None:
            return False
        buffers = self._buffers
        for name, old in zip(self._PLAN_SOURCES, built):
            tensor = buffers.get(name)
            if old is None:
                if tensor is not None:
                    return False
            elif tensor is not old[0] or tensor._version != old[1]:
                return False
        return True

    def _drop_plan(self) -> None:
        """Forget the derived state; the next forward (or ``_ensure_plan``) rebuilds it."""
        self._derived_plan: ConvPlan | None = None
        self._derived_float_requant = None
        self._float_high_precision = False
        self._plan_built_for: tuple | None = None

    def _ensure_plan(self) -> None:
        """Build the derived state if it is missing or stale (outside ``torch.export``)."""
        if torch.compiler.is_exporting():
            # buffers are fake tensors here: keep the plan built from the real ones
            if self._derived_plan is None:
                raise RuntimeError(
                    f"Expected `{type(self).__name__}` to have run once on a real input before "
                    "torch.export / ONNX export (it derives its exact-conv plan from its buffers "
                    "on the first forward), but it never ran since it was built or loaded. Call "
                    "`model(example_input)` first (hq_lightning.deploy.export_onnx does)."
                )
            return
        if not self._plan_is_current():
            self._rebuild_plan_untraced()

    @property
    def _plan(self) -> ConvPlan:
        """The float32 weight chunks (built now if missing or stale)."""
        self._ensure_plan()
        return self._derived_plan

    @property
    def _float_requant(self):
        """The float64 requantization factors, or None for the int64 path (built if needed)."""
        self._ensure_plan()
        return self._derived_float_requant

    @_float_requant.setter
    def _float_requant(self, factors) -> None:
        # lets a benchmark force the int64 path: the plan is built first, so it is not undone
        self._ensure_plan()
        self._derived_float_requant = factors

    def _build_plan(self) -> None:
        act = torch_dtype(self.input_dtype)
        plan = ConvPlan.build(self.weight.cpu(), self._kind, self.groups, act)
        acc_min, acc_max = plan.accumulator_range(act)
        self._derived_plan = plan
        self._derived_float_requant = None
        self._float_high_precision = False
        if self.high_precision:
            bias = 0 if self.bias is None else int(self.bias.abs().max())
            largest = max(int(acc_min.abs().max()), int(acc_max.abs().max()))
            self._float_high_precision = largest + bias <= EXACT_FLOAT64_BOUND
        else:
            factors = float_requant_factors(
                acc_min,
                acc_max,
                None if self.bias is None else self.bias.cpu(),
                self.multiplier.cpu(),
                self.shift.cpu(),
                int(self.clamp_min),
                int(self.clamp_max),
                None if self.addend_multiplier is None else self.addend_multiplier.cpu(),
                torch_dtype(self.addend_dtype) if self.has_addend else None,
            )
            self._derived_float_requant = (
                None if factors is None else factors.to(self.multiplier.device)
            )
        self._out_min, self._out_max = int(self.clamp_min.min()), int(self.clamp_max.max())
        self._plan_built_for = self._plan_key()

    def _rebuild_plan_untraced(self) -> None:
        # A buffer changed since the plan was derived. Under torch.jit.trace the rebuild must not
        # be recorded into the graph (it would re-derive the plan on every traced call), so the
        # tracer is paused around it; its results enter the trace as constants like the chunks.
        state = torch._C._get_tracing_state() if torch.jit.is_tracing() else None
        if state is not None:
            torch._C._set_tracing_state(None)
        try:
            self._build_plan()
        finally:
            if state is not None:
                torch._C._set_tracing_state(state)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_derived_plan", "_derived_float_requant", "_plan_built_for"):
            state.pop(name, None)  # derived; keep saved modules (and deep copies) small
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("_plan", "_float_requant"):  # saved before the plan became lazy
            state.pop(name, None)
        super().__setstate__(state)
        self._drop_plan()  # rebuilt on the first forward

    # -- forward --------------------------------------------------------------------------
    def _op_kwargs(self) -> dict:
        raise NotImplementedError

    def forward(self, x: Tensor, addend: Tensor | None = None) -> Tensor:
        check_int_input(x, self.input_dtype)
        if self.has_addend != (addend is not None):
            raise ValueError(
                f"Expected `addend` to be {'an integer tensor' if self.has_addend else 'None'} "
                f"(module built with addend_scale={'set' if self.has_addend else 'None'}), "
                f"but got {'None' if addend is None else 'a tensor'}."
            )
        if addend is not None:
            check_int_input(addend, self.addend_dtype, "addend")
        self._ensure_plan()
        if self._derived_float_requant is not None:
            return self._forward_float_requant(x, addend)
        if self._float_high_precision:
            return self._forward_float_high_precision(x)
        return self._forward_int64(x, addend)

    def _forward_float_requant(self, x: Tensor, addend: Tensor | None) -> Tensor:
        # exact by the per-channel proof of float_requant_factors (docs section 7)
        factors = self._derived_float_requant
        if factors.multiplier.device != x.device:
            factors = self._derived_float_requant = factors.to(x.device)
        dtype = torch_dtype(self.output_dtype)
        total = self._derived_plan.accumulate_float(x, weight=self.weight, **self._op_kwargs())
        step = self._batch_step(total, addend)
        if step == 0:
            return requantize_float(
                total, factors, self._out_min, self._out_max, dtype, self._out_axis, addend
            )
        # The epilogue runs over batch slices through one small float64 scratch: its passes stay
        # in cache and the allocator reuses it instead of faulting in fresh pages for a
        # whole-batch float64 temporary on every call (measured 1.2-1.6x faster on small layers).
        out = torch.empty(total.shape, dtype=dtype, device=total.device)
        scratch = None
        if total.dtype != torch.float64:
            scratch = torch.empty((step, *total.shape[1:]), dtype=torch.float64)
        for start in range(0, total.shape[0], step):
            stop = min(start + step, total.shape[0])
            work = total[start:stop]
            if scratch is not None:
                work = scratch[: stop - start].copy_(work)
            requantize_float(
                work,
                factors,
                self._out_min,
                self._out_max,
                dtype,
                self._out_axis,
                None if addend is None else addend[start:stop],
                out=out[start:stop],
            )
        return out

    def _batch_step(self, total: Tensor, addend: Tensor | None) -> int:
        """Samples per slice of the float epilogue, or 0 for one pass over the whole batch."""
        tracing = (
            torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
        )
        if total.dim() < 2 or total.is_cuda or tracing:
            return 0  # a trace or export must not bake the slice count of one batch size
        if self._kind != "linear" and total.dim() != len(self.stride) + 2:
            return 0  # unbatched conv input: dim 0 is the channel axis
        step = max(1, self._slice_elements // max(total[0].numel(), 1))
        if step >= total.shape[0]:
            return 0
        if addend is not None and addend.shape != total.shape:
            return 0  # a broadcast addend is not sliced along the batch
        return step

    def _forward_float_high_precision(self, x: Tensor) -> Tensor:
        # |sum| + |bias| <= 2^53: float64 holds acc exactly; clamping inside the int32 range at
        # [clamp_min, clamp_max] also performs the int32 saturation of section 4.
        total = self._derived_plan.accumulate_float(x, weight=self.weight, **self._op_kwargs())
        value = total if total.dtype == torch.float64 else total.to(torch.float64)
        ndim, axis = value.dim(), self._out_axis
        if self.bias is not None:
            value.add_(channel_view(self.bias, axis, ndim))
        lo = channel_view(self.clamp_min.to(torch.float64), axis, ndim)
        hi = channel_view(self.clamp_max.to(torch.float64), axis, ndim)
        return torch.clamp(value, lo, hi, out=value).to(torch.int32)

    def _forward_int64(self, x: Tensor, addend: Tensor | None) -> Tensor:
        # `_plan` (not `_derived_plan`): this path is also called directly, by tests and benches
        acc = self._plan.accumulate(x, self.bias, weight=self.weight, **self._op_kwargs())
        ndim, axis = acc.dim(), self._out_axis
        lo = channel_view(self.clamp_min, axis, ndim)
        hi = channel_view(self.clamp_max, axis, ndim)
        if self.high_precision:
            return torch.clamp(acc, lo, hi).to(torch.int32)
        value = acc * channel_view(self.multiplier, axis, ndim)
        if addend is not None:
            value = value + addend.to(torch.int64) * channel_view(
                self.addend_multiplier, axis, ndim
            )
        value = (value + channel_view(self.offset, axis, ndim)) >> channel_view(
            self.shift, axis, ndim
        )
        return torch.clamp(value, lo, hi).to(torch_dtype(self.output_dtype))

    def extra_repr(self) -> str:
        parts = [
            f"weight={tuple(self.weight.shape)}",
            f"bias={self.bias is not None}",
            f"{self.input_dtype.value}->{self.output_dtype.value}",
        ]
        if self.activation:
            parts.append(f"activation={self.activation}")
        if self.has_addend:
            parts.append(f"addend={self.addend_dtype.value}")
        return ", ".join(parts)
