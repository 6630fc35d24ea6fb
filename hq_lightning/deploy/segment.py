"""``split_stages``: cut a converted model into stages deployed separately (segmented deployment).

The chapter's recipe ("模型分段部署"): before prepare, put ``QuantStub(scale=None)`` right after
each split point; train and convert the model as a whole; the stub records the next stage's input
scale. Then split here. Stages follow the graph (forward) order: stage ``k`` holds the nodes from
split point ``at[k-1]`` (included) up to ``at[k]`` (excluded). A stage takes, as inputs, the values
it uses from earlier stages or from the model's inputs, and returns, as a tuple, the values later
stages or the model's output use. Values crossing a boundary must be float (end a stage with a
DeQuantStub; start the next with the split QuantStub, which quantizes with its stored scale). An
int8/int16 value whose scale the graph states (the output of a converted QuantStub or integer
module, possibly through scale-preserving ops) may cross too: its stage ends with a ``DeQuantize``
at that scale and the next starts with a ``Quantize`` at the same scale, which gives back the
integers exactly. So every stage runs and traces with float example inputs, and running the
stages in sequence (:func:`run_stages`) equals running the whole model bit for bit.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx, convert_fx
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
    ...         self.split, self.dequant2 = QuantStub(scale=None), DeQuantStub()
    ...     def forward(self, x):
    ...         y = self.dequant(self.conv1(self.quant(x)))  # float at the boundary
    ...         return self.dequant2(self.conv2(self.split(y)))
    >>> qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> _ = qat(torch.rand(2, 3, 4, 4))
    >>> int_model = convert_fx(qat)
    >>> first, second = split_stages(int_model, at=["split"])
    >>> x = torch.rand(1, 3, 4, 4)
    >>> torch.equal(run_stages([first, second], x), int_model(x))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from hq_lightning.dtype import QuantDType, as_dtype
from hq_lightning.nn.quantized import DeQuantize, Quantize
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.utils.fx_helper import is_wrapped_callable

__all__ = [
    "auto_split_points",
    "check_float_boundary",
    "float_island_split_points",
    "run_stages",
    "split_at_points",
    "split_stages",
    "value_qparams",
]


@torch.fx.wrap
def check_float_boundary(value: Any, name: str) -> Any:
    """Pass ``value`` through; raise if a tensor crossing stages is an integer (quantized) tensor."""
    if isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.dtype == torch.bool
    ):
        raise TypeError(
            f"Expected the value `{name}` crossing a stage boundary to be a float tensor, but got "
            f"{value.dtype}. End the earlier stage with a DeQuantStub and start the next one with "
            "a QuantStub(scale=None) (inserted before prepare), or split at another point."
        )
    return value


def _integer_qparams(node: fx.Node, model: fx.GraphModule) -> tuple[torch.Tensor, QuantDType] | None:
    """Per-tensor scale and dtype of an int8/int16 value of the converted graph, else ``None``.

    Read from the module that produced it (``Quantize.scale``/``dtype``, an integer module's
    ``output_scale``/``output_dtype``), looking through scale-preserving ops. ``None`` for float
    values (after ``DeQuantize``, float ops) and for values whose scale cannot be read.
    """
    while True:
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if isinstance(module, DeQuantize):
                return None
            if isinstance(module, Quantize):
                return module.scale.detach().clone(), as_dtype(module.dtype)
            scale = getattr(module, "output_scale", None)
            dtype = getattr(module, "output_dtype", None)
            if isinstance(scale, torch.Tensor) and dtype is not None:
                dtype = as_dtype(dtype)
                if scale.numel() == 1 and dtype in (QuantDType.qint8, QuantDType.qint16):
                    return scale.detach().clone(), dtype
                return None
            if not qat_mapping.is_scale_preserving(module):  # the operator registry says
                return None
        elif node.op == "call_method":
            if not qat_mapping.is_scale_preserving_method(node.target):
                return None
        elif node.op == "call_function":
            if not qat_mapping.is_scale_preserving_function(node.target):
                return None
        else:
            return None
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        node = first


def value_qparams(node: fx.Node, model: fx.GraphModule) -> tuple[torch.Tensor, QuantDType] | None:
    """Public form of the scale/dtype lookup: ``(scale, dtype)`` of an int8/int16 value, else ``None``.

    Used by the deployment manifest to state each boundary value's scale.
    """
    return _integer_qparams(node, model)


def float_island_split_points(model: fx.GraphModule) -> list[str]:
    """Node names where a float island of the converted graph begins (CPU-side, float).

    The hook through which ``at="auto"`` learns about float islands (ops that run in float
    between integer parts, :func:`hq_lightning.quantization.float_islands`): prepare marks each
    island's nodes with ``node.meta["hq_float_island"]``, convert keeps the mark; the first float
    node of each island in graph order is returned (its entry dequantizes stay with the integer
    stage that produced their input, which then ends in float as the chapter's DeQuantStub
    does), and the island's re-entry QuantStub starts the next integer stage.
    """
    from hq_lightning.quantization.fx.islands import META_KEY

    seen: set[str] = set()
    points: list[str] = []
    for node in model.graph.nodes:
        island = node.meta.get(META_KEY)
        if island is None or island in seen:
            continue
        if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), DeQuantize):
            continue  # an entry dequantize: the end of the integer stage before the island
        seen.add(island)
        points.append(node.name)
    return points


def _is_inner_quant_stub(node: fx.Node, model: fx.GraphModule) -> bool:
    """A converted QuantStub that does not read a model input: the chapter's split-point stub."""
    if node.op != "call_module" or not isinstance(model.get_submodule(str(node.target)), Quantize):
        return False
    source = node.args[0] if node.args else None
    return not (isinstance(source, fx.Node) and source.op == "placeholder")


