"""The deployment manifest: one JSON file that says how to run the exported stages.

A deployment engineer reads it (and a program can run from it alone, see :func:`run_manifest`):
stage order; per stage its file(s), its inputs and outputs with dtype, shape and scale, whether it
is integer (BPU) or float (CPU); the march; the YUV input conversion (swing, mean, std); the
package version and the checkpoint the model came from. The schema is kept next to this module
(``manifest.schema.json``, shipped in the wheel); :func:`validate_manifest` checks a manifest
against it with a small validator of the JSON Schema subset the schema uses (no extra package).

Example:
    >>> errors = validate({"a": 1}, {"type": "object", "required": ["a", "b"]})
    >>> errors
    ["$: missing required property 'b'"]
    >>> validate([1, "x"], {"type": "array", "items": {"type": "integer"}})
    ["$[1]: expected type integer, got 'x'"]
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST_NAME",
    "load_manifest",
    "load_schema",
    "run_manifest",
    "tensor_spec",
    "validate",
    "validate_manifest",
    "write_manifest",
]

#: File name of the manifest inside a deployment directory.
MANIFEST_NAME = "manifest.json"
_SCHEMA_FILE = "manifest.schema.json"


# ---------------------------------------------------------------------------- schema
def load_schema() -> dict[str, Any]:
    """The manifest's JSON schema (``hq_lightning/deploy/manifest.schema.json``)."""
    text = resources.files("hq_lightning.deploy").joinpath(_SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
_KEYWORDS = {
    "$schema", "$id", "$defs", "title", "description", "$ref", "type", "enum", "oneOf",
    "required", "properties", "additionalProperties", "minProperties", "items", "minItems",
    "maxItems", "minLength", "pattern", "minimum", "exclusiveMinimum",
}


def validate(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
             where: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (empty list: valid).

    Supports the JSON Schema (2020-12) subset the manifest schema uses: ``type`` (a name or a
    list), ``enum``, ``oneOf``, ``$ref`` to ``#/$defs/<name>``, ``required``, ``properties``,
    ``additionalProperties: false``, ``minProperties``, ``items``, ``minItems``, ``maxItems``,
    ``minLength``, ``pattern``, ``minimum``, ``exclusiveMinimum``. Any other keyword is refused
    (so the schema cannot silently use one this validator ignores).
    """
    root = schema if root is None else root
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(
            f"Expected the schema at {where} to use only the supported keywords, but got "
            f"{sorted(unknown)}: extend hq_lightning.deploy.manifest.validate first."
        )
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"Expected `$ref` to point into '#/$defs/', but got {ref!r}.")
        return validate(instance, root["$defs"][ref[len("#/$defs/"):]], root, where)
    if "oneOf" in schema:
        matches = [not validate(instance, option, root, where) for option in schema["oneOf"]]
        if sum(matches) != 1:
            return [f"{where}: expected exactly one of `oneOf` to match, got {sum(matches)}"]
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](instance) for name in names):
            return [f"{where}: expected type {' or '.join(names)}, got {instance!r}"]
    errors: list[str] = []
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: expected one of {schema['enum']}, got {instance!r}")
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                errors.append(f"{where}: missing required property {key!r}")
        properties = schema.get("properties", {})
        for key, value in instance.items():
            if key in properties:
                errors.extend(validate(value, properties[key], root, f"{where}.{key}"))
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: unexpected property {key!r}")
        if len(instance) < schema.get("minProperties", 0):
            errors.append(f"{where}: expected at least {schema['minProperties']} properties")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{where}: expected at least {schema['minItems']} items, got {len(instance)}")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            errors.append(f"{where}: expected at most {schema['maxItems']} items, got {len(instance)}")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors.extend(validate(item, schema["items"], root, f"{where}[{i}]"))
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{where}: expected a string of length >= {schema['minLength']}")
        if "pattern" in schema and re.search(schema["pattern"], instance) is None:
            errors.append(f"{where}: expected to match {schema['pattern']!r}, got {instance!r}")
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{where}: expected >= {schema['minimum']}, got {instance!r}")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: expected > {schema['exclusiveMinimum']}, got {instance!r}")
    return errors


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every way ``manifest`` departs from the schema."""
    errors = validate(manifest, load_schema())
    if errors:
        raise ValueError(
            "Expected the deployment manifest to match hq_lightning/deploy/manifest.schema.json, "
            "but:\n  " + "\n  ".join(errors)
        )


# ---------------------------------------------------------------------------- content
def tensor_spec(name: str, value: torch.Tensor, scale: torch.Tensor | None = None,
                quant_dtype: Any = None) -> dict[str, Any]:
    """The manifest's description of one tensor crossing a file boundary.

    Args:
        name: the value's name (what later stages refer to it by).
        value: an example of the tensor (its dtype and shape are recorded).
        scale: the integer grid's scale (one value, or one per channel), or ``None`` for a plain
            float value.
        quant_dtype: ``"qint8"``/``"qint16"``/``"qint32"`` of that grid, or ``None``.

    Example:
        >>> tensor_spec("x", torch.zeros(1, 3), torch.tensor([0.5]), "qint8")
        {'name': 'x', 'dtype': 'float32', 'shape': [1, 3], 'scale': [0.5], 'quant_dtype': 'qint8'}
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Expected the value `{name}` crossing a file boundary to be a tensor, but got "
            f"{type(value).__name__}: return tensors (or tuples of tensors) from each stage."
        )
    return {
        "name": name,
        "dtype": str(value.dtype).replace("torch.", ""),
        "shape": [int(d) for d in value.shape],
        "scale": None if scale is None else [float(s) for s in scale.detach().flatten().tolist()],
        "quant_dtype": None if quant_dtype is None else str(getattr(quant_dtype, "value", quant_dtype)),
    }


def write_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Validate ``manifest`` and write it as JSON, atomically (temp file + ``os.replace``)."""
    validate_manifest(manifest)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a manifest; a missing file referenced by it is an error too."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Expected a deployment manifest at {str(path)!r}, but there is no such file."
        ) from None
    validate_manifest(manifest)
    for entry in [manifest["whole"], *manifest["stages"]]:
        for kind, name in entry["files"].items():
            if not (path.parent / name).is_file():
                raise FileNotFoundError(
                    f"Expected the {kind} file {name!r} named by {str(path)!r} next to it, but it "
                    "is missing: copy the whole deployment directory."
                )
    return manifest


# ---------------------------------------------------------------------------- running
def _runner(file: Path, kind: str):
    if kind == "torchscript":
        module = torch.jit.load(str(file), map_location="cpu")
        return lambda *args: module(*args)
    if kind == "onnx":
        from hq_lightning.deploy.onnx_export import run_onnx

        return lambda *args: run_onnx(str(file), *args)
    raise ValueError(f"Expected `format` to be 'torchscript' or 'onnx', but got {kind!r}.")


def run_manifest(path: str | os.PathLike, *inputs: torch.Tensor, format: str = "torchscript",
                 whole: bool = False) -> Any:
    """Run a deployment from its manifest: load each stage's file, wire the values by name.

    Args:
        path: the manifest (its files are looked up next to it).
        inputs: the model's inputs, in ``model_inputs`` order (centered YUV where ``yuv`` is set).
        format: which exported files to run.
        whole: run the single whole-model file instead of the stages.

    Returns:
        What the last stage returns (the whole model's output; ONNX files return a flat list).
    """
    manifest = load_manifest(path)
    if format not in manifest["formats"]:
        raise ValueError(
            f"Expected `format` to be one of the exported formats {manifest['formats']}, but got "
            f"{format!r}."
        )
    names = [spec["name"] for spec in manifest["model_inputs"]]
    if len(inputs) != len(names):
        raise ValueError(f"Expected {len(names)} inputs {names}, but got {len(inputs)}.")
    directory = Path(path).parent
    if whole:
        return _runner(directory / manifest["whole"]["files"][format], format)(*inputs)
    env: dict[str, Any] = dict(zip(names, inputs))
    result: Any = None
    for stage in manifest["stages"]:
        run = _runner(directory / stage["files"][format], format)
        result = run(*(env[spec["name"]] for spec in stage["inputs"]))
        if not stage.get("returns_model_output", False):
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            env.update(zip((spec["name"] for spec in stage["outputs"]), outputs))
    return result
