"""attention_init="identity": every attention module starts as an exact identity (IdentityStart),
so an attention ResNet loaded with a plain ResNet's weights computes the plain ResNet's outputs."""
import pytest
import torch
from torch import nn

from ssd_da.models.attention import ATTENTIONS, IdentityStart, build_attention
from ssd_da.models.resnet import BasicBlock, ResNet, build_resnet
from ssd_da.models.ssd import build_ssd

MODULES = sorted(n for n in ATTENTIONS if n != "none")


class _Double(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.w * x


def test_identity_start_by_hand():
    # y = x + g * (m(x) - x) with m(x) = w x, w = 2. g = 0: y = x exactly.
    # dL/dg for L = sum(y) = sum(m(x) - x) = sum(x) (w = 2); dL/dw = g * sum(x) = 0.
    m = IdentityStart(_Double())
    assert m.gate.shape == () and m.gate.item() == 0.0
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]]).view(1, 1, 2, 2)
    y = m(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert m.gate.grad.item() == pytest.approx(2.5)  # 1 - 2 + 3 + 0.5
    assert m.module.w.grad.item() == 0.0
    with torch.no_grad():
        m.gate.fill_(0.5)  # y = x + 0.5 (2x - x) = 1.5 x
    torch.testing.assert_close(m(x), 1.5 * x, rtol=0, atol=0)


def test_build_attention_init_option():
    assert isinstance(build_attention("da", 64, init="identity"), IdentityStart)
    assert not isinstance(build_attention("da", 64), IdentityStart)
    assert isinstance(build_attention("none", 64, init="identity"), nn.Identity)  # no gate
    with pytest.raises(ValueError, match=r"unknown attention init 'zero'; valid: \['default', "
                                         r"'identity'\]"):
        build_attention("se", 64, init="zero")


def _perturbed_plain(seed: int) -> ResNet:
    torch.manual_seed(seed)
    plain = ResNet(BasicBlock, (1, 1, 1, 1), attention="none", num_classes=None)
    with torch.no_grad():  # BN weight 1 / bias 0 / stats 0, 1 would hide little; make them real
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return plain


@pytest.mark.parametrize("name", MODULES)
def test_identity_start_reproduces_the_plain_resnet_exactly(name):
    plain = _perturbed_plain(0)
    torch.manual_seed(1)
    # The module in every block and once more after layer4 (the end-of-backbone slot).
    model = ResNet(BasicBlock, (1, 1, 1, 1), attention=name, num_classes=None,
                   end_attention=name, attention_init="identity")
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing
    assert all(".attn." in k or k.startswith("end_attn.") for k in missing)
    gates = [m for m in model.modules() if isinstance(m, IdentityStart)]
    assert len(gates) == 5 and all(g.gate.item() == 0.0 for g in gates)
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        plain.train(train)
        model.train(train)
        with torch.no_grad():
            ours, ref = model.forward_features(x), plain.forward_features(x)
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (name, train, key)


def test_identity_start_adds_one_parameter_per_block():
    # DA-ResNet18: 11,689,672 (Table II) + 8 blocks x 1 gate; ResNet18 itself gets no gates.
    def count(name, **kw):
        return sum(p.numel() for p in build_resnet(name, **kw).parameters())
    assert count("da_resnet18", attention_init="identity") == 11_689_672 + 8
    assert count("resnet18", attention_init="identity") == 11_689_512
    assert count("se_resnet50", attention_init="identity") == 28_071_976 + 16


def test_identity_start_detector_equals_plain_then_moves():
    # The whole SSD300 on DA-ResNet18 with the plain detector's weights: the same outputs at step
    # 0. One SGD step moves only the gates among the attention parameters (the modules' own
    # parameters get zero gradient at gate 0), and afterwards the outputs differ.
    torch.manual_seed(0)
    plain = build_ssd("resnet18", 5).eval()
    model = build_ssd("da_resnet18", 5, attention_init="identity").eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".attn." in k for k in missing)
    x = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        ours, ref = model.head_outputs(x), plain.head_outputs(x)
    for key in ref:
        assert torch.equal(ours[key], ref[key])
    out = model.head_outputs(x)
    (out["cls_logits"].square().mean() + out["bbox_regression"].square().mean()).backward()
    attn = {k: p for k, p in model.named_parameters() if ".attn." in k}
    assert all((p.grad.abs().sum() > 0) == k.endswith(".gate") for k, p in attn.items()), \
        [k for k, p in attn.items() if (p.grad.abs().sum() > 0) != k.endswith(".gate")]
    with torch.no_grad():
        for p in attn.values():
            p -= 0.1 * p.grad
        moved = model.head_outputs(x)
    assert not torch.equal(moved["cls_logits"], ref["cls_logits"])


