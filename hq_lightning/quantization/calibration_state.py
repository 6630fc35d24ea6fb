"""Carry state between the two prepares of the calibration -> QAT workflow.

Calibration and QAT qconfigs are never mixed in one prepared model (the plugin's workflow): the
float model is prepared once with calibration qconfigs and calibrated, then prepared again with
QAT qconfigs. ``copy_calibration_state`` moves the calibrated scales into the QAT prepare; the
observer types differ (histogram vs moving average), so a strict ``load_state_dict`` cannot.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import (
    ...     QuantStub, DeQuantStub, prepare_qat_fx, set_fake_quantize, FakeQuantState,
    ...     copy_calibration_state)
    >>> from hq_lightning.qconfig import (
    ...     default_calib_8bit_fake_quant_qconfig, default_qat_8bit_fake_quant_qconfig)
    >>> float_model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), DeQuantStub())
    >>> calib = prepare_qat_fx(float_model, {"": default_calib_8bit_fake_quant_qconfig})
    >>> _ = calib.eval()
    >>> set_fake_quantize(calib, FakeQuantState.CALIBRATION)
    >>> with torch.no_grad():
    ...     _ = calib(torch.randn(8, 3, 8, 8))
    >>> qat = prepare_qat_fx(float_model, {"": default_qat_8bit_fake_quant_qconfig})
    >>> names = copy_calibration_state(calib, qat)
    >>> bool(torch.equal(qat.get_submodule(names[0]).scale, calib.get_submodule(names[0]).scale))
    True
"""

import torch
from torch import nn

from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.march_record import check_march_record

__all__ = ["copy_calibration_state", "copy_float_state", "fake_quant_names"]


def fake_quant_names(model: nn.Module) -> list[str]:
    """Names of every FakeQuantize in ``model``, in ``named_modules`` order."""
    return [name for name, module in model.named_modules() if isinstance(module, FakeQuantize)]


def _is_fake_quant_key(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def copy_float_state(source: nn.Module, target: nn.Module) -> None:
    """Loads every non-fake-quant entry (weights, BN statistics) of ``source`` into ``target``.

    Both are prepares of the same float model, so the names of weights and BN buffers agree.
    """
    target_fq = fake_quant_names(target)
    source_state = source.state_dict()
    wanted = {}
    for key, value in target.state_dict().items():
        if _is_fake_quant_key(key, target_fq):
            continue
        if key not in source_state or source_state[key].shape != value.shape:
            raise RuntimeError(
                f"Expected the calibration prepare and the QAT prepare to share `{key}` of shape "
                f"{tuple(value.shape)}, but the QAT model has "
                f"{tuple(source_state[key].shape) if key in source_state else 'no such entry'}: "
                "give both qconfig trees the same skipped (None) modules."
            )
        wanted[key] = source_state[key]
    target.load_state_dict(wanted, strict=False)


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    # a learnable scale is a Parameter under the same name: keep the Parameter object (an
    # optimizer may already hold it) and copy into its storage
    tensors = module._parameters if name in module._parameters else module._buffers
    current = tensors[name]
    if current.shape != value.shape:
        current.data = torch.empty(value.shape, device=current.device, dtype=current.dtype)
    current.data.copy_(value)


@torch.no_grad()
def copy_calibration_state(calibrated: nn.Module, live: nn.Module) -> list[str]:
    """Copies scales and observer statistics of every FakeQuantize of ``calibrated`` into ``live``.

    When both observers have the same class, its whole state is copied. Otherwise a moving-average
    min/max observer of ``live`` is seeded with the calibrated symmetric range ``[-amax, amax]``,
    so that QAT continues from the calibrated scale instead of restarting from its first batch.

    Raises:
        ValueError: when a FakeQuantize of ``calibrated`` was built for another march or dtype
            than its counterpart in ``live`` (hq_lightning.quantization.march_record).

    Returns:
        the names of the FakeQuantize modules that received a calibrated state.
    """
    copied = []
    live_modules = dict(live.named_modules())
    for name in fake_quant_names(calibrated):
        source = calibrated.get_submodule(name)
        target = live_modules.get(name)
        if not isinstance(target, FakeQuantize):
            raise RuntimeError(
                f"Expected the QAT model to have a FakeQuantize at `{name}` as the calibration model "
                f"does, but got {type(target).__name__ if target is not None else 'nothing'}: give both "
                "qconfig trees the same skipped (None) modules."
            )
        # a scale is only right for the march and dtype it was computed for
        check_march_record(source.get_extra_state(), target.march, target.dtype, where=name,
                           source="the calibrated model's")
        src_obs, dst_obs = source.activation_post_process, target.activation_post_process
        if not getattr(src_obs, "initialized", True):
            continue
        _assign(target, "scale", source.scale)
        _assign(target, "zero_point", source.zero_point)
        if hasattr(target, "_scale_initialized"):  # a learnable scale starts from the calibrated one
            target._scale_initialized = True
        if type(src_obs) is type(dst_obs):
            dst_obs.load_state_dict(src_obs.state_dict())
        elif "min_val" in dst_obs._buffers and "max_val" in dst_obs._buffers:
            amax = src_obs.calculate_amax().float()
            dst_obs.load_state_dict({"min_val": -amax, "max_val": amax.clone()}, strict=False)
        copied.append(name)
    return copied
