"""The user's chapter (``shared/spec/user-guide-expert.md``) as acceptance tests, read from the file.

Every ```python block of the chapter is extracted, ``horizon_plugin_pytorch`` is replaced by
``hq_lightning`` (and ``import hq_lightning as horizon`` is prepended to blocks that use the
``horizon.`` alias), and the block is run in a fresh namespace after ``torch.manual_seed(0)``.
Nothing else in a block's text is changed.

Complete programs run verbatim. Fragments (snippets that lean on names defined in the prose or in
other blocks) run after a small prelude listed in ``FRAGMENTS`` with the reason for each. Blocks
that cannot run at all are in ``NOT_RUN`` with the exact reason, and a check that the reason still
holds. Each block is keyed by its first distinctive line; a block the tables do not know fails
``test_every_block_is_classified`` until it is classified here.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import operator
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx

CHAPTER = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "user-guide-expert.md"

if not CHAPTER.is_file():
    pytest.skip(
        f"the user's chapter is not at {CHAPTER} (CI places a copy of shared/ beside the repo)",
        allow_module_level=True,
    )

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _key(block: str) -> str:
    """The block's first line that is not blank, a comment or (part of) an import."""
    in_import = False
    for line in block.splitlines():
        s = line.strip()
        if in_import:
            in_import = ")" not in s
            continue
        if s.startswith(("import ", "from ")):
            in_import = s.endswith("(")
            continue
        if s and not s.startswith("#"):
            return s
    raise AssertionError(f"Expected a block with a statement, but got {block!r}")


def _substitute(block: str) -> str:
    code = block.replace("horizon_plugin_pytorch", "hq_lightning")
    if re.search(r"\bhorizon\.", code):
        code = "import hq_lightning as horizon\n" + code
    return code


def _blocks() -> dict[str, str]:
    blocks = {}
    for match in _BLOCK.finditer(CHAPTER.read_text(encoding="utf-8")):
        key = _key(match.group(1))
        assert key not in blocks, f"Expected block keys to be unique, but got {key!r} twice"
        blocks[key] = _substitute(match.group(1))
    return blocks


BLOCKS = _blocks()


@pytest.fixture(autouse=True)
def _restore_march():
    """The samples call ``set_march``; leave the process-wide march as it was."""
    from hq_lightning import get_march, set_march

    before = get_march()
    yield
    set_march(before)


def _run(code: str, namespace: dict | None = None) -> tuple[dict, str]:
    """Exec ``code`` in a fresh (or the given) namespace after seeding; return it and the stdout."""
    namespace = {"__name__": "chapter_sample"} if namespace is None else namespace
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<user-guide-expert.md>", "exec"), namespace)
    return namespace, out.getvalue()


# --- the classification -----------------------------------------------------------------------

#: Complete programs, run exactly as written (after the package-name substitution).
VERBATIM = {
    "class Net(torch.nn.Module):": "RGB888 deployment: prepare, convert, hand-inserted centered_yuv2rgb",
    "class ModelForFusion(torch.nn.Module):": "fusion principle: fuse_fx on conv-bn-add-relu",
}

#: Fragments, run after a documented prelude (see each test for the prelude and why).
FRAGMENTS = {
    "activation_8bit_fake_quant = FakeQuantize.with_args(": "qconfig section: needs the imports the prose names",
    "weight_8bit_fake_quant = FakeQuantize.with_args(": "qconfig section: needs the imports the prose names",
    "qat_8bit_qconfig = QConfig(": "qconfig section: uses the two fake-quant partials of the blocks above",
    "fused_model = horizon.quantization.fuse_fx(model)": "one-liner on an undefined `model`",
    "horizon.march.set_march(horizon.march.March.BAYES)": "needs `model` and `custom_qconfig` from the prose",
    "quantized_model = horizon.quantization.convert_fx(qat_model)": "one-liner on the `qat_model` of the Prepare block",
    "def rgb2centered_yuv(input: Tensor, swing: str = \"studio\") -> Tensor:": (
        "signature listing (docstring only): needs `Tensor`; compared with ours"
    ),
    "def register_fusion_patterns():": (
        "listing: calls `register_fusion_pattern`, `MatchAllNode`, `ConvBNAddReLUFusion`, "
        "`ConvBNAddedReLUFusion` without importing them; run with a recording `register_fusion_pattern`"
    ),
}

