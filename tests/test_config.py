"""Config: ssd.pytorch/lufficc defaults, YAML + key=value precedence, clear errors."""
from __future__ import annotations

import pytest

from ssd_da.config import Config, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


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


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
    assert load_config(ROOT / "configs/voc0712.yaml") == Config()


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
