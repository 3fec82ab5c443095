"""LGA, LA, GA (ssd_da/models/lga.py), MHSA and SA (compared_attention.py): counts, shapes and
outputs worked out by hand, and the public LGA code's second product against ours."""
import math

import pytest
import torch

from ssd_da.models.attention import build_attention
from ssd_da.models.lga import channel_attention, lga_default_heads

NEW = ("lga", "la", "ga", "mhsa", "sa")


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# D = 16 channels, h = 2 heads (8 per head). Every conv has a bias.
# multi-scale, 3 scales: depthwise 3x3 (9*16 + 16 = 160) + 1x1 (16*16 + 16 = 272) = 432 each
_MS = 3 * 432
_SCALE_W = 16 * 4 + 4        # 1x1 conv D -> 4 scales
_PE = 14 * 14 * 16           # learned 14 x 14 encoding


def _branch(k: int) -> int:  # depthwise k x k + grouped 1x1 D -> 3D (2 groups of 8 -> 24)
    return (k * k * 16 + 16) + (48 * 8 + 48)


_OUT = 16 * 16 + 16
_LOCAL = _branch(3) + _branch(5) + _branch(7)  # 592 + 848 + 1232
_GLOBAL = _branch(11)                           # 2384


@pytest.mark.parametrize("name,kw,expected", [
    ("lga", {"heads": 2}, _MS + _SCALE_W + _PE + _LOCAL + _GLOBAL + 2 + _OUT),  # 9830
    ("la", {"heads": 2}, _MS + _SCALE_W + _PE + _LOCAL + 1 + _OUT),             # 7445
    ("ga", {"heads": 2}, _MS + _SCALE_W + _PE + _GLOBAL + 1 + _OUT),            # 7157
    ("lga", {"heads": 4}, 9830 - 4 * 48 * (8 - 4)),  # 4 groups: 48 x 4 qkv weights, not 48 x 8
    ("mhsa", {}, 3 * (16 * 16 + 16)),                    # q, k, v 1x1 convs with bias: 816
    ("sa", {"groups": 4}, 6 * 2),                        # 16 / (2*4) = 2 per half, 6 tensors
    ("sa", {}, 6 * 1),                                   # default 8 groups at 16 channels
])
def test_parameter_counts_small_width(name, kw, expected):
    assert _count(build_attention(name, 16, **kw)) == expected


def test_parameter_counts_resnet18_end():
    """512 channels (ResNet18 after layer4): 8 heads by default. LGA: 4 D^2 (3 multi-scale
    1x1 + output) + 12 D^2 / 8 (four grouped qkv convs) + 454 D (depthwise, biases, PE, scale
    weights) + 4 (scale-weight biases) + 2 (alphas)."""
    d = 512
    assert lga_default_heads(d) == 8
    assert _count(build_attention("lga", d)) == 4 * d * d + 12 * d * d // 8 + 454 * d + 6
    assert _count(build_attention("lga", d)) == 1_674_246
    assert _count(build_attention("mhsa", d)) == 3 * (d * d + d)
    assert _count(build_attention("sa", d)) == 3 * d // 64  # 24