#: Blocks that cannot be compiled as written, with the exact reason (checked below).
NOT_RUN = {
    "class RetinaNet(nn.Module):": (
        "SyntaxError in the chapter: `def _post_process(self, data, feat, cls_scores, bbox_preds)` lacks "
        "its colon, and backbone/neck/head/anchors/targets/losses are not defined; the class is "
        "compiled with the colon added, and recipes/retinanet_wrap.py runs it with real sub-modules"
    ),
    "def centered_yuv2rgb(": (
        "signature without a body (ends at the colon): SyntaxError as written; compiled with `...` "
        "as the body and compared with ours"
    ),
}


def test_every_block_is_classified():
    known = set(VERBATIM) | set(FRAGMENTS) | set(NOT_RUN)
    assert set(BLOCKS) == known, (
        f"Expected the chapter's python blocks to be exactly the classified ones; new: "
        f"{sorted(set(BLOCKS) - known)}, gone: {sorted(known - set(BLOCKS))}. Classify new blocks in "
        "tests/test_user_guide_samples.py."
    )


@pytest.mark.parametrize("key", sorted(set(VERBATIM) | set(FRAGMENTS)))
def test_runnable_blocks_compile_as_written(key):
    compile(BLOCKS[key], "<user-guide-expert.md>", "exec")


@pytest.mark.parametrize("key", sorted(NOT_RUN))
def test_not_run_blocks_still_do_not_compile(key):
    with pytest.raises(SyntaxError):
        compile(BLOCKS[key], "<user-guide-expert.md>", "exec")


# --- verbatim programs ------------------------------------------------------------------------


def _tabular_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split()[:1] and line.split()[0] in (
        "placeholder", "call_module", "call_function", "call_method", "output")]


def test_rgb888_sample_inserts_centered_yuv2rgb_after_quant():
    namespace, out = _run(BLOCKS["class Net(torch.nn.Module):"])
    before, after = out.split("After centered_yuv2rgb")
    assert "Before centered_yuv2rgb" in before
    names_before = [row[1] for row in _tabular_rows(before)]
    names_after = [row[1] for row in _tabular_rows(after)]
    assert "centered_yuv2rgb" not in names_before
    assert names_after.index("centered_yuv2rgb") == names_after.index("quant") + 1
    rows = {row[1]: row for row in _tabular_rows(after)}
    assert rows["centered_yuv2rgb"][0] == "call_function"
    assert "(quant,)" in " ".join(rows["centered_yuv2rgb"])
    # the op after the colour conversion now reads from it, and the stub's scale is 1
    following = _tabular_rows(after)[names_after.index("centered_yuv2rgb") + 1]
    assert "(centered_yuv2rgb,)" in " ".join(following)
    traced = namespace["traced"]
    assert torch.equal(traced.quant.scale, torch.ones_like(traced.quant.scale))
    # the patched model runs on centered YUV input
    yuv = torch.randint(-128, 128, (1, 3, 28, 28)).float()
    assert traced(yuv).shape == (1, 3, 26, 26)


def test_fusion_sample_prints_the_chapters_structure():
    namespace, out = _run(BLOCKS["class ModelForFusion(torch.nn.Module):"])
    fused = namespace["fused_model"]
    assert isinstance(fused, fx.GraphModule)
    for name in ("conv", "bn", "relu"):
        assert f"({name}): Identity()" in out
        assert type(getattr(fused, name)).__name__ == "Identity"
    assert "(_generated_add_0): ConvAddReLU2d(" in out
    generated = fused._generated_add_0
    assert type(generated).__name__ == "ConvAddReLU2d"
    assert isinstance(generated.conv, torch.nn.Conv2d) and isinstance(generated.relu, torch.nn.ReLU)
    calls = [n.target for n in fused.graph.nodes if n.op == "call_module"]
    assert calls == ["quantx", "quanty", "_generated_add_0", "dequant"]
    # BN absorbed into the conv: same output as the float model (eval: running statistics)
    float_model = namespace["float_model"].eval()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused.eval()(x, y), float_model(x, y))


