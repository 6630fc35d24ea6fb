"""Learnable-scale fake quantization (LSQ, Esser et al. 2020, "Learned Step Size Quantization").

Same forward as :class:`~hq_lightning.quantization.fake_quantize.FakeQuantize`::

    y = clamp(round_half_even(x * (1 / s)), qmin, qmax) * s

(``1 / s`` in float32, so it is bit for bit what ``FakeQuantize`` computes with the same scale),
but ``s`` is an ``nn.Parameter`` trained by the optimizer. With ``v = x / s`` and ``r = round(v)``:

* ``dy/dx = 1`` where ``qmin <= r <= qmax``, else 0 (the saturating straight-through estimator);
* ``dy/ds = r - v`` where ``qmin <= r <= qmax``, else ``clamp(r, qmin, qmax)`` (``qmin`` or ``qmax``),

and the gradient of ``s`` is multiplied by the LSQ gradient scale
``g = 1 / sqrt(numel_per_scale * qmax)`` (``numel_per_scale = x.numel() / s.numel()``: the whole
tensor per tensor, one channel's elements per channel), which keeps the step size's update in
proportion to the weights' updates. ``grad_scale=False`` uses ``g = 1``.

Example:
    >>> import torch
    >>> s = torch.tensor([0.5], requires_grad=True)
    >>> y = lsq_fake_quantize(torch.tensor([0.3, 100.0]), s, "qint8", grad_scale=False)
    >>> y
    tensor([ 0.5000, 63.5000], grad_fn=<_LSQFakeQuantizeBackward>)
    >>> y.sum().backward()
    >>> s.grad  # (round(0.6) - 0.6) + 127
    tensor([127.4000])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hq_lightning.dtype import QuantDType, qinfo
from hq_lightning.march import get_march, uses_power_of_two_scales
from hq_lightning.quantization.fake_quantize import FakeQuantize, _check_scale
from hq_lightning.quantization.nonfinite import record_nonfinite, register_nonfinite
from hq_lightning.quantization.observer import MovingAveragePerTensorMinMaxObserver
from hq_lightning.quantization.qparams import SCALE_EPS

__all__ = ["LearnableFakeQuantize", "lsq_fake_quantize"]


class _LSQFakeQuantize(torch.autograd.Function):
    """The fake-quant formula with the LSQ gradients for ``x`` and ``scale`` (see module docstring).

    Keeps ``x`` and ``scale`` and recomputes codes in backward (no mask is stored).
    """

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor, reduce_dims):
        code = torch.mul(x if x.dtype == torch.float32 else x.float(), torch.reciprocal(scale))
        code.round_().clamp_(qmin, qmax).mul_(scale)
        ctx.save_for_backward(x, scale)
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        ctx.reduce_dims = reduce_dims
        return code if x.dtype == torch.float32 else code.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        with torch.no_grad():
            value = torch.mul(x if x.dtype == torch.float32 else x.float(), torch.reciprocal(scale))
            code = torch.round(value)
            inside = (code >= qmin) & (code <= qmax)
            grad_x = grad_scale = None
            if ctx.needs_input_grad[0]:
                grad_x = grad * inside.to(grad.dtype)
            if ctx.needs_input_grad[1]:
                # inside: r - v; outside: the clamped code (qmin or qmax)
                per_element = torch.where(inside, code - value, code.clamp(qmin, qmax))
                total = (grad.float() * per_element).sum(dim=ctx.reduce_dims, keepdim=True)
                grad_scale = total.reshape(scale.shape).mul_(ctx.grad_factor)
        return grad_x, grad_scale, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: QuantDType | str = "qint8",
    ch_axis: int | None = None,
    grad_scale: bool = True,
) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable ``scale``: LSQ gradients for both (module docstring).

    Args:
        x: floating point input.
        scale: positive float32 tensor (a parameter or a function of one), one element per tensor
            or ``x.shape[ch_axis]`` elements.
        dtype: quantized dtype giving ``qmin``/``qmax``.
        ch_axis: channel axis of a per-channel ``scale``; ``None`` for per tensor.
        grad_scale: multiply the scale's gradient by ``1 / sqrt(numel_per_scale * qmax)``.

    Returns:
        tensor like ``x``.
    """
    info = qinfo(dtype)
    scale, axis = _check_scale(x, scale, ch_axis)
    if axis is None:
        scale_view = scale.reshape(())
        reduce_dims = tuple(range(x.dim()))
    else:
        shape = [1] * x.dim()
        shape[axis] = scale.numel()
        scale_view = scale.view(shape)
        reduce_dims = tuple(d for d in range(x.dim()) if d != axis)
    per_scale = x.numel() // max(scale.numel(), 1)
    factor = 1.0 / math.sqrt(per_scale * info.max) if grad_scale and per_scale > 0 else 1.0
    return _LSQFakeQuantize.apply(x, scale_view, info.min, info.max, factor, reduce_dims)