def test_attention_pretrained_file_loads_and_identity_start_warns(tmp_path, caplog):
    # A local file with attention weights (our key names) loads them with attention_init
    # "default"; with "identity" the modules live under attn.module.* and the loader says so.
    from ssd_da.models.pretrained import load_pretrained

    torch.manual_seed(0)
    source = build_resnet("se_resnet18", num_classes=None)
    path = tmp_path / "se18.pth"
    torch.save(source.state_dict(), path)
    model = build_resnet("se_resnet18", num_classes=None)
    report = load_pretrained(model, path)
    assert not [k for k in report.missing if not k.endswith("num_batches_tracked")]
    assert torch.equal(model.layer3[1].attn.fc1.weight, source.layer3[1].attn.fc1.weight)
    gated = build_resnet("se_resnet18", num_classes=None, attention_init="identity")
    with caplog.at_level("WARNING", logger="ssd_da.models.pretrained"):
        load_pretrained(gated, path)
    assert "attention_init='identity'" in caplog.text and str(path) in caplog.text


def _gates(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters() if k.endswith(".gate")]


def test_config_key_validated_and_passed_to_the_detector():
    from ssd_da.config import load_config
    from ssd_da.config_checks import validate_config
    from ssd_da.engine.setup import build_model

    cfg = load_config(None, ["backbone=da_resnet18", "pretrained=none",
                             "attention_init=identity"])
    validate_config(cfg)
    model, init = build_model(cfg, num_classes=3, device=torch.device("cpu"))
    # DA-ResNet18 has 8 residual blocks: 8 wrapped modules, 8 gates, each starting at 0.
    gates = _gates(model)
    assert len(gates) == 8 and init == "none"
    assert all(isinstance(b.attn, IdentityStart) for layer in ("layer1", "layer2", "layer3",
               "layer4") for b in getattr(model.backbone, layer))
    plain, _ = build_model(load_config(None, ["backbone=da_resnet18", "pretrained=none"]), 3,
                           torch.device("cpu"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) - count(plain) == 8 and not _gates(plain)
    with pytest.raises(ValueError, match="attention_init 'zero' is not one of: default, identity"):
        validate_config(load_config(None, ["attention_init=zero"]))


def test_load_detector_rebuilds_the_identity_start(tmp_path):
    # A checkpoint of an identity-start run holds gates: load_detector must rebuild the same
    # wrapped modules from the saved config, not the default ones (whose keys would not match).
    from ssd_da.engine.checkpoint import load_detector, save_checkpoint

    torch.manual_seed(0)
    model = build_ssd("se_resnet18", 3, attention_init="identity")
    with torch.no_grad():
        model.backbone.layer2[1].attn.gate.fill_(0.25)
    path = tmp_path / "last.pth"
    save_checkpoint({"model": model.state_dict(), "backbone": "se_resnet18",
                     "class_names": ["a", "b"], "config": {"attention_init": "identity"}}, path)
    loaded, _ = load_detector(path)
    assert loaded.backbone.layer2[1].attn.gate.item() == 0.25
    assert set(loaded.state_dict()) == set(model.state_dict())
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        assert torch.equal(loaded.head_outputs(x)["cls_logits"],
                           model.eval().head_outputs(x)["cls_logits"])