# --- fragments ----------------------------------------------------------------------------------

#: The imports the qconfig section's prose implies ("FakeQuantize.with_args", observers, QConfig).
QCONFIG_PRELUDE = (
    "from hq_lightning.quantization import (FakeQuantize, MovingAveragePerTensorMinMaxObserver, "
    "MovingAveragePerChannelMinMaxObserver, QConfig)\n"
)


def test_qconfig_section_builds_a_working_qconfig():
    namespace = {"__name__": "chapter_sample"}
    _run(QCONFIG_PRELUDE, namespace)
    for key in (
        "activation_8bit_fake_quant = FakeQuantize.with_args(",
        "weight_8bit_fake_quant = FakeQuantize.with_args(",
        "qat_8bit_qconfig = QConfig(",
    ):
        _run(BLOCKS[key], namespace)
    qconfig = namespace["qat_8bit_qconfig"]
    act, weight = qconfig.activation(), qconfig.weight()
    assert type(act).__name__ == type(weight).__name__ == "FakeQuantize"
    assert act.dtype == weight.dtype == "qint8"
    assert type(act.activation_post_process).__name__ == "MovingAveragePerTensorMinMaxObserver"
    assert act.activation_post_process.averaging_constant == 0
    assert type(weight.activation_post_process).__name__ == "MovingAveragePerChannelMinMaxObserver"
    assert weight.activation_post_process.averaging_constant == 1 and weight.ch_axis == 0
    # averaging_constant=0 fixes the activation scale after the first observation
    act(torch.full((4,), 2.0))
    first = act.scale.clone()
    act(torch.full((4,), 100.0))
    assert torch.equal(act.scale, first)