def _lga_count(d: int, h: int) -> int:
    """LGA's count by the docstring's formula, 3 scales, PE 14 x 14, kernels 3, 5, 7, 11:
    3 (D^2 + 11 D) + 4 (D + 1) + 196 D + (9 + 25 + 49 + 121) D + 4 (D + 3 D^2 / h + 3 D) + 2
    + D^2 + D."""
    return (3 * (d * d + 11 * d) + 4 * (d + 1) + 196 * d + 204 * d
            + 4 * (d + 3 * d * d // h + 3 * d) + 2 + d * d + d)


# By hand, term by term (multi-scale + scale weights + PE + depthwise of the 4 branches + their
# grouped qkv convs with biases + alphas + output conv):
#   D=512, h=8 (ours):     803,328 + 2,052 + 100,352 + 104,448 + 401,408 + 2 + 262,656 = 1,674,246
#   D=512, h=32 (head 16): 803,328 + 2,052 + 100,352 + 104,448 + 106,496 + 2 + 262,656 = 1,379,334
#   D=128, h=8 (authors' ResNet18):  53,376 + 516 + 25,088 + 26,112 + 26,624 + 2 + 16,512 = 148,230
#   D=24, h=6 (authors' MobileNetV3): 2,520 + 100 + 4,704 + 4,896 + 1,536 + 2 + 600 = 14,358
@pytest.mark.parametrize("d,kw,heads,expected", [
    (512, {}, 8, 1_674_246), (512, {"head_dim": 16}, 32, 1_379_334),
    (128, {"heads": 8}, 8, 148_230), (128, {"head_dim": 16}, 8, 148_230),
    (24, {"heads": 6}, 6, 14_358), (24, {"head_dim": 4}, 6, 14_358),
])
def test_parameter_counts_ours_and_the_authors_configs(d, kw, heads, expected):
    m = build_attention("lga", d, **kw)
    assert m.heads == heads and m.scale == (d // heads) ** -0.5
    assert _lga_count(d, heads) == expected
    assert _count(m) == expected


def test_head_dim_option_everywhere():
    from ssd_da.models.lga import LGA_AUTHORS_HEAD_DIM
    from ssd_da.models.resnet import build_resnet

    assert LGA_AUTHORS_HEAD_DIM == 16  # 128 channels / 8 heads in the authors' ResNet18 config
    assert build_attention("la", 512, head_dim=16).heads == 32
    assert build_attention("ga", 512, head_dim=16).heads == 32
    assert build_resnet("resnet18_lga", num_classes=None, head_dim=16).end_attn.heads == 32
    with pytest.raises(ValueError, match="give heads or head_dim, not both"):
        build_attention("lga", 512, heads=8, head_dim=16)
    with pytest.raises(ValueError, match=r"head_dim=3 does not divide channels=20; valid "
                                         r"head_dim: \[1, 2, 4, 5, 10, 20\]"):
        build_attention("lga", 20, head_dim=3)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        build_attention("lga", 16, head_dim=0)


@pytest.mark.parametrize("channels,heads", [(64, 1), (128, 2), (256, 4), (512, 8), (1024, 16),
                                            (2048, 32), (16, 1)])
def test_default_heads_per_resnet_width(channels, heads):
    assert lga_default_heads(channels) == heads
    assert build_attention("lga", channels).heads == heads


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("size", [38, 19, 10, 1])
def test_shapes_on_ssd_maps(name, size):
    torch.manual_seed(0)
    m = build_attention(name, 16)
    x = torch.randn(2, 16, size, size)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


# Nearest resizing takes source row floor(i * 14 / S) for output row i.
_PE_ROWS = {
    10: [0, 1, 2, 4, 5, 7, 8, 9, 11, 12],
    19: [0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13],
    38: [i * 14 // 38 for i in range(38)],
    1: [0],
}


@pytest.mark.parametrize("size", sorted(_PE_ROWS))
def test_positional_encoding_resized_to_each_map(size):
    m = build_attention("lga", 16)
    assert m.pos.shape == (1, 16, 14, 14)
    rows = torch.tensor(_PE_ROWS[size])
    expected = m.pos[:, :, rows][:, :, :, rows]
    torch.testing.assert_close(m.positional_encoding(size, size), expected, rtol=0, atol=0)


def _public_second_product(attention: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The authors' public code: einsum('bhqk,bhvd->bhqd'); k and v are summed separately."""
    return torch.einsum("bhqk,bhvd->bhqd", attention, value)


def test_channel_attention_by_hand_and_public_product():
    # One head, d = 2 channels, N = 1 position: q = k = [1, 0], v = [2, 4], scale 1.
    # Energy [[1, 0], [0, 0]]: rows softmax to [e, 1] / (e + 1) and [1/2, 1/2].
    q = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 4.0]).view(1, 1, 2, 1)
    e = math.e
    ours = channel_attention(q, q, v, scale=1.0)
    torch.testing.assert_close(ours.flatten(), torch.tensor([(2 * e + 4) / (e + 1), 3.0]))
    att = (torch.matmul(q, q.transpose(-1, -2))).softmax(-1)
    public = _public_second_product(att, v)
    torch.testing.assert_close(public.flatten(), torch.tensor([6.0, 6.0]))  # sum of v, twice


def test_public_product_ignores_q_and_k_ours_does_not():
    torch.manual_seed(0)
    shape = (2, 4, 8, 25)  # B, heads, head_dim, N
    v = torch.randn(shape)
    outs_public, outs_ours = [], []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(shape, generator=g).requires_grad_(True)
        k = torch.randn(shape, generator=g).requires_grad_(True)
        att = (torch.matmul(q, k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1)
        public = _public_second_product(att, v)
        (public * torch.randn(shape)).sum().backward()
        # d/dq of sum_k softmax(...)_k = d/dq 1 = 0: nothing reaches Q or K.
        assert q.grad.abs().max() < 1e-5 and k.grad.abs().max() < 1e-5
        outs_public.append(public.detach())
        q.grad = k.grad = None
        ours = channel_attention(q, k, v, 8 ** -0.5)
        (ours * torch.randn(shape)).sum().backward()
        assert q.grad.abs().sum() > 1 and k.grad.abs().sum() > 1
        outs_ours.append(ours.detach())
    torch.testing.assert_close(outs_public[0], outs_public[1])
    torch.testing.assert_close(outs_public[0], v.sum(dim=2, keepdim=True).expand(shape))
    assert (outs_ours[0] - outs_ours[1]).abs().max() > 0.1


@pytest.mark.parametrize("name", ["lga", "la", "ga"])
def test_gradients_reach_every_parameter(name):
    """At the default init (no perturbation): every parameter, Q and K convs included."""
    torch.manual_seed(0)
    m = build_attention(name, 16, heads=2)
    x = torch.randn(2, 16, 10, 10, requires_grad=True)
    (m(x) * torch.randn(2, 16, 10, 10)).sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


def _zero_all_but_identity_output(m: torch.nn.Module, channels: int) -> None:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith(("pos", "alpha")):
                p.zero_()
        m.out.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))


def test_lga_by_hand():
    """Zero convs: Y_i = X, scale weights 1/4 each -> X_w = X; Q = K = 0 -> uniform attention
    over the head's channels, V = 0 -> each branch gives X; 0.5 X + 0.5 X = X; identity output
    conv -> X. With the qkv biases of V at c: every branch gives X + c, and alphas (1, 0) pick
    the local branches alone."""
    m = build_attention("lga", 4, heads=2)
    _zero_all_but_identity_output(m, 4)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(m(x), x)
    with torch.no_grad():
        for qkv in list(m.local_branches) + [m.global_branch]:
            # output groups (q_g, k_g, v_g) of 2 channels each: v of head g is 6g + 4 .. 6g + 5
            qkv.qkv.bias.view(2, 3, 2)[:, 2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        m.alpha_local.fill_(1.0)
        m.alpha_global.fill_(0.0)
    expected = x + torch.tensor([1.5, 1.5, 3.5, 3.5]).view(1, 4, 1, 1)  # mean of v per head
    torch.testing.assert_close(m(x), expected)


def test_lga_output_depends_on_query_and_key_convs():
    torch.manual_seed(0)
    m = build_attention("lga", 16, heads=2)
    x = torch.randn(1, 16, 10, 10)
    before = m(x).detach()
    with torch.no_grad():  # change only the Q rows of the global branch's qkv conv
        m.global_branch.qkv.weight.view(2, 3, 8, 8)[:, 0] += 0.5
    assert (m(x) - before).abs().max() > 1e-3


def test_la_and_ga_have_one_branch():
    la, ga = build_attention("la", 16), build_attention("ga", 16)
    assert len(la.local_branches) == 3 and la.global_branch is None
    assert not hasattr(la, "alpha_global") and la.alpha_local.item() == 0.5
    assert len(ga.local_branches) == 0 and ga.global_branch.depthwise.kernel_size == (11, 11)
    assert not hasattr(ga, "alpha_local") and ga.alpha_global.item() == 0.5


def test_mhsa_by_hand():
    # C = 1, one head, q = k = v = x (identity 1x1 convs): x = [0, 1] at two positions.
    # Energy x_n x_m = [[0, 0], [0, 1]]: position 0 averages (0.5), position 1 gives e/(1+e).
    m = build_attention("mhsa", 1, heads=1)
    with torch.no_grad():
        for conv in (m.query, m.key, m.value):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    out = m(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5, math.e / (1 + math.e)]))
    # Zero q/k: uniform attention over positions -> every position gets the mean of v.
    m = build_attention("mhsa", 8)  # 4 heads of 2 channels
    with torch.no_grad():
        for conv in (m.query, m.key):
            conv.weight.zero_()
        m.value.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        m.value.bias.zero_()
    x = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(m(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x))


def test_sa_init_is_gated_shuffle():
    """Gates start at sigmoid(1); C = 8, G = 2: the shuffle puts old channel (j % 2) * 4 + j // 2
    at j, i.e. [0, 4, 1, 5, 2, 6, 3, 7]."""
    m = build_attention("sa", 8, groups=2)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(m(x), x[:, [0, 4, 1, 5, 2, 6, 3, 7]] * _sig(1.0))


def test_sa_by_hand():
    # C = 4, G = 1: channel half = channels 0, 1; spatial half = 2, 3. Weights 1, biases 0.
    m = build_attention("sa", 4, groups=1)
    with torch.no_grad():
        m.cweight.fill_(1.0)
        m.cbias.zero_()
        m.sweight.fill_(1.0)
        m.sbias.zero_()
    x = torch.tensor([[1.0, 1.0], [2.0, 4.0], [1.0, 3.0], [5.0, 9.0]]).view(1, 4, 1, 2)
    # GN per channel over 2 positions: [1, 3] -> [-1, 1] / sqrt(1 + 1e-5), [5, 9] -> [-2, 2] /
    # sqrt(4 + 1e-5) (biased variance); the channel half's gates are sigmoid(GAP) = s(1), s(3).
    n1, n2 = 1 / math.sqrt(1 + 1e-5), 2 / math.sqrt(4 + 1e-5)
    before = torch.tensor([[1 * _sig(1), 1 * _sig(1)], [2 * _sig(3), 4 * _sig(3)],
                           [1 * _sig(-n1), 3 * _sig(n1)], [5 * _sig(-n2), 9 * _sig(n2)]])
    expected = before[[0, 2, 1, 3]].view(1, 4, 1, 2)  # shuffle for C = 4
    torch.testing.assert_close(m(x), expected)


def test_sa_matches_a_per_group_loop():
    """SA-Net's definition written group by group (random parameters)."""
    torch.manual_seed(3)
    m = build_attention("sa", 32, groups=4)  # 4 channels per half-group
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 32, 5, 6)
    halves = []
    for g in range(4):
        part = x[:, 8 * g:8 * g + 8]
        xc, xs = part[:, :4], part[:, 4:]
        gc = torch.sigmoid(m.cweight * xc.mean(dim=(2, 3), keepdim=True) + m.cbias)
        mu, var = xs.mean(dim=(2, 3), keepdim=True), xs.var(dim=(2, 3), keepdim=True, unbiased=False)
        gn = (xs - mu) / torch.sqrt(var + 1e-5) * m.gn.weight.view(1, 4, 1, 1) \
            + m.gn.bias.view(1, 4, 1, 1)
        gs = torch.sigmoid(m.sweight * gn + m.sbias)
        halves += [xc * gc, xs * gs]
    before = torch.cat(halves, dim=1)
    expected = torch.stack([before[:, :16], before[:, 16:]], dim=2).reshape(2, 32, 5, 6)
    torch.testing.assert_close(m(x), expected)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        build_attention("lga", 16, heads=3)
    with pytest.raises(ValueError, match="no default head count for 200 channels"):
        build_attention("lga", 200)
    with pytest.raises(ValueError, match="kernel sizes must be odd"):
        build_attention("la", 16, local_kernels=(3, 4))
    with pytest.raises(ValueError, match=r"valid groups for 12 channels: \[1, 2, 3, 6\]"):
        build_attention("sa", 12, groups=4)
    with pytest.raises(ValueError, match="channels=6 is not divisible by heads=4"):
        build_attention("mhsa", 6)
    with pytest.raises(ValueError, match=r"'ga' takes no option\(s\) \['local_kernels'\]"):
        build_attention("ga", 16, local_kernels=(3,))
