"""One SGD step that never makes the host wait for the device, and the checks that read it.

On a GPU the host queues kernels and runs ahead; any read of a device value on the host
(``.item()``, ``bool(t)``, a boolean index...) stops it until the queue drains, and the GPU
then idles while the host prepares the next step. So:

- the batch moves as uint8 pixels (a quarter of float32's bytes) from pinned memory without
  blocking, and the model normalises it on the device (``SSD300.forward``);
- targets stay on the CPU: the loss pads them there and copies them over once (``ssd_loss``);
- a non-finite loss or gradient skips its own update on the device: GradScaler's found-inf
  check with a fused optimizer decides there, without a host read, and a non-finite loss is
  folded into that check by turning its gradients into NaN. The scale starts at 1 and never
  grows (bf16 needs no loss scaling), so a halved scale says that a step was skipped;
- the host reads values only on logging iterations (:func:`read_losses`, one copy) and when
  :class:`FiniteCheck` runs (logging iterations, before checkpoints and evaluations), which
  raises :class:`NonFiniteLossError` naming the iterations. Weights never see a bad update, so
  no checkpoint holds one.

``tests/test_utils_sync.py`` counts the host reads of a step with ``ssd_da.utils.sync``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ssd_da.engine import distributed as dist_utils
from ssd_da.utils.device import autocast_context

__all__ = ["NonFiniteLossError", "make_scaler", "make_optimizer", "sgd_step", "read_losses",
           "FiniteCheck", "check_model_finite"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; that step's update was skipped, and the
    last checkpoint on disk is a good state."""


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler used for its on-device found-inf check: scale 1, halved by each skipped
    step, never grown (growth would only matter for float16, which this project does not use)."""
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float
                   ) -> torch.optim.SGD:
    """SGD with the fused implementation, which skips a step on the device when the scaler
    found non-finite gradients (the foreach one needs the flag on the host)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=True)


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             images: torch.Tensor, targets: list[dict], device: torch.device, amp: bool = False,
             grad_clip: float = 0.0, channels_last: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward, backward and update of one batch, with no host read of a device value.

    Args:
        images: (B, 3, S, S) uint8 pixels or normalised float, on the CPU (pinned) or the device.
        targets: B dicts of CPU ``boxes`` (N, 4) xyxy and ``labels`` (N,), as the loader gives.

    Returns:
        (the detached loss terms on the device, a 0-dim bool tensor: the loss was not finite).
    """
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    with autocast_context(device, amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    not_finite = ~torch.isfinite(loss.detach())
    # x NaN when the loss is not finite: every gradient becomes NaN, which the scaler's check
    # below catches, so one on-device test covers the loss and the gradients.
    loss = loss * torch.where(not_finite, float("nan"), 1.0)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # fused SGD: skipped on the device when a gradient is not finite
    scaler.update()
    return {k: v.detach() for k, v in losses.items()}, not_finite


def read_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms as floats (means over processes) and their sum ``loss``: one host read."""
    values = dist_utils.all_reduce_mean(torch.stack([v.float() for v in losses.values()])).tolist()
    out = dict(zip(losses, values))
    out["loss"] = sum(values)
    return out


class FiniteCheck:
    """Remembers, on the device, whether any loss since the last check was not finite, and
    reads that and the scaler's scale when asked (two host reads)."""

    def __init__(self, iteration: int) -> None:
        self.checked_at = iteration
        self._loss_bad: Optional[torch.Tensor] = None

    def note(self, not_finite: torch.Tensor) -> None:
        self._loss_bad = not_finite if self._loss_bad is None else self._loss_bad | not_finite

    def check(self, scaler: torch.amp.GradScaler, iteration: int, last_good: str = "") -> None:
        """Raise NonFiniteLossError if a step in (last check, ``iteration``] was skipped, its
        message ending with ``last_good`` (where the last good state is). The scale decides (it
        is the same on every process: gradients are all-reduced before the check), so all
        processes stop together."""
        loss_bad = bool(self._loss_bad) if self._loss_bad is not None else False
        skipped = scaler.get_scale() < 1.0
        first = self.checked_at + 1
        self.checked_at, self._loss_bad = iteration, None
        if not skipped:
            return
        what = "loss" if loss_bad else "gradient"
        when = f"iteration {iteration}" if first == iteration else f"iterations {first}..{iteration}"
        raise NonFiniteLossError(
            f"non-finite {what} at {when}; its update was skipped (no update with a non-finite "
            f"value is ever applied) and training stops here. "
            + (last_good or "The last checkpoint on disk is a good state."))



def check_model_finite(model: torch.nn.Module, images: torch.Tensor, iteration: int,
                       last_good: str = "") -> None:
    """Raise NonFiniteLossError unless every parameter and floating buffer of ``model`` is
    finite and so are its raw outputs on the first image of ``images`` (a training batch, run in
    eval mode and without gradients: the BatchNorm statistics stay as they are). Called before a checkpoint
    or an evaluation; one host read (all processes decide together under torchrun).

    A finite loss and gradient can still give weights that overflow: with a learning rate of
    1e30 one step leaves weights near 1e31, finite, whose every output is inf or NaN, and
    FiniteCheck, which sees only losses and gradients, would let the run end "done" on them."""
    net = dist_utils.unwrap(model)
    named = [(n, t) for n, t in (*net.named_parameters(), *net.named_buffers())
             if t.is_floating_point()]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            # One image is enough to see an overflow, and keeps the probe cheap.
            outputs = net.head_outputs(images[:1].to(named[0][1].device, non_blocking=True))
    finally:
        net.train(was_training)
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]
                         + [torch.isfinite(v).all() for v in outputs.values()])
    bad = dist_utils.all_reduce_mean((~finite).float())  # > 0 where any process saw a problem
    if not bool((bad > 0).any()):
        return
    names = [n for n, _ in named] + [f"output {k}" for k in outputs]
    found = [n for n, b in zip(names, (bad > 0).tolist()) if b]
    raise NonFiniteLossError(
        f"non-finite {'weights' if found[0] in dict(named) else 'outputs'} after iteration "
        f"{iteration} (e.g. {', '.join(found[:3])}): a step too large for the network (is the "
        f"learning rate far too high?); nothing is saved from this state and training stops "
        f"here. " + (last_good or "The last checkpoint on disk is a good state."))
