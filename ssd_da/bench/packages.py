"""What ``tools/benchmark.py gpu-suite`` needs beyond torch, checked before anything imports it.

Standard library only: ``tools/benchmark.py`` runs :func:`check_suite_packages` before it imports
the benchmarks, so a bare GPU machine is told every package it lacks at once instead of meeting the
first one as a traceback (issue 20: cv2, imported through ssd_da/data/decode.py, did that).
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["SUITE_PACKAGES", "missing_packages", "check_suite_packages"]

# (module to import, package to install): everything the suite imports beyond torch. grad-cam
# (the smoke part's Grad-CAM) imports scikit-learn, scipy, matplotlib and ttach in turn.
SUITE_PACKAGES: tuple[tuple[str, str], ...] = (
    ("torchvision", "torchvision"), ("numpy", "numpy"), ("cv2", "opencv-python-headless"),
    ("PIL", "pillow"), ("albumentations", "albumentations"), ("pycocotools", "pycocotools"),
    ("yaml", "pyyaml"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("pytorch_grad_cam", "grad-cam"))


def missing_packages(packages: tuple[tuple[str, str], ...] = SUITE_PACKAGES) -> list[str]:
    """``"package (the import error)"`` for each module of ``packages`` that does not import."""
    missing = []
    for module, package in packages:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{package} ({exc})")
    return missing


def check_suite_packages(tool: str = "benchmark.py",
                         packages: tuple[tuple[str, str], ...] = SUITE_PACKAGES) -> None:
    """Exit with status 2 and ``<tool>: error: gpu-suite needs ...`` on stderr when a package is
    missing (the format of ``ssd_da.utils.cli.fail``, which this must not import)."""
    missing = missing_packages(packages)
    if missing:
        print(f"{tool}: error: gpu-suite needs {', '.join(missing)}; install them (`pip install -r "
              f"requirements.txt`; offline, see docs/benchmarks.md, 'gpu-suite') and run again",
              file=sys.stderr)
        raise SystemExit(2)
