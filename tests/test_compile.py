"""uint8 input, --channels-last and --compile compute what the eager float NCHW model computes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ssd_da.data.augment import to_tensor
from ssd_da.models.resnet import Bottleneck
from ssd_da.models.ssd import build_ssd


def _batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 300, 300), dtype=np.uint8))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[50.0, 60.0, 200.0, 220.0], [5.0, 5.0, 50.0, 50.0]]),
                "labels": torch.tensor([2, 1])}]
    return images, targets


def _losses_and_grads(model: torch.nn.Module, images: torch.Tensor, targets: list[dict]
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    return torch.stack([losses["bbox_regression"], losses["classification"]]).detach(), \
        [p.grad.clone() for p in model.parameters()]


def _assert_grads_close(grads: list[torch.Tensor], reference: list[torch.Tensor], tol: float) -> None:
    """||g - g_ref|| / ||g_ref|| per parameter: another memory format or a compiled graph sums in
    another order, and float32 rounding differences grow through 20 layers of backward."""
    for i, (g, ref) in enumerate(zip(grads, reference)):
        error = (g - ref).norm() / ref.norm().clamp(min=1e-12)
        assert error < tol, (i, float(error))


def test_uint8_batch_is_normalised_like_the_data_pipeline() -> None:
    torch.manual_seed(0)
    model = build_ssd("resnet18", 3).eval()
    pixels = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    with torch.no_grad():
        as_float = model.head_outputs(to_tensor(pixels, False, "float")[None])
        as_uint8 = model.head_outputs(to_tensor(pixels, False, "uint8")[None])
    torch.testing.assert_close(as_uint8, as_float, rtol=0, atol=0)
    with pytest.raises(ValueError, match="float .* or uint8"):
        model.head_outputs(torch.zeros(1, 3, 300, 300, dtype=torch.int32))


@pytest.mark.slow
def test_channels_last_gives_the_same_losses_and_gradients() -> None:
    torch.manual_seed(0)
    eager = build_ssd("da_resnet18", 3)
    other = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    images, targets = _batch()
    losses, grads = _losses_and_grads(eager, images, targets)
    losses_cl, grads_cl = _losses_and_grads(other, images.contiguous(memory_format=torch.channels_last), targets)
    torch.testing.assert_close(losses_cl, losses, rtol=1e-4, atol=1e-5)
    _assert_grads_close(grads_cl, grads, 1e-3)


@pytest.mark.slow
def test_compiled_network_gives_the_same_losses_and_gradients() -> None:
    # aot_eager: graph capture and AOTAutograd (the custom attention functions included)
    # without generating kernels, which takes minutes on a CPU; the inductor test below
    # compiles one block.
    torch.manual_seed(0)
    eager = build_ssd("da_resnet18", 3)
    compiled = copy.deepcopy(eager)
    compiled.compile_network(backend="aot_eager")
    images, targets = _batch()
    losses, grads = _losses_and_grads(eager, images, targets)
    losses_c, grads_c = _losses_and_grads(compiled, images, targets)
    torch.testing.assert_close(losses_c, losses, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads_c, grads, 1e-4)
    assert set(compiled.state_dict()) == set(eager.state_dict())


@pytest.mark.slow
def test_inductor_compiles_a_da_bottleneck_to_the_same_numbers() -> None:
    torch.manual_seed(0)
    block = Bottleneck(64, 16, attention="da").train()
    with torch.no_grad():
        for p in block.attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    twin = copy.deepcopy(block)
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    y = block(x)
    y_c = torch.compile(twin)(x_twin)
    torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_c * weights).sum().backward()
    torch.testing.assert_close(x_twin.grad, x.grad, rtol=1e-4, atol=1e-5)
    for p, p_c in zip(block.parameters(), twin.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-3, atol=1e-4)