#: The FX-flow prose's ``model`` and ``custom_qconfig``, which the chapter leaves to the reader. The
#: Prepare block's mapping names the placeholder ``"<module_name>"``; rather than edit the block, the
#: prelude gives the model a submodule of exactly that name.
FX_FLOW_PRELUDE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from hq_lightning.quantization import DeQuantStub, QuantStub
    from hq_lightning.qconfig import default_calib_8bit_fake_quant_qconfig as custom_qconfig

    model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.add_module("<module_name>", nn.Conv2d(4, 4, 1))
    model.add_module("dequant", DeQuantStub())
    """
)


def test_fx_flow_one_liners_fuse_prepare_and_convert():
    namespace = {"__name__": "chapter_sample"}
    _run(FX_FLOW_PRELUDE, namespace)
    _run(BLOCKS["fused_model = horizon.quantization.fuse_fx(model)"], namespace)
    assert isinstance(namespace["fused_model"], fx.GraphModule)
    assert namespace["model"][1].__class__ is torch.nn.Conv2d  # no inplace: the float model is intact

    _run(BLOCKS["horizon.march.set_march(horizon.march.March.BAYES)"], namespace)
    qat_model = namespace["qat_model"]
    assert namespace["horizon"].march.get_march() == namespace["horizon"].march.March.BAYES
    qat_model.eval()
    namespace["horizon"].quantization.set_fake_quantize(
        qat_model, namespace["horizon"].quantization.FakeQuantState.CALIBRATION
    )
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        qat_model(x)
    namespace["horizon"].quantization.set_fake_quantize(
        qat_model, namespace["horizon"].quantization.FakeQuantState.VALIDATION
    )

    _run(BLOCKS["quantized_model = horizon.quantization.convert_fx(qat_model)"], namespace)
    quantized = namespace["quantized_model"]
    assert quantized(x).shape == (2, 4, 6, 6)


def test_rgb2centered_yuv_listing_matches_our_signature():
    from hq_lightning.functional import rgb2centered_yuv

    namespace, _ = _run("from torch import Tensor\n" + BLOCKS['def rgb2centered_yuv(input: Tensor, swing: str = "studio") -> Tensor:'])
    assert _params(namespace["rgb2centered_yuv"]) == _params(rgb2centered_yuv)


def test_centered_yuv2rgb_listing_with_a_body_matches_our_signature():
    from hq_lightning.functional import centered_yuv2rgb

    code = BLOCKS["def centered_yuv2rgb("].rstrip() + "\n    ...\n"
    prelude = "from typing import List, Union\nfrom torch import Tensor\nQTensor = Tensor\n"
    namespace, _ = _run(prelude + code)
    assert _params(namespace["centered_yuv2rgb"]) == _params(centered_yuv2rgb)


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_retinanet_class_compiles_with_the_missing_colon_and_wraps_post_process():
    code = BLOCKS["class RetinaNet(nn.Module):"]
    broken = "def _post_process(self, data, feat, cls_scores, bbox_preds)\n"
    assert code.count(broken) == 1, "the chapter's missing colon is gone: move RetinaNet to FRAGMENTS"
    prelude = "from typing import Dict, List, Optional\nimport torch\nfrom torch import nn\n"
    namespace, _ = _run(prelude + code.replace(broken, broken[:-1] + ":\n"))
    from hq_lightning.utils.fx_helper import is_wrapped_callable

    assert is_wrapped_callable(namespace["RetinaNet"]._post_process)


def test_fusion_pattern_listing_is_covered_by_our_table():
    """Every pattern the chapter registers parses, and every one that can occur is in our table.

    The chapter's loops pair every conv with every BN, including pairs no model can run (Conv2d's
    4-d output into BatchNorm1d, Linear into BatchNorm3d); ``BN_TYPES`` lists the pairs that can.
    """
    from hq_lightning.quantization.fx.patterns import (
        BN_TYPES,
        FUSION_PATTERNS,
        MatchAllNode,
        parse_pattern,
    )

    recorded = []

    def register_fusion_pattern(pattern):  # records instead of mutating the global table
        recorded.append(pattern)
        return lambda cls: cls

    namespace, _ = _run(BLOCKS["def register_fusion_patterns():"])
    namespace.update(
        register_fusion_pattern=register_fusion_pattern,
        MatchAllNode=MatchAllNode,
        ConvBNAddReLUFusion=object,
        ConvBNAddedReLUFusion=object,
    )
    namespace["register_fusion_patterns"]()
    assert any(operator.add in _flatten(p) for p in recorded)
    keys = {parse_pattern(p) for p in recorded}
    runnable = {k for k in keys if k[1] is None or k[1] in BN_TYPES[k[0]]}
    assert {k[0] for k in runnable} == {torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Conv3d, torch.nn.Linear}
    missing = sorted(map(str, runnable - set(FUSION_PATTERNS)))
    assert not missing, f"Expected every chapter pattern in FUSION_PATTERNS, but these are not: {missing}"


def _flatten(pattern) -> list:
    return [x for item in pattern for x in _flatten(item)] if isinstance(pattern, tuple) else [pattern]


def test_horizon_alias_reaches_every_subpackage_without_prior_imports():
    """``import hq_lightning as horizon`` alone must give ``horizon.quantization`` etc. (fresh process)."""
    code = (
        "import sys; import hq_lightning as horizon\n"
        "names = ['quantization', 'qconfig', 'march', 'functional', 'nn', 'utils']\n"
        "[getattr(horizon, n) for n in names]\n"
        "assert horizon.quantization.fuse_fx and horizon.qconfig.default_calib_8bit_fake_quant_qconfig\n"
        "assert 'lightning' not in sys.modules and 'hydra' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
