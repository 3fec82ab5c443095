"""Every training command shown in README.md, docs/ and the tools' --help is a sensible run
(issue 10, point 14): its schedule draws no warning, i.e. its lr steps lie inside --iters (a
shortened schedule that kept a longer recipe's steps would never decay) and its warmup ends
before the first step."""
from __future__ import annotations

import importlib.util
import logging
import re
import shlex
from pathlib import Path

import pytest

from ssd_da.config import resolve_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("train.py", "ablate.py")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"doc_cmd_{name[:-3]}", ROOT / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(where, tool, arguments) of each tools/train.py or tools/ablate.py command in the docs,
    continuation lines joined and trailing comments dropped."""
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in
             [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for name in TOOLS:  # the usage examples of --help
        texts[f"tools/{name}"] = _tool(name).__doc__
    found = []
    for where, text in texts.items():
        text = text.replace("\\\\\n", " ").replace("\\\n", " ")
        for line in text.splitlines():
            match = re.search(r"tools/(train|ablate)\.py\b(.*)", line)
            if not match or not re.match(r"\s*(\S+=\S+\s+)*(python|torchrun)\b", line):
                continue  # prose that names a tool
            argv = shlex.split(match.group(2), comments=True)
            found.append((where, f"{match.group(1)}.py", argv))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_training_commands():
    tools = {tool for _, tool, _ in COMMANDS}
    assert tools == set(TOOLS) and len(COMMANDS) >= 15


@pytest.mark.parametrize("where, tool, argv", COMMANDS,
                         ids=[f"{w}:{' '.join(a)[:50]}" for w, _, a in COMMANDS])
def test_shown_command_has_a_sensible_schedule(where, tool, argv, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository
    args = _tool(tool).get_args_parser().parse_intermixed_args(argv)
    if getattr(args, "resume", None) or (args.config and not Path(args.config).exists()):
        pytest.skip("continues or reads a run that the command line does not define")
    cfg = resolve_config(args)
    with caplog.at_level(logging.WARNING, logger="ssd_da.config"):
        validate_config(cfg)
    assert not caplog.records, f"{where}: {' '.join(argv)}: {caplog.text}"
