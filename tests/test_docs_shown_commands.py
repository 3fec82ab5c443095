"""Every `python tools/X.py ...` command shown to users -- in README.md, in docs/*.md and in the
tools' own --help examples -- is accepted by that tool's argument parser as written; every
training command resolves to a valid Config (its --config file exists and loads; backbone,
key=value overrides and values are valid) whose schedule draws no warning: its lr steps lie
inside --iters (a shortened schedule that kept a longer recipe's steps would never decay) and
its warmup ends before the first step (issue 10, point 14). Running them all is too slow for a
test; this catches renamed or removed options, choices and configs, which is how documented
commands usually break."""
from __future__ import annotations

import ast
import importlib
import logging
import re
import shlex
from pathlib import Path

import pytest

from ssd_da.config import resolve_config
from ssd_da.config_checks import validate_config

ROOT = Path(__file__).resolve().parents[1]
TRAINING_TOOLS = ("train.py", "ablate.py")  # they take key=value overrides anywhere
# A line that runs a tool: optional VAR=value assignments, then python or torchrun.
_RUNS = re.compile(r"\s*(\S+=\S+\s+)*(python|torchrun)\b")


def commands_in(text: str) -> list[list[str]]:
    """The tool commands of a text, one argv per command starting with "tools/X.py":
    continuation lines joined, comments removed, `cmd1 && cmd2` split, a `torchrun ...` prefix
    dropped. Lines that do not start with python/torchrun (prose naming a tool, pip, pytest
    runs of other modules) are left out."""
    commands = []
    text = text.replace("\\\\\n", " ").replace("\\\n", " ")  # docstrings hold "\\" + newline
    for line in text.splitlines():
        for part in line.split("&&"):
            if not _RUNS.match(part) or not re.search(r"tools/\w+\.py\b", part):
                continue
            argv = shlex.split(part, comments=True)
            tools = [i for i, a in enumerate(argv) if re.fullmatch(r"tools/\w+\.py", a)]
            if tools:
                commands.append(argv[tools[0]:])
    return commands


def test_commands_in_by_hand() -> None:
    text = """Intro naming tools/train.py in prose, and `python tools/gradcam.py` inline.
```bash
pip install -e . && python tools/train.py --config a.yaml   # comment
torchrun --nproc_per_node 4 tools/train.py --backbone x \\
    --sync-bn
OMP_NUM_THREADS=1 python tools/eval_voc.py --checkpoint c.pth
python -m pytest -q
```
"""
    assert commands_in(text) == [["tools/train.py", "--config", "a.yaml"],
                                 ["tools/train.py", "--backbone", "x", "--sync-bn"],
                                 ["tools/eval_voc.py", "--checkpoint", "c.pth"]]


def _tool(script: str):
    """The module of ``tools/<name>.py``'s tool: ``ssd_da.cli.<name>``."""
    return importlib.import_module(f"ssd_da.cli.{Path(script).stem}")


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every tool command in README.md, docs/*.md, the scripts' docstrings and
    their tools' (the --help text)."""
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in
             [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for path in sorted((ROOT / "tools").glob("*.py")):
        texts[f"tools/{path.name}"] = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        texts[f"ssd_da/cli/{path.name}"] = _tool(path.name).__doc__ or ""
    return [(where, argv) for where, text in texts.items() for argv in commands_in(text)]


COMMANDS = shown_commands()


def test_every_tool_and_place_shows_commands() -> None:
    tools = {argv[0] for _, argv in COMMANDS}
    places = {where for where, _ in COMMANDS}
    every_tool = {"tools/train.py", "tools/eval_voc.py", "tools/gradcam.py", "tools/detect.py",
                  "tools/ablate.py", "tools/complexity.py", "tools/benchmark.py",
                  "tools/download_voc.py", "tools/voc_to_coco.py"}
    assert every_tool <= tools
    assert {"README.md", "docs/usage.md", "docs/experiments.md", "tools/train.py",
            "tools/ablate.py"} <= places
    # The tool reference (docs/usage.md) shows every tool at work, so each is parsed from there.
    assert every_tool <= {argv[0] for where, argv in COMMANDS if where == "docs/usage.md"}


@pytest.mark.parametrize("where, argv", COMMANDS,
                         ids=[f"{w}:{' '.join(a)[:60]}" for w, a in COMMANDS])
def test_shown_command_parses_and_trains_sensibly(where: str, argv: list[str], caplog,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the commands run from the repository root
    script = Path(argv[0]).name
    parser = _tool(script).get_args_parser()
    parse = parser.parse_intermixed_args if script in TRAINING_TOOLS else parser.parse_args
    try:
        args = parse(argv[1:])
    except SystemExit as exc:  # argparse printed the reason on stderr
        pytest.fail(f"{where}: command rejected by its parser (exit {exc.code}): {' '.join(argv)}")
    if script not in TRAINING_TOOLS or getattr(args, "resume", None):
        return
    if args.config and "<" in args.config:
        return  # a pattern (DIR/<backbone>/seed<k>/config.yaml), not a file to load
    cfg = resolve_config(args)
    with caplog.at_level(logging.WARNING, logger="ssd_da.config"):
        validate_config(cfg)
    assert not caplog.records, f"{where}: {' '.join(argv)}: {caplog.text}"
