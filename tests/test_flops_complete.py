"""The complete FLOP count (FlopCounterMode: every conv and matmul, 2 per multiply-accumulate)
beside the torchstat-rule count, with values worked out by hand."""
import torch
from torch import nn

from ssd_da.models.attention import build_attention
from ssd_da.models.resnet import build_resnet
from ssd_da.utils.flops import count_flops, count_flops_complete, count_flops_per_module


class _ConvThenMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)  # bias: not a multiply-accumulate
        self.weight = nn.Parameter(torch.zeros(16, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).flatten(2)  # (B, 3, 16)
        return torch.matmul(y, self.weight).softmax(-1)  # (B, 3, 7)


def test_conv_and_functional_matmul_by_hand():
    # conv: 2 * 9 * 2 * 3 per output pixel, 16 pixels; matmul (3 x 16) @ (16 x 7): 2 * 3 * 16 * 7.
    m = _ConvThenMatmul()
    assert count_flops_complete(m, (1, 2, 4, 4)) == 2 * 9 * 2 * 3 * 16 + 2 * 3 * 16 * 7
    assert count_flops_complete(m, (2, 2, 4, 4)) == 2 * (2 * 9 * 2 * 3 * 16 + 2 * 3 * 16 * 7)
    # torchstat rules: conv k*Cin*Cout*HW + bias Cout*HW; ReLU and matmul are not modules -> 0.
    assert count_flops(m, (1, 2, 4, 4)) == 9 * 2 * 3 * 16 + 3 * 16


def test_plain_resnet18_is_twice_the_torchstat_conv_and_fc_terms():
    """Bias-free, ungrouped convs and the FC: torchstat counts their MACs, the complete count
    2 x MACs; BN/ReLU/pool terms are torchstat's only. ResNet18 at 224: 3.63 vs 1.82 GFLOPs."""
    with torch.device("meta"):
        model = build_resnet("resnet18")
    per_module = count_flops_per_module(model, (1, 3, 224, 224))
    macs = sum(v for k, v in per_module.items() if k.endswith(("conv1", "conv2", "fc"))
               or k.endswith("downsample.0"))
    complete = count_flops_complete(model, (1, 3, 224, 224))
    assert complete == 2 * macs
    assert round(complete / 1e9, 2) == 3.63 and round(count_flops(model) / 1e9, 2) == 1.82


def test_lga_complete_count_by_hand():
    """D = 16, 2 heads of 8, 5x5 map (N = 25); 2 FLOPs per multiply-accumulate."""
    m = build_attention("lga", 16, heads=2)
    d, n = 16, 25
    # Multi-scale: depthwise 3x3 (9 MACs per output value) + 1x1 (16 per value), strides 1, 2, 4
    # give 5x5, 3x3, 2x2 maps.
    multi = sum(2 * (9 * d + d * d) * hw for hw in (25, 9, 4))
    scale_w = 2 * d * 4 * n
    # Each branch: depthwise k x k, then qkv 1x1 in 2 groups (8 inputs per output, 48 outputs).
    branch = {k: 2 * k * k * d * n + 2 * 8 * 48 * n for k in (3, 5, 7, 11)}
    # Attention per branch: (8 x 25) @ (25 x 8) energy and (8 x 8) @ (8 x 25) output, per head.
    attention = 4 * 2 * (2 * 8 * 25 * 8 + 2 * 8 * 8 * 25)
    out = 2 * d * d * n
    expected = multi + scale_w + sum(branch.values()) + attention + out
    assert count_flops_complete(m, (1, d, 5, 5)) == expected
    # torchstat sees the convs only (depthwise with its full-C_in quirk), not the products.
    assert count_flops(m, (1, d, 5, 5)) < expected - attention


def test_mhsa_complete_count_by_hand():
    """C = 16, 4 heads of 4, N = 6 x 6 = 36: three 1x1 convs and two N x N products per head."""
    m = build_attention("mhsa", 16)
    n = 36
    convs = 3 * 2 * 16 * 16 * n
    products = 4 * (2 * n * 4 * n + 2 * 4 * n * n)
    assert count_flops_complete(m, (1, 16, 6, 6)) == convs + products
