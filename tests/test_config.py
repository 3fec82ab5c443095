"""Config (ssd_da/config.py): ssd.pytorch/lufficc defaults, YAML + key=value precedence, clear
errors; and the YAML files in configs/: they load, name no path outside the repository, and the
bundled BCCD config works from a plain clone (run from the repository root, as the README does)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ssd_da.cli import eval_voc as eval_tool
from ssd_da.cli import train as train_tool
from ssd_da.config import Config, load_config
from ssd_da.data.voc import VOCDetection, resolve_split
from ssd_da.engine.loaders import class_names_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# Paths a config may name that are not in a clone: folders the tools create or fill themselves.
GENERATED_ROOTS = {"data", "runs"}


def test_defaults_are_the_ssd_pytorch_lufficc_voc0712_recipe():
    # The DA paper states no recipe; these are ssd.pytorch's/lufficc's VOC0712 values, with
    # lufficc's warmup (500 iterations from lr/3).
    cfg = Config()
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (32, 1e-3, 0.9, 5e-4)
    assert (cfg.iters, cfg.lr_steps, cfg.lr_gamma) == (120_000, [80_000, 100_000], 0.1)
    assert cfg.train_split == "voc07_trainval+voc12_trainval" and cfg.test_split == "voc07_test"
    assert cfg.metric == "voc07" and not hasattr(cfg, "image_size")  # a constant: SSD300
    assert (cfg.warmup_iters, cfg.warmup_factor) == (500, 1.0 / 3.0)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lr: 0.01\niters: 50\nclasses: [a, b]\n")
    cfg = load_config(path, ["iters=70", "lr_steps=[10,20]", "amp=true", "classes=c,d"])
    assert cfg.lr == 0.01 and cfg.iters == 70 and cfg.lr_steps == [10, 20] and cfg.amp is True
    assert cfg.classes == ["c", "d"]
    assert load_config(None, ["lr=1"]).lr == 1.0 and isinstance(load_config(None, ["lr=1"]).lr, float)


@pytest.mark.parametrize("items, message", [
    (["learning_rate=0.1"], "unknown config key 'learning_rate'.*valid keys:.*lr"),
    (["iters=many"], "'iters' must be int"),
    (["amp=maybe"], "'amp' must be true or false"),
    (["lr"], "key=value"),
])
def test_bad_overrides_are_clear(items, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, items)


def test_voc0712_yaml_is_the_defaults():
    # Every file in configs/ loads: test_config_names_no_path_outside_the_repository loads each.
    assert load_config(REPO / "configs/voc0712.yaml") == Config()


def test_retired_image_size_key(tmp_path):
    """Configs saved before image_size became a constant still load (resume, ablation reuse);
    any other value than SSD300's 300 is an error that says why."""
    assert load_config(None, ["image_size=300"]) == Config()
    with pytest.raises(ValueError, match="image_size is fixed at 300"):
        load_config(None, ["image_size=512"])


def test_yaml_floats_without_dot_and_syntax_errors(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-4\n")  # YAML 1.1 reads these as strings
    cfg = load_config(path, ["momentum=9e-1"])
    assert (cfg.lr, cfg.weight_decay, cfg.momentum) == (1e-3, 5e-4, 0.9)
    path.write_text("lr: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(None, ["lr_steps=[1"])


# ---------------------------------------- the files in configs/
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


def test_empty_classes_is_an_error_not_the_voc_classes(tmp_path, capsys):
    """Before: --classes "" (an unset shell variable) meant the 20 VOC classes."""
    with pytest.raises(ValueError, match="'classes' is empty"):
        load_config(None, ["classes="])
    code = train_tool.main(["--classes", "", "--output-dir", str(tmp_path / "r")])
    assert code == 2 and "'classes' is empty (an unset shell variable?)" in capsys.readouterr().err
    args = eval_tool.get_args_parser().parse_args(["--detections", "d.json", "--classes", " , "])
    assert eval_tool.run(args) == 2
    assert "--classes ' , ' names nothing" in capsys.readouterr().err
    assert load_config(None, ["classes=voc"]).classes is None  # the explicit word still works


def test_a_key_given_twice_in_a_config_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\niters: 100\nlr: 0.001\n")
    with pytest.raises(ValueError, match=r"key 'lr' is given twice \(lines 1 and 3\)"):
        load_config(path)