def _is_cpu_side_call(node: fx.Node) -> bool:
    """A function or method kept out of the trace with ``fx_helper.wrap``: runs on the CPU."""
    return node.op == "call_function" and is_wrapped_callable(node.target)


def auto_split_points(model: fx.GraphModule) -> list[str]:
    """The split points ``split_stages(model, at="auto")`` uses, in forward order.

    The chapter marks a stage boundary with a ``QuantStub(scale=None)`` right after the split
    point, and keeps CPU-side steps out of the trace with ``wrap``. So:

    * every inner converted QuantStub (one that does not read a model input) starts an integer
      (BPU) stage;
    * the first of each run of wrapped CPU-side calls (and of each float island, see
      :func:`float_island_split_points`) starts a float (CPU) stage; further CPU-side calls
      before the next QuantStub stay in that stage.

    Returns:
        Split-point names for ``split_stages`` (module paths of stubs, node names of calls);
        empty when the model has none (it deploys as one stage).

    Example:
        >>> import torch
        >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx, convert_fx
        >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
        ...         self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
        ...         self.split, self.dequant2 = QuantStub(scale=None), DeQuantStub()
        ...     def forward(self, x):
        ...         y = self.dequant(self.conv1(self.quant(x)))
        ...         return self.dequant2(self.conv2(self.split(y)))
        >>> qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
        >>> _ = qat(torch.rand(2, 3, 4, 4))
        >>> auto_split_points(convert_fx(qat))
        ['split']
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"Expected `model` to be a converted torch.fx.GraphModule, but got {type(model).__name__}."
        )
    islands = set(float_island_split_points(model))
    points: list[str] = []
    on_cpu = False
    started = False  # a cut before the first computing node would leave an empty stage
    for node in model.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if _is_inner_quant_stub(node, model):
            if started:
                points.append(str(node.target))
            on_cpu = False
        elif _is_cpu_side_call(node) or node.name in islands:
            if started and not on_cpu:
                points.append(node.name)
            on_cpu = True
        started = True
    return points


def _split_indices(nodes: list[fx.Node], model: fx.GraphModule, at: Sequence[str]) -> list[int]:
    by_name = {n.name: i for i, n in enumerate(nodes)}
    by_target = {
        str(n.target): i for i, n in enumerate(nodes) if n.op == "call_module"
    }
    indices = []
    for point in at:
        index = by_target.get(point, by_name.get(point))
        if index is None or nodes[index].op in ("placeholder", "output"):
            valid = [n.name for n in nodes if n.op not in ("placeholder", "output")]
            raise ValueError(
                f"Expected each split point in `at` to name a QuantStub (module path) or a node of "
                f"the converted graph, one of {valid}, but got {point!r}."
            )
        indices.append(index)
    if indices != sorted(set(indices)):
        raise ValueError(
            f"Expected the split points {list(at)} to be distinct and in forward order, but got "
            f"graph positions {indices}."
        )
    return indices


def split_stages(model: fx.GraphModule, at: Sequence[str] | str) -> list[fx.GraphModule]:
    """Split a converted model at ``at`` into ``len(at) + 1`` runnable, traceable stages.

    Args:
        model: a converted GraphModule (not modified; the stages hold copies of its modules).
        at: split points in forward order: QuantStub module paths (``"quant_roi"``) or node names
            of the graph (e.g. a wrapped CPU-side function, ``"decode_topk_boxes"``); or
            ``"auto"``: the points :func:`auto_split_points` finds (every inner QuantStub, the
            start of every run of wrapped CPU-side calls); none found gives one stage.

    Returns:
        GraphModules, one per stage. Each has ``stage_inputs`` (names of the values it takes, in
        argument order), ``stage_outputs`` (names of the values it returns, as a tuple) and
        ``model_inputs`` (the whole model's argument names), which :func:`run_stages` uses. The
        last stage returns what the whole model returns.

    Raises:
        TypeError: ``model`` is not a GraphModule.
        ValueError: a split point is unknown or out of order.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"Expected `model` to be a converted torch.fx.GraphModule, but got {type(model).__name__}."
        )
    if isinstance(at, str) and at == "auto":
        points = auto_split_points(model)
    else:
        points = [at] if isinstance(at, str) else list(at)
        if not points:
            raise ValueError(
                "Expected `at` to name at least one split point (or be 'auto'), but got none."
            )
    return split_at_points(model, points)


