"""Core quantization API: observers, fake quant, qconfigs, stubs and the FX graph passes.

Names are resolved lazily so that importing one piece never drags in the others (and a graph
pass is only imported when it is used).
"""

import importlib

_EXPORTS = {
    # observers
    "ObserverBase": "observer",
    "MinMaxObserver": "observer",
    "MovingAveragePerTensorMinMaxObserver": "observer",
    "MovingAveragePerChannelMinMaxObserver": "observer",
    "FixedScaleObserver": "observer",
    "ClipObserver": "observer",
    "PercentileObserver": "observer",
    "MSEObserver": "observer",
    "KLObserver": "observer",
    "MixObserver": "observer",
    # fake quant and its states
    "FakeQuantize": "fake_quantize",
    "CalibFakeQuantize": "fake_quantize",
    "LearnableFakeQuantize": "learnable_fake_quantize",
    "FakeQuantState": "state",
    "set_fake_quantize": "state",
    "check_nonfinite": "nonfinite",
    "QConfig": "qconfig",
    # calibration -> QAT hand-over
    "copy_calibration_state": "calibration_state",
    "copy_float_state": "calibration_state",
    # stubs
    "QuantStub": "stubs",
    "DeQuantStub": "stubs",
    "is_quant_stub": "stubs",
    "is_dequant_stub": "stubs",
    # graph passes
    "fuse_fx": "fx.fuse",
    "prepare_qat_fx": "fx.prepare",
    "convert_fx": "fx.convert",
    "register_fusion_pattern": "fx.patterns",
    "float_islands": "fx.islands",
    "FloatIsland": "fx.islands",
    "FloatIslandWarning": "fx.islands",
    # what a prepare applied, module by module (printed and saved before training)
    "quantization_plan": "plan",
    "format_plan": "plan",
    "PlanEntry": "plan",
    # per-layer sensitivity and mixed-precision fallback
    "layer_sensitivity": "sensitivity",
    "LayerSensitivity": "sensitivity",
    "SensitivityReport": "sensitivity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
