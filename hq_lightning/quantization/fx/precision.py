"""Per-op precision defaults: inputs an op needs wider than int8 become int16 where the march has it.

An op's registry entry may name the dtype its input defaults to (``OpSpec.input_dtype``:
softmax's input, where int8 leaves a few distinct exponentials). After ``prepare_qat_fx`` built
the fake quants, :func:`apply_input_precision` makes the fake quant producing such an input
``qint16`` when it was built for a march with int16 activations (BAYES, BAYES_E, NASH); on the
BERNOULLI family it changes nothing (the op has no integer form there at all). Only dtypes change:
no module or buffer is added, so checkpoints of a prepare with the same rule load strictly.
``prepare_qat_fx(..., op_precision="qconfig")`` keeps exactly what the qconfigs say.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx
    >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.fc, self.dequant = QuantStub(), nn.Linear(4, 4), DeQuantStub()
    ...     def forward(self, x):
    ...         return self.dequant(torch.softmax(self.fc(self.quant(x)), dim=-1))
    >>> prepare_qat_fx(Net(), {"": qc}).fc.activation_post_process.dtype.value
    'qint16'
    >>> prepare_qat_fx(Net(), {"": qc}, op_precision="qconfig").fc.activation_post_process.dtype.value
    'qint8'
"""

from __future__ import annotations

from torch import fx, nn

from hq_lightning.dtype import QuantDType, as_dtype
from hq_lightning.march import supports_int16
from hq_lightning.quantization import ops
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx.input_fake_quant import producer_fake_quant

__all__ = ["OP_PRECISIONS", "apply_input_precision"]

#: ``"auto"``: registry defaults (int16 inputs where an op asks and the march has them);
#: ``"qconfig"``: the qconfigs' dtypes only.
OP_PRECISIONS = ("auto", "qconfig")


def _op_spec(node: fx.Node, modules: dict[str, nn.Module]) -> ops.OpSpec | None:
    if node.op == "call_module":
        return ops.lookup_module(modules[str(node.target)])
    if node.op == "call_function":
        return ops.lookup_function(node.target)
    if node.op == "call_method":
        owner = node.args[0] if node.args else None
        if isinstance(owner, fx.Node) and owner.op == "get_attr":
            return ops.lookup_functional(str(node.target))
        return ops.lookup_method(node.target)
    return None


def apply_input_precision(graph_module: fx.GraphModule) -> list[tuple[str, str]]:
    """Give each op's input the dtype its registry entry asks for, where the march has it.

    Returns:
        ``(producer path, op node name)`` for every fake quant made wider, in graph order.
    """
    from hq_lightning.quantization.sensitivity import promote_to_int16

    modules = dict(graph_module.named_modules())
    owner_of = {
        id(m.activation_post_process): path
        for path, m in modules.items()
        if isinstance(getattr(m, "activation_post_process", None), FakeQuantize)
    }
    changed: list[tuple[str, str]] = []
    for node in graph_module.graph.nodes:
        spec = _op_spec(node, modules)
        if spec is None or spec.input_dtype is None or not node.args:
            continue
        first = node.args[1] if node.op == "call_method" and spec.kind is ops.OpKind.FUNCTIONAL else node.args[0]
        fake_quant = producer_fake_quant(first, modules)
        path = owner_of.get(id(fake_quant))
        if fake_quant is None or path is None or not supports_int16(fake_quant.march):
            continue
        if as_dtype(spec.input_dtype) is QuantDType.qint16 and fake_quant.dtype is QuantDType.qint8:
            promote_to_int16(graph_module, [path], recompute_scale=True)
            changed.append((path, node.name))
    return changed
