"""The attention modules rewritten for speed (issue 24) compute what they computed before: the
pre-issue code is kept in ssd_da/bench/legacy_attention.py, and every module here equals it in
float64 (output, input gradient, parameter gradients), in both memory formats, eager and on the
path used under torch.compile."""
from __future__ import annotations

import pytest
import torch

from ssd_da.bench.legacy_attention import build_legacy
from ssd_da.models.attention import build_attention
from ssd_da.models.fused_gates import gate, native_convs

# Every registered module that has a legacy twin, with the option sets worth telling apart.
CASES = [("da", {}), ("da", {"channel_affine": True}), ("da_cs", {}), ("da_cs", {"channel_affine": True}),
         ("da_par", {}), ("da_par", {"channel_affine": True}), ("da_s", {}), ("da_c", {}),
         ("da_c", {"channel_affine": True}), ("se", {}), ("se", {"reduction": 4}), ("eca", {}),
         ("eca", {"kernel_size": 7}), ("sge", {}), ("sge", {"groups": 8}), ("cbam", {}),
         ("cbam", {"kernel_size": 3})]
TOL = 1e-12  # float64: the rewritten passes sum in another order, nothing else


def _pair(name: str, options: dict, channels: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    new = build_attention(name, channels, **options).double().train()
    with torch.no_grad():  # off the init values (SGE's zero weight, CBAM's zero BN weight, ...)
        for p in new.parameters():
            p.add_(0.3 * torch.randn_like(p))
    old = build_legacy(name, channels, **options).double().train()
    old.load_state_dict(new.state_dict())
    return new, old


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp(min=1e-300)
    assert ((actual - expected).abs().max() / scale).item() < TOL, what


def _input(shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) + 0.2
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name,options", CASES)
def test_equals_the_legacy_module_in_float64(name: str, options: dict, channels_last: bool) -> None:
    new, old = _pair(name, options, 64)
    x = _input((3, 64, 9, 7), channels_last).requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    weights = torch.randn(3, 64, 9, 7, dtype=torch.float64)
    y, y_old = new(x), old(x_old)
    _close(y, y_old, "output")
    if y_old.is_contiguous(memory_format=torch.channels_last):  # a layout kept stays kept
        assert y.is_contiguous(memory_format=torch.channels_last)
    (y * weights).sum().backward()
    (y_old * weights).sum().backward()
    _close(x.grad, x_old.grad, "input gradient")
    for (pname, p), p_old in zip(new.named_parameters(), old.parameters()):
        _close(p.grad, p_old.grad, pname)
    for (bname, b), b_old in zip(new.named_buffers(), old.buffers()):  # BN running statistics
        _close(b.double(), b_old.double(), bname)


@pytest.mark.parametrize("name,options", CASES)
def test_equals_the_legacy_module_without_grad_and_in_eval_mode(name: str, options: dict) -> None:
    new, old = _pair(name, options, 64)
    x = _input((2, 64, 5, 6), False)
    with torch.no_grad():
        _close(new(x), old(x), "no_grad, train mode")
    new.eval(), old.eval()
    with torch.inference_mode():
        _close(new(x), old(x), "inference_mode, eval mode")


@pytest.mark.parametrize("name,options", CASES)
def test_the_compiled_path_equals_the_legacy_module(name: str, options: dict, monkeypatch) -> None:
    # Under torch.compile the modules take their traceable formulas (attention_ops); run that
    # path eagerly here, by making the modules believe they are being compiled.
    new, old = _pair(name, options, 64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = _input((2, 64, 6, 5), False).requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    y, y_old = new(x), old(x_old)
    _close(y, y_old, "output")
    y.pow(2).sum().backward()
    y_old.pow(2).sum().backward()
    _close(x.grad, x_old.grad, "input gradient")
    for (pname, p), p_old in zip(new.named_parameters(), old.parameters()):
        _close(p.grad, p_old.grad, pname)


@pytest.mark.parametrize("name,options", CASES)
def test_the_whole_batch_path_of_other_devices_equals_the_legacy_module(name: str, options: dict,
                                                                        monkeypatch) -> None:
    # On a GPU the fused functions take the batch in one piece (bmm) where the CPU goes one
    # sample at a time (gemv): the CPU stand-in for that branch, which no GPU runs here.
    from ssd_da.models import fused_cbam, fused_gates, fused_sge

    calls = []

    def whole_batch(x: torch.Tensor):
        calls.append(x.shape[0])
        return iter((slice(None),))

    for module in (fused_gates, fused_cbam, fused_sge):
        monkeypatch.setattr(module, "_samples", whole_batch)
    new, old = _pair(name, options, 64)
    x = _input((3, 64, 9, 7), False).requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    y, y_old = new(x), old(x_old)
    _close(y, y_old, "output")
    y.pow(2).sum().backward()
    y_old.pow(2).sum().backward()
    _close(x.grad, x_old.grad, "input gradient")
    for (pname, p), p_old in zip(new.named_parameters(), old.parameters()):
        _close(p.grad, p_old.grad, pname)
    assert calls and set(calls) == {3}  # the branch was taken, forward and backward


def test_native_convs_restores_the_onednn_flag() -> None:
    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="inside"):
        with native_convs():
            assert not torch.backends.mkldnn.enabled
            raise RuntimeError("inside")
    assert torch.backends.mkldnn.enabled == before


def test_gate_rejects_an_unknown_order() -> None:
    with pytest.raises(ValueError, match=r"unknown order 'sx'.*'sc'"):
        gate(torch.zeros(1, 2, 3, 3), "sx")


@pytest.mark.parametrize("name", ["da", "da_cs", "se", "eca", "sge", "cbam"])
def test_bf16_autocast_is_close_to_float32(name: str) -> None:
    torch.manual_seed(0)
    module = build_attention(name, 64).train()
    x = (torch.randn(2, 64, 8, 8) + 0.2).requires_grad_(True)
    y32 = module(x)
    y32.sum().backward()
    g32, x.grad = x.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = module(x.to(torch.bfloat16))
    y16.float().sum().backward()
    assert torch.isfinite(y16).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(x.grad, g32, rtol=0.1, atol=0.1)


def test_cbam_splits_the_gradient_between_tied_maxima_as_before() -> None:
    # Small integers: many positions tie for the channel's maximum, and where x is 0 in several
    # channels that all others undercut, x * c ties at 0 across channels. Each tie gets an even
    # share, as torch.amax's gradient gives it.
    new, old = _pair("cbam", {}, 32)
    torch.manual_seed(3)
    x = torch.randint(-3, 2, (2, 32, 5, 4)).double().requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    y, y_old = new(x), old(x_old)
    _close(y, y_old, "output")
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_old * weights).sum().backward()
    _close(x.grad, x_old.grad, "input gradient")
    for (pname, p), p_old in zip(new.named_parameters(), old.parameters()):
        _close(p.grad, p_old.grad, pname)


@pytest.mark.parametrize("size", [(1, 1), (4, 3)])
def test_sge_on_one_position_and_on_constant_groups_as_before(size: tuple[int, int]) -> None:
    # One position: the centred similarity is 0 whatever x is (no 0/0). Constant groups (x the
    # same small integer at every position, so the centred similarity is exactly 0): std 0,
    # whose gradient torch.std takes as 0; the rewritten backward must too.
    new, old = _pair("sge", {"groups": 4}, 8)
    x = torch.randint(-3, 4, (2, 8, 1, 1)).double().expand(2, 8, *size).contiguous()
    x[1] += torch.randn(8, *size, dtype=torch.float64)  # sample 1 varies, sample 0 is constant
    x.requires_grad_(True)
    x_old = x.detach().clone().requires_grad_(True)
    y, y_old = new(x), old(x_old)
    _close(y, y_old, "output")
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_old * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    _close(x.grad, x_old.grad, "input gradient")
    for (pname, p), p_old in zip(new.named_parameters(), old.parameters()):
        _close(p.grad, p_old.grad, pname)
