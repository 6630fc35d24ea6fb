"""Find the ``FakeQuantize`` that produces a node's value in a prepared graph.

A weighted QAT module needs its input scale ``s_in`` to put its bias on the accumulator grid
``s_in * s_w`` (bias fake quant, :mod:`hq_lightning.nn.qat.fused_weighted`). That scale is the
one convert's static propagation gives the input (:mod:`.convert`): walk back through the
scale-preserving ops (ReLU, MaxPool, Identity, Dropout, flatten/reshape/getitem..., which have no
fake quant) to the producer, and take its ``activation_post_process``: a QAT module's,
a ``QuantStub``'s or a ``FloatFunctional`` call's. Anything else (a float value, a high-precision
int32 output, an op without a known scale rule) has no such fake quant.

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
    ...         return self.dequant(self.conv(torch.relu(self.quant(x))))
    >>> qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> qat.conv.input_fake_quant is qat.quant.activation_post_process
    True
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from hq_lightning.nn import qat
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx import qat_mapping

__all__ = ["link_input_fake_quants", "producer_fake_quant"]


def _first_node(node: fx.Node) -> fx.Node | None:
    # the tensor a scale-preserving op passes on is its first argument (``self`` of a method)
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def producer_fake_quant(node: Any, modules: dict[str, nn.Module]) -> FakeQuantize | None:
    """The ``FakeQuantize`` whose scale is the scale of ``node``'s value, or ``None``.

    Args:
        node: a node of a prepared GraphModule (anything else gives ``None``).
        modules: ``dict(graph_module.named_modules())``.
    """
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            module = modules.get(str(node.target))
            fake_quant = getattr(module, "activation_post_process", None)
            if isinstance(fake_quant, FakeQuantize):
                return fake_quant  # a QAT module or QuantStub: its output fake quant
            if module is None or not qat_mapping.is_scale_preserving(module):
                return None
        elif node.op == "call_method":
            owner = node.args[0] if node.args else None
            if isinstance(owner, fx.Node) and owner.op == "get_attr":
                module = modules.get(str(owner.target))
                fake_quant = getattr(module, "activation_post_process", None)
                return fake_quant if isinstance(module, qat.FloatFunctional) and isinstance(fake_quant, FakeQuantize) else None
            if not qat_mapping.is_scale_preserving_method(node.target):
                return None
        elif node.op == "call_function":
            if not qat_mapping.is_scale_preserving_function(node.target):
                return None
        else:
            return None
        node = _first_node(node)
    return None


def link_input_fake_quants(graph_module: fx.GraphModule) -> int:
    """Link every weighted QAT module called in the graph to its input's ``FakeQuantize``.

    A module called several times is linked only if every call's input has the same fake quant
    (else it keeps the float bias: no single accumulator grid).

    Returns:
        the number of modules linked.
    """
    modules = dict(graph_module.named_modules())
    found: dict[str, set[int]] = {}
    chosen: dict[str, FakeQuantize | None] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), qat.FusedWeightedMixin):
            continue
        path = str(node.target)
        fake_quant = producer_fake_quant(node.args[0] if node.args else None, modules)
        found.setdefault(path, set()).add(id(fake_quant))
        chosen[path] = fake_quant if len(found[path]) == 1 else None
    linked = 0
    for path, fake_quant in chosen.items():
        modules[path].set_input_fake_quant(fake_quant)
        linked += fake_quant is not None
    return linked
