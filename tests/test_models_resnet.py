"""DA-ResNet backbones (ssd_da/models/resnet.py, names.py): parameter counts of the DA paper's
Table II, layout, placement. The pretrained-weight loader: test_models_pretrained.py."""
from functools import lru_cache

import pytest
import torch
import torchvision

from ssd_da.models.names import BACKBONE_NAMES, parse_backbone_name
from ssd_da.models.resnet import BasicBlock, Bottleneck, build_resnet

# He et al. 2016, Table 1: blocks per stage, and each stage's output width (block expansion x).
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
WIDTHS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512),
          50: (256, 512, 1024, 2048), 101: (256, 512, 1024, 2048)}
PLAIN = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}  # torchvision
DA = {18: 11_689_672, 34: 21_797_992, 50: 25_557_352, 101: 44_549_820}     # docs/method.md
SE_PAPER_M = {18: 11.7766, 34: 21.9549, 50: 28.0720, 101: 49.2923}         # Table II, in M


def _meta(name: str, **kw):
    """Build on the meta device: shapes without memory or init, so counting is cheap."""
    with torch.device("meta"):
        return build_resnet(name, **kw)


@lru_cache(maxsize=None)
def _count(name: str) -> int:
    return sum(p.numel() for p in _meta(name).parameters())


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_counts_table2(depth):
    assert _count(f"resnet{depth}") == PLAIN[depth]
    assert _count(f"da_resnet{depth}") == DA[depth]
    assert DA[depth] - PLAIN[depth] == 20 * sum(BLOCKS[depth])  # 8/16/16/33 blocks
    se_extra = sum(n * 2 * c * (c // 16) for n, c in zip(BLOCKS[depth], WIDTHS[depth]))
    assert _count(f"se_resnet{depth}") == PLAIN[depth] + se_extra
    assert round((PLAIN[depth] + se_extra) / 1e6, 4) == SE_PAPER_M[depth]


# ECA adds k parameters per block. Released k by stage (the ECA authors' README, BangguWu/ECANet:
# eca_resnet18_k3577, eca_resnet34_k3357, eca_resnet50_k3557, eca_resnet101_k3357) vs the formula
# k = psi(C) (64 -> 3; 128 .. 1024 -> 5; 2048 -> 7), with 2/2/2/2 (R18), 3/4/6/3 (R34, R50) or
# 3/4/23/3 (R101) blocks:
#   R18  released 2*3 + 2*5 + 2*7 + 2*7 = 44,   formula 2*3 + 2*5 + 2*5 + 2*5 = 36;
#   R34  released 3*3 + 4*3 + 6*5 + 3*7 = 72,   formula 3*3 + 4*5 + 6*5 + 3*5 = 74;
#   R50  released 3*3 + 4*5 + 6*5 + 3*7 = 80,   formula 3*5 + 4*5 + 6*5 + 3*7 = 86;
#   R101 released 3*3 + 4*3 + 23*5 + 3*7 = 157, formula 3*5 + 4*5 + 23*5 + 3*7 = 171.
# Classifier totals: ResNet18 11,689,512 + 44 = 11,689,556; ResNet34 21,797,672 + 72 = 21,797,744.
@pytest.mark.parametrize("name, extra, total, stage_k", [
    ("eca_resnet18", 44, 11_689_556, (3, 5, 7, 7)),
    ("eca_adaptive_resnet18", 36, 11_689_548, (3, 5, 5, 5)),
    ("eca_resnet34", 72, 21_797_744, (3, 3, 5, 7)),
    ("eca_adaptive_resnet34", 74, 21_797_746, (3, 5, 5, 5)),
    ("eca_resnet50", 80, 25_557_112, (3, 5, 5, 7)),
    ("eca_adaptive_resnet50", 86, 25_557_118, (5, 5, 5, 7)),
    ("eca_resnet101", 157, 44_549_317, (3, 3, 5, 7)),
    ("eca_adaptive_resnet101", 171, 44_549_331, (5, 5, 5, 7)),
])
def test_eca_kernel_sizes_released_and_formula(name, extra, total, stage_k):
    depth = int(name.rpartition("resnet")[2])
    assert PLAIN[depth] + extra == total
    assert _count(name) == total
    model = _meta(name, num_classes=None)
    for stage, k in enumerate(stage_k, start=1):
        assert {b.attn.conv.kernel_size for b in getattr(model, f"layer{stage}")} == {(k,)}


def test_eca_kernel_size_option_overrides_the_stage_table():
    model = _meta("eca_resnet50", num_classes=None, kernel_size=9)
    assert {b.attn.conv.kernel_size for b in model.modules() if isinstance(b, Bottleneck)} == {(9,)}


def test_se_resnet50_exact():
    assert _count("se_resnet50") == 28_071_976


@pytest.mark.parametrize("depth,blocks", [(18, 8), (34, 16), (50, 16), (101, 33)])
def test_da_adds_twenty_per_block(depth, blocks):
    model = _meta(f"da_resnet{depth}", num_classes=None)
    found = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(found) == blocks
    assert all(sum(p.numel() for p in b.attn.parameters()) == 20 for b in found)
    assert model.depth == depth


def test_state_dict_names_match_torchvision():
    ours = _meta("resnet50").state_dict()
    with torch.device("meta"):
        assert list(ours) == list(torchvision.models.resnet50().state_dict())
    da_keys = [k for k in _meta("da_resnet50").state_dict() if ".attn." not in k]
    assert da_keys == list(ours)


def test_detector_form_and_out_channels():
    model = _meta("resnet50", num_classes=None)
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")
    assert sum(p.numel() for p in model.parameters()) == PLAIN[50] - (2048 * 1000 + 1000)
    assert model.out_channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert _meta("resnet18", num_classes=None).out_channels["layer2"] == 128
    with pytest.raises(RuntimeError, match="forward_features"):
        model(torch.zeros(1, 3, 32, 32, device="meta"))


def test_forward_features_ssd300_sizes():
    model = build_resnet("da_resnet18", num_classes=None).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 300, 300))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer2": (1, 128, 38, 38), "layer3": (1, 256, 19, 19), "layer4": (1, 512, 10, 10)}


