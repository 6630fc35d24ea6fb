"""Fake quantization: ``FakeQuantize`` modules and the plain ``fake_quantize`` function.

Symmetric, zero point 0::

    y = clamp(round_half_even(x * (1 / scale)), qmin, qmax) * scale

with ``1 / scale`` computed in float32 and a saturating straight-through gradient (``dy/dx = 1``
where the rounded value lies in ``[qmin, qmax]``, 0 where it was clamped). It runs as plain torch
ops in float32 on few temporaries on every device, every size and every floating dtype (torch's
fused aten kernels compute the same for finite input, but their CPU loops are scalar and they turn
NaN into ``qmin * scale`` on CPU and into 0 on CUDA). Under ``torch.compile`` the same formula is
written without looking at autograd nodes, so it compiles into one fused kernel.
``x * (1 / scale)`` equals ``x / scale`` except within one ulp of a half-integer tie, and always
for power-of-two scales.

Non-finite input, on every path: NaN stays NaN (its gradient is 0, as outside the range), +-inf
saturate to ``qmax * scale`` / ``qmin * scale`` (gradient 0). The integer model's ``Quantize`` maps
NaN to code 0 and counts it (docs/integer-arithmetic.md, "Non-finite input").

Example:
    >>> import torch
    >>> fake_quantize(torch.tensor([0.3, 1.0, 9.0]), torch.tensor([0.25]), "qint8")
    tensor([0.2500, 1.0000, 9.0000])
    >>> fake_quantize(torch.tensor([100.0]), torch.tensor([0.5]), "qint8")  # saturates at 127
    tensor([63.5000])
    >>> fake_quantize(torch.tensor([float("nan"), float("inf")]), torch.tensor([0.5]), "qint8")
    tensor([    nan, 63.5000])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hq_lightning.dtype import QuantDType, as_dtype, qinfo
from hq_lightning.march import get_march, supports_int16
from hq_lightning.quantization.factory import WithArgsMixin
from hq_lightning.quantization.host_float32 import to_float32
from hq_lightning.quantization.march_record import (
    EXTRA_STATE_SUFFIX,
    check_march_record,
    encode_march_record,
    warn_unrecorded,
)
from hq_lightning.quantization.observer import (
    MovingAveragePerTensorMinMaxObserver,
    normalize_ch_axis,
)
from hq_lightning.quantization.qparams import compute_scale_on_host

__all__ = ["FakeQuantize", "CalibFakeQuantize", "fake_quantize"]


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


# autograd nodes that save their own output for their backward (ReLU: ``threshold_backward`` reads
# it): an input made by one of them stays alive until this fake quant's backward anyway
_SAVES_ITS_OUTPUT = {"ReluBackward0": "_saved_result", "SigmoidBackward0": "_saved_result", "TanhBackward0": "_saved_result"}


def _kept_by_its_producer(x: torch.Tensor) -> bool:
    """True when ``x`` is the output its autograd node saved for backward (``relu(y)``), so keeping
    a reference to it costs no memory."""
    attribute = _SAVES_ITS_OUTPUT.get(type(x.grad_fn).__name__)
    if attribute is None:
        return False
    saved = getattr(x.grad_fn, attribute)
    return saved.data_ptr() == x.data_ptr() and saved.shape == x.shape and saved.stride() == x.stride()


class _PlainFakeQuantize(torch.autograd.Function):
    """The formula in float32 with plain torch ops, in few passes over one temporary.

    Forward: ``q = x * inv_scale``, then in place ``round_``, ``clamp_``, ``mul_(scale)``. For the
    backward it keeps either nothing new or a 1-byte mask:

    * a leaf input (a weight parameter) is alive until backward anyway, so only a reference to it
      is kept and the in-range mask is recomputed from it in backward; likewise, on the CPU, for
      an input its producer saved for its own backward (a ReLU's output, see
      :func:`_kept_by_its_producer`), and for an input computed as ``leaf * constant`` (see
      :func:`_leaf_times_constant`), recomputing the product;
    * any other input keeps a 1-byte mask of in-range codes (``int8`` on the CPU, ``bool``
      elsewhere): the codes clamping leaves unchanged (NaN compares unequal: outside). On a GPU,
      where a step is bound by kernel launches, two kernels in forward and one in backward beat
      recomputing (five more kernels in backward);
    * an input that needs no gradient keeps nothing.

    Backward is ``grad * mask`` (as the aten kernels: a NaN gradient stays NaN).
    """

    @staticmethod
    def forward(ctx, x, scale, inv_scale, qmin, qmax):
        # scale / inv_scale: float32 tensors, or Python floats holding float32 values (the host
        # path of FakeQuantize, the same bits: a CPU kernel reads a 0-d tensor as that scalar)
        q = torch.mul(x if x.dtype == torch.float32 else x.float(), inv_scale)
        q.round_()
        ctx.qrange = (qmin, qmax)
        ctx.recompute_mask = False
        ctx.recompute_product = False
        ctx.host_inv_scale = None if isinstance(inv_scale, torch.Tensor) else inv_scale
        saved_inv_scale = (inv_scale,) if ctx.host_inv_scale is None else ()
        if ctx.needs_input_grad[0]:
            product = None if x.is_leaf else _leaf_times_constant(x)
            if x.is_leaf or (product is None and x.device.type == "cpu" and _kept_by_its_producer(x)):
                # no mask pass in forward, one fresh tensor less (the CPU: ResNet-18, 32x32, 2
                # threads, 17 of 23 activations after a ReLU: about 0.5 ms of a 55 ms step)
                ctx.recompute_mask = True
                ctx.save_for_backward(x, *saved_inv_scale)
            elif product is not None:
                ctx.recompute_mask = ctx.recompute_product = True
                ctx.save_for_backward(*product, *saved_inv_scale)
            else:
                # one op fewer than an in-range test. On the CPU eq_ on floats and float <-> int8
                # conversions are vectorised, where eq into bool, bool -> float and float -> uint8
                # are not (a float32 * bool backward: 4x the time of float32 * int8); elsewhere eq
                # into bool is one kernel where eq_ + to are two
                clamped = torch.clamp(q, qmin, qmax)
                on_cpu = q.device.type == "cpu"
                ctx.save_for_backward(q.eq_(clamped).to(torch.int8) if on_cpu else torch.eq(q, clamped))
                clamped.mul_(scale)
                return clamped if x.dtype == torch.float32 else clamped.to(x.dtype)
        q.clamp_(qmin, qmax).mul_(scale)
        return q if x.dtype == torch.float32 else q.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.recompute_mask:
            saved = ctx.saved_tensors
            inv_scale = saved[-1] if ctx.host_inv_scale is None else ctx.host_inv_scale
            with torch.no_grad():  # a constant even under create_graph=True
                if ctx.recompute_product:
                    leaf, factor = saved[:2]
                    mask = torch.mul(leaf, factor).mul_(inv_scale)  # the forward's two roundings
                else:
                    x = saved[0]
                    mask = torch.mul(x if x.dtype == torch.float32 else x.float(), inv_scale)
                # in place on one buffer: a second one (clamp(v) == v on the unrounded codes, two
                # passes fewer) is a fresh allocation, whose first touch cost more than the two
                # passes save (ResNet-18's weights, measured)
                _in_range_(mask.round_(), *ctx.qrange)
            mask = mask.to(grad.dtype)
            return mask.mul_(grad), None, None, None, None
        (mask,) = ctx.saved_tensors
        return torch.mul(grad, mask), None, None, None, None  # one op: the mask converts in the kernel


def _float_in_range(codes: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """1.0 where the rounded ``codes`` equal their clamped value, else 0.0 (NaN, +-inf: 0.0),
    computed without a ``bool`` tensor.

    ``codes - clamped`` is 0 inside the range and at least 1 in magnitude outside (both are
    integer-valued), NaN for NaN; ``fmin`` with 1 maps NaN to 1, so ``1 - fmin(|d|, 1)`` is
    exactly the in-range test. Inductor's CPU code stores a ``bool`` tensor ~50x slower than a
    float one (one ``bool`` per element through a generic conversion: 5.8 ms against 0.09 ms for
    786 k elements on one thread, torch 2.14), and its partitioner prefers saving the 1-byte mask,
    so a mask that is a bool anywhere in the graph ends up stored as one.
    """
    one = torch.ones((), dtype=codes.dtype, device=codes.device)
    return torch.sub(one, torch.fmin(torch.abs(torch.sub(codes, clamped)), one))


class _TracedFakeQuantize(torch.autograd.Function):
    """The same formula and saturating STE for ``torch.compile``: no look at autograd nodes; the
    backward recomputes the in-range mask from the saved input with float ops only
    (:func:`_float_in_range`). ``grad * 1.0`` and ``grad * 0.0`` are the bits of
    ``grad * bool_mask``, and the recomputed codes are the forward's (same ops, same order).

    Saving the input rather than a mask leaves the choice to the compiler's partitioner: it keeps
    whichever tensor is cheapest and recomputes the rest in the backward kernel. After a
    ``ReLU6``, for instance, it keeps the convolution output and recomputes both the ReLU6 and the
    fake-quant masks, so no ``bool`` mask is stored at all (measured on 32x96x16x16, one thread:
    forward 6.8 -> 0.44 ms, backward 2.9 -> 0.46 ms, ReLU6 included).
    """

    @staticmethod
    def forward(ctx, x, scale, inv_scale, qmin, qmax):
        q = torch.round(torch.mul(x.float(), inv_scale))
        clamped = torch.clamp(q, qmin, qmax)
        ctx.save_for_backward(x, inv_scale)
        ctx.qrange = (qmin, qmax)
        out = torch.mul(clamped, scale)
        # no `.to()` for float32: torch.compile before 2.12 drops the custom backward of a Function
        # whose output went through a no-op `.to()` (zero gradients, seen on torch 2.11)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, inv_scale = ctx.saved_tensors
        with torch.no_grad():  # a constant even under create_graph=True
            # inv_scale * x, not x * inv_scale: the same bits (IEEE products commute), but not the
            # forward's node, so the joint graph's CSE does not merge this recomputation into the
            # forward, where the partitioner would then keep the mask rather than recompute it
            q = torch.round(torch.mul(inv_scale, x.float()))
            mask = _float_in_range(q, torch.clamp(q, *ctx.qrange))
        return torch.mul(grad, mask.to(grad.dtype)), None, None, None, None


def _check_scale(x: torch.Tensor, scale: torch.Tensor, ch_axis: int | None) -> tuple[torch.Tensor, int | None]:
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor([float(scale)], device=x.device)
    if scale.dtype != torch.float32 or scale.device != x.device:
        scale = scale.to(device=x.device, dtype=torch.float32)
    if ch_axis is None:
        if scale.numel() != 1:
            raise ValueError(
                f"Expected a one-element `scale` for per-tensor fake quant, but got shape {tuple(scale.shape)}."
            )
        return scale.reshape(1), None
    axis = normalize_ch_axis(ch_axis, x.dim())
    channels = x.shape[axis]
    if scale.dim() != 1 or scale.numel() != channels:
        raise ValueError(
            f"Expected `scale` of shape [{channels}] for per-channel fake quant along ch_axis={ch_axis} "
            f"of an input of shape {tuple(x.shape)}, but got shape {tuple(scale.shape)}."
        )
    return scale, axis


def _fake_quantize_plain(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int | None):
    """Plain torch ops, same formula (``scale`` already checked)."""
    if axis is None:
        scale = scale.reshape(())
    else:
        shape = [1] * x.dim()
        shape[axis] = scale.numel()
        scale = scale.view(shape)
    # reciprocal is the IEEE 1 / scale; ``1.0 / scale`` would run reciprocal and a multiply by 1
    function = _TracedFakeQuantize if torch.compiler.is_compiling() else _PlainFakeQuantize
    return function.apply(x, scale, torch.reciprocal(scale), qmin, qmax)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: QuantDType | str = "qint8",
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with a symmetric ``scale`` (zero point 0), differentiable (saturating STE).

    One implementation for every device, size and dtype (module docstring), so NaN stays NaN and
    +-inf saturate everywhere; under ``torch.compile`` it fuses into one kernel.

    Args:
        x: floating point input.
        scale: float32 tensor, one element (per tensor) or ``x.shape[ch_axis]`` elements.
        dtype: quantized dtype giving ``qmin``/``qmax``.
        ch_axis: channel axis for per-channel ``scale``; ``None`` for per tensor.

    Returns:
        tensor like ``x``.
    """
    info = qinfo(dtype)
    scale, axis = _check_scale(x, scale, ch_axis)
    return _fake_quantize_plain(x, scale, info.min, info.max, axis)