def split_at_points(model: fx.GraphModule, points: Sequence[str]) -> list[fx.GraphModule]:
    """:func:`split_stages` with an explicit (possibly empty: one stage) list of split points."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"Expected `model` to be a converted torch.fx.GraphModule, but got {type(model).__name__}."
        )
    model = copy.deepcopy(model)
    nodes = list(model.graph.nodes)
    cuts = _split_indices(nodes, model, points)
    stage_of = {node: sum(1 for c in cuts if c <= i) for i, node in enumerate(nodes)}
    output_node = next(n for n in nodes if n.op == "output")
    last = len(cuts)
    # needed_by[v]: the stages that use value v without producing it
    needed_by: dict[fx.Node, set[int]] = {}
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        for used in node.all_input_nodes:
            if used.op == "placeholder" or stage_of[used] != stage_of[node]:
                needed_by.setdefault(used, set()).add(stage_of[node])
    for used in output_node.all_input_nodes:  # the last stage returns the model's output
        if used.op == "placeholder" or stage_of[used] != last:
            needed_by.setdefault(used, set()).add(last)
    model_inputs = [n.name for n in nodes if n.op == "placeholder"]
    # integer values crossing a boundary: dequantized at the end of their stage, quantized again
    # (exactly: |q| <= 2^15, so round(fp32(q * s) * fp32(1 / s)) == q) at the start of the next
    boundary: dict[fx.Node, tuple[str, str]] = {}
    for value in needed_by:
        qparams = None if value.op == "placeholder" else _integer_qparams(value, model)
        if qparams is not None:
            scale, dtype = qparams
            dequant_path = f"_boundary_dequant_{value.name}"
            quant_path = f"_boundary_quant_{value.name}"
            model.add_submodule(dequant_path, DeQuantize(scale))
            model.add_submodule(quant_path, Quantize(scale, dtype))
            boundary[value] = (dequant_path, quant_path)
    stages = []
    for k in range(last + 1):
        members = [n for n in nodes if n.op not in ("placeholder", "output") and stage_of[n] == k]
        inputs = [v for v in nodes if k in needed_by.get(v, ())]
        outputs = [n for n in members if any(s > k for s in needed_by.get(n, ()))]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for value in inputs:
            placeholder = graph.placeholder(value.name)
            placeholder.meta.update(value.meta)
            if value in boundary:
                env[value] = graph.call_module(boundary[value][1], (placeholder,))
            elif value.op == "placeholder":
                env[value] = placeholder
            else:
                env[value] = graph.call_function(check_float_boundary, (placeholder, value.name))
        for node in members:
            env[node] = graph.node_copy(node, env.__getitem__)
        if k == last:
            graph.output(fx.node.map_arg(output_node.args[0], env.__getitem__))
        else:
            graph.output(
                tuple(
                    graph.call_module(boundary[n][0], (env[n],)) if n in boundary else env[n]
                    for n in outputs
                )
            )
        stage = fx.GraphModule(model, graph, class_name=f"Stage{k}")
        stage.model_inputs = model_inputs
        stage.stage_inputs = [v.name for v in inputs]
        stage.stage_outputs = [n.name for n in outputs] if k < last else []
        stages.append(stage)
    return stages


def run_stages(stages: Sequence[fx.GraphModule], *args: Any) -> Any:
    """Run stages from :func:`split_stages` in sequence on the whole model's inputs.

    Returns:
        What the whole model returns.
    """
    if not stages:
        raise ValueError("Expected at least one stage, but got none.")
    if not all(hasattr(stage, "stage_inputs") for stage in stages):
        raise TypeError("Expected stages returned by `split_stages`, but got another module.")
    env: dict[str, Any] = dict(zip(stages[0].model_inputs, args))
    result: Any = None
    for stage in stages:
        values = [env[name] for name in stage.stage_inputs]
        result = stage(*values)
        if stage is not stages[-1]:
            env.update(zip(stage.stage_outputs, result))
    return result
