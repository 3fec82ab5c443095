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


def _two_sgd_steps(model: torch.nn.Module, images: torch.Tensor, targets: list[dict],
                   channels_last: bool = False) -> list[float]:
    """The summed loss of two training steps as the trainer takes them (uint8 batch, CPU
    targets, fused SGD behind the scaler's check): the second loss sees the first update."""
    from ssd_da.engine.step import make_optimizer, make_scaler, read_losses, sgd_step

    cpu = torch.device("cpu")
    optimizer, scaler = make_optimizer(model, 1e-2, 0.9, 5e-4), make_scaler(cpu)
    model.train()
    out = []
    for _ in range(2):
        losses, _ = sgd_step(model, optimizer, scaler, images, targets, cpu, channels_last=channels_last)
        out.append(read_losses(losses)["loss"])
    return out


@pytest.mark.slow
def test_training_steps_with_channels_last_or_compile_give_the_eager_losses() -> None:
    torch.manual_seed(0)
    eager = build_ssd("da_resnet18", 3)
    last = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    compiled = copy.deepcopy(eager)
    compiled.compile_network(backend="aot_eager")
    images, targets = _batch()
    reference = _two_sgd_steps(eager, images, targets)
    assert reference[1] != pytest.approx(reference[0], rel=1e-3)  # the update did change the loss
    assert _two_sgd_steps(last, images, targets, channels_last=True) == pytest.approx(reference, rel=1e-4)
    assert _two_sgd_steps(compiled, images, targets) == pytest.approx(reference, rel=1e-5)


def test_trainer_builds_the_model_with_the_options(tmp_path) -> None:
    from ssd_da.config import load_config
    from ssd_da.engine.setup import build_model

    cfg = load_config(None, ["backbone=resnet18", "pretrained=none", "channels_last=true", "compile=true"])
    model, _ = build_model(cfg, 3, torch.device("cpu"))
    conv = model.backbone.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model._network != model._run_network  # torch.compile's wrapper (compiles on first call)
    plain, _ = build_model(load_config(None, ["backbone=resnet18", "pretrained=none"]), 3, torch.device("cpu"))
    assert plain.backbone.layer2[0].conv1.weight.is_contiguous()
    assert plain._network == plain._run_network


def test_detections_reach_the_host_in_one_copy_unchanged() -> None:
    from ssd_da.engine.inference import _to_host

    dets = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.5, 6.0, 7.0, 8.25]]),
             "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([3, 1])},
            {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
            {"boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0]], dtype=torch.bfloat16),
             "scores": torch.tensor([0.5], dtype=torch.bfloat16), "labels": torch.tensor([2])}]
    out = _to_host(dets)
    np.testing.assert_array_equal(out[0]["boxes"], [[1, 2, 3, 4], [5.5, 6, 7, 8.25]])
    np.testing.assert_array_equal(out[0]["scores"], np.float32([0.9, 0.25]))
    np.testing.assert_array_equal(out[0]["labels"], [3, 1])
    assert out[1]["boxes"].shape == (0, 4) and out[1]["scores"].shape == (0,) and out[1]["labels"].shape == (0,)
    np.testing.assert_array_equal(out[2]["boxes"], [[0, 0, 10, 20]])
    assert out[2]["labels"].dtype == np.int64 and out[2]["scores"].dtype == np.float32
