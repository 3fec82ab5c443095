"""The YAML files in configs/: they load, name no path outside the repository, and the bundled
BCCD config works from a plain clone (run from the repository root, as the README does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ssd_da.config import load_config
from ssd_da.data.voc import VOCDetection, resolve_split
from ssd_da.engine.loaders import class_names_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# Paths a config may name that are not in a clone: folders the tools create or fill themselves.
GENERATED_ROOTS = {"data", "runs"}


def _outside_paths(text: str) -> list[str]:
    """Path-like tokens of a YAML text (values and comments) that leave the repository: absolute
    ("/x", "C:\\x"), home-relative ("~/x") or climbing out with "..". A token is path-like when it
    holds a slash or backslash and a name character."""
    bad = []
    for token in re.findall(r"[^\s\"'(),;\[\]{}]+", text):
        if ("/" not in token and "\\" not in token) or not re.search(r"[\w.~]", token):
            continue  # no separator, or a lone "/" of prose ("292 / 72")
        path = token.replace("\\", "/").rstrip(".:")
        if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:/", path) or ".." in path.split("/"):
            bad.append(token)
    return bad


def test_outside_paths_detector() -> None:
    # A config pointing beside the repository (as bccd.yaml once did) must be caught.
    assert _outside_paths("data_root: ../other/data/bccd/VOCdevkit") == ["../other/data/bccd/VOCdevkit"]
    assert _outside_paths("# data in /srv/data, or ~/voc") == ["/srv/data", "~/voc"]
    assert _outside_paths("pretrained: C:\\weights\\r50.pth") == ["C:\\weights\\r50.pth"]
    assert _outside_paths("data_root: datasets/a/../../b") == ["datasets/a/../../b"]
    assert _outside_paths("data_root: datasets/bccd/VOCdevkit  # 640x480, a/b, 292 / 72\nlr: 1e-3") == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_no_path_outside_the_repository(path: Path) -> None:
    text = path.read_text()
    assert _outside_paths(text) == [], f"{path.name} names paths outside the repository"
    load_config(path)  # and it is a valid config
    data = yaml.safe_load(text) or {}
    for key, value in data.items():
        if isinstance(value, str) and "/" in value:
            resolved = (REPO / value).resolve()
            assert resolved.is_relative_to(REPO), f"{path.name}: {key}={value!r} leaves the repository"
            top = Path(value).parts[0]
            # Anything not created by the tools (data/, runs/) must be in the clone already.
            assert top in GENERATED_ROOTS or resolved.exists(), f"{path.name}: {key}={value!r} does not exist"


def test_bccd_config_works_from_a_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the README runs the tools from the repository root
    cfg = load_config("configs/bccd.yaml")
    names = class_names_from_config(cfg)
    assert names == ["RBC", "WBC", "Platelets"]
    train = VOCDetection(cfg.data_root, cfg.train_split, names)
    test = VOCDetection(cfg.data_root, cfg.test_split, names)
    assert (len(train), len(test)) == (292, 72)
    # The licence travels with the data.
    assert "MIT License" in (REPO / "datasets/bccd/LICENSE").read_text()


def test_relative_data_root_error_names_the_current_directory(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"datasets/bccd/VOCdevkit not found under the current "
                                                r"directory .*run it from the repository root"):
        resolve_split("datasets/bccd/VOCdevkit", "voc07_test")