_FORWARD_NAMES = [n for n in BACKBONE_NAMES if n.endswith(("resnet18", "resnet50"))] + \
    ["resnet34", "resnet101"]


@pytest.mark.parametrize("name", _FORWARD_NAMES)
def test_forward_every_backbone(name):
    torch.manual_seed(0)
    model = build_resnet(name, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    for layer, size in (("layer2", 8), ("layer3", 4), ("layer4", 2)):
        assert feats[layer].shape == (1, model.out_channels[layer], size, size)
        assert torch.isfinite(feats[layer]).all()


@pytest.mark.parametrize("name", ["da_resnet50", "cbam_resnet18"])
def test_attention_sits_after_last_bn_before_addition(name):
    model = build_resnet(name, num_classes=None).eval()
    block = model.layer2[0]  # has a downsample shortcut
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    seen = {}
    last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    block.attn.register_forward_hook(lambda m, i, o: seen.update(attn_in=i[0].clone(), attn=o))
    x = torch.randn(1, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        out = block(x)
        shortcut = block.downsample(x)
    torch.testing.assert_close(seen["attn_in"], seen["bn"])
    torch.testing.assert_close(out, torch.relu(seen["attn"] + shortcut))


def test_init_is_torchvision_and_attention_keeps_its_own():
    torch.manual_seed(0)
    model = build_resnet("sge_resnet50", num_classes=None)
    for block in model.modules():
        if isinstance(block, Bottleneck):
            assert torch.equal(block.attn.weight, torch.zeros(1, 64, 1, 1))
            assert torch.equal(block.attn.bias, torch.ones(1, 64, 1, 1))
            assert torch.equal(block.bn3.weight, torch.ones_like(block.bn3.weight))
    # Kaiming normal, fan_out: std = sqrt(2 / (64 * 7 * 7)) = 0.02526 over 9408 weights.
    assert abs(model.conv1.weight.std().item() / (2 / (64 * 49)) ** 0.5 - 1) < 0.05
    # DA convs keep PyTorch's default init, |w| <= 1/sqrt(fan_in) = 1/3 for the 1->1 3x3 convs
    # (Kaiming fan_out would give std 0.47 and exceed it).
    da = build_resnet("da_resnet18", num_classes=None)
    weights = torch.cat([b.attn.spatial.conv.weight.flatten() for b in da.modules()
                         if isinstance(b, BasicBlock)])
    assert weights.abs().max() <= 1 / 3


def test_one_home_for_backbone_names():
    from ssd_da.models.attention import ATTENTIONS
    from ssd_da.models.names import BLOCK_ATTENTIONS, DEPTHS, backbone_name, display_name
    from ssd_da.models.resnet import STAGES

    assert tuple(STAGES) == DEPTHS and set(BLOCK_ATTENTIONS) < set(ATTENTIONS)
    for name in BACKBONE_NAMES:  # parse and format are inverses, and ResNet.name agrees
        assert backbone_name(*parse_backbone_name(name)) == name
    assert _meta("da_cs_resnet34", num_classes=None).name == "da_cs_resnet34"
    assert parse_backbone_name("da_s_resnet101").attention == "da_s"
    assert display_name("da_par_resnet50") == "DA(s|c)-ResNet50"
    assert display_name("resnet101", detector=True) == "ResNet101-SSD"
    assert display_name("resnet18_lga") == "ResNet18+LGA"  # the LGA paper's Table 4 spelling
    assert display_name("resnet50_mhsa", detector=True) == "ResNet50+MHSA-SSD"
    assert display_name("sa_resnet50") == "SA-ResNet50"
    from ssd_da.models.names import END_ATTENTIONS
    assert set(END_ATTENTIONS) < set(ATTENTIONS)
    model = _meta("resnet34_lga", num_classes=None)
    assert (model.name, model.attention, model.end_attention) == ("resnet34_lga", "none", "lga")
    assert _meta("resnet18_lga", num_classes=None, heads=4).end_attn.heads == 4  # options: end slot


def test_names_and_errors():
    # 4 depths x (plain + 11 per-block modules) + 4 depths x 10 end-of-backbone modules
    assert len(BACKBONE_NAMES) == 4 * 12 + 4 * 10 and "da_par_resnet101" in BACKBONE_NAMES
    assert parse_backbone_name("eca_adaptive_resnet50") == ("eca_adaptive", 50, "none")
    assert parse_backbone_name("da_cs_resnet50") == ("da_cs", 50, "none")
    assert parse_backbone_name("resnet18") == ("none", 18, "none")
    assert parse_backbone_name("resnet34_lga") == ("none", 34, "lga")
    assert parse_backbone_name("resnet50_da") == ("none", 50, "da")
    for bad in ("resnet18_foo", "da_resnet18_lga", "resnet18_da_cs", "resnet18_"):
        with pytest.raises(ValueError, match=rf"unknown backbone '{bad}'.*'resnet18_lga'"):
            parse_backbone_name(bad)
    assert _meta("da_par_resnet18", num_classes=None).attention == "da_par"
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet152'.*'da_resnet50'"):
        build_resnet("resnet152")
    with pytest.raises(ValueError, match=r"unknown backbone 'foo_resnet50'.*'resnet18'"):
        parse_backbone_name("foo_resnet50")
    with pytest.raises(ValueError, match="num_classes must be a positive int or None"):
        build_resnet("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"'none' takes no option"):
        build_resnet("resnet18", channel_affine=True)
    affine = _meta("da_resnet18", num_classes=None, channel_affine=True)
    assert sum(p.numel() for p in affine.layer1[0].attn.parameters()) == 22


def test_a_misspelled_backbone_gets_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown backbone 'da_resnt50' \(did you mean "
                                         r"'da_resnet50'"):
        parse_backbone_name("da_resnt50")
