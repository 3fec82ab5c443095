"""torchstat-rule FLOP counter (ssd_da/utils/flops.py) and tools/complexity.py.

Expected values are worked out by hand in the comments; the Table II values are the DA paper's.
"""
from __future__ import annotations

import csv
import io

from ssd_da.cli import complexity as complexity_tool
import pytest
import torch
from torch import nn

from ssd_da.utils.flops import count_flops, count_flops_per_module, count_params, module_flops


class TinyNet(nn.Module):
    """Every rule once, plus one ReLU object called twice at different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        self.gate = nn.Sigmoid()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))  # (B, 4, 6, 6)
        x = self.conv2(self.pool(x))  # (B, 3, 3, 3)
        x = self.relu(x * self.gate(x))  # same ReLU object, now on (B, 3, 3, 3)
        return self.fc(self.gap(x).flatten(1))


# Input (1, 2, 6, 6):
#   conv1: 3*3 * 2 * 4 * 6*6 = 2592, + bias 4 * 6*6 = 144      -> 2736
#   bn:    2 * (4*6*6) = 288 (affine)
#   relu:  LAST call only, 3*3*3 = 27 (not 144 + 27, not 144)
#   pool:  input elements 4*6*6 = 144
#   conv2: 1*1 * 4 * 3 * 3*3 = 108, no bias
#   sigmoid, adaptive pool, x * gate, flatten: 0
#   fc:    3 * 5 = 15 (bias not counted)
TINY_PER_MODULE = {"conv1": 2736, "bn": 288, "relu": 27, "pool": 144, "conv2": 108,
                   "gate": 0, "gap": 0, "fc": 15}
TINY_TOTAL = 3318


def test_tiny_net_per_module_by_hand():
    per_module = count_flops_per_module(TinyNet(), (1, 2, 6, 6))
    assert dict(per_module) == TINY_PER_MODULE
    assert list(per_module) == list(TINY_PER_MODULE)  # registration order
    assert count_flops(TinyNet(), (1, 2, 6, 6)) == TINY_TOTAL


def test_batch_size_multiplies_every_rule():
    # torchstat counts the batch in every rule: batch 2 doubles each term.
    assert count_flops(TinyNet(), (2, 2, 6, 6)) == 2 * TINY_TOTAL


def test_shared_module_counts_last_call_size():
    relu = nn.ReLU()

    class TwoCalls(nn.Module):
        def __init__(self, big_first: bool) -> None:
            super().__init__()
            self.relu = relu
            self.big_first = big_first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            small = x[:, :1, :2, :2]  # 1*1*2*2 = 4 elements; x has 1*3*4*4 = 48
            first, last = (x, small) if self.big_first else (small, x)
            self.relu(first)
            return self.relu(last)

    assert count_flops(TwoCalls(big_first=True), (1, 3, 4, 4)) == 4
    assert count_flops(TwoCalls(big_first=False), (1, 3, 4, 4)) == 48


def test_grouped_conv_uses_full_input_channels():
    # torchstat: k*k * C_in * (C_out // groups) * H*W = 9 * 4 * 2 * 25 = 1800 (not 900).
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    assert count_flops(conv, (1, 4, 5, 5)) == 1800
    # the model itself as the only leaf is named by its class
    assert dict(count_flops_per_module(conv, (1, 4, 5, 5))) == {"Conv2d": 1800}


@pytest.mark.parametrize("module, size, expected", [
    (nn.BatchNorm2d(3, affine=False), (1, 3, 2, 2), 12),  # 1 x input elements
    (nn.AvgPool2d(2), (2, 3, 4, 4), 96),  # input elements 2*3*4*4
    (nn.LeakyReLU(), (1, 5), 5),
    (nn.Upsample(scale_factor=2), (2, 3, 4, 4), 128),  # torchstat drops C: 2 * 8*8
    (nn.Linear(3, 5), (2, 4, 3), 120),  # leading dims as batch: 8 * 3 * 5
    (nn.Conv2d(1, 1, 3, padding=3, dilation=3, bias=False), (1, 1, 7, 7), 441),  # 9 * 49
    (nn.Conv1d(2, 2, 3), (1, 2, 8), 0),  # not a torchstat rule
    (nn.ConvTranspose2d(2, 2, 2), (1, 2, 3, 3), 0),
    (nn.BatchNorm1d(4), (2, 4), 0),
    (nn.AdaptiveAvgPool2d(1), (1, 3, 4, 4), 0),
    (nn.SiLU(), (1, 3), 0),
])
def test_single_module_rules(module, size, expected):
    assert count_flops(module, size) == expected


def test_module_flops_without_positional_input_is_zero():
    assert module_flops(nn.ReLU(), None, torch.zeros(3)) == 0


def test_params_by_hand_and_trainable_only():
    net = TinyNet()
    # conv1 2*4*9 + 4 = 76, bn 4 + 4 = 8 (running stats are buffers), conv2 4*3 = 12,
    # fc 3*5 + 5 = 20
    assert count_params(net) == 116
    net.bn.requires_grad_(False)
    assert count_params(net, trainable_only=True) == 108


def test_counter_restores_mode_and_removes_hooks():
    net = TinyNet().train()
    count_flops(net, (1, 2, 6, 6))
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())


def test_meta_device_gives_the_same_count():
    with torch.device("meta"):
        meta_net = TinyNet()
    assert count_flops(meta_net, (1, 2, 6, 6)) == TINY_TOTAL


def test_bad_input_size_names_the_argument():
    with pytest.raises(ValueError, match="input_size"):
        count_flops(TinyNet(), (1, 2, 0, 6))


# ---------------------------------------------------------------- tools/complexity.py


def _run_csv(tool, argv, capsys, complete: bool = False) -> dict[str, tuple[int, ...]]:
    """{backbone: (params, torchstat flops)}; with ``complete``, the FlopCounterMode count too."""
    tool.main(argv)
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["backbone", "params", "flops", "flops_complete"]
    return {name: (int(p), int(f), int(c))[:3 if complete else 2] for name, p, f, c in rows[1:]}


# Spatial outputs of ResNet18's blocks at 224: two blocks each at 56, 28, 14, 7.
RESNET18_BLOCK_HW = [56 * 56] * 2 + [28 * 28] * 2 + [14 * 14] * 2 + [7 * 7] * 2


def test_cli_csv_resnet18_and_da_difference_by_hand(capsys):
    tool = complexity_tool
    counts = _run_csv(tool, ["--classifier", "--csv", "resnet18", "da_resnet18"], capsys)
    params, flops = counts["resnet18"]
    assert (round(params / 1e6, 4), round(flops / 1e9, 4)) == (11.6895, 1.8214)  # Table II
    da_params, da_flops = counts["da_resnet18"]
    # DA per block: 3x3 1->1, dilated 3x3 1->1, 1x1 2->1, no bias: 9 + 9 + 2 = 20 params and
    # (9 + 9 + 2) * H*W FLOPs at the block's output H*W; mean / sigmoid / GAP / mul are free.
    assert da_params - params == 20 * len(RESNET18_BLOCK_HW)
    assert da_flops - flops == sum(20 * hw for hw in RESNET18_BLOCK_HW) == 166_600
    # the CPU path (real tensors) agrees with the meta device path
    cpu = _run_csv(tool, ["--classifier", "--csv", "--no-meta", "da_resnet18"], capsys)
    assert cpu["da_resnet18"] == counts["da_resnet18"]


def test_cli_table_format(capsys):
    tool = complexity_tool
    tool.main(["--classifier", "resnet18"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert [c.strip() for c in lines[-3].split("|")[1:5]] == [
        "Backbone", "Params (M)", "GFLOPs (torchstat)", "GFLOPs (complete)"]
    # complete: twice torchstat's conv + FC terms (tests/test_flops_complete.py)
    assert [c.strip() for c in lines[-1].split("|")[1:5]] == ["resnet18", "11.6895", "1.8214",
                                                              "3.6281"]
    assert "torchstat's rules" in out and "FlopCounterMode" in out  # says which is which


def test_cli_end_of_backbone_lga_adds_the_module_alone(capsys):
    from ssd_da.models.lga import LocalGlobalAttention
    from ssd_da.utils.flops import count_flops_complete

    counts = _run_csv(complexity_tool, ["--classifier", "--csv", "resnet18", "resnet18_lga"],
                      capsys, complete=True)
    (p0, f0, c0), (p1, f1, c1) = counts["resnet18"], counts["resnet18_lga"]
    assert p1 - p0 == 1_674_246  # LGA at 512 channels, 8 heads (tests/test_lga.py derives it)
    # the module sees layer4's 7x7 map at 224x224; the complete count includes its matmuls
    with torch.device("meta"):
        lga = LocalGlobalAttention(512)
    assert c1 - c0 == count_flops_complete(lga, (1, 512, 7, 7)) > 2 * (f1 - f0)


def test_cli_unknown_backbone_exits_2_listing_names(capsys):
    tool = complexity_tool
    with pytest.raises(SystemExit) as exc:
        tool.main(["--classifier", "resnet18", "resnet99"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "resnet99" in err and "da_resnet50" in err


class _FakeSSD(nn.Module):
    """Stands in for SSD300: head_outputs is the network, forward would postprocess."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, num_classes, 1, bias=False)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the counter must use head_outputs, not the postprocessing forward")


