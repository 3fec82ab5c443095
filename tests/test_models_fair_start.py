"""attention_init's default, "auto": on a pretrained trunk every attention module starts as the
identity, so each attention ResNet18 computes exactly plain ResNet18's feature maps at step 0;
from scratch each module keeps its own init. An explicit value (YAML, key=value, --attention-init)
wins, and a resumed run keeps the value its config recorded."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from ssd_da.cli import train as train_tool
import yaml
from torch import nn

from ssd_da.config import load_config, resolve_attention_init, resolve_config
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.engine.setup import build_model
from ssd_da.models.attention import IdentityStart
from ssd_da.models.names import BACKBONE_NAMES, parse_backbone_name
from ssd_da.models.resnet import backbone_features

# Every attention ResNet18: one module per block (<module>_resnet18) or one after layer4
# (resnet18_<module>).
ATTENTION_RESNET18 = [n for n in BACKBONE_NAMES
                      if parse_backbone_name(n).depth == 18 and n != "resnet18"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A torchvision ResNet18 classifier state dict written to a file, with BatchNorm weights
    and statistics away from 1/0 so that a perturbed branch could not hide; and that ResNet18,
    the reference."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "resnet18_plain.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.eval()


def _gated(model: nn.Module) -> list[IdentityStart]:
    return [m for m in model.modules() if isinstance(m, IdentityStart)]


@pytest.mark.parametrize("name", ATTENTION_RESNET18)
def test_pretrained_trunk_starts_as_plain_resnet18(name, plain_weights):
    path, reference = plain_weights
    reference = copy.deepcopy(reference)  # training mode below updates its BN statistics
    cfg = load_config(None, [f"backbone={name}", f"pretrained={path}"])  # attention_init not given
    assert cfg.attention_init == "auto"
    assert resolve_attention_init(cfg).attention_init == "identity"
    torch.manual_seed(1)
    model, init = build_model(cfg, num_classes=3, device=CPU)
    assert init == str(path)
    attention, _, end = parse_backbone_name(name)
    assert len(_gated(model)) == (8 if attention != "none" else 0) + (end != "none")
    x = torch.randn(2, 3, 96, 96)
    for train in (False, True):  # BN with running statistics, then with batch statistics
        model.backbone.train(train)
        reference.train(train)
        with torch.no_grad():
            ours, ref = model.backbone.forward_features(x), backbone_features(reference, x)
        for key in ("layer2", "layer3", "layer4"):
            assert torch.equal(ours[key], ref[key]), (name, train, key)


@pytest.mark.parametrize("name", ["sa_resnet18", "resnet18_mhsa", "da_resnet18"])
def test_explicit_default_keeps_the_module_perturbing_the_trunk(name, plain_weights):
    # The reason for the default: with each module's own init on the same weights, the
    # features differ from the plain ResNet's (SA shuffles channels, MHSA has no residual).
    path, reference = plain_weights
    cfg = load_config(None, [f"backbone={name}", f"pretrained={path}", "attention_init=default"])
    model, _ = build_model(cfg, num_classes=3, device=CPU)
    assert not _gated(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ours = model.backbone.eval().forward_features(x)["layer4"]
        ref = backbone_features(reference, x)["layer4"]
    assert not torch.allclose(ours, ref, atol=1e-3)


@pytest.mark.parametrize("pretrained", ["none", "None", "scratch", ""])
def test_from_scratch_each_module_keeps_its_own_init(pretrained):
    cfg = load_config(None, ["backbone=se_resnet18", f"pretrained={pretrained!r}"])
    assert resolve_attention_init(cfg).attention_init == "default"
    model, init = build_model(cfg, num_classes=3, device=CPU)
    assert init == "none" and not _gated(model)


def test_a_torchvision_weights_name_resolves_to_identity():
    # No download: the resolution reads the setting only.
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"):
        assert resolve_attention_init(load_config(None, [f"pretrained={name}"])).attention_init \
            == "identity"
    assert load_config(None, []).attention_init == "auto"  # the default: pretrained IMAGENET1K_V1


def test_explicit_value_wins_in_yaml_key_value_and_option(tmp_path):
    yaml_default = tmp_path / "default.yaml"
    yaml_default.write_text("attention_init: default\n")
    parse = train_tool.parse_args
    cases = [
        ([], "identity"),  # nothing given: auto, pretrained IMAGENET1K_V1
        (["--pretrained", "none"], "default"),
        (["--config", str(yaml_default)], "default"),
        (["attention_init=default"], "default"),
        (["--attention-init", "default"], "default"),
        (["--pretrained", "none", "attention_init=identity"], "identity"),
        (["--config", str(yaml_default), "attention_init=identity"], "identity"),  # key=value > YAML
        (["attention_init=identity", "--attention-init", "default"], "default"),  # option > key=value
        (["attention_init=auto", "--pretrained", "none"], "default"),
    ]
    for argv, expected in cases:
        cfg = resolve_config(parse(argv))
        assert resolve_attention_init(cfg).attention_init == expected, argv


def test_resume_keeps_the_recorded_value(tmp_path):
    # The checkpoint's config decides, unless this command line names a value.
    recorded = load_config(None, ["attention_init=default"]).to_dict()  # pretrained IMAGENET1K_V1
    older = {k: v for k, v in recorded.items() if k != "attention_init"}  # saved before the key
    yaml_plain = tmp_path / "plain.yaml"
    yaml_plain.write_text("lr: 0.002\n")
    cases = [
        (recorded, [], "default"),
        (older, [], "default"),  # such runs started each module its own way
        (recorded, ["--config", str(yaml_plain)], "default"),
        ({**recorded, "attention_init": "identity"}, ["--pretrained", "none"], "identity"),
        (recorded, ["attention_init=identity"], "identity"),
    ]
    for saved, argv, expected in cases:
        args = train_tool.parse_args(["--resume", "last.pth", *argv])
        assert resolve_config(args, saved).attention_init == expected, (argv, saved is older)


def test_validate_lists_auto():
    from ssd_da.config_checks import validate_config

    with pytest.raises(ValueError, match="attention_init 'zero' is not one of: default, "
                                         "identity, auto"):
        validate_config(load_config(None, ["attention_init=zero"]))


@pytest.mark.slow
def test_training_records_the_resolved_value(tiny_devkit, tmp_path, plain_weights):
    from ssd_da.engine.checkpoint import load_checkpoint
    from ssd_da.engine.trainer import train

    path, _ = plain_weights
    items = {"demo": False, "data_root": str(tiny_devkit), "train_split": "voc07_trainval",
             "test_split": "voc07_test", "backbone": "resnet18_sa", "pretrained": str(path),
             "batch_size": 2, "iters": 2, "lr_steps": [1], "warmup_iters": 0, "eval_every": 0,
             "workers": 0, "eval_batch_size": 4, "output_dir": str(tmp_path / "run"),
             "classes": list(DEMO_CLASSES)}
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["attention_init"] == "identity"
    assert load_checkpoint(tmp_path / "run" / "last.pth")["config"]["attention_init"] == "identity"
