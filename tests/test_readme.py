"""The README's first commands and its plugin-style example stay true."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_main_job_and_the_tests():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert first_block[0].split("#")[0].strip() == (
        "make venv && .venv/bin/python train.py +quant=qat march=bayes"
    )
    assert first_block[1].split("#")[0].strip() == "make test"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_plugin_style_example_runs(capsys):
    code = re.search(r"```python\n(import torch.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    quantized, qat = namespace["quantized"], namespace["qat"]
    x = namespace["batches"][1]
    # the converted model is integer inside and agrees with fake quant to about one output step
    # the fused conv-bn-relu is named after its last node (the ReLU, module "3")
    step = qat.get_submodule("3").activation_post_process.scale
    assert any(t.dtype == torch.int8 for t in _intermediates(quantized, x))
    assert (quantized(x) - qat(x)).abs().max() <= 2 * step
    assert "tensor(" in capsys.readouterr().out


def _intermediates(graph_module, x):
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out))
             for _, m in graph_module.named_children()]
    try:
        graph_module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [t for t in seen if isinstance(t, torch.Tensor)]


def _train_commands():
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            command = line.split("#")[0].split("&&")[-1].strip()
            if "train.py" in command:
                yield command


def test_readme_app_commands_run_in_the_venv_and_compose():
    import shlex

    from hydra import compose, initialize_config_dir

    from hq_lightning.app.overrides import check_override_keys, quote_path_overrides
    from hq_lightning.app.schema import register_configs
    from hq_lightning.cli import CONFIG_PATH

    register_configs()
    commands = list(_train_commands())
    assert len(commands) >= 8
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == [".venv/bin/python", "train.py"], command  # no bare `python`
        args = quote_path_overrides(words[2:])
        check_override_keys(args)
        if "-m" in args:
            continue  # a sweep's comma lists are for the launcher, not for compose
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            compose("config", overrides=args)
    assert 'pip install ".[mnist]"' not in README  # make venv installs it; this would replace -e


def test_docs_cite_only_files_in_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "semantics.md" not in text, path
        assert "the chapter" not in text.lower(), path
