"""``deploy_converted``: a converted model -> YUV-input, segmented, exported, checked, with manifest.

The deployment phase in one call (the Lightning callback ``DeploymentCallback`` calls it at the end
of fit; a script without Lightning can call it directly):

1. optional YUV input (:func:`patch_yuv_input`, the chapter's "RGB888 数据部署");
2. optional segmentation (:func:`split_stages`, ``at`` a list of points or ``"auto"``); the stages
   in sequence must equal the whole model **bit for bit** on the check inputs;
3. each stage and the whole deployed model exported (TorchScript, and ONNX if asked), each file
   checked against eager on its example input by the exporter;
4. one manifest (``manifest.json``, schema ``manifest.schema.json``) describing all of it.

Example:
    >>> import torch, tempfile
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
    >>> result = deploy_converted(convert_fx(qat), (torch.rand(2, 3, 4, 4),), tempfile.mkdtemp(),
    ...                           yuv={"swing": "full"}, march="bayes")
    >>> [stage["device"] for stage in result.manifest["stages"]], result.manifest["yuv"]["swing"]
    (['bpu'], 'full')
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.deploy.manifest import MANIFEST_NAME, tensor_spec, write_manifest
from hq_lightning.deploy.segment import (
    auto_split_points,
    check_float_boundary,
    run_stages,
    split_at_points,
    value_qparams,
)
from hq_lightning.deploy.torchscript_export import export_torchscript, outputs_equal
from hq_lightning.deploy.yuv_patch import input_stub_names, patch_yuv_input
from hq_lightning.nn.quantized import DeQuantize, Quantize

__all__ = ["Deployment", "deploy_converted", "model_fingerprint", "FORMATS"]

FORMATS = ("torchscript", "onnx")
_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
_YUV_KEYS = ("swing", "mean", "std", "bgr", "input_names")


@dataclass
class Deployment:
    """What :func:`deploy_converted` produced.

    Attributes:
        model: the deployed whole model (YUV-patched if asked).
        stages: its stages (one when not segmented), from :func:`split_stages`.
        split_points: where it was cut (empty: one stage).
        manifest: the manifest's content; ``manifest_path`` where it was written.
        files: ``{"whole.torchscript": path, "stage0.torchscript": path, ...}``.
    """

    model: fx.GraphModule
    stages: list[fx.GraphModule]
    split_points: list[str]
    manifest: dict[str, Any]
    manifest_path: str
    files: dict[str, str] = field(default_factory=dict)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): which weights were deployed."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _quant_of_input(graph_module: fx.GraphModule, placeholder: fx.Node):
    """``(scale, dtype)`` of the Quantize a placeholder feeds (through a boundary check), else None."""
    frontier = list(placeholder.users)
    while frontier:
        user = frontier.pop(0)
        if user.op == "call_function" and user.target is check_float_boundary:
            frontier.extend(user.users)
        elif user.op == "call_module":
            module = graph_module.get_submodule(str(user.target))
            if isinstance(module, Quantize):
                return module.scale, module.dtype
    return None


def _output_qparams(graph_module: fx.GraphModule, node: Any):
    """``(scale, dtype)`` of the integer grid an output value was dequantized from (or is on)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        module = graph_module.get_submodule(str(node.target))
        if isinstance(module, DeQuantize):
            source = node.args[0] if node.args else None
            found = value_qparams(source, graph_module) if isinstance(source, fx.Node) else None
            dtype = found[1] if found is not None else ("qint32" if module.scale.numel() > 1 else None)
            return module.scale, dtype
    return value_qparams(node, graph_module)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _leaves(value[key])]
    return [value]


def _input_specs(graph_module: fx.GraphModule, names: Sequence[str], values: Sequence[Any]) -> list:
    placeholders = {n.name: n for n in graph_module.graph.nodes if n.op == "placeholder"}
    specs = []
    for name, value in zip(names, values):
        found = _quant_of_input(graph_module, placeholders[name])
        scale, dtype = found if found is not None else (None, None)
        specs.append(tensor_spec(name, value, scale, dtype))
    return specs


def _output_names(graph_module: fx.GraphModule) -> list[str]:
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    return [
        node.name if isinstance(node, fx.Node) else f"output_{i}"
        for i, node in enumerate(_leaves(output.args[0]))
    ]


