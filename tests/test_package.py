"""The package and the command as a newcomer meets them: top-level exports, Auto
registration after `import modformer`, a light CLI start-up, `python -m modformer`,
`--version`, and help text on every option."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import modformer
from modformer.cli import build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout's modformer."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


# ---- defect 8: every public config and model class at the top level -----------------------


def test_top_level_exports_every_config_and_model_class():
    from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTModel
    from modformer.models.moduleformer import (
        ModuleFormerConfig,
        ModuleFormerForCausalLM,
        ModuleFormerModel,
    )
    from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMModel

    expected = {
        "GPTConfig": GPTConfig,
        "GPTModel": GPTModel,
        "GPTForCausalLM": GPTForCausalLM,
        "MoMConfig": MoMConfig,
        "MoMModel": MoMModel,
        "MoMForCausalLM": MoMForCausalLM,
        "ModuleFormerConfig": ModuleFormerConfig,
        "ModuleFormerModel": ModuleFormerModel,
        "ModuleFormerForCausalLM": ModuleFormerForCausalLM,
    }
    for name, cls in expected.items():
        assert getattr(modformer, name) is cls
        assert name in modformer.__all__ and name in dir(modformer)
    from modformer import MoMConfig as Top  # the import the issue reports failing

    assert Top is MoMConfig
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        modformer.NoSuchThing  # noqa: B018


# ---- defect 10: `import modformer` and the parser are light; registration still happens --


def test_building_the_whole_parser_imports_neither_torch_nor_transformers():
    code = (
        "import sys, modformer.cli\n"
        "modformer.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("order", ["modformer first", "transformers first"])
def test_import_modformer_registers_the_auto_classes(tmp_path, order):
    from modformer.models.mom import MoMConfig, MoMForCausalLM

    config = MoMConfig.from_preset("tiny", vocab_size=64, n_positions=32)
    MoMForCausalLM(config).save_pretrained(tmp_path / "mom")
    imports = (
        "import modformer\nfrom transformers import AutoModelForCausalLM\n"
        if order == "modformer first"
        else "from transformers import AutoModelForCausalLM\nimport modformer\n"
    )
    code = imports + (
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'mom')!r})\n"
        "print(type(model).__name__)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MoMForCausalLM"


def test_lazy_package_exports_resolve_like_before():
    from modformer.data import prepare
    from modformer.data.prepare import prepare as prepare_function
    from modformer.surgery import prune_model
    from modformer.surgery.prune import prune_model as prune_function

    assert prepare is prepare_function and prune_model is prune_function


# ---- defect 6: `python -m modformer` and --version -------------------------------------


def test_version_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"modformer {modformer.__version__}"


def test_python_dash_m_modformer_runs_the_cli():
    result = _python("", "-m", "modformer", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"modformer {modformer.__version__}"
    result = _python("", "-m", "modformer", "plot-curves", "--help")
    assert result.returncode == 0 and "--out" in result.stdout


# ---- defect 9: every option of every subcommand has help text ----------------------------


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_of_every_subcommand_has_help():
    missing = []
    seen = 0
    for path, action in _walk(build_parser(), "modformer"):
        seen += 1
        name = "/".join(action.option_strings) or action.dest
        text = (action.help or "").strip()
        # A bare "(default: X)" says nothing about what the option does.
        if action.help == argparse.SUPPRESS:
            continue
        if not text or text.startswith("(default"):
            missing.append(f"{path} {name}")
    assert seen > 150  # the walk reached every subcommand
    assert not missing, "options without help text: " + ", ".join(missing)


def test_cli_choices_are_the_librarys():
    """The help's choices are the library's own constants (modformer.defaults), not copies."""
    from modformer import cli_args, defaults
    from modformer.models.flops import ATTENTION_MODES

    assert cli_args.ATTENTION_MODES is defaults.ATTENTION_MODES is ATTENTION_MODES
