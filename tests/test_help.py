"""Every console script's help: fast (no torch import for --help), every option documented with
its default, --version, the same dtype choices everywhere."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bagel import __version__

TOOLS = ("app", "chat", "data", "distill", "eval", "generate", "lora", "parity", "rl", "train")


def parser_of(tool: str) -> argparse.ArgumentParser:
    import importlib

    module = importlib.import_module(f"bagel.cli.{tool}")
    build = getattr(module, "build_parser", None) or getattr(module, "_parser", None)
    if build is None:  # bagel-parity builds its parser inside main: read it from --help instead
        pytest.skip("no parser builder")
    return build()


def test_help_does_not_import_torch():
    """--help must answer in well under half a second: no torch (1.5 s) behind any tool's parser."""
    code = ("import sys\n"
            f"for tool in {TOOLS!r}:\n"
            "    m = __import__(f'bagel.cli.{tool}', fromlist=['x'])\n"
            "    try:\n"
            "        m.main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'gradio', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("tool", TOOLS)
def test_version(tool, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"bagel.cli.{tool}").main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bagel-{tool} {__version__}"


@pytest.mark.parametrize("tool", [t for t in TOOLS if t != "parity"])
def test_every_option_documented_with_its_default(tool):
    parser = parser_of(tool)
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    for p in parsers:
        text = p.format_help()
        assert "`" not in text, f"{p.prog}: literal backticks in --help"
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{p.prog} {action.option_strings[0]} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS, []) and not isinstance(action.default, bool):
                assert "default" in p._get_formatter()._format_action(action), \
                    f"{p.prog} {action.option_strings[0]}: default {action.default!r} not shown"


def test_dtype_choices_are_the_same_everywhere():
    from bagel.config import DTYPE_NAMES

    for tool in ("app", "chat", "eval", "generate"):
        dtype = next(a for a in parser_of(tool)._actions if "--dtype" in a.option_strings)
        assert tuple(dtype.choices) == DTYPE_NAMES, tool


def test_eval_task_names_match_the_eval_modules():
    from bagel.cli.eval import PROTOCOLS, TASKS
    from eval import digits, geneval, items, runner

    assert sorted(TASKS) == sorted([*runner.TASKS, geneval.TASK, digits.TASK])
    assert tuple(PROTOCOLS) == tuple(items.PROTOCOLS)


def test_allocator_setting_is_applied_and_can_be_turned_off(monkeypatch):
    import sys as _sys

    from bagel.cli.common import tune_allocator

    if not _sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    monkeypatch.setenv("BAGEL_MALLOC", "default")
    assert tune_allocator() is False
    monkeypatch.delenv("BAGEL_MALLOC")
    assert tune_allocator() is True