class FakeQuantize(WithArgsMixin, nn.Module):
    """Observe a tensor's range and fake-quantize it.

    The observer updates only when ``observer_enabled and self.training``, so ``model.eval()``
    freezes every scale; after each update the ``scale`` buffer is recomputed from the observer
    with the march captured at construction. States are usually switched with
    :func:`hq_lightning.quantization.set_fake_quantize`.

    Args:
        observer: observer class (or factory) building ``activation_post_process``.
        dtype: ``"qint8"`` or ``"qint16"`` (int16 needs BAYES or newer).
        ch_axis: channel axis for a per-channel observer (weights: 0, ConvTranspose weights: 1).
            Ignored with a per-tensor observer, as in the plugin; then ``self.ch_axis`` is ``None``.
        averaging_constant: passed to the observer when given.
        **observer_kwargs: more observer arguments (e.g. ``percentile=99.99``).

    Attributes:
        scale: buffer, shape ``[1]`` per tensor; ``[C]`` per channel (``[0]`` before data).
        zero_point: int32 zeros of the same shape.
        march: the march read from ``get_march()`` at construction.

    Example:
        >>> import torch
        >>> from hq_lightning.quantization import MovingAveragePerChannelMinMaxObserver
        >>> fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0,
        ...                   averaging_constant=1)
        >>> y = fq(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
        >>> fq.scale
        tensor([0.0157, 0.0039])
    """

    def __init__(
        self,
        observer: Any = MovingAveragePerTensorMinMaxObserver,
        dtype: QuantDType | str = "qint8",
        ch_axis: int | None = None,
        averaging_constant: float | None = None,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dtype = as_dtype(dtype)
        self.march = get_march()
        if self.dtype is QuantDType.qint32:
            raise ValueError(
                "Expected `dtype` of a FakeQuantize to be 'qint8' or 'qint16', but got 'qint32' "
                "(int32 outputs are expressed with QConfig(activation=None))."
            )
        if self.dtype is QuantDType.qint16 and not supports_int16(self.march):
            raise ValueError(
                f"Expected march to support qint16 (BAYES, BAYES_E, NASH), but got march "
                f"{self.march.value!r}: use dtype='qint8' or set_march() a newer march before prepare."
            )
        kwargs = dict(observer_kwargs)
        if averaging_constant is not None:
            kwargs["averaging_constant"] = averaging_constant
        per_channel = bool(getattr(getattr(observer, "cls", observer), "per_channel", False))
        if per_channel:
            if ch_axis is None:
                ch_axis = 0
            if not isinstance(ch_axis, int) or isinstance(ch_axis, bool):
                raise ValueError(f"Expected `ch_axis` to be an int, but got {ch_axis!r}.")
            kwargs["ch_axis"] = ch_axis
        self.ch_axis = ch_axis if per_channel else None
        self.activation_post_process = observer(dtype=self.dtype, **kwargs)
        initial = torch.empty(0) if per_channel else torch.ones(1)
        self.register_buffer("scale", initial)
        self.register_buffer("zero_point", torch.zeros(initial.shape, dtype=torch.int32))
        self.fake_quant_enabled = True
        self.observer_enabled = True
        # histogram observers search for their range: the scale is then recomputed when it is
        # read (attribute access, state_dict, fake quant), not after every calibration batch
        self._scale_stale = False
        self._lazy_scale = bool(getattr(self.activation_post_process, "expensive_amax", False))
        self.register_state_dict_pre_hook(_refresh_before_state_dict)

    # torch-style switches
    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> FakeQuantize:
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self.observer_enabled = bool(enabled)
        return self

    def disable_observer(self) -> FakeQuantize:
        return self.enable_observer(False)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from the observer with this module's march."""
        return self.activation_post_process.calculate_qparams(self.march)

    def __getattr__(self, name: str) -> Any:
        # nn.Module resolves buffers here; refresh a stale scale first
        if name in ("scale", "zero_point") and self.__dict__.get("_scale_stale"):
            self._update_scale()
        return super().__getattr__(name)

    def _update_scale(self) -> None:
        self.__dict__["_scale_stale"] = False
        scale = self._modules["activation_post_process"].calculate_scale(self.march)
        buffers = self._buffers
        if scale.shape != buffers["scale"].shape:
            buffers["scale"] = torch.empty_like(scale)
            buffers["zero_point"] = torch.zeros_like(scale, dtype=torch.int32)  # symmetric: set once
        buffers["scale"].copy_(scale)

    def _observe_on_host(self, observer: nn.Module, x: torch.Tensor) -> tuple[bool, float | None]:
        """Observe ``x`` with host floats where the observer can (``update_on_host``: per tensor,
        eager CPU, see there): ``(True, scale)`` with the new scale also in the buffer, or
        ``(True, None)`` when the scale was left to the tensor formula; ``(False, None)``, having
        changed nothing, where the tensor path must observe. The same bits as the tensor path, at
        about half its fixed cost (ResNet-18's 23 activations at 32x32, 2 threads: 0.4-0.8 ms of a
        55 ms QAT step)."""
        update_on_host = getattr(observer, "update_on_host", None)
        scale_buffer = self._buffers["scale"]
        if update_on_host is None or self.ch_axis is not None or self._lazy_scale or scale_buffer.numel() != 1:
            return False, None
        host_range = update_on_host(x)
        if host_range is None:
            return False, None
        scale = compute_scale_on_host(max(-host_range[0], host_range[1]), self.dtype, self.march)
        if scale is None:  # a power-of-two march, or a subnormal quotient: the tensor formula
            self._update_scale()
        else:
            scale_buffer.fill_(scale)
        return True, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # submodules and buffers through _modules / _buffers: nn.Module.__getattr__ costs ~0.3 us
        # a lookup, and an observed weight made 14 (ResNet-18 at 32x32: ~0.3 ms a step)
        host_scale = None
        if self.observer_enabled and self.training:
            observer = self._modules["activation_post_process"]
            observed, host_scale = self._observe_on_host(observer, x)
            if not observed:
                observer(x.detach())
                if self._lazy_scale:
                    self._scale_stale = x.numel() > 0 or self._scale_stale
                elif observer.initialized:
                    self._update_scale()
        if not self.fake_quant_enabled:
            return x
        if host_scale is not None:
            info = qinfo(self.dtype)
            return _PlainFakeQuantize.apply(x, host_scale, to_float32(1.0 / host_scale), info.min, info.max)
        if self._scale_stale:
            self._update_scale()
        scale = self._buffers["scale"]
        if scale.numel() == 0:
            raise RuntimeError(
                "Expected this per-channel FakeQuantize to have a scale, but it has observed no "
                "data yet: run a forward in train mode with the observer enabled (QAT or "
                "CALIBRATION state) or load a state_dict before enabling fake quant."
            )
        return fake_quantize(x, scale, self.dtype, self.ch_axis)

    # the march/dtype record (hq_lightning.quantization.march_record)
    def get_extra_state(self) -> torch.Tensor:
        """The record of the march and dtype this fake quant was built for, saved with its scale."""
        return encode_march_record(self.march, self.dtype)

    def set_extra_state(self, state: Any) -> None:
        """Refuse a record of another march or dtype (``load_state_dict`` calls this)."""
        check_march_record(state, self.march, self.dtype)

    def _check_record_before_load(self, state_dict, prefix) -> None:
        # before any of this module's state is copied, naming the module
        key = prefix + EXTRA_STATE_SUFFIX
        if key in state_dict:
            check_march_record(state_dict[key], self.march, self.dtype, where=prefix[:-1] or None)

    def _accept_unrecorded_after_load(self, state_dict, prefix, missing_keys) -> None:
        # a state saved before the record existed loads (strictly too), with one warning
        key = prefix + EXTRA_STATE_SUFFIX
        if key not in state_dict and prefix + "scale" in state_dict:
            if key in missing_keys:
                missing_keys.remove(key)
            warn_unrecorded()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_record_before_load(state_dict, prefix)
        self.__dict__["_scale_stale"] = False  # the checkpoint's scale wins
        # per-channel scale starts as shape [0]; take the checkpoint's channel count
        for name in ("scale", "zero_point"):
            key = prefix + name
            current = self._buffers[name]
            if key in state_dict and state_dict[key].shape != current.shape:
                self._buffers[name] = torch.empty(
                    state_dict[key].shape, dtype=current.dtype, device=current.device
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._accept_unrecorded_after_load(state_dict, prefix, missing_keys)

    def extra_repr(self) -> str:
        return (
            f"dtype={self.dtype.value}, ch_axis={self.ch_axis}, march={self.march.value}, "
            f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}"
        )


def _refresh_before_state_dict(module: FakeQuantize, prefix: str, keep_vars: bool) -> None:
    if module.__dict__.get("_scale_stale"):
        module._update_scale()


class CalibFakeQuantize(FakeQuantize):
    """A :class:`FakeQuantize` built by a calibration qconfig (``QConfig.kind == "calibration"``).

    Behaves like its parent; the class only marks calibration so a calibration qconfig is never
    mixed with a QAT one in a prepared model.
    """
