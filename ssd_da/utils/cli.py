"""How every tool in tools/ reports bad input: one line ``<tool>: error: <message>`` on stderr
(argparse's own format, so option errors and ours look alike) and exit status 2."""
from __future__ import annotations

import sys
from typing import NoReturn

__all__ = ["EXIT_BAD_INPUT", "report_error", "fail"]

EXIT_BAD_INPUT = 2


def report_error(tool: str, message: object) -> int:
    """Print ``tool: error: message`` on stderr; returns :data:`EXIT_BAD_INPUT` for ``main``."""
    print(f"{tool}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def fail(tool: str, message: object) -> NoReturn:
    """:func:`report_error`, then exit with status 2 (for checks deep inside a tool)."""
    raise SystemExit(report_error(tool, message))
