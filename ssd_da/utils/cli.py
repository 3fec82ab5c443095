"""How every tool in tools/ reports bad input: one line ``<tool>: error: <message>`` on stderr
(argparse's own format, so option errors and ours look alike) and exit status 2; and the other
exit statuses of the tools. The package raises typed exceptions (``NonFiniteLossError``,
``Interrupted``, ``CheckpointWriteError``); only the tools turn them into these numbers."""
from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn

__all__ = ["EXIT_BAD_INPUT", "EXIT_NON_FINITE", "EXIT_WRITE_FAILED", "EXIT_INTERRUPTED",
           "EXIT_STOPPED_AT_ONCE", "report_error", "fail", "parse_names", "run_program"]

EXIT_BAD_INPUT = 2
# A non-finite loss or weights (NonFiniteLossError; the ablation runner reads it: a seed that
# diverges is a result, not a crash).
EXIT_NON_FINITE = 3
# A checkpoint could not be written for lack of space or a file-size limit (CheckpointWriteError;
# sysexits.h's EX_IOERR); the previous checkpoint is intact.
EXIT_WRITE_FAILED = 74
# Stopped by a signal after saving (Interrupted; sysexits.h's EX_TEMPFAIL, "temporary failure;
# the user is invited to retry"): the run continues when the printed command is run again.
EXIT_INTERRUPTED = 75
EXIT_STOPPED_AT_ONCE = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def report_error(tool: str, message: object) -> int:
    """Print ``tool: error: message`` on stderr; returns :data:`EXIT_BAD_INPUT` for ``main``."""
    print(f"{tool}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def fail(tool: str, message: object) -> NoReturn:
    """:func:`report_error`, then exit with status 2 (for checks deep inside a tool)."""
    raise SystemExit(report_error(tool, message))


def parse_names(text: str | None, option: str) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None (the option not given) -> None. A value naming
    nothing (``--classes ""``: an unset shell variable) is a ValueError, never the default."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise ValueError(f"{option} {text!r} names nothing (an unset shell variable?); give "
                         f"a,b,c, or leave the option out for its default")
    return names


def run_program(main: Callable[[], int], timestamps: bool = False,
                level: int = logging.INFO) -> NoReturn:
    """A tool run as a program (``tools/<tool>.py``, ``python -m ssd_da.cli.<tool>``): log
    records to stderr as ``[time] LEVEL logger: message`` from ``level`` up, then ``main()`` on
    the command line; exits with its status."""
    logging.basicConfig(level=level, format=("%(asctime)s " if timestamps else "")
                        + "%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
