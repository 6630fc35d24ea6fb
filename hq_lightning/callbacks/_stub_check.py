"""Refuse, at ``setup``, a submodule without a QuantStub: it would train float and QAT in full and
only fail in ``convert_fx`` at the end of fit.

The message names where the stubs go in the model as the user wrote it: the first and the last
module its ``forward`` calls, by their paths and their own classes (not a fused module's).

Example:
    >>> from torch import nn
    >>> from hq_lightning.quantization import prepare_qat_fx
    >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig as qconfig
    >>> import warnings
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(144, 10))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     prepared = prepare_qat_fx(net, {"": qconfig})
    >>> try:
    ...     check_has_quant_stub(prepared, net, "model")
    ... except ValueError as err:
    ...     print(str(err).split("Fix: ")[1])
    put a QuantStub() in front of `model.0` (Conv2d), the first module the forward calls, and a DeQuantStub() after `model.4` (Linear), the last one: e.g. `self.quant = QuantStub()` in __init__ and `x = self.quant(x)` at the start of forward (hq_lightning.quantization.QuantStub / DeQuantStub).
"""

from __future__ import annotations

from torch import nn

from hq_lightning.quantization.fx.qat_mapping import is_quant

__all__ = ["check_has_quant_stub"]


def _called_modules(float_module: nn.Module) -> list[str]:
    """Paths of the modules the float ``forward`` calls, in order (empty if it cannot be traced)."""
    from hq_lightning.quantization.fx.tracer import symbolic_trace

    try:
        graph_module = symbolic_trace(float_module)
    except Exception:
        return []
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"]


def check_has_quant_stub(prepared: nn.Module, float_module: nn.Module, path: str) -> None:
    """Raise unless the prepared submodule holds a QuantStub.

    Args:
        prepared: the submodule after ``prepare_qat_fx``.
        float_module: the same submodule as the user wrote it (for the names in the message).
        path: its attribute path in the LightningModule (``model``).
    """
    if any(is_quant(module) for module in prepared.modules()):
        return
    called = _called_modules(float_module)

    def named(name: str) -> str:
        return f"`{path}.{name}` ({type(float_module.get_submodule(name)).__name__})"

    if called:
        where = (
            f"in front of {named(called[0])}, the first module the forward calls, and a "
            f"DeQuantStub() after {named(called[-1])}, the last one"
        )
    else:
        where = f"at the start of `{path}`'s forward, and a DeQuantStub() at its end"
    raise ValueError(
        f"Expected submodule `{path}` ({type(float_module).__name__}) to contain a QuantStub where "
        "quantization starts, but it has none: nothing in it would be quantized, it would train "
        "float and QAT in full and fail at the end of fit when converted. Fix: put a QuantStub() "
        f"{where}: e.g. `self.quant = QuantStub()` in __init__ and `x = self.quant(x)` at the "
        "start of forward (hq_lightning.quantization.QuantStub / DeQuantStub)."
    )