class LearnableFakeQuantize(FakeQuantize):
    """A :class:`FakeQuantize` whose ``scale`` is an ``nn.Parameter`` trained with LSQ gradients.

    Opt in through a qconfig, e.g.
    ``QConfig(activation=LearnableFakeQuantize.with_args(observer=..., averaging_constant=0.01), ...)``.

    Life cycle, with the states of :func:`~hq_lightning.quantization.set_fake_quantize`:

    * Initialisation: the observer runs (``observer_enabled and self.training``) and the scale
      follows it exactly as in ``FakeQuantize`` until the first forward that also fake-quantizes
      (QAT): that batch seeds the scale from the observer and from then on the scale is learned
      and the observer is no longer called. So CALIBRATION batches calibrate as usual and the
      first QAT step starts from the calibrated scale. :meth:`reinitialize_scale` re-arms it.
    * A loaded ``state_dict`` holding ``scale`` counts as initialised (keys are the same as
      ``FakeQuantize``'s, so a calibration checkpoint loads strictly as well).
    * A :class:`~hq_lightning.quantization.FixedScaleObserver` pins the scale: its parameter is
      created with ``requires_grad=False``.

    The parameter appears in ``model.parameters()`` under ``<path>.scale``. Build the optimizer
    after it exists (``prepare_qat_fx`` creates it); a per-channel scale starts with shape ``[0]``
    and is resized in place (``param.data``) by the first batch or a loaded state, so the same
    Parameter object, and an optimizer holding it, stays valid.

    ``module.scale`` reads the learned value as a detached tensor sharing the parameter's storage
    (what ``convert_fx`` reads). Positivity: before every forward and every read the parameter is
    projected onto ``[eps_fp32, inf)`` in place (on ``param.data``, untracked by autograd), i.e.
    projected gradient descent; a step that drives it non-positive leaves it at ``eps``, where its
    LSQ gradient (about ``qmin``/``qmax`` per element) pushes it back up. The projection also
    repairs a step that left it NaN or +-inf (a NaN gradient, an overflow): each such element is
    restored to its last projected value, and the step is counted on the device and reported by
    :func:`~hq_lightning.quantization.nonfinite.check_nonfinite` at the next synchronising point
    (``convert_fx``, ``set_fake_quantize``, the callback's epoch ends), so one bad step neither
    poisons the scale for good nor passes unnoticed.

    Args:
        observer: observer class (or factory), used to initialise the scale.
        dtype: ``"qint8"`` or ``"qint16"``.
        ch_axis: channel axis for a per-channel observer.
        averaging_constant: passed to the observer when given.
        grad_scale: multiply the scale's gradient by ``1 / sqrt(numel_per_scale * qmax)`` (LSQ);
            ``False`` uses the plain gradient.
        **observer_kwargs: more observer arguments.

    Raises:
        ValueError: on march BERNOULLI, whose power-of-two scales cannot be learned freely.

    Example:
        >>> import torch
        >>> fq = LearnableFakeQuantize(averaging_constant=1)
        >>> _ = fq(torch.tensor([-1.0, 2.0]))          # QAT: seeds the scale from the observer
        >>> fq.scale
        tensor([0.0157])
        >>> [name for name, _ in fq.named_parameters()]
        ['scale']
    """

    def __init__(
        self,
        observer: Any = MovingAveragePerTensorMinMaxObserver,
        dtype: QuantDType | str = "qint8",
        ch_axis: int | None = None,
        averaging_constant: float | None = None,
        grad_scale: bool = True,
        **observer_kwargs: Any,
    ) -> None:
        march = get_march()
        if uses_power_of_two_scales(march):
            raise ValueError(
                f"Expected a march with free float scales for LearnableFakeQuantize, but got march "
                f"{march.value!r}, whose scales are snapped to powers of two: a learned scale "
                "would not survive the snapping. Use FakeQuantize on BERNOULLI, or set_march() "
                "another march before prepare."
            )
        super().__init__(observer, dtype, ch_axis, averaging_constant, **observer_kwargs)
        self.grad_scale = bool(grad_scale)
        initial = self._buffers.pop("scale")
        pinned = type(self.activation_post_process).__name__ == "FixedScaleObserver"
        self.register_parameter("scale", nn.Parameter(initial, requires_grad=not pinned))
        self._scale_initialized = False
        register_nonfinite(self)  # steps that left the scale non-finite (repaired, reported later)
        self.register_buffer("_last_good_scale", initial.clone(), persistent=False)

    #: check_nonfinite words its report about a learned scale, not an input
    learns_scale = True

    def reinitialize_scale(self) -> LearnableFakeQuantize:
        """Seed the scale from the observer again at the next observed batch (then learn on)."""
        self._scale_initialized = False
        return self

    def _scale_parameter(self) -> nn.Parameter:
        """The parameter, projected in place (not tracked by autograd, no version bump) onto
        ``[eps, inf)``, its non-finite elements restored to the last projected value; no host read."""
        param = self._parameters["scale"]
        data = param.data
        last = self._buffers["_last_good_scale"]
        if last.shape != data.shape or last.device != data.device:  # seeded, resized or moved
            last = self._buffers["_last_good_scale"] = torch.ones_like(data)
        finite = torch.isfinite(data)
        record_nonfinite(self, finite.logical_not().any(), torch.isnan(data).any())
        data.copy_(torch.where(finite, data.clamp_min(SCALE_EPS), last))
        last.copy_(data)
        return param

    def __getattr__(self, name: str) -> Any:
        if name == "scale" and "scale" in self.__dict__.get("_parameters", {}):
            if self.__dict__.get("_scale_stale"):
                self._update_scale()
            return self._scale_parameter().detach()
        return super().__getattr__(name)

    def _update_scale(self) -> None:
        self.__dict__["_scale_stale"] = False
        scale, zero_point = self.calculate_qparams()
        param = self._parameters["scale"]
        with torch.no_grad():
            if param.shape != scale.shape:
                param.data = torch.empty(scale.shape, dtype=param.dtype, device=param.device)
                self._buffers["zero_point"] = torch.empty_like(zero_point, device=param.device)
            param.copy_(scale)
            self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and self.training and not self._scale_initialized:
            observer = self.activation_post_process
            observer(x.detach())
            if self.fake_quant_enabled and observer.initialized:
                self._update_scale()  # the seeding batch: learned from here on
                self._scale_initialized = True
            elif self._lazy_scale:
                self._scale_stale = x.numel() > 0 or self._scale_stale
            elif observer.initialized:
                self._update_scale()
        if self.fake_quant_enabled:
            if self._scale_stale:
                self._update_scale()
            scale = self._scale_parameter()
            if scale.numel() == 0:
                raise RuntimeError(
                    "Expected this per-channel LearnableFakeQuantize to have a scale, but it has "
                    "observed no data yet: run a forward in train mode with the observer enabled "
                    "(QAT or CALIBRATION state) or load a state_dict before enabling fake quant."
                )
            x = lsq_fake_quantize(x, scale, self.dtype, self.ch_axis, self.grad_scale)
        return x

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_record_before_load(state_dict, prefix)
        self.__dict__["_scale_stale"] = False  # the checkpoint's scale wins
        param = self._parameters["scale"]
        key = prefix + "scale"
        if key in state_dict:
            if state_dict[key].shape != param.shape:  # same Parameter object, new shape
                param.data = torch.empty(state_dict[key].shape, dtype=param.dtype, device=param.device)
            self._scale_initialized = True
        zp_key = prefix + "zero_point"
        if zp_key in state_dict and state_dict[zp_key].shape != self.zero_point.shape:
            current = self._buffers["zero_point"]
            self._buffers["zero_point"] = torch.empty(
                state_dict[zp_key].shape, dtype=current.dtype, device=current.device
            )
        # skip FakeQuantize's version, which resizes `scale` as a buffer
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._accept_unrecorded_after_load(state_dict, prefix, missing_keys)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grad_scale={self.grad_scale}, learning={self._scale_initialized}"
