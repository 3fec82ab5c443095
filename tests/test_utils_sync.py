"""A training step reads nothing on the host (no device sync on a GPU) except on logging
iterations; a non-finite step is skipped on the device and reported at the next check."""
from __future__ import annotations

import pytest
import torch

from ssd_da.engine.step import FiniteCheck, NonFiniteLossError, make_optimizer, make_scaler, read_losses, sgd_step
from ssd_da.models import ssd_loss as loss_module
from ssd_da.models.ssd import build_ssd
from ssd_da.utils.sync import count_host_reads

CPU = torch.device("cpu")


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, torch.Tensor, list[dict]]:
    torch.manual_seed(0)
    model = build_ssd("resnet18", 3).train()
    images = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[50.0, 60.0, 200.0, 220.0], [5.0, 5.0, 50.0, 50.0]]),
                "labels": torch.tensor([2, 1])}]
    return model, make_optimizer(model, 1e-3, 0.9, 5e-4), make_scaler(CPU), images, targets


def _host(targets: list[dict]) -> list[torch.Tensor]:
    """The loader's targets stay on the CPU in a GPU run too: reading them is no sync."""
    return [v for t in targets for v in t.values()]


@pytest.mark.slow
def test_training_step_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scaler, images, targets = _setup()
    sgd_step(model, optimizer, scaler, images, targets, CPU)  # first step: lazy state created
    with count_host_reads(_host(targets)) as reads:
        losses, not_finite = sgd_step(model, optimizer, scaler, images, targets, CPU)
    assert dict(reads.counts) == {}
    # A logging iteration reads the loss terms once; a check reads the scale and the flag.
    with count_host_reads(_host(targets)) as reads:
        values = read_losses(losses)
        FiniteCheck(0).check(scaler, 2)
    assert reads.total == 1 + 1 and set(values) == {"bbox_regression", "classification", "loss"}

    # The count would catch a sync added to the step: the loss as it was, with a boolean index.
    real_loss = loss_module.ssd_loss

    def with_boolean_index(cls_logits, *args, **kwargs):
        out = real_loss(cls_logits, *args, **kwargs)
        out["classification"] = out["classification"] + 0 * cls_logits[cls_logits > 0].sum()
        return out

    monkeypatch.setattr("ssd_da.models.ssd.ssd_loss", with_boolean_index)
    with count_host_reads(_host(targets)) as reads:
        sgd_step(model, optimizer, scaler, images, targets, CPU)
    assert reads.counts["boolean-mask indexing"] >= 1


def test_counter_sees_each_kind_of_host_read() -> None:
    host = torch.arange(4.0)
    device = torch.arange(4.0) + 1  # not declared host data
    with count_host_reads([host]) as reads:
        host.sum().item(), host.tolist(), bool(host[0] > 0)  # host data: free
        device.sum().item()
        bool(device[0] > 0)
        device[device > 1]
        device.nonzero()
        device.tolist()
        device.cpu()
    assert dict(reads.counts) == {"_local_scalar_dense": 2, "boolean-mask indexing": 1, "nonzero": 1,
                                  "Tensor.tolist": 1, "Tensor.cpu": 1}


@pytest.mark.slow
def test_non_finite_step_is_skipped_on_the_device_and_reported() -> None:
    model, optimizer, scaler, images, targets = _setup()
    sgd_step(model, optimizer, scaler, images, targets, CPU)
    check = FiniteCheck(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    poisoned = images.float()
    poisoned[0, 0, 0, 0] = float("nan")
    losses, not_finite = sgd_step(model, optimizer, scaler, poisoned, targets, CPU)
    check.note(not_finite)
    for k, v in model.state_dict().items():  # BatchNorm statistics move in forward; weights do not
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=False, msg=k)
    for p, m in zip(model.parameters(), momentum):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], m, rtol=0, atol=0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 2"):
        check.check(scaler, 2)


def test_check_names_a_range_of_iterations_and_passes_when_finite() -> None:
    scaler = make_scaler(CPU)
    check = FiniteCheck(0)
    check.note(torch.tensor(False))
    check.check(scaler, 20)  # scale still 1: nothing skipped
    scaler.scale(torch.ones(()))  # creates the scale tensor (lazily, as in a step)
    scaler.update(1.0 / 2)  # as a skipped step leaves it
    with pytest.raises(NonFiniteLossError, match="gradient at iterations 21..40"):
        check.check(scaler, 40)
