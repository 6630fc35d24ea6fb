"""The forward shared by every weighted QAT module: Conv/ConvTranspose/Linear, optionally fused
with a kept BatchNorm, an add and a ReLU/ReLU6.

One class per weighted float type (``Conv2d``, ``Linear``, ...) carries the fused parts as
attributes, so ``qat.Conv2d`` built from a ``ConvBNAddReLU2d`` prints as ``ConvBNAddReLU2d``:

- ``bn``: a BatchNorm kept for QAT (``qat_mode="with_bn"``) or ``None`` (folded at fuse time).
- ``has_add``: ``forward(x, addend)`` adds ``addend`` to the conv output in full precision.
- ``relu``: ``nn.ReLU``, ``nn.ReLU6`` or ``None``, applied after the add.
- ``weight_fake_quant``: per-channel fake quant of the (BN-folded) weight, run once per forward.
- ``activation_post_process``: the ONE output fake quant, after the ReLU (``None`` for a
  high-precision output).

With a kept BN the running-statistics scale ``gamma / sqrt(running_var + eps)`` is folded into the
weight before its fake quant and divided out after the conv, so BN still normalises with batch
statistics in training while the weight is quantized as it will be deployed; one conv per step.
In that training path the fold factor is a constant for autograd (BN's own parameters still get
their gradients through the BN), which saves keeping the conv output for the division's gradient.
In the FLOAT state (weight fake quant and observer both off) it computes exactly ``bn(conv(x))``.
After :meth:`freeze_bn` (or in ``eval()``) it runs the folded conv with running statistics,
which is what convert deploys.

Bias fake quant (``bias_fake_quant``): the converted layer adds an int32 bias on the accumulator
grid ``s_acc[c] = s_in * s_w[c]`` (docs/integer-arithmetic.md, section 2). When it is active the
(BN-folded) bias is replaced in the forward by
``quantize_bias(b, s_acc) * s_acc`` (the very rule convert uses), with a straight-through
gradient, so the fake-quant model adds what the chip adds. ``s_in`` is the scale of the
``FakeQuantize`` that produces the module's input; ``prepare_qat_fx`` links it with
:meth:`~FusedWeightedMixin.set_input_fake_quant` (a plain reference, not a submodule: the
``state_dict`` is unchanged). ``bias_fake_quant`` is ``True`` (QAT and VALIDATION), ``False``
(never: the float bias) or ``None`` (march default: always on BERNOULLI, where the bias is
quantized during QAT; elsewhere only in ``eval()``, i.e. VALIDATION, which predicts the deployed
model). It needs the weight and the input to be fake-quantized (not in CALIBRATION or FLOAT),
and a kept BN normalising with running statistics (frozen or ``eval()``): with batch statistics
there is no deployable bias yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.functional.integer.quantize import quantize_bias
from hq_lightning.march import March
from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, weight_fake_quant

__all__ = ["FusedWeightedMixin"]

_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


class FusedWeightedMixin:
    """Mixin for a float weighted module type; see the module docstring for the attributes.

    Subclasses set ``_NAME_STEM`` / ``_NAME_SUFFIX`` (for printing), ``_WEIGHT_CH_AXIS`` and
    implement ``_float_kwargs(float_mod)`` (constructor arguments of the float type) and
    ``_weighted_forward(x, weight, bias)``.
    """

    _NAME_STEM = "Conv"
    _NAME_SUFFIX = "2d"
    _WEIGHT_CH_AXIS = 0
    _FLOAT_TYPE: type[nn.Module] = nn.Module

    weight: nn.Parameter
    bias: nn.Parameter | None
    #: ``True``, ``False`` or ``None`` (march default); see the module docstring.
    bias_fake_quant: bool | None = None

    def _init_qat(self, qconfig: Any, bn: nn.Module | None, relu: str | nn.Module | None, has_add: bool) -> None:
        self.qconfig = qconfig
        if bn is not None and (bn.running_mean is None or bn.running_var is None):
            raise ValueError(
                "Expected the BatchNorm kept for QAT to track running statistics, but got "
                f"{bn!r} with track_running_stats=False. Use qat_mode='fuse_bn' or a BN with statistics."
            )
        self.bn = bn
        self.has_add = bool(has_add)
        if isinstance(relu, str):
            if relu not in _ACTIVATIONS:
                raise ValueError(f"Expected `relu` to be one of {sorted(_ACTIVATIONS)} or None, but got {relu!r}.")
            relu = _ACTIVATIONS[relu]()
        elif relu is not None and type(relu) not in (nn.ReLU, nn.ReLU6):
            raise ValueError(f"Expected `relu` to be nn.ReLU, nn.ReLU6 or None, but got {relu!r}.")
        self.relu = relu
        self._relu6 = isinstance(relu, nn.ReLU6)
        self.bn_frozen = False
        self.weight_fake_quant = weight_fake_quant(qconfig, self._WEIGHT_CH_AXIS, self._NAME_STEM)
        self.activation_post_process = activation_fake_quant(qconfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _float_kwargs(cls, float_mod: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None):
        """Build the QAT module from a float weighted module or a fused ``nn.intrinsic`` module.

        The float parameters (and a kept BN) are shared, not copied: prepare deep-copies the
        model first. ``qconfig`` defaults to ``mod.qconfig``.

        Args:
            mod: an instance of the float type, or a fused module with attributes ``conv``,
                optional ``bn``, optional ``relu`` and an add flag.
            qconfig: the :class:`~hq_lightning.quantization.QConfig` to use.
        """
        if qconfig is None:
            qconfig = getattr(mod, "qconfig", None)
        float_mod, bn, relu, has_add = _fused_parts(mod)
        if type(float_mod) is not cls._FLOAT_TYPE:
            raise TypeError(
                f"Expected `mod` to be a {cls._FLOAT_TYPE.__name__} or a fused module around one, "
                f"but got {type(mod).__name__} (weighted part {type(float_mod).__name__})."
            )
        kwargs = cls._float_kwargs(float_mod)
        qat = cls(**kwargs, device="meta", qconfig=qconfig, bn=bn, relu=relu, has_add=has_add)
        qat.weight = float_mod.weight
        qat.bias = float_mod.bias
        qat.train(mod.training)
        device = float_mod.weight.device
        if device.type != "cpu":
            for name in ("weight_fake_quant", "activation_post_process"):
                fake_quant = getattr(qat, name)
                if fake_quant is not None:
                    fake_quant.to(device)
        return qat

    # ------------------------------------------------------------------ BN switches
    def freeze_bn(self):
        """Stop updating BN running statistics and normalise with them (folded conv).

        Adds or removes no parameter, so optimizers and DDP wrappers stay valid.
        """
        self.bn_frozen = True
        if self.bn is not None:
            self.bn.train(False)
        return self

    def unfreeze_bn(self):
        """Undo :meth:`freeze_bn`: BN follows the module's train/eval mode again."""
        self.bn_frozen = False
        if self.bn is not None:
            self.bn.train(self.training)
        return self

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        if self.bn_frozen and self.bn is not None:
            self.bn.train(False)
        return self

    # ------------------------------------------------------------------ numerics
    def _bn_scale_factor(self) -> torch.Tensor:
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std * bn.weight if bn.weight is not None else inv_std

    def _channel_shape(self, ndim: int) -> list[int]:
        # shape broadcasting a per-output-channel vector over the output (channels on dim 1)
        shape = [1] * ndim
        shape[1] = -1
        return shape

    def _weight_channel_shape(self) -> list[int]:
        shape = [1] * self.weight.dim()
        shape[self._WEIGHT_CH_AXIS] = -1
        return shape

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float weight and bias with a kept BN folded in using its running statistics.

        The bias is a zero vector when the module has none (convert always gets a tensor).
        """
        weight = self.weight
        bias = self.bias if self.bias is not None else torch.zeros(self._out_channels(), device=weight.device, dtype=weight.dtype)
        if self.bn is None:
            return weight, bias
        bn = self.bn
        factor = self._bn_scale_factor()
        folded_weight = weight * factor.reshape(self._weight_channel_shape())
        folded_bias = (bias - bn.running_mean) * factor
        if bn.bias is not None:
            folded_bias = folded_bias + bn.bias
        return folded_weight, folded_bias

    def _out_channels(self) -> int:
        return self.weight.shape[self._WEIGHT_CH_AXIS] * (getattr(self, "groups", 1) if self._WEIGHT_CH_AXIS == 1 else 1)

    def _weighted_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ bias fake quant
    @property
    def input_fake_quant(self) -> nn.Module | None:
        """The ``FakeQuantize`` producing this module's input (``None`` if not linked)."""
        return self.__dict__.get("_input_fake_quant")

    def set_input_fake_quant(self, fake_quant: nn.Module | None):
        """Link the ``FakeQuantize`` whose scale is this module's input scale ``s_in``.

        Stored as a plain reference, not as a submodule, so ``state_dict``, ``modules()`` and
        printing are unchanged; ``copy.deepcopy`` of the whole model keeps it pointing at the
        copy's own ``FakeQuantize``.
        """
        if fake_quant is not None and not (hasattr(fake_quant, "scale") and hasattr(fake_quant, "fake_quant_enabled")):
            raise TypeError(
                f"Expected `fake_quant` to be a FakeQuantize (with `scale`) or None, but got {type(fake_quant).__name__}."
            )
        self.__dict__["_input_fake_quant"] = fake_quant
        return self

    def _bias_fake_quant_active(self) -> bool:
        input_fake_quant = self.__dict__.get("_input_fake_quant")
        if input_fake_quant is None or self.bias_fake_quant is False:
            return False
        if not (input_fake_quant.fake_quant_enabled and self.weight_fake_quant.fake_quant_enabled):
            return False
        if self.bias_fake_quant is None:
            return self.weight_fake_quant.march is March.BERNOULLI or not self.training
        return True

    def accumulator_scale(self) -> torch.Tensor:
        """``s_in * s_w[c]`` per output channel in float64 (exact), as convert computes it.

        Needs the linked input fake quant (:meth:`set_input_fake_quant`).
        """
        input_fake_quant = self.__dict__.get("_input_fake_quant")
        if input_fake_quant is None:
            raise RuntimeError(
                f"Expected {self._get_name()} to be linked to its input FakeQuantize, but it is not: "
                "build the model with prepare_qat_fx, or call set_input_fake_quant(fake_quant)."
            )
        channels = self._out_channels()
        weight_scale = self.weight_fake_quant.scale.detach().to(torch.float64).flatten()
        if weight_scale.numel() == 1:
            weight_scale = weight_scale.expand(channels)
        elif weight_scale.numel() != channels:
            # ConvTranspose: [C_out / groups] scales on weight axis 1, one set per group
            weight_scale = weight_scale.repeat(channels // weight_scale.numel())
        input_scale = input_fake_quant.scale.detach().to(torch.float64).reshape(())
        return input_scale.to(weight_scale.device) * weight_scale

    def _fake_quant_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None or not self._bias_fake_quant_active():
            return bias
        s_acc = self.accumulator_scale()
        on_grid = (quantize_bias(bias.detach(), s_acc).to(torch.float64) * s_acc).to(bias.dtype)
        # straight-through: the forward adds the int32-grid bias, the gradient is the float one's
        return bias + (on_grid - bias).detach()

    def _forward_with_bn(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        fake_quant = self.weight_fake_quant
        # FakeQuantize's flags are Python bools: reading them never synchronises a device
        if not (fake_quant.fake_quant_enabled or fake_quant.observer_enabled):
            # FLOAT state: exactly the float model's conv -> bn
            return bn(self._weighted_forward(x, self.weight, self.bias))
        factor = self._bn_scale_factor()
        if bn.training:
            # Batch statistics: the fold (w * f) and the unfold (/ f) cancel, and under the
            # straight-through estimator so do their gradients; a constant f gives the same
            # gradients (up to clipped weights) without saving the conv output for d/df.
            factor = factor.detach()
        weight = fake_quant(self.weight * factor.reshape(self._weight_channel_shape()))
        if not bn.training:
            # running statistics: conv -> bn is the folded conv, as deployed
            bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
            folded_bias = (bias - bn.running_mean) * factor
            if bn.bias is not None:
                folded_bias = folded_bias + bn.bias
            return self._weighted_forward(x, weight, self._fake_quant_bias(folded_bias))
        out = self._weighted_forward(x, weight, None)
        shape = self._channel_shape(out.dim())
        out = out / factor.reshape(shape)
        if self.bias is not None:
            out = out + self.bias.reshape(shape)
        return bn(out)

    def forward(self, x: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
        if self.bn is None:
            weight = self.weight_fake_quant(self.weight)  # first: the bias grid uses its scale
            out = self._weighted_forward(x, weight, self._fake_quant_bias(self.bias))
        else:
            out = self._forward_with_bn(x)
        if self.has_add:
            if addend is None:
                raise ValueError(f"Expected `addend` to be a tensor for fused {self._get_name()}, but got None.")
            out = out + addend
        elif addend is not None:
            raise ValueError(f"Expected no `addend` for {self._get_name()} (it has no fused add), but got a tensor.")
        if self.relu is not None:
            out = F.relu6(out) if self._relu6 else F.relu(out)
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out

    def _get_name(self) -> str:
        name = self._NAME_STEM
        if self.bn is not None:
            name += "BN"
        if self.has_add:
            name += "Add"
        if self.relu is not None:
            name += "ReLU6" if self._relu6 else "ReLU"
        return name + self._NAME_SUFFIX


def _fused_parts(mod: nn.Module) -> tuple[nn.Module, nn.Module | None, nn.Module | None, bool]:
    """(weighted float module, bn or None, relu module or None, has_add) of a float or fused module."""
    conv = getattr(mod, "conv", None)
    if not isinstance(conv, nn.Module):
        return mod, None, None, False
    bn = getattr(mod, "bn", None)
    if isinstance(bn, nn.Identity):
        bn = None
    relu = getattr(mod, "relu", None)
    if isinstance(relu, nn.Identity):
        relu = None
    has_add = bool(getattr(mod, "has_add", False))
    return conv, bn, relu, has_add
