"""``patch_yuv_input``: let a model trained on RGB take the chip's centered YUV input.

The transform automates the chapter's manual graph edit ("RGB888 数据部署"): after each chosen
input QuantStub of a *converted* model it inserts a ``centered_yuv2rgb`` (or ``centered_yuv2bgr``)
``call_function`` node, whose ``q_scale`` is the stub's trained scale, and sets the stub's scale
to 1 so the stub passes centered YUV (-128..127) through as int8.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx, convert_fx
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.conv = torch.nn.Conv2d(3, 4, 1)
    ...     def forward(self, x):
    ...         return self.dequant(self.conv(self.quant(x)))
    >>> qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> _ = qat(torch.rand(2, 3, 4, 4) * 2 - 1)
    >>> patched = patch_yuv_input(convert_fx(qat), swing="full")
    >>> [n.name for n in patched.graph.nodes][:3]
    ['x', 'quant', 'centered_yuv2rgb']
    >>> patched.quant.scale.item()
    1.0
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn

from hq_lightning.functional.color import (
    centered_yuv2bgr,
    centered_yuv2rgb,
    yuv2rgb_fixed_point_params,
)

__all__ = ["patch_yuv_input", "input_stub_names"]


def _is_input_stub(module: nn.Module) -> bool:
    # the converted QuantStub: a module with a one-element `scale` buffer producing integers
    # (docs/architecture.md); recognised by that contract, not by class
    scale = dict(module.named_buffers(recurse=False)).get("scale")
    return isinstance(scale, Tensor) and scale.numel() == 1 and type(module).__name__ == "Quantize"


def input_stub_names(model: fx.GraphModule) -> list[str]:
    """Targets of the converted QuantStubs that read a model input (a placeholder) directly."""
    names = []
    for node in model.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        source = node.args[0]
        reads_input = isinstance(source, fx.Node) and source.op == "placeholder"
        if reads_input and _is_input_stub(model.get_submodule(str(node.target))):
            names.append(str(node.target))
    return names


def _as_floats(value: float | Sequence[float] | Tensor, name: str) -> tuple[float, ...]:
    if isinstance(value, Tensor):
        return tuple(float(v) for v in value.detach().flatten().tolist())
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(float(v) for v in value)


def patch_yuv_input(
    model: fx.GraphModule,
    input_names: Sequence[str] | str | None = None,
    swing: str = "full",
    mean: float | Sequence[float] | Tensor = (128.0,),
    std: float | Sequence[float] | Tensor = (128.0,),
    bgr: bool = False,
) -> fx.GraphModule:
    """Insert the fixed-point YUV -> RGB/BGR conversion after input QuantStubs of a converted model.

    Args:
        model: a converted (``convert_fx``) GraphModule; it is not modified.
        input_names: the QuantStub(s) to patch, by module path (e.g. ``"quant"``); default: every
            QuantStub that reads a model input.
        swing: ``"full"`` (default here: what the chip's image pyramid produces) or ``"studio"``.
        mean: the RGB normalisation mean used in training (1 or 3 values, or a tensor).
        std: the RGB normalisation std used in training.
        bgr: the model was trained on BGR images (inserts ``centered_yuv2bgr``).

    Returns:
        A new GraphModule taking centered YUV (float values -128..127) at the patched inputs.

    Raises:
        TypeError: ``model`` is not a GraphModule.
        ValueError: a name is not a converted input QuantStub, or nothing is left to patch.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"Expected `model` to be a converted torch.fx.GraphModule (from `convert_fx`), "
            f"but got {type(model).__name__}."
        )
    # validate the conversion arguments once, before touching anything
    yuv2rgb_fixed_point_params(swing, mean, std, 1.0, bgr)
    candidates = input_stub_names(model)
    if input_names is None:
        names = candidates
    else:
        names = [input_names] if isinstance(input_names, str) else list(input_names)
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(
                f"Expected `input_names` to name converted input QuantStubs of the model "
                f"(one of {candidates}), but got {unknown}."
            )
    if not names:
        raise ValueError(
            "Expected the model to have a converted QuantStub reading a model input, but got "
            "none: pass a model returned by `convert_fx`."
        )
    patched = copy.deepcopy(model)
    op = centered_yuv2bgr if bgr else centered_yuv2rgb
    mean_values, std_values = _as_floats(mean, "mean"), _as_floats(std, "std")
    for node in list(patched.graph.nodes):
        if node.op != "call_module" or str(node.target) not in names:
            continue
        stub = patched.get_submodule(str(node.target))
        dtype = getattr(stub, "dtype", "qint8")
        if str(getattr(dtype, "value", dtype)) != "qint8":
            raise ValueError(
                f"Expected QuantStub `{node.target}` to produce qint8 (the conversion outputs "
                f"int8 at its scale), but got {dtype}."
            )
        q_scale = float(stub.scale.detach().reshape(()))
        with patched.graph.inserting_after(node):
            convert = patched.graph.call_function(
                op,
                (node,),
                {"swing": swing, "mean": mean_values, "std": std_values, "q_scale": q_scale},
            )
        node.replace_all_uses_with(convert)
        convert.args = (node,)
        with torch.no_grad():
            stub.scale.fill_(1.0)
    patched.graph.lint()
    patched.recompile()
    return patched
