"""Registry entries: elementwise functions as integer tables, clamp, and division by an activation.

Every spelling users write (``nn.SiLU()``, ``F.silu(x)``, ``F.silu(x, inplace=True)``,
``torch.sigmoid(x)``, ``x.sigmoid()``, ``x.sigmoid_()``, ``x ** 2``, ``x.clamp(0, 6)``, ``x / y``)
becomes the op's module at fuse time. In QAT the float function runs, then the output fake quant
(:mod:`hq_lightning.nn.qat.elementwise`); convert builds a table from the same function
(:class:`~hq_lightning.nn.quantized.lookup.QuantizedLookup`, docs/integer-arithmetic.md section 9).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from hq_lightning.quantization.ops import lookup_module, lookup_spelling
    >>> lookup_module(torch.nn.SiLU()).name, [s.name for s, _ in lookup_spelling("sigmoid_")]
    ('silu', ['sigmoid'])
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.march import March
from hq_lightning.nn import elementwise as fm
from hq_lightning.nn.qat import elementwise as qe
from hq_lightning.nn.quantized.clamp import QuantizedClamp
from hq_lightning.nn.quantized.lookup import QuantizedDiv, QuantizedLookup
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, Spelling, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_clamp", "build_div", "build_lookup"]

#: Error bound of a table op (docs/integer-arithmetic.md, section 9).
TABLE_ERROR = (
    "int8 input: bit-exact (the fake-quant op); int16 input: <= 1 step from the fake-quant op"
)
TABLE_REFERENCE = "tests/reference/table_ref.py::ref_table, ref_segmented"
TABLE_SUMMARY = "int8 input: 256-entry table; int16 input: segmented table, integer interpolation"
#: Marches with table lookups (the BERNOULLI family has few: those ops run as float islands there).
TABLE_MARCHES = frozenset({March.BAYES, March.BAYES_E, March.NASH})


def build_lookup(ctx: ConvertContext) -> nn.Module:
    """QAT table op -> :class:`~hq_lightning.nn.quantized.lookup.QuantizedLookup` built from its ``float_forward``."""
    x = per_tensor(ctx, ctx.input, "input")
    module = ctx.module
    channels = 1
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        channels = module.num_parameters
    return QuantizedLookup.from_function(
        module.float_forward, x.scale, x.dtype, ctx.output.scale, ctx.output.dtype,
        channels=channels, ch_axis=1 if channels > 1 else None,
    )  # fmt: skip


def build_div(ctx: ConvertContext) -> nn.Module:
    """QAT ``Div``: a constant divisor is a table of ``x / c``; a quantized divisor ``y`` is a
    :class:`~hq_lightning.nn.quantized.lookup.QuantizedDiv` (reciprocal table of ``y``, integer product)."""
    from hq_lightning.quantization.fx.convert import QParams

    module = ctx.module
    if module.other is not None:
        return build_lookup(ctx)
    if len(ctx.inputs) != 2 or not all(isinstance(q, QParams) for q in ctx.inputs):
        raise RuntimeError(
            f"Expected both operands of the division `{ctx.path}` to be quantized activations, but "
            f"got {ctx.inputs}: put a QuantStub before a float divisor."
        )
    x = per_tensor(ctx, ctx.inputs[0], "dividend")
    y = per_tensor(ctx, ctx.inputs[1], "divisor")
    fake_quant = module.reciprocal_post_process
    reciprocal = QuantizedLookup.from_function(
        torch.reciprocal, y.scale, y.dtype, fake_quant.scale.detach().float().reshape(1),
        fake_quant.dtype,
    )  # fmt: skip
    return QuantizedDiv(x.scale, x.dtype, reciprocal, ctx.output.scale, ctx.output.dtype)


def build_clamp(ctx: ConvertContext) -> nn.Module:
    """``Clamp`` / ``nn.Hardtanh`` on integers -> :class:`~hq_lightning.nn.quantized.clamp.QuantizedClamp`:
    bounds at the codes the fake quant gives them at the input scale."""
    x = per_tensor(ctx, ctx.input, "input")
    module = ctx.module
    if isinstance(module, nn.Hardtanh):
        return QuantizedClamp(x.scale, x.dtype, min=module.min_val, max=module.max_val)
    return QuantizedClamp(x.scale, x.dtype, min=module.min, max=module.max)


def _table_op(
    name: str,
    modules: tuple,
    qat: type,
    spellings: tuple = (),
    summary: str = TABLE_SUMMARY,
    **kw: Any,
) -> None:
    register_op(OpSpec(
        name, OpKind.REQUANTIZE, summary, modules=modules, spellings=spellings, qat=qat,
        integer=build_lookup, error=TABLE_ERROR, reference=TABLE_REFERENCE, marches=TABLE_MARCHES, **kw,
    ))  # fmt: skip


def _inplace(
    target: Any, params: tuple[str, ...] = (), defaults: dict | None = None, **kw: Any
) -> Spelling:
    """A ``F.<fn>(x, ..., inplace=False)`` spelling (``inplace`` accepted and ignored)."""
    return Spelling(target, (*params, "inplace"), {**(defaults or {}), "inplace": False}, **kw)


def _plain(*targets: Any, build: Any = None) -> tuple[Spelling, ...]:
    """Spellings with no argument but the input: functions and Tensor methods."""
    return tuple(Spelling(t, build=build) for t in targets)


def _torch(name: str) -> tuple[Any, ...]:
    """``torch.<name>`` if this torch has it (in-place ``torch.sigmoid_``...)."""
    fn = getattr(torch, name, None)
    return (fn,) if fn is not None else ()


_table_op("hardswish", (nn.Hardswish,), qe.Hardswish, (_inplace(F.hardswish),))
_table_op("hardsigmoid", (nn.Hardsigmoid,), qe.Hardsigmoid, (_inplace(F.hardsigmoid),))
_table_op("silu", (nn.SiLU,), qe.SiLU, (_inplace(F.silu),))
_table_op(
    "sigmoid", (nn.Sigmoid,), qe.Sigmoid,
    _plain(torch.sigmoid, F.sigmoid, *_torch("sigmoid_"), "sigmoid", "sigmoid_"),
)  # fmt: skip
_table_op(
    "tanh", (nn.Tanh,), qe.Tanh, _plain(torch.tanh, F.tanh, *_torch("tanh_"), "tanh", "tanh_")
)
_table_op(
    "gelu", (nn.GELU,), qe.GELU, (Spelling(F.gelu, ("approximate",), {"approximate": "none"}),),
    summary=TABLE_SUMMARY + " (exact erf or tanh form, as the float module)",
)  # fmt: skip
_table_op(
    "leaky_relu", (nn.LeakyReLU,), qe.LeakyReLU,
    (_inplace(F.leaky_relu, ("negative_slope",), {"negative_slope": 0.01}),
     Spelling(F.leaky_relu_, ("negative_slope",), {"negative_slope": 0.01})),
)  # fmt: skip
_table_op(
    "prelu", (nn.PReLU,), qe.PReLU,
    summary="one table per channel (per-channel weight): int8 256 entries, int16 segmented",
)  # fmt: skip
_table_op(
    "elu", (nn.ELU,), qe.ELU,
    (_inplace(F.elu, ("alpha",), {"alpha": 1.0}), Spelling(F.elu_, ("alpha",), {"alpha": 1.0})),
)  # fmt: skip
_table_op(
    "softplus", (nn.Softplus,), qe.Softplus,
    (Spelling(F.softplus, ("beta", "threshold"), {"beta": 1.0, "threshold": 20.0}),),
)  # fmt: skip
_table_op("mish", (nn.Mish,), qe.Mish, (_inplace(F.mish),))
_table_op("exp", (fm.Exp,), qe.Exp, _plain(torch.exp, *_torch("exp_"), "exp", "exp_"))
_table_op("log", (fm.Log,), qe.Log, _plain(torch.log, *_torch("log_"), "log", "log_"))
_table_op("sqrt", (fm.Sqrt,), qe.Sqrt, _plain(torch.sqrt, *_torch("sqrt_"), "sqrt", "sqrt_"))
_table_op("rsqrt", (fm.Rsqrt,), qe.Rsqrt, _plain(torch.rsqrt, *_torch("rsqrt_"), "rsqrt", "rsqrt_"))
_table_op(
    "reciprocal", (fm.Reciprocal,), qe.Reciprocal,
    _plain(torch.reciprocal, *_torch("reciprocal_"), "reciprocal", "reciprocal_"),
)  # fmt: skip
_table_op(
    "abs", (fm.Abs,), qe.Abs,
    _plain(torch.abs, torch.absolute, *_torch("abs_"), "abs", "abs_", "absolute", "absolute_"),
)  # fmt: skip
_POW = ("exponent",)
_table_op(
    "pow", (fm.Pow,), qe.Pow,
    (Spelling(torch.pow, _POW), Spelling(operator.pow, _POW), Spelling(operator.ipow, _POW),
     Spelling("pow", _POW), Spelling("pow_", _POW),
     *_plain(torch.square, "square", "square_", build=lambda: fm.Pow(2.0))),
    summary=TABLE_SUMMARY + " (constant exponent)",
)  # fmt: skip
_DIV = ("other",)
register_op(OpSpec(
    "div", OpKind.REQUANTIZE,
    "x / y: reciprocal table of y (its own fake-quant scale), int64 product x * T[y], one "
    "multiplier/shift; x / c: a table of the float x / c",
    modules=(fm.Div,),
    spellings=(
        Spelling(operator.truediv, _DIV, dynamic=_DIV, tensors=_DIV), Spelling(operator.itruediv, _DIV, dynamic=_DIV, tensors=_DIV),
        Spelling(torch.div, (*_DIV, "rounding_mode"), {"rounding_mode": None},
                 fixed={"rounding_mode": None}, dynamic=_DIV, tensors=_DIV),
        Spelling(torch.true_divide, _DIV, dynamic=_DIV, tensors=_DIV),
        Spelling("div", (*_DIV, "rounding_mode"), {"rounding_mode": None}, fixed={"rounding_mode": None},
                 dynamic=_DIV, tensors=_DIV),
        Spelling("div_", (*_DIV, "rounding_mode"), {"rounding_mode": None}, fixed={"rounding_mode": None},
                 dynamic=_DIV, tensors=_DIV),
        Spelling("true_divide", _DIV, dynamic=_DIV, tensors=_DIV),
    ),
    qat=qe.Div, integer=build_div, marches=TABLE_MARCHES,
    error="int8: reciprocal bit-exact, product <= 1 step from the fake-quant op; int16 divisor: "
    "<= 1 step on the reciprocal as well",
    reference="tests/reference/table_ref.py::ref_div",
))  # fmt: skip
_CLAMP = ("min", "max")
_CLAMP_DEFAULTS = {"min": None, "max": None}
_HARDTANH = ("min_val", "max_val")
_HARDTANH_DEFAULTS = {"min_val": -1.0, "max_val": 1.0}
register_op(OpSpec(
    "clamp", OpKind.PRESERVE,
    "clamp(q, q_a, q_b), q_a, q_b the codes the fake quant gives the bounds at the input scale",
    modules=(fm.Clamp, nn.Hardtanh),
    spellings=(
        *(Spelling(t, _CLAMP, _CLAMP_DEFAULTS) for t in (
            torch.clamp, torch.clip, *_torch("clamp_"), *_torch("clip_"), "clamp", "clamp_", "clip", "clip_")),
        Spelling("clamp_min", ("min",), build=lambda min: fm.Clamp(min=min)),
        Spelling("clamp_max", ("max",), build=lambda max: fm.Clamp(max=max)),
        Spelling(torch.clamp_min, ("min",), build=lambda min: fm.Clamp(min=min)),
        Spelling(torch.clamp_max, ("max",), build=lambda max: fm.Clamp(max=max)),
        _inplace(F.hardtanh, _HARDTANH, _HARDTANH_DEFAULTS, build=nn.Hardtanh),
        Spelling(F.hardtanh_, _HARDTANH, _HARDTANH_DEFAULTS, build=nn.Hardtanh),
    ),
    integer=build_clamp,
    reference="tests/reference/table_ref.py::ref_clamp",
))  # fmt: skip
