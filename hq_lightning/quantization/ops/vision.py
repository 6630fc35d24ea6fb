"""Registry entries: torchvision helpers that move values without computing new ones.

torchvision marks some helpers with ``torch.fx.wrap`` so they stay one graph node; two of them
only select, pad or drop whole values, so they keep their input's scale and run on integer
tensors as they are:

- ``StochasticDepth`` (EfficientNet, ConvNeXt, Swin): identity in eval; in QAT training it zeroes
  whole rows and divides the rest by the survival rate, and the next op's fake quant takes it from
  there. Registered as a module (a tracer leaf), so its ``training`` flag is read at run time
  rather than frozen into the graph by tracing through its ``forward``.
- ``_patch_merging_pad`` (Swin's patch merging): zero padding and strided slicing, then a ``cat``
  of slices of one tensor (one scale), so the codes pass through exactly.

They are registered when torchvision is installed.

Example:
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> from torchvision.ops import StochasticDepth
    >>> lookup_module(StochasticDepth(0.1, "row")).name
    'stochastic_depth'
"""

from __future__ import annotations

from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

__all__: list[str] = []

try:  # torchvision is optional
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import StochasticDepth as _StochasticDepth
except ImportError:  # pragma: no cover - torchvision is installed in the project's environment
    _StochasticDepth = None
    _swin = None

if _StochasticDepth is not None:
    register_op(OpSpec(
        "stochastic_depth", OpKind.PRESERVE,
        "identity in eval (the converted model); QAT training drops rows, the next fake quant requantizes",
        modules=(_StochasticDepth,), elementwise=True,
        reference="tests/test_ops_vision.py::test_stochastic_depth_reads_training_at_run_time",
    ))  # fmt: skip
if _swin is not None:
    register_op(OpSpec(
        "patch_merging_pad", OpKind.PRESERVE,
        "zero padding, strided slices and a cat of one tensor's codes; scale unchanged",
        functions=tuple(
            f for f in (getattr(_swin, "_patch_merging_pad", None),) if f is not None
        ),
        reference="tests/test_ops_vision.py::test_patch_merging_pad_passes_integer_codes_through",
    ))  # fmt: skip
