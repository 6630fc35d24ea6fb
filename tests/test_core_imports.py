"""The core package stays light: no Lightning, Hydra, OmegaConf or torch.ao.quantization imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import json, sys
import torch
baseline = set(sys.modules)  # this torch build already imports torch.ao.quantization itself
import hq_lightning, hq_lightning.quantization, hq_lightning.qconfig
from hq_lightning.quantization import (FakeQuantize, FakeQuantState, QConfig, QuantStub,
    MSEObserver, set_fake_quantize)
from hq_lightning.march import get_march
added = sorted(set(sys.modules) - baseline)
files = sorted({m.__file__ for n, m in list(sys.modules.items())
                if n.startswith("hq_lightning") and getattr(m, "__file__", None)})
print(json.dumps({"added": added, "files": files, "march": get_march().value}))
"""

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
FORBIDDEN_TORCH = ("torch.ao.quantization", "torch.quantization")


def _imports(path):
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_importing_core_pulls_in_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["march"] == "bayes"  # default march
    for name in report["added"]:
        assert name.split(".")[0] not in FORBIDDEN, name
        assert not name.startswith(FORBIDDEN_TORCH), name
    # and no module it loaded names them in an import statement (torch.ao is loaded by torch
    # itself here, so the static check is what proves we never import it)
    for path in report["files"]:
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN, f"{path} imports {name}"
            assert not name.startswith(FORBIDDEN_TORCH), f"{path} imports {name}"


def _documented_modules() -> list[str]:
    import pkgutil

    import hq_lightning

    names = [info.name for info in pkgutil.walk_packages(hq_lightning.__path__, "hq_lightning.")]
    return sorted(n for n in names if not n.endswith("__main__"))


@pytest.mark.parametrize("name", _documented_modules())
def test_docstring_examples_run(name):
    """Every module's docstring examples run as written (Google docstrings with examples)."""
    import doctest
    import importlib

    from hq_lightning.march import get_march, set_march

    before = get_march()
    try:
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    finally:
        set_march(before)
    if result.failed:
        pytest.fail(f"{result.failed} docstring example(s) failed in {name}")
