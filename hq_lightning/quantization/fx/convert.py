"""``convert_fx``: a prepared (calibrated or QAT) model -> an integer-only GraphModule.

Between its input ``QuantStub``s and its ``DeQuantStub``s the converted model computes in
integers only: every tensor there is ``torch.int8`` / ``int16`` / ``int32`` and every scale is a
static buffer resolved here, by **static scale propagation** over the graph, in topological order.
Each node gets its output :class:`QParams` (scale, dtype, channel axis of a per-channel scale), or
``None`` for a float (or non-tensor) value:

- placeholder, get_attr: float.
- ``QuantStub``: its fake quant's ``scale`` / ``dtype``. A stub inside the quantized region (a
  segment boundary: the plugin's ``QuantStub(scale=None)`` after a split point) requantizes its
  integer input to that scale.
- ``DeQuantStub``: float (dequantized with the propagated scale, which may be per channel).
- QAT module or ``FloatFunctional`` call (``_generated_add_0.add(x, y)``) with an
  ``activation_post_process``: that fake quant's ``scale`` / ``dtype``.
- Conv/Linear whose ``activation_post_process`` is ``None`` (high-precision output): int32, per
  output channel ``s_in * s_w[c]`` (channel axis 1 for convs, -1 for Linear).
- scale-preserving op (ReLU, MaxPool, Identity, Dropout, flatten/reshape/permute/getitem, nearest
  upsample): the qparams of its (first) quantized input.
- anything else fed only by float values: float, left as it is (the float part of a model);
  fed by an integer tensor: an error naming the op.

Then every QAT module, ``FloatFunctional`` call and scale-preserving op that cannot run on an
integer tensor as it is is replaced by the integer module that the table in
:mod:`hq_lightning.quantization.fx.convert_mapping` builds from the resolved scales (int8
weights quantized with the weight fake quant's scale, int32 bias in the accumulator scale).

The conversion uses eval semantics whatever the input's mode: observers frozen, BatchNorm folded
with its running statistics. The input model is never modified (it is deep-copied first).

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.conv = torch.nn.Conv2d(3, 4, 3)
    ...     def forward(self, x):
    ...         return self.dequant(self.conv(self.quant(x)))
    >>> qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> _ = qat(torch.rand(2, 3, 8, 8))
    >>> int_model = convert_fx(qat)
    >>> int_model.quant(torch.rand(1, 3, 8, 8)).dtype
    torch.int8
    >>> int_model(torch.rand(1, 3, 8, 8)).dtype
    torch.float32
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.dtype import QuantDType, as_dtype
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx import convert_mapping as mapping
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.nonfinite import check_nonfinite

__all__ = ["NON_TENSOR", "QParams", "convert_fx", "propagate_qparams"]


class _NonTensor:
    """Marks a value that is no tensor (a shape, a size, arithmetic on them)."""

    def __repr__(self) -> str:
        return "NON_TENSOR"


#: The propagated "qparams" of a non-tensor value (``x.size(0)``, ``x.shape``...).
NON_TENSOR = _NonTensor()


@dataclass(frozen=True)
class QParams:
    """Static quantization parameters of one integer tensor of the converted graph.

    Attributes:
        scale: float32 scale, shape ``[1]`` (per tensor) or ``[C]`` (per channel).
        dtype: the quantized dtype (``qint8``, ``qint16`` or ``qint32``).
        ch_axis: axis of the tensor ``scale`` runs along when it is per channel, else ``None``.
    """

    scale: torch.Tensor
    dtype: QuantDType
    ch_axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    def __repr__(self) -> str:
        values = self.scale.flatten().tolist()
        shown = values if len(values) <= 4 else values[:4] + ["..."]
        axis = "" if self.ch_axis is None else f", ch_axis={self.ch_axis}"
        return f"QParams({self.dtype.value}, scale={shown}{axis})"


@dataclass
class ConvertContext:
    """Everything a builder of :mod:`convert_mapping` gets to build one integer module.

    Attributes:
        module: the module being replaced (QAT module, ``FloatFunctional`` or float op module);
            ``None`` for a replaced function call.
        node: its node in the prepared graph.
        path: dotted path of ``module`` (or of the new module for a replaced function call).
        inputs: qparams of the node's tensor inputs in argument order (``None``: float input).
        output: the propagated qparams of the node's output.
    """

    module: nn.Module | None
    node: fx.Node
    path: str
    inputs: list[QParams | None]
    output: QParams | None

    @property
    def input(self) -> QParams:
        """The (first) quantized input."""
        for qparams in self.inputs:
            if isinstance(qparams, QParams):
                return qparams
        raise ValueError(f"Expected `{self.path}` to have a quantized input, but all are float.")


# --------------------------------------------------------------------------- checks


def _fake_quant_paths(model: nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantize)]


def _check_prepared(model: Any) -> None:
    if not isinstance(model, fx.GraphModule) or not _fake_quant_paths(model):
        kind = type(model).__name__
        detail = "a GraphModule without fake-quant modules" if isinstance(model, fx.GraphModule) else kind
        raise TypeError(
            "Expected `model` to be a model prepared by prepare_qat_fx (a GraphModule with "
            f"fake-quant modules), but got {detail}. Call "
            "hq_lightning.quantization.prepare_qat_fx(model, qconfig_dict) first, calibrate or "
            "train it, then convert_fx."
        )


def _check_calibrated(model: nn.Module) -> None:
    missing = [
        name
        for name, fake_quant in _fake_quant_paths(model)
        if not fake_quant.activation_post_process.initialized
    ]
    if missing:
        raise RuntimeError(
            "Expected every observer of `model` to have seen data before convert_fx, but "
            f"{len(missing)} never did: {', '.join(missing)}. Run calibration batches "
            "(eval() + FakeQuantState.CALIBRATION) or QAT steps first, or load a calibrated "
            "state_dict."
        )


# --------------------------------------------------------------------------- propagation


def _fake_quant_qparams(fake_quant: FakeQuantize) -> QParams:
    scale = fake_quant.scale.detach().to(torch.float32).clone()
    if scale.numel() != 1:
        raise ValueError(
            f"Expected an activation fake quant to be per tensor, but got a scale of shape {tuple(scale.shape)}."
        )
    return QParams(scale.reshape(1), as_dtype(fake_quant.dtype))


def weight_scale(module: nn.Module, out_channels: int) -> torch.Tensor:
    """The weight fake quant's scale of ``module`` as a float32 ``[out_channels]`` vector."""
    scale = module.weight_fake_quant.scale.detach().to(torch.float32).flatten()
    groups = getattr(module, "groups", 1)
    if scale.numel() == 1:
        scale = scale.expand(out_channels)
    elif scale.numel() * groups == out_channels and isinstance(module, nn.ConvTranspose2d):
        scale = scale.repeat(groups)  # ConvTranspose: [C_out / groups] scales, one set per group
    if scale.numel() != out_channels:
        raise ValueError(
            f"Expected the weight scale of {type(module).__name__} to have 1 or {out_channels} "
            f"elements, but got {scale.numel()}."
        )
    return scale.clone()


