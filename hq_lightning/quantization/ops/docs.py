"""``docs/operators.md``, generated from the operator registry.

Regenerate the page after adding or changing an op::

    python -m hq_lightning.quantization.ops docs/operators.md

``tests/test_ops_registry.py`` fails when the page and the registry disagree.

Example:
    >>> from hq_lightning.quantization.ops import render_operator_table
    >>> "| conv2d |" in render_operator_table()
    True
"""

from __future__ import annotations

import sys
from pathlib import Path

from hq_lightning.march import March
from hq_lightning.quantization.ops.registry import ALL_MARCHES, OpKind, OpSpec, all_ops

__all__ = ["render_operator_table"]

_KIND_TEXT = {
    OpKind.STUB: "stub",
    OpKind.WEIGHTED: "weighted (weight + output fake quant)",
    OpKind.REQUANTIZE: "output fake quant",
    OpKind.PRESERVE: "keeps the input scale",
    OpKind.FUNCTIONAL: "FloatFunctional (output fake quant)",
}

_HEADER = """# Operators

Generated from the operator registry (`hq_lightning/quantization/ops/`) by
`python -m hq_lightning.quantization.ops docs/operators.md`; do not edit by hand
(`tests/test_ops_registry.py` fails when this page and the registry disagree).

Each row is one registry entry: the spellings it matches (module, function, Tensor method,
`FloatFunctional` method), what QAT does with it, the marches and activation dtypes that have it,
how the converted (integer) model computes it, its error bound (`bit-exact`: equal to its slow
reference bit for bit), and the test that checks it. An op absent from this page
has no integer form: between `QuantStub` and `DeQuantStub` it is refused by `prepare_qat_fx`.

"""


def _marches(spec: OpSpec) -> str:
    if spec.marches == ALL_MARCHES:
        return "all"
    return ", ".join(m.value for m in March if m in spec.marches)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_operator_table() -> str:
    """The Markdown of ``docs/operators.md`` for the current registry."""
    lines = [
        _HEADER.rstrip("\n"),
        "",
        "| op | spellings | in QAT | marches | dtypes | integer model | error bound | tested against |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in all_ops():
        spellings = ", ".join(f"`{s}`" for s in spec.spellings_text()) or "-"
        row = [
            spec.name,
            spellings,
            _KIND_TEXT[spec.kind],
            _marches(spec),
            ", ".join(spec.dtypes) + (
                f"; input {spec.input_dtype} by default where the march has it" if spec.input_dtype else ""
            ),
            spec.summary,
            spec.error,
            f"`{spec.reference}`" if spec.reference.startswith("tests/") else (spec.reference or "-"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page to the path given (stdout without one)."""
    argv = sys.argv[1:] if argv is None else argv
    text = render_operator_table()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
