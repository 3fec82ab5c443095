"""Attention modules: shapes, gradients, parameter counts and hand-worked outputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssd_da.models.attention import ATTENTIONS, build_attention, eca_kernel_size


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
@pytest.mark.parametrize("channels", [64, 256])
@pytest.mark.parametrize("size", [(1, 7, 5), (2, 8, 8)])
def test_shape_and_gradients(name, channels, size):
    torch.manual_seed(0)
    batch, h, w = size
    m = build_attention(name, channels).train()
    # Perturb every parameter so no gradient vanishes only because of an init value (SGE's
    # weight 0 blocks the gradient through its normalised similarity at init).
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = (torch.randn(batch, channels, h, w) + 0.3).requires_grad_(True)
    out = m(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# Parameter counts by hand. DA: 3x3 + 3x3 dilated + 1x1 (2->1), no bias = 9 + 9 + 2, whatever C.
# SE(C): 2 * C * (C // 16). ECA: k. SGE: 2 * 64. CBAM(C), h = C // 16: 2*C*h + h + C + 7*7*2 + 2.
@pytest.mark.parametrize("name,channels,expected", [
    ("none", 64, 0), ("da", 64, 20), ("da", 2048, 20), ("da_cs", 256, 20), ("da_par", 256, 20),
    ("da_s", 256, 20), ("da_c", 256, 0),
    ("se", 64, 512), ("se", 256, 8192), ("se", 8, 16),  # 8 // 16 = 0 -> hidden 1: 8 + 8
    ("eca", 64, 3), ("eca", 256, 5), ("eca", 2048, 7),
    ("sge", 64, 128), ("sge", 2048, 128),
    ("cbam", 64, 2 * 64 * 4 + 4 + 64 + 100), ("cbam", 256, 2 * 256 * 16 + 16 + 256 + 100),
])
def test_parameter_counts(name, channels, expected):
    assert _count(build_attention(name, channels)) == expected


def test_da_is_bias_free_and_affine_adds_two():
    m = build_attention("da", 64)
    for conv in (m.spatial.conv, m.spatial.conv_dilated, m.spatial.fuse):
        assert conv.bias is None
    assert m.spatial.conv_dilated.dilation == (3, 3) and m.spatial.conv_dilated.padding == (3, 3)
    assert _count(build_attention("da", 64, channel_affine=True)) == 22
    assert _count(build_attention("da_c", 64, channel_affine=True)) == 2


@pytest.mark.parametrize("name,expected", [
    # x = 2 everywhere, zeroed convs -> spatial mask sigmoid(0) = 0.5.
    ("da", _sig(1.0)),            # spatial first: y = 1, then y * sigmoid(GAP(y) = 1)
    ("da_cs", 2 * _sig(2.0) * 0.5),  # channel first: 2 * sigmoid(2), then * 0.5
    ("da_par", 2 * 0.5 * _sig(2.0)),  # both masks from x
    ("da_s", 1.0),
    ("da_c", 2 * _sig(2.0)),
])
def test_da_orders_by_hand(name, expected):
    m = build_attention(name, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    out = m(torch.full((1, 2, 3, 3), 2.0))
    torch.testing.assert_close(out, torch.full((1, 2, 3, 3), expected))


def test_da_matches_functional_reference():
    """Spatial then channel, written out with torch.nn.functional (random weights)."""
    torch.manual_seed(1)
    m = build_attention("da", 6)
    x = torch.randn(2, 6, 7, 5)
    s = m.spatial
    mean = x.mean(1, keepdim=True)
    a = F.conv2d(mean, s.conv.weight, padding=1)
    b = F.conv2d(mean, s.conv_dilated.weight, padding=3, dilation=3)
    w = s.fuse.weight.view(2)
    y = x * torch.sigmoid(w[0] * a + w[1] * b)
    expected = y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(m(x), expected)


def test_da_dilated_branch_receptive_field():
    """An impulse through the dilated conv (all-ones kernel) reaches exactly rows/cols 1, 4, 7."""
    m = build_attention("da_s", 1)
    with torch.no_grad():
        m.spatial.conv.weight.zero_()
        m.spatial.conv_dilated.weight.fill_(1.0)
        m.spatial.fuse.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    mask = m.spatial(x)[0, 0]
    expected = torch.full((9, 9), 0.5)
    for i in (1, 4, 7):
        for j in (1, 4, 7):
            expected[i, j] = _sig(1.0)
    torch.testing.assert_close(mask, expected)


def test_channel_affine_starts_equal_then_differs():
    torch.manual_seed(2)
    plain = build_attention("da", 8)
    affine = build_attention("da", 8, channel_affine=True)
    affine.spatial.load_state_dict(plain.spatial.state_dict())
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(affine(x), plain(x))
    with torch.no_grad():
        affine.channel.shift.fill_(1.0)
    assert not torch.allclose(affine(x), plain(x))


def test_se_by_hand():
    m = build_attention("se", 16)  # hidden = 16 // 16 = 1
    with torch.no_grad():
        m.fc1.weight.fill_(1.0)
        m.fc2.weight.fill_(1.0)
    # GAP 0.5 in 16 channels -> relu(8) = 8 -> sigmoid(8); GAP -0.5 -> relu(-8) = 0 -> 0.5.
    torch.testing.assert_close(m(torch.full((1, 16, 2, 3), 0.5)),
                               torch.full((1, 16, 2, 3), 0.5 * _sig(8.0)))
    torch.testing.assert_close(m(torch.full((1, 16, 2, 3), -0.5)), torch.full((1, 16, 2, 3), -0.25))


@pytest.mark.parametrize("channels,k", [
    # t = int((log2 C + 1) / 2): 64: 3.5->3 (odd) ; 128: 4->5 ; 256: 4.5->4->5 ; 512: 5 ;
    # 1024: 5.5->5 ; 2048: 6->7 ; 16: 2.5->2->3 ; 2: 1 -> floor 3.
    (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7), (16, 3), (2, 3),
])
def test_eca_kernel_size(channels, k):
    assert eca_kernel_size(channels) == k
    assert build_attention("eca", channels).conv.kernel_size == (k,)


def test_eca_mixes_neighbouring_channels():
    m = build_attention("eca", 64)  # k = 3
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3))
    v = torch.linspace(-1, 1, 64)
    x = v.view(1, 64, 1, 1).expand(1, 64, 2, 2).contiguous()
    prev = torch.cat([torch.zeros(1), v[:-1]])  # cross-correlation: out[c] = in[c - 1], zero pad
    expected = (v * torch.sigmoid(prev)).view(1, 64, 1, 1).expand(1, 64, 2, 2)
    torch.testing.assert_close(m(x), expected)


def test_sge_init_and_by_hand():
    m = build_attention("sge", 128)
    assert m.weight.shape == (1, 64, 1, 1)
    assert torch.equal(m.weight, torch.zeros(1, 64, 1, 1))
    assert torch.equal(m.bias, torch.ones(1, 64, 1, 1))
    x = torch.randn(2, 128, 4, 3)
    torch.testing.assert_close(m(x), x * _sig(1.0))  # weight 0: every gate sigmoid(1)

    # One channel per group, values [1, 3]: GAP 2, similarity [2, 6], centred [-2, 2],
    # Bessel std sqrt(8), normalised -+1/sqrt(2); weight 1, bias 0 -> gates sigmoid(-+0.7071).
    m = build_attention("sge", 2, groups=2)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.zero_()
    x = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2).repeat(1, 2, 1, 1)
    g = 1 / math.sqrt(2)
    expected = torch.tensor([1.0 * _sig(-g), 3.0 * _sig(g)]).view(1, 1, 1, 2).repeat(1, 2, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_sge_single_pixel_and_bad_groups():
    m = build_attention("sge", 64)
    x = torch.randn(1, 64, 1, 1)
    torch.testing.assert_close(m(x), x * _sig(1.0))  # centred value 0, no 0/0 NaN
    with pytest.raises(ValueError, match="not divisible by groups=64"):
        build_attention("sge", 96)


def test_cbam_by_hand():
    m = build_attention("cbam", 2).eval()  # eval BN: (v - 0) / sqrt(1 + 1e-5) * 1 + 0
    assert m.mlp[0].bias is not None and m.spatial_conv.bias is None
    with torch.no_grad():
        for p in m.mlp.parameters():
            p.zero_()
        m.spatial_bn.weight.fill_(1.0)  # the released init has 0 here (next test)
        m.spatial_conv.weight.zero_()
        m.spatial_conv.weight[0, 0, 3, 3] = 1.0  # centre tap of the channel-max map only
    # Channel gate 0.5 -> y = [0.5, 1.5]; spatial input [max, mean] = [1.5, 1.0] -> uses 1.5.
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    gate = _sig(1.5 / math.sqrt(1 + 1e-5))
    torch.testing.assert_close(m(x), torch.tensor([0.5, 1.5]).view(1, 2, 1, 1) * gate)


def test_cbam_init_as_the_released_code():
    # Jongchan/attention-module: SpatialGate BN weight 0, all biases 0, conv Kaiming-normal
    # fan-out. With the BN weight and bias 0 the spatial gate is sigmoid(0) = 0.5 everywhere, in
    # train and eval mode; with the MLP weights also zeroed (biases are already 0) the channel
    # gate is sigmoid(0 + 0) = 0.5 too, so the module returns exactly x * 0.25.
    torch.manual_seed(0)
    m = build_attention("cbam", 64)
    assert m.spatial_bn.weight.item() == 0.0 and m.spatial_bn.bias.item() == 0.0
    assert all(layer.bias.abs().max().item() == 0.0 for layer in (m.mlp[0], m.mlp[2]))
    assert m.mlp[0].weight.abs().sum() > 0  # MLP weights keep PyTorch's (random) default
    x = torch.randn(2, 64, 5, 6)
    with torch.no_grad():
        m.mlp[0].weight.zero_()
        m.mlp[2].weight.zero_()
        for mode in (True, False):
            assert torch.equal(m.train(mode)(x), x * 0.25)


def test_cbam_spatial_conv_is_kaiming_normal_fan_out():
    # fan_out = 1 output channel x 7 x 7 = 49 -> std sqrt(2 / 49) = 0.2020. PyTorch's default
    # (Kaiming-uniform, a = sqrt(5), fan_in 2 x 49 = 98) would give U(-1/sqrt(98), 1/sqrt(98)):
    # std 0.0583 and |w| <= 0.101. Over 200 modules (19,600 weights) the sample std is within
    # ~1% of the target, and a normal sample reaches far past the uniform's bound.
    torch.manual_seed(0)
    w = torch.cat([build_attention("cbam", 16).spatial_conv.weight.flatten() for _ in range(200)])
    assert w.std().item() == pytest.approx(math.sqrt(2 / 49), rel=0.03)
    assert abs(w.mean().item()) < 0.01
    assert w.abs().max().item() > 3 * math.sqrt(2 / 49)  # a tail a uniform init cannot have


def test_build_attention_errors():
    with pytest.raises(ValueError, match=r"unknown attention 'nope'.*\['cbam', 'da', 'da_c'"):
        build_attention("nope", 64)
    with pytest.raises(ValueError, match=r"'se' takes no option\(s\) \['groups'\].*reduction"):
        build_attention("se", 64, groups=4)
    with pytest.raises(ValueError, match="'none' takes no option"):
        build_attention("none", 64, reduction=4)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        build_attention("da", 0)
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        build_attention("eca", 64, kernel_size=4)