def _accumulator_qparams(module: nn.Module, input_qparams: QParams) -> QParams:
    # high-precision (int32) output of a Conv/Linear: the accumulator itself, scale s_in * s_w[c]
    out_channels = mapping.out_channels(module)
    scale = (input_qparams.scale.double() * weight_scale(module, out_channels).double()).float()
    ch_axis = mapping.output_channel_axis(module)
    return QParams(scale, QuantDType.qint32, ch_axis)


def _first_quantized(inputs: Sequence[QParams | None]) -> QParams | None:
    return next((q for q in inputs if isinstance(q, QParams)), None)


def _input_qparams(node: fx.Node, env: dict[fx.Node, Any]) -> list[Any]:
    """qparams of the node inputs in argument order (lists such as ``cat([a, b])`` flattened)."""
    found: list[Any] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(env.get(n)))
    return found


def _is_float_functional(module: nn.Module | None) -> bool:
    return module is not None and mapping.is_float_functional(module)


def _functional_module(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """(path, module) when ``node`` is ``call_method(op, (get_attr(<FloatFunctional>), ...))``."""
    if node.op != "call_method" or not node.args:
        return None
    owner = node.args[0]
    if not isinstance(owner, fx.Node) or owner.op != "get_attr":
        return None
    module = modules.get(str(owner.target))
    return (str(owner.target), module) if _is_float_functional(module) else None


def _unsupported(node: fx.Node, what: str) -> RuntimeError:
    return RuntimeError(
        f"Expected every op on an integer tensor to have an integer conversion, but got {what} "
        f"(node `{node.name}`) fed by a quantized tensor. Keep it outside the QuantStub/DeQuantStub "
        "region (insert a DeQuantStub before it), give it a qconfig so it is prepared, or register "
        "an op with an integer builder in the operator registry (hq_lightning.quantization.ops.register_op)."
    )


def _check_elementwise(node: fx.Node, quantized: QParams | None, elementwise: bool) -> QParams | None:
    # a per-channel (int32 high-precision) scale runs along one axis: shape ops would move it
    if quantized is not None and quantized.per_channel and not elementwise:
        raise RuntimeError(
            f"Expected the input of `{node.name}` to have a per-tensor scale, but got the per-channel "
            f"int32 output of a high-precision Conv/Linear ({quantized}), which may only feed a "
            "DeQuantStub or elementwise ops (ReLU, Dropout, Identity, max pool). Dequantize first, "
            "or give that Conv/Linear an 8/16-bit output qconfig."
        )
    return quantized


def _declared_qparams(declared: Any) -> Any:
    # (scale, dtype, ch_axis) -> QParams; a tuple of them (or None for a float element) -> tuple
    if declared is None:
        return None
    if isinstance(declared[0], torch.Tensor):
        scale, dtype, ch_axis = declared
        return QParams(scale.detach().to(torch.float32).reshape(-1).clone(), as_dtype(dtype), ch_axis)
    return tuple(_declared_qparams(item) for item in declared)


def _module_output(node: fx.Node, module: nn.Module, inputs: list[Any]) -> Any:
    quantized = _first_quantized([q for q in inputs if isinstance(q, QParams)])
    if mapping.is_dequant(module):
        return None
    if mapping.is_quant(module):
        fake_quant = getattr(module, "activation_post_process", None)
        if not isinstance(fake_quant, FakeQuantize):
            if quantized is None:
                return None  # an unprepared stub (qconfig None): part of the float model
            raise _unsupported(node, f"unprepared QuantStub `{node.target}`")
        return _fake_quant_qparams(fake_quant)
    if mapping.is_qat_module(module):
        declared = getattr(module, "output_qparams", None)
        if callable(declared):
            # the module states its output qparams: a constant operand (no quantized input) or a
            # tuple output with one scale per element (nn.MultiheadAttention's (out, weights))
            return _declared_qparams(declared())
        if quantized is None:
            raise RuntimeError(
                f"Expected the input of QAT module `{node.target}` ({type(module).__name__}) to be "
                "quantized, but got a float tensor: put a QuantStub before it."
            )
        fake_quant = getattr(module, "activation_post_process", None)
        if isinstance(fake_quant, FakeQuantize):
            return _fake_quant_qparams(fake_quant)
        if hasattr(module, "weight_fake_quant"):
            return _accumulator_qparams(module, quantized)
        raise RuntimeError(
            f"Expected QAT module `{node.target}` ({type(module).__name__}) to have an output fake "
            "quant, but it has none (only a Conv/Linear may have a high-precision output)."
        )
    if mapping.is_scale_preserving_module(module):
        return _check_elementwise(node, quantized, mapping.is_elementwise(node.op, None, module))
    if quantized is not None:
        raise _unsupported(node, f"module `{node.target}` of type {type(module).__name__}")
    return None


def _function_output(node: fx.Node, inputs: list[Any]) -> Any:
    target = node.target
    if target is operator.getitem:
        # an item of a split/chunk of an integer tensor, a slice of it, or an element of a shape
        if inputs and isinstance(inputs[0], tuple) and isinstance(node.args[1], int):
            return inputs[0][node.args[1]]  # one element of a module's tuple output
        return inputs[0] if inputs else None
    if target is getattr:
        return NON_TENSOR
    quantized = [q for q in inputs if isinstance(q, QParams)]
    if not quantized:
        # arithmetic on sizes stays a non-tensor; anything touching a float tensor is float
        return NON_TENSOR if inputs and all(q is NON_TENSOR for q in inputs) else None
    if qat_mapping.is_scale_preserving_function(target):
        return _check_elementwise(node, quantized[0], mapping.is_elementwise(node.op, target))
    raise _unsupported(node, f"function {getattr(target, '__name__', target)!r}")


def _method_output(node: fx.Node, inputs: list[Any], modules: dict[str, nn.Module]) -> Any:
    functional = _functional_module(node, modules)
    if functional is not None:
        path, module = functional
        method = str(node.target)
        quantized = [q for q in inputs[1:] if isinstance(q, QParams)]
        if not quantized:
            return None  # a FloatFunctional of the float part of the model
        if mapping.functional_builder(method) is None:
            raise _unsupported(node, f"FloatFunctional method {method!r} of `{path}`")
        fake_quant = getattr(module, "activation_post_process", None)
        if not isinstance(fake_quant, FakeQuantize):
            raise RuntimeError(
                f"Expected FloatFunctional `{path}` to be prepared (to own a FakeQuantize), but it "
                "has none. Give the module that calls it a qconfig before prepare_qat_fx."
            )
        return _fake_quant_qparams(fake_quant)
    if node.target in mapping.NON_TENSOR_METHODS:
        return NON_TENSOR
    quantized = [q for q in inputs if isinstance(q, QParams)]
    if not quantized:
        return None
    if qat_mapping.is_scale_preserving_method(node.target):
        return _check_elementwise(node, quantized[0], mapping.is_elementwise(node.op, node.target))
    raise _unsupported(node, f"tensor method {node.target!r}")


def propagate_qparams(model: fx.GraphModule) -> dict[fx.Node, Any]:
    """Static scale propagation over a prepared model's graph (see the module docstring).

    Args:
        model: a prepared (``prepare_qat_fx``) GraphModule with calibrated fake quants.

    Returns:
        ``{node: QParams | None | NON_TENSOR}``: the qparams of each node's output (``None`` for
        a float tensor, :data:`NON_TENSOR` for shapes and sizes).
    """
    modules = dict(model.named_modules())
    env: dict[fx.Node, Any] = {}
    for node in model.graph.nodes:
        inputs = _input_qparams(node, env)
        if node.op in ("placeholder", "get_attr", "output"):
            env[node] = None
        elif node.op == "call_module":
            env[node] = _module_output(node, modules[str(node.target)], inputs)
        elif node.op == "call_function":
            env[node] = _function_output(node, inputs)
        elif node.op == "call_method":
            env[node] = _method_output(node, inputs, modules)
        else:  # pragma: no cover - torch.fx has no other opcodes
            raise RuntimeError(f"Expected a known fx opcode, but got {node.op!r}.")
    return env


# --------------------------------------------------------------------------- replacement


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _fresh_path(model: nn.Module, base: str) -> str:
    taken = dict(model.named_modules())
    path, k = base, 0
    while path in taken:
        k += 1
        path = f"{base}_{k}"
    return path


def _replace_modules(model: fx.GraphModule, env: dict[fx.Node, Any]) -> None:
    modules = dict(model.named_modules())
    graph = model.graph
    functional_uses: dict[str, int] = {}
    module_uses: dict[str, int] = {}
    kept_float: list[fx.Node] = []  # calls left as they are (float input)
    for node in list(graph.nodes):
        inputs = _input_qparams(node, env)
        quantized = any(isinstance(q, QParams) for q in inputs)
        if node.op == "call_module":
            module = modules[str(node.target)]
            builder = mapping.module_builder(module)
            if builder is None or not (isinstance(env[node], QParams) or quantized):
                kept_float.append(node)
                continue
            # a module called several times (one DeQuantStub for every output of a dict) gets
            # one integer module per call: each knows the scales of its own call
            path = str(node.target)
            uses = module_uses.get(path, 0)
            module_uses[path] = uses + 1
            new_path = path if uses == 0 else _fresh_path(model, path)
            ctx = ConvertContext(module, node, new_path, inputs, env[node])
            _set_module(model, new_path, builder(ctx))
            node.target = new_path
        elif node.op == "call_method":
            functional = _functional_module(node, modules)
            if functional is None or not isinstance(env[node], QParams):
                continue
            # keep the graph's form `call_method(op, (get_attr(path), ...))`: the QFunctional
            # that replaces the FloatFunctional has the same method names. A FloatFunctional
            # called several times gets one integer module per call (each knows its scales).
            path, module = functional
            uses = functional_uses.get(path, 0)
            functional_uses[path] = uses + 1
            new_path = path if uses == 0 else _fresh_path(model, path)
            ctx = ConvertContext(module, node, new_path, inputs[1:], env[node])
            _set_module(model, new_path, mapping.functional_builder(str(node.target))(ctx))
            if uses:
                with graph.inserting_before(node):
                    owner = graph.get_attr(new_path)
                node.args = (owner, *node.args[1:])
        elif node.op == "call_function" and quantized and mapping.function_builder(node.target) is not None:
            base = node.meta.get("hq_module_path") or ""
            name = f"{base}.{node.name}" if base else node.name
            new_path = _fresh_path(model, name.replace(".", "_"))
            ctx = ConvertContext(None, node, new_path, inputs, env[node])
            _set_module(model, new_path, mapping.function_builder(node.target)(ctx))
            with graph.inserting_before(node):
                new_node = graph.call_module(new_path, _tensor_args(node), {})
            new_node.meta.update(node.meta)
            node.replace_all_uses_with(new_node)
            env[new_node] = env[node]
            graph.erase_node(node)
    for node in kept_float:
        # a module also called on integers (a DeQuantStub shared by an integer output and a
        # float-island output) was replaced there: this float call keeps the float module
        path = str(node.target)
        if path in module_uses:
            new_path = _fresh_path(model, path)
            _set_module(model, new_path, modules[path])
            node.target = new_path


def _tensor_args(node: fx.Node) -> tuple[Any, ...]:
    # a replaced function keeps only its tensor (node) arguments; constants went into the module
    return tuple(a for a in node.args if isinstance(a, fx.Node))


def convert_fx(model: fx.GraphModule) -> fx.GraphModule:
    """Convert a prepared (calibrated or QAT) model into an integer-only GraphModule.

    Args:
        model: the output of :func:`~hq_lightning.quantization.prepare_qat_fx`, after calibration
            or QAT (its observers must have seen data). It is not modified, nor is its mode.

    Returns:
        A new GraphModule in eval mode whose QAT modules, ``FloatFunctional`` calls and integer
        incompatible scale-preserving ops are integer modules from ``hq_lightning.nn.quantized``.
        Between QuantStub and DeQuantStub its tensors are ``torch.int8/int16/int32``.

    Raises:
        TypeError: ``model`` was not prepared with ``prepare_qat_fx``.
        RuntimeError: some observers never saw data (all of them are listed by path), or an op
            on an integer tensor has no integer conversion.
        ValueError: observed inputs or learned scales were NaN or +-inf since the last
            :func:`~hq_lightning.quantization.nonfinite.check_nonfinite`.
    """
    _check_prepared(model)
    _check_calibrated(model)
    check_nonfinite(model)  # non-finite batches counted during the steps are reported here
    converted = copy.deepcopy(model)
    converted.eval()
    with torch.no_grad():
        env = propagate_qparams(converted)
        _replace_modules(converted, env)
    converted.graph.lint()
    converted.recompile()
    converted.eval()  # the integer modules built above start in train mode
    return converted
