"""ONNX export of a converted model (whole, or one stage of :func:`split_stages`).

Uses torch's ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, which needs
the ``onnxscript`` package: ``pip install hq_lightning[export]``). The integer kernels become
ordinary ONNX integer/float ops (Cast, Conv on exact float32 chunks, Mul/Add on int64, BitShift),
which onnxruntime runs exactly, so the exported model reproduces the converted one bit for bit.
torch's exporter has no translation for the tensor forms of ``<<`` / ``>>`` that the
requantization uses; they are mapped here to the exporter's own bitwise shift translations.

Example:
    >>> import torch, tempfile, os
    >>> from torch import fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> path = os.path.join(tempfile.mkdtemp(), "relu.onnx")
    >>> export_onnx(gm, (torch.randn(2, 3),), path) == path
    True
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from hq_lightning.deploy.atomic_write import write_bytes_atomically
from hq_lightning.deploy.torchscript_export import as_example_tuple

__all__ = ["export_onnx", "run_onnx"]


def _translation_table() -> dict[Any, Any]:
    try:
        from onnxscript.function_libs.torch_lib.ops import core
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Expected the `onnxscript` package for ONNX export (torch's exporter needs it), but it "
            "is not installed: `pip install onnxscript` or `pip install hq_lightning[export]`."
        ) from error
    return {
        torch.ops.aten.__rshift__.Tensor: core.aten_bitwise_right_shift,
        torch.ops.aten.__lshift__.Tensor: core.aten_bitwise_left_shift,
    }


def _failing_op(error: BaseException) -> str:
    text = "\n".join(str(e) for e in (error, error.__cause__, error.__context__) if e)
    for pattern in (
        r"OpOverload\(op='([^']+)'",
        r"target=torch\.ops\.([\w.]+)",
        r"(aten\.\w+(?:\.\w+)?|aten::\w+(?:\.\w+)?|\w+::\w+)",
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return type(error).__name__


def run_onnx(path: str | os.PathLike | bytes, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported model (a file, or its serialised bytes) with onnxruntime (CPU) and return
    its outputs as tensors."""
    import onnxruntime as ort

    model = path if isinstance(path, bytes) else os.fspath(path)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat_tensors(item)]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _flat_tensors(value[key])]
    return []


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset_version: int = 18,
    check: bool = True,
    atol: float = 0.0,
    optimize: bool = True,
) -> str:
    """Export ``model`` to ONNX and, with ``check``, compare onnxruntime's output to it.

    Args:
        model: a converted GraphModule or a stage of one (float inputs).
        example_inputs: one tensor or a tuple of positional inputs (the shapes are fixed).
        path: output file (a single file: weights are embedded), written atomically once the
            check passed (the whole file or none of it, see :mod:`hq_lightning.deploy.atomic_write`).
        opset_version: ONNX opset (18 default).
        check: run the file with onnxruntime on ``example_inputs`` and compare with the model.
        atol: tolerance of that check for float outputs (0: bit for bit). Integer outputs are
            always compared exactly. Integer kernels export exactly; float ops of CPU-side steps
            (``grid_sample``, ``exp``...) may differ from torch's by a few float ulps.
        optimize: let the exporter fold constants and simplify the graph (smaller file; about
            3x slower to export).

    Returns:
        ``path`` as a string.

    Raises:
        RuntimeError: an op cannot be exported (the message names it), or onnxruntime's output
            differs from the model's.
        ArtefactWriteError: the file could not be written (full disk...); nothing was replaced.
    """
    args = as_example_tuple(example_inputs)
    model = model.eval()
    path = os.fspath(path)
    table = _translation_table()
    with torch.no_grad():
        # one real run first: modules that cache derived state from their buffers refresh it
        # here, since under torch.export they only see fake tensors
        model(*args)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # exported into memory: the file is written once, atomically, after the check passed
            program = torch.onnx.export(
                model,
                args,
                None,
                dynamo=True,
                opset_version=opset_version,
                external_data=False,
                custom_translation_table=table,
                optimize=optimize,
                verbose=False,
            )
        except Exception as error:  # the exporter raises many types; name the op in one message
            op = _failing_op(error)
            raise RuntimeError(
                f"Expected every op of `model` to be exportable to ONNX, but `{op}` is not. "
                "Keep it out of the exported stage (split before it with `split_stages`, or wrap it "
                f"as a CPU-side step). Exporter error: {str(error).splitlines()[0][:300]}"
            ) from error
    data = program.model_proto.SerializeToString()
    if check:
        with torch.no_grad():
            expected = _flat_tensors(model(*args))
        got = run_onnx(data, *[a for a in args if isinstance(a, torch.Tensor)])
        if len(expected) != len(got):
            raise RuntimeError(
                f"Expected the ONNX model to return {len(expected)} tensors, but got {len(got)}."
            )
        for i, (e, g) in enumerate(zip(expected, got)):
            exact = atol == 0 or not e.is_floating_point()
            if e.shape != g.shape or (
                not torch.equal(e, g.to(e.dtype))
                if exact
                else not torch.allclose(e.double(), g.double(), rtol=0.0, atol=atol)
            ):
                diff = (e.double() - g.double()).abs().max().item() if e.shape == g.shape else None
                raise RuntimeError(
                    f"Expected onnxruntime's output {i} to equal the model's (atol {atol}), but it "
                    f"differs (shapes {tuple(e.shape)} vs {tuple(g.shape)}, max |diff| {diff})."
                )
    return write_bytes_atomically(path, data)
