"""Every `python tools/X.py ...` command in the README's ```bash blocks is accepted by that
tool's argument parser as written, and every train.py command resolves to a valid Config (its
--config file exists and loads; its backbone, key=value overrides and values are valid). Running
them all is too slow for a test; this catches renamed or removed options, choices and configs,
which is how README commands usually break."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from ssd_da.config import resolve_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def readme_commands(text: str) -> list[list[str]]:
    """The tool commands of the ```bash blocks of a Markdown text, one argv per command, starting
    with "tools/X.py": continuation lines joined, comments removed, `cmd1 && cmd2` split, a
    `torchrun ... tools/train.py` prefix dropped. Other commands (pip, pytest) are left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                tools = [i for i, a in enumerate(argv) if re.fullmatch(r"tools/\w+\.py", a)]
                if tools and argv[0] in ("python", "torchrun"):
                    commands.append(argv[tools[0]:])
    return commands


def test_readme_commands_parser() -> None:
    text = """Intro.
```bash
pip install -e . && python tools/train.py --config a.yaml   # comment
torchrun --nproc_per_node 4 tools/train.py --backbone x \\
    --sync-bn
python -m pytest -q
```
```python
python tools/not_bash.py
```
"""
    assert readme_commands(text) == [["tools/train.py", "--config", "a.yaml"],
                                     ["tools/train.py", "--backbone", "x", "--sync-bn"]]


COMMANDS = readme_commands((REPO / "README.md").read_text())


def test_the_readme_has_commands_of_every_data_tool() -> None:
    tools = {argv[0] for argv in COMMANDS}
    assert {"tools/train.py", "tools/eval_voc.py", "tools/download_voc.py",
            "tools/voc_to_coco.py", "tools/ablate.py"} <= tools


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv)[:80])
def test_readme_command_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the README runs the tools from the repository root
    tool = importlib.import_module(Path(argv[0]).stem)  # tools/ is on the path: conftest.py
    try:
        args = tool.get_args_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed the reason on stderr
        pytest.fail(f"README command rejected by its parser (exit {exc.code}): {' '.join(argv)}")
    if argv[0] == "tools/train.py" and not args.resume:
        validate_config(resolve_config(args))  # loads --config; checks backbone, overrides, values
