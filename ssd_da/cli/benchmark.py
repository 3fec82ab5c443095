"""Benchmarks of ssd_da, one subcommand each; results go to a section of docs/benchmarks.md.

    python tools/benchmark.py metric            # evaluate_voc on 5,000 images x 20 classes
    python tools/benchmark.py model --amp       # SSD300 train/inference images/s, peak memory
    python tools/benchmark.py loader            # CPU data pipeline images/s per core
    python tools/benchmark.py memory            # bytes saved for backward per attention module
    python tools/benchmark.py train             # training images/s: ours vs torchvision, e2e
    python tools/benchmark.py eval              # inference images/s, VOC07-test-sized evaluation
    python tools/benchmark.py gpu-suite         # the whole GPU measurement, under 8 minutes
    python tools/benchmark.py modules           # each attention module's cost per training step
    python tools/benchmark.py modules --stages --before --step   # against their floors (issue 24)

To add a benchmark: a module in ssd_da/bench/ with ``run_<name>(args) -> str`` returning the
Markdown body of its section (the timing core, ssd_da/bench/core.py, gives the device lines, the
synthetic batch and the timing loop) and ``register(sub)`` adding its subcommand with
``set_defaults(func=run_<name>)``, listed in ``BENCHMARKS`` here; :func:`main` writes the section
between ``<!-- benchmark:<name> -->`` markers, replacing that section's previous result.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from ssd_da.bench.packages import check_suite_packages
from ssd_da.utils.cli import fail

# The modules of ssd_da/bench/ that add subcommands, in the order --help lists them. They are
# imported by get_args_parser, not here: ``gpu-suite`` checks its packages first (:func:`script`).
BENCHMARKS = ("metric", "train_eval", "loader", "memory", "suite", "modules")


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) the section of benchmark ``name`` in the Markdown file ``doc``."""
    begin, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else (
        "# Benchmarks\n\nWritten by `tools/benchmark.py <name>`; each section holds the latest "
        "run of one benchmark. Re-run a benchmark to update its section.\n")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def get_args_parser() -> argparse.ArgumentParser:
    from ssd_da.bench.core import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                        help="Markdown file to write the result section to")
    parser.add_argument("--no-write", action="store_true", help="print only, leave --doc alone")
    sub = parser.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        importlib.import_module(f"ssd_da.bench.{name}").register(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and write (or, with --no-write, print) its section. Returns the exit
    status: 0, or what the benchmark set in ``args.exit_status`` (gpu-suite: 1 unless every part
    ran and passed). A benchmark with parts may write its section as each ends, through
    ``args.write_partial``."""
    args.write_partial = None if args.no_write else (lambda body: write_section(args.doc, args.name, body))
    try:
        body = args.func(args)
    except ModuleNotFoundError as exc:  # a bare GPU machine: name the package, no traceback
        fail("benchmark.py", f"{args.name} needs the package {exc.name!r}, not installed here "
                             f"(`pip install -r requirements.txt`)")
    if args.no_write:
        print(body)
    else:
        section = getattr(args, "section", args.name)  # a subcommand may write another section
        write_section(args.doc, section, body)
        print(f"wrote section {section!r} of {args.doc}")
    return getattr(args, "exit_status", 0)


def main(argv: list[str] | None = None) -> int:
    """The command line ``argv`` (default: ``sys.argv[1:]``) parsed and run; the exit status."""
    return run(get_args_parser().parse_args(argv))


def script() -> None:
    """The program: for gpu-suite, first the packages it needs (a bare GPU machine is told every
    one it lacks, not shown the traceback of the first import, issue 20); then :func:`main`."""
    if "gpu-suite" in sys.argv[1:]:
        check_suite_packages("benchmark.py")
    sys.exit(main())


if __name__ == "__main__":
    script()