def _output_specs(graph_module: fx.GraphModule, result: Any, names: Sequence[str] | None = None) -> list:
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    nodes, values = _leaves(output.args[0]), _leaves(result)
    names = list(names) if names is not None else _output_names(graph_module)
    specs = []
    for node, value, name in zip(nodes, values, names):
        found = _output_qparams(graph_module, node)
        scale, dtype = found if found is not None else (None, None)
        specs.append(tensor_spec(name, value, scale, dtype))
    return specs


def _is_integer_stage(stage: fx.GraphModule) -> bool:
    from hq_lightning.functional.color import centered_yuv2bgr, centered_yuv2rgb

    for node in stage.graph.nodes:
        if node.op == "call_module" and not str(node.target).startswith("_boundary_"):
            module = stage.get_submodule(str(node.target))
            if type(module).__module__.startswith("hq_lightning.nn.quantized"):
                return True
        if node.op == "call_function" and node.target in (centered_yuv2rgb, centered_yuv2bgr):
            return True
    return False


def _first_rows(values: Sequence[Any], rows: int) -> tuple:
    return tuple(v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in values)


def _export(model: nn.Module, inputs: tuple, directory: str, stem: str, formats: Sequence[str],
            files: dict[str, str], key: str, onnx_atol: float) -> dict[str, str]:
    from hq_lightning.deploy.onnx_export import export_onnx

    written = {}
    for kind in formats:
        name = stem + _SUFFIX[kind]
        path = os.path.join(directory, name)
        try:
            if kind == "torchscript":
                export_torchscript(model, inputs, path)  # checked bit for bit against eager
            else:
                # checked with onnxruntime: integer outputs equal, float ones within onnx_atol
                export_onnx(model, inputs, path, atol=onnx_atol)
        except Exception as error:
            raise RuntimeError(
                f"Expected {key} of the deployment to export to {kind} and reproduce eager, but "
                f"it failed: {error}\nFix: drop {kind!r} from the formats, or change the split "
                "points so that data-dependent code sits in a CPU-side stage."
            ) from error
        written[kind] = name
        files[f"{key}.{kind}"] = path
    return written