def test_cli_detector_counts_head_outputs_at_300_with_21_classes(capsys, monkeypatch):
    from ssd_da.models import complexity

    tool = complexity_tool
    monkeypatch.setattr(complexity, "build_ssd", lambda name, num_classes: _FakeSSD(num_classes))
    complexity.measure_detector.cache_clear()
    counts = _run_csv(tool, ["--csv", "resnet18"], capsys, complete=True)
    # 1x1 conv 3 -> 21 at 300x300: 3 * 21 * 90000 multiply-accumulates (torchstat: 1 FLOP each,
    # FlopCounterMode: 2); 63 params
    assert counts["resnet18"] == (63, 3 * 21 * 300 * 300, 2 * 3 * 21 * 300 * 300)
    counts = _run_csv(tool, ["--csv", "--input-size", "10x20", "resnet18"], capsys)
    assert counts["resnet18"] == (63, 3 * 21 * 10 * 20)
    complexity.measure_detector.cache_clear()


# DA paper Table II (Params in M, GFLOPs). DA-ResNet18/34 GFLOPs come out 0.0001 above the print
# under torchstat's rules (docs/complexity.md): 1.8216 and 3.6745.
TABLE_II = {
    "resnet18": (11.6895, 1.8214), "se_resnet18": (11.7766, 1.8215),
    "da_resnet18": (11.6897, 1.8216),
    "resnet34": (21.7977, 3.6742), "se_resnet34": (21.9549, 3.6744),
    "da_resnet34": (21.7980, 3.6745),
    "resnet50": (25.5570, 4.1185), "se_resnet50": (28.0720, 4.1211),
    "da_resnet50": (25.5574, 4.1188),
    "resnet101": (44.5492, 7.8444), "se_resnet101": (49.2923, 7.8492),
    "da_resnet101": (44.5498, 7.8448),
}


@pytest.mark.slow
def test_cli_reproduces_table_ii(capsys):
    tool = complexity_tool
    counts = _run_csv(tool, ["--classifier", "--csv"], capsys)  # default: the 12 Table II rows
    assert list(counts) == list(TABLE_II)
    got = {n: (round(p / 1e6, 4), round(f / 1e9, 4)) for n, (p, f) in counts.items()}
    assert got == TABLE_II
