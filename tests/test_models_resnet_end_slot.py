"""The end-of-backbone attention slot (``end_attn``, after layer4; the LGA paper's placement):
parameter counts, torchvision weights, and SSD300 taking layer4's map from after the module."""
import pytest
import torch
import torchvision

from ssd_da.models.pretrained import load_pretrained
from ssd_da.models.resnet import STAGES, ResNet
from ssd_da.models.ssd import SSD300

PLAIN18 = 11_689_512  # torchvision resnet18 (classifier)
LGA512 = 1_674_246    # LGA at 512 channels, 8 heads (tests/test_models_lga.py derives it)


def _resnet(depth: int, end: str, num_classes: int | None = 1000, **kw) -> ResNet:
    block, layers = STAGES[depth]
    return ResNet(block, layers, num_classes=num_classes, end_attention=end, **kw)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_add_one_module():
    with torch.device("meta"):
        assert _count(_resnet(18, "lga")) == PLAIN18 + LGA512
        assert _count(_resnet(18, "se")) == PLAIN18 + 2 * 512 * 32   # one SE at 512 channels
        assert _count(_resnet(18, "mhsa")) == PLAIN18 + 3 * (512 * 512 + 512)
        assert _count(_resnet(18, "sa")) == PLAIN18 + 24
        assert _count(_resnet(18, "none")) == PLAIN18
        assert _count(_resnet(50, "eca")) == 25_557_032 + 7  # k = 7 at 2048 channels


def test_default_heads_follow_the_width():
    with torch.device("meta"):
        assert _resnet(18, "lga").end_attn.heads == 8
        assert _resnet(50, "lga", num_classes=None).end_attn.heads == 32
        assert _resnet(18, "lga", end_attn_kwargs={"heads": 4}).end_attn.heads == 4


def test_torchvision_weights_load_with_only_end_keys_missing(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = _resnet(18, "lga", num_classes=None)
    report = load_pretrained(model, path)
    end_keys = sorted(k for k in model.state_dict() if k.startswith("end_attn."))
    assert report.missing == end_keys and len(end_keys) > 20
    assert report.unexpected == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_end_module_keeps_its_own_init():
    torch.manual_seed(0)
    model = _resnet(18, "lga", num_classes=None)
    assert torch.all(model.end_attn.alpha_local == 0.5)  # not touched by the ResNet init
    bias = model.end_attn.out.bias  # ResNet init would leave convs bias-free / Kaiming: PyTorch's
    assert bias is not None and bias.abs().max() <= 512 ** -0.5  # default U(-1/sqrt(fan_in), ..)


def _capture(module: torch.nn.Module) -> list:
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    return seen


def test_classifier_and_features_use_the_attended_map():
    torch.manual_seed(0)
    model = _resnet(18, "sa").eval()
    with torch.no_grad():  # gates away from their init so the module changes its input
        model.end_attn.cweight.fill_(2.0)
    seen = _capture(model.end_attn)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    (inp, out), (inp2, out2) = seen
    assert not torch.allclose(inp, out)
    torch.testing.assert_close(feats["layer4"], out)
    torch.testing.assert_close(logits, model.fc(out2.mean(dim=(2, 3))))


def test_ssd300_takes_layer4_after_the_module():
    torch.manual_seed(0)
    model = SSD300(_resnet(18, "lga", num_classes=None), num_classes=4).eval()
    seen = _capture(model.backbone.end_attn)
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(2, 3, 300, 300))
    assert [tuple(m.shape[-2:]) for m in maps] == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3),
                                                    (1, 1)]
    (layer4, attended), = seen
    torch.testing.assert_close(maps[2], attended)
    assert (maps[2] - layer4).abs().max() > 1e-3


@pytest.mark.parametrize("end", ["lga", "la", "ga", "mhsa", "sa", "se", "eca", "cbam", "da"])
def test_every_module_fits_the_end_slot_of_resnet18(end):
    torch.manual_seed(0)
    model = _resnet(18, end, num_classes=None).eval()
    with torch.no_grad():
        c4 = model.forward_features(torch.randn(1, 3, 96, 96))["layer4"]
    assert c4.shape == (1, 512, 3, 3) and torch.isfinite(c4).all()


def test_unknown_end_attention_lists_names():
    with pytest.raises(ValueError, match=r"unknown end_attention 'nope'.*'lga'"):
        _resnet(18, "nope")