def _yuv_options(yuv: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if yuv is None:
        return None
    unknown = sorted(set(yuv) - set(_YUV_KEYS))
    if unknown:
        raise ValueError(f"Expected `yuv` keys from {_YUV_KEYS}, but got {unknown}.")
    options = {"swing": "full", "mean": (128.0,), "std": (128.0,), "bgr": False, "input_names": None}
    options.update({k: v for k, v in yuv.items() if v is not None})
    for key in ("mean", "std"):
        value = options[key]
        if isinstance(value, torch.Tensor):
            value = value.flatten().tolist()
        options[key] = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return options


def deploy_converted(
    converted: fx.GraphModule,
    check_inputs: Sequence[Any],
    output_dir: str | os.PathLike,
    *,
    yuv: Mapping[str, Any] | None = None,
    at: Sequence[str] | str | None = None,
    formats: Sequence[str] = ("torchscript",),
    march: Any = None,
    source: Mapping[str, Any] | None = None,
    export_batch_size: int = 1,
    onnx_atol: float = 1e-6,
) -> Deployment:
    """Patch, split, check, export and describe a converted model.

    Args:
        converted: a ``convert_fx`` GraphModule (not modified).
        check_inputs: the deployed model's inputs for the checks (a validation batch; centered YUV
            values -128..127 at the patched inputs when ``yuv`` is set). The stages must equal the
            whole model on them bit for bit.
        output_dir: where the files and ``manifest.json`` go (created).
        yuv: ``None`` (no patch) or options of :func:`patch_yuv_input`: ``swing``, ``mean``,
            ``std``, ``bgr``, ``input_names``.
        at: ``None`` (one stage), split points, or ``"auto"`` (:func:`auto_split_points`).
        formats: any of ``"torchscript"``, ``"onnx"``.
        march: the march the model was converted for (recorded in the manifest).
        source: ``checkpoint``, ``last_checkpoint``, ``submodule``, ``epoch``, ``global_step`` of
            the manifest's ``source`` (the fingerprint of ``converted`` is added here).
        export_batch_size: rows of ``check_inputs`` used as the export example (the manifest's
            shapes are those of this example).
        onnx_atol: tolerance of float outputs of ONNX files (float ops such as ``grid_sample``
            differ by ulps between torch and onnxruntime); integer outputs must be equal.

    Returns:
        A :class:`Deployment`.

    Raises:
        RuntimeError: the stages differ from the whole model, or an export fails its check.
    """
    from hq_lightning import __version__ as package_version
    from hq_lightning.march import as_march, get_march

    if not isinstance(converted, fx.GraphModule):
        raise TypeError(
            f"Expected `converted` to be a converted torch.fx.GraphModule, but got "
            f"{type(converted).__name__}."
        )
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ValueError(f"Expected `formats` to be a non-empty subset of {FORMATS}, but got {formats}.")
    check_inputs = tuple(check_inputs)
    march_value = (as_march(march) if march is not None else get_march()).value
    options = _yuv_options(yuv)
    converted = copy.deepcopy(converted).eval()
    if options is not None:
        model = patch_yuv_input(converted, **options)
        patched_inputs = list(options["input_names"] or input_stub_names(converted))
    else:
        model = converted
    if at is None:
        points: list[str] = []
    elif isinstance(at, str) and at == "auto":
        points = auto_split_points(model)
    else:
        points = [at] if isinstance(at, str) else list(at)
    stages = split_at_points(model, points)  # names checked; none: one stage
    model.eval()
    with torch.no_grad():
        whole = model(*check_inputs)
        staged = run_stages(stages, *check_inputs)
    if not outputs_equal(whole, staged):
        raise RuntimeError(
            f"Expected the {len(stages)} stages (split at {points}) to reproduce the whole deployed "
            "model bit for bit on the check batch, but the outputs differ. Report this with the "
            "model: splitting must not change any value."
        )

    directory = os.fspath(output_dir)
    os.makedirs(directory, exist_ok=True)
    files: dict[str, str] = {}
    example = _first_rows(check_inputs, export_batch_size)
    with torch.no_grad():
        whole_example = model(*example)
    whole_entry = {
        "files": _export(model, example, directory, "model", formats, files, "whole",
                         onnx_atol),
        "outputs": _output_specs(model, whole_example),
    }
    env: dict[str, Any] = dict(zip(stages[0].model_inputs, example))
    stage_entries = []
    for index, stage in enumerate(stages):
        args = tuple(env[name] for name in stage.stage_inputs)
        with torch.no_grad():
            result = stage(*args)
        last = index == len(stages) - 1
        integer = _is_integer_stage(stage)
        device = "bpu" if integer else "cpu"
        entry = {
            "index": index,
            "name": f"stage{index}",
            "kind": "integer" if integer else "float",
            "device": device,
            "files": _export(stage, args, directory, f"stage{index}_{device}", formats, files,
                             f"stage{index}", onnx_atol),
            "inputs": _input_specs(stage, stage.stage_inputs, args),
            # the last stage returns the model's output: named like the whole model's
            "outputs": _output_specs(stage, result, _output_names(model) if last else None),
            "returns_model_output": last,
        }
        if not last:
            env.update(zip(stage.stage_outputs, result))
        stage_entries.append(entry)

    source = dict(source or {})
    manifest = {
        "format_version": 1,
        "package": {"name": "hq_lightning", "version": package_version,
                    "torch": torch.__version__.split("+")[0]},
        "march": march_value,
        "source": {
            "checkpoint": _optional_str(source.get("checkpoint")),
            "last_checkpoint": _optional_str(source.get("last_checkpoint")),
            "submodule": source.get("submodule"),
            "epoch": source.get("epoch"),
            "global_step": source.get("global_step"),
            "fingerprint": model_fingerprint(converted),
        },
        "yuv": None if options is None else {
            "swing": options["swing"], "mean": options["mean"], "std": options["std"],
            "bgr": bool(options["bgr"]), "inputs": patched_inputs,
        },
        "formats": list(formats),
        "model_inputs": _input_specs(model, stages[0].model_inputs, example),
        "whole": whole_entry,
        "stages": stage_entries,
        "checks": {
            "stages_equal_whole": True,
            "exports_equal_eager": True,
            "batch_size": int(_leaves(check_inputs)[0].shape[0]) if check_inputs else 1,
            "onnx_atol": float(onnx_atol) if "onnx" in formats else None,
        },
    }
    path = write_manifest(manifest, os.path.join(directory, MANIFEST_NAME))
    return Deployment(model, stages, points, manifest, path, files)


def _optional_str(value: Any) -> str | None:
    return None if value is None else os.fspath(value)
