"""tools/benchmark.py subcommands run on the CPU with tiny sizes, so that they cannot rot; the
figures themselves go to docs/benchmarks.md, never into assertions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ssd_da.data.demo import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import benchmark  # noqa: E402


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench_demo")
    ensure_demo_dataset(root, num_train=6, num_test=4, seed=2)
    return root / "VOCdevkit"


def _run(argv: list[str], doc: Path) -> str:
    args = benchmark.get_args_parser().parse_args(["--doc", str(doc), *argv])
    benchmark.main(args)
    return doc.read_text()


def test_loader_table_has_every_pipeline(devkit: Path, tmp_path: Path) -> None:
    text = _run(["loader", "--data-root", str(devkit), "--resize", "80x60", "--images", "4", "--repeats", "1"],
                tmp_path / "b.md")
    section = text.split("<!-- benchmark:loader -->")[1].split("<!-- /benchmark:loader -->")[0]
    for name in ("albumentations", "fast", "fast-uint8", "torchvision-v2", "decode-floor"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        rates = [float(cell) for cell in row.strip("|").split("|")[-2:]]
        assert all(rate > 0 for rate in rates), row
    assert "4 images of" in section and "80x60" in section


def test_memory_table_shows_the_saving(tmp_path: Path) -> None:
    text = _run(["memory", "--modules", "da,se", "--backbones", ""], tmp_path / "b.md")
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in text.splitlines()
            if line.startswith("| da |") or line.startswith("| se |")}
    before, after = (float(v) for v in rows["da"])
    assert before > 1.9 and after < 1.1  # DA: x and x * s before, x alone now
    assert [float(v) for v in rows["se"]] == pytest.approx([1.0, 1.0], abs=0.01)
