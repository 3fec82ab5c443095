"""The CUDA contract, checked on the CPU (issue 20): every GPU path proves itself here, where no
GPU is, so that the first GPU user does not meet its defects.

- A pretend one-GPU machine (``PretendGPU``, tests/pretend_cuda.py): each entry point runs up to
  its first real CUDA use, and none may reset the allocator's statistics before CUDA is
  initialised.
- Every attention module compiled by inductor under bf16 autocast.
- The NCCL branch of the trainer with torch.distributed mocked; CUDA RNG states only in a process
  that uses CUDA.
- ``--compile``: one training graph and one evaluation graph, whatever the last batch's size.
- bf16 through ``--amp``'s own switch on the CPU: float32 losses and detections, every family.
- The model, the loss and the post-processing on the ``meta`` device: no tensor on a fixed device.
"""
from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from ssd_da.config import load_config

from pretend_cuda import FirstCudaUse, PretendGPU


def test_pretend_gpu_behaves_as_torch_does(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = PretendGPU(monkeypatch)
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert torch.cuda.max_memory_allocated(0) == 0  # statistics read as empty before init
    with pytest.raises(RuntimeError, match="did you call init"):
        torch.cuda.reset_peak_memory_stats(0)
    with pytest.raises(FirstCudaUse, match="_lazy_init"):  # from C++, as every CUDA tensor
        torch.zeros(1).to("cuda")
    assert gpu.calls == ["_cuda_resetPeakMemoryStats", "_lazy_init"] and torch.cuda.is_initialized()
    torch.cuda.reset_peak_memory_stats(0)  # initialised now: no error


# ---------------------------------------------------------------- entry points, up to CUDA
def _train_argv(devkit: Path, out: Path, classes: list[str], device: str) -> list[str]:
    values = {"demo": False, "data_root": str(devkit), "classes": classes, "backbone": "resnet18",
              "pretrained": "none", "batch_size": 2, "iters": 4, "lr_steps": [3], "warmup_iters": 2,
              "eval_every": 0, "workers": 0, "eval_batch_size": 2, "output_dir": str(out)}
    return ["--device", device, *(f"{k}={json.dumps(v)}" for k, v in values.items())]


def _run_train(devkit: Path, out: Path, classes: list[str], ckpt: Path, device: str = "cuda") -> None:
    from ssd_da.cli import train as train_tool

    train_tool.main(_train_argv(devkit, out, classes, device))


def _run_ablate_child(devkit: Path, out: Path, classes: list[str], ckpt: Path) -> None:
    """The command ``tools/ablate.py --gpus 0`` starts for one run, run here in-process."""
    from ssd_da.cli import ablate as ablate_tool
    import ssd_da.experiments.ablate as ablate_module
    from ssd_da.cli import train as train_tool
    from ssd_da.config import resolve_config

    args = ablate_tool.get_args_parser().parse_intermixed_args(_train_argv(devkit, out, classes, "auto"))
    args.output_dir = None
    spec = ablate_module.plan_runs(resolve_config(args), ["resnet18"], [0], out)[0]

    def child(cmd: list[str], env: dict, **kwargs: Any) -> Any:
        """subprocess.Popen's stand-in: the run happens here; wait() gives its exit status."""
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and cmd[1:3] == ["-m", "ssd_da.cli.train"]
        code = train_tool.main(cmd[3:])
        return types.SimpleNamespace(wait=lambda timeout=None: code,
                                     send_signal=lambda signum: None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ablate_module, "subprocess", types.SimpleNamespace(Popen=child, STDOUT=-2))
        ablate_module._train_subprocess(spec, None, "0")


def _run_eval(devkit: Path, out: Path, classes: list[str], ckpt: Path) -> None:
    from ssd_da.cli import eval_voc

    eval_voc.main([
        "--checkpoint", str(ckpt), "--data-root", str(devkit), "--device", "cuda", "--workers", "0",
        "--no-coco"])


def _image(devkit: Path) -> str:
    return str(sorted((devkit / "VOC2007" / "JPEGImages").glob("*.jpg"))[0])


def _run_detect(devkit: Path, out: Path, classes: list[str], ckpt: Path) -> None:
    from ssd_da.cli import detect

    detect.main([_image(devkit), "--checkpoint", str(ckpt), "--out",
                                                      str(out), "--device", "cuda"])


def _run_gradcam(devkit: Path, out: Path, classes: list[str], ckpt: Path) -> None:
    from ssd_da.cli import gradcam

    gradcam.main([_image(devkit), "--checkpoint", str(ckpt), "--out",
                                                       str(out / "cam.png"), "--device", "cuda"])


def _benchmark(*argv: str) -> Callable[..., None]:
    def run(devkit: Path, out: Path, classes: list[str], ckpt: Path) -> None:
        from ssd_da.cli import benchmark

        benchmark.main([
            "--no-write", argv[0], "--device", "cuda", "--data-root", str(devkit), "--workers", "0",
            *argv[1:]])
    return run


ENTRY_POINTS = {
    "train": _run_train,
    "train --device auto": lambda *a: _run_train(*a, device="auto"),
    "ablate --gpus child": _run_ablate_child,
    "eval_voc": _run_eval,
    "detect": _run_detect,
    "gradcam": _run_gradcam,
    "benchmark train": _benchmark("train", "--backbones", "resnet18", "--tv", ""),
    "benchmark eval": _benchmark("eval", "--backbones", "resnet18", "--eval-split", "voc07_test"),
    "benchmark gpu-suite": _benchmark("gpu-suite"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_points_initialise_cuda_before_its_allocator_statistics(
        entry: str, tiny_devkit: Path, tiny_classes: list[str], untrained_checkpoint, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On one GPU with CUDA not yet initialised, each entry point reaches its first real CUDA use
    (where the pretend machine stops it) without a statistics reset before it: on main before
    issue 20, train and every ablate child stopped with "did you call init?"."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ckpt = untrained_checkpoint("resnet18", tiny_classes, 0)
    gpu = PretendGPU(monkeypatch)
    with pytest.raises(FirstCudaUse):
        ENTRY_POINTS[entry](tiny_devkit, tmp_path / "out", tiny_classes, ckpt)
    assert gpu.calls[-1].split("(")[0] in PretendGPU.INITIALISERS
    assert not set(gpu.calls) & set(PretendGPU.RESETS), gpu.calls


# ---------------------------------------------------------------- compiled attention under bf16
COMPILED_MODULES = ["da", "se", "eca", "sge", "cbam", "sa", "lga", "la", "ga", "mhsa"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED_MODULES)
def test_inductor_compiled_module_under_bf16_autocast_matches_eager(name: str) -> None:
    """Each attention module compiled by inductor, on a bf16 input (as a conv's output under
    autocast), forward and backward under bf16 autocast: finite gradients, and no further from
    eager bf16 than bf16 itself allows. Tolerance: bf16 keeps 8 significant bits; eager rounds
    after every operation, the compiled graph keeps float32 in between and rounds where it
    stores. Both approximate the float32 computation, so their gap is at most the sum of their
    distances to it: we ask the compiled one to be no worse than eager, i.e. a gap of at most
    twice eager's own distance to float32, plus 2^-8 (one bf16 step) where eager hits float32
    exactly. Measured (2x64x10x10): gaps 0.002-0.025, eager's distance 0.002-0.035 (SGE's
    normalisation over 64 groups of one channel makes its gradient the least well conditioned).
    On main before issue 20, CBAM's input gradient was NaN in every entry."""
    from ssd_da.models.attention import build_attention

    torch.manual_seed(0)
    module = build_attention(name, 64).train()
    with torch.no_grad():  # off the init values (SGE's zeros, identity-like gates)
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled = torch.compile(copy.deepcopy(module), backend="inductor")
    x = torch.randn(2, 64, 10, 10).bfloat16()
    weights = torch.randn(2, 64, 10, 10)
    results = []
    for net, amp, dtype in ((module, True, torch.bfloat16), (compiled, True, torch.bfloat16),
                            (copy.deepcopy(module), False, torch.float32)):
        xi = x.to(dtype, copy=True).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = net(xi)
        (y.float() * weights).sum().backward()
        results.append((y.detach(), xi.grad))
    (y_eager, g_eager), (y_comp, g_comp), (y_fp32, g_fp32) = results
    assert torch.isfinite(g_comp).all(), f"{int((~torch.isfinite(g_comp)).sum())} non-finite"
    for comp, eager, exact in ((y_comp, y_eager, y_fp32), (g_comp, g_eager, g_fp32)):
        assert _relative(comp, eager) <= 2 * _relative(eager, exact) + 2 ** -8


# ---------------------------------------------------------------- torchrun with NCCL, mocked
class _FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel (which needs a real process group): keeps its
    arguments."""

    def __init__(self, module: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.module, self.kwargs = module, kwargs


class _StopEvaluation(Exception):
    pass


def _mock_process_group(monkeypatch: pytest.MonkeyPatch, calls: list[str], world: int) -> None:
    import torch.distributed as dist

    initialised = []

    def init_process_group(backend: str, **kwargs: Any) -> None:
        calls.append(f"init_process_group({backend})")
        initialised.append(True)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(initialised))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: world)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: None)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", _FakeDDP)


def test_nccl_branch_sets_the_device_first_and_gives_it_to_ddp(
        tiny_devkit: Path, tiny_classes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 on a two-GPU machine (torchrun's environment): the device is set before the
    NCCL process group starts (NCCL binds a communicator to the current device), DDP gets
    ``device_ids`` and ``output_device``, and the evaluation divides the cores between the
    processes as training does (on main before issue 20 it started one worker per core in
    every process)."""
    import ssd_da.engine.evaluation as evaluation
    import ssd_da.engine.setup as setup
    from ssd_da.models.ssd import build_ssd

    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    gpu = PretendGPU(monkeypatch, devices=2, stop=False)
    _mock_process_group(monkeypatch, gpu.calls, world=2)
    cfg = load_config(None, ["device=cuda", "pretrained=none", "backbone=resnet18", "workers=-1",
                             f"data_root={tiny_devkit}", f"classes={json.dumps(tiny_classes)}"])
    device, rank, world = setup.prepare_process(cfg)
    assert (device, rank, world) == (torch.device("cuda", 1), 1, 2)
    assert gpu.calls[:2] == ["set_device(1)", "init_process_group(nccl)"]
    assert gpu.calls[-1] == "_cuda_resetPeakMemoryStats"
    state = setup.build_train_state(cfg, build_ssd("resnet18", 3), "none", device)
    assert isinstance(state.model, _FakeDDP)
    assert state.model.kwargs == {"device_ids": [1], "output_device": 1}

    seen = {}

    def evaluate_model(*args: Any, **kwargs: Any) -> None:
        seen["workers"] = args[5]
        raise _StopEvaluation

    monkeypatch.setattr(evaluation, "evaluate_model", evaluate_model)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    with pytest.raises(_StopEvaluation):
        evaluation.evaluate(state, None, tiny_classes, cfg, device, tmp_path, None)
    assert seen["workers"] == 16 // 2 - 1  # as training's loader: the cores shared, one kept


def test_cuda_rng_state_only_in_a_process_that_uses_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A --device cpu run on a GPU machine neither saves nor restores a CUDA RNG state: reading
    it would initialise CUDA (a context, GPU memory) in a process that never uses the GPU. On main
    before issue 20 both did whenever CUDA was available."""
    from ssd_da.engine.checkpoint import rng_states, set_rng_states

    gpu = PretendGPU(monkeypatch)  # stops at the first initialisation
    states = rng_states()
    assert "cuda" not in states
    set_rng_states({**states, "cuda": torch.zeros(16, dtype=torch.uint8)})
    assert gpu.calls == []
    gpu.initialised = True  # a process on the GPU: its state is saved and restored
    saved = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: restored.append(state))
    assert rng_states()["cuda"] is saved
    set_rng_states(rng_states())
    assert restored == [saved]


# ---------------------------------------------------------------- compile count
TARGETS = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[50.0, 60.0, 200.0, 220.0]]), "labels": torch.tensor([2])}]


class _Images(torch.utils.data.Dataset):
    """``count`` seeded uint8 300x300 images as the evaluation loader's items."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, 300, 300), dtype=torch.uint8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return self.images[index], {"orig_size": torch.tensor([300, 300]), "index": index}


@pytest.mark.slow
def test_compile_makes_one_training_graph_and_one_evaluation_graph() -> None:
    """Two training steps (batch 2), then two evaluations of 5 images in batches of 2, 2, 1:
    one graph for training and one for evaluation, the last batch padded to 2 rather than
    compiled again; the padded batch's detections are the eager model's. (On main before issue
    20: three graphs, the batch of 1 compiled anew; 50-70 s each on a CPU with inductor.)"""
    from torch._dynamo.testing import CompileCounter

    from ssd_da.engine.inference import predict
    from ssd_da.engine.step import make_optimizer, make_scaler, sgd_step
    from ssd_da.models.ssd import build_ssd

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_ssd("resnet18", 3)
    model = copy.deepcopy(eager)
    counter = CompileCounter()  # counts the graphs dynamo hands over; runs them as they are
    model.compile_network(backend=counter)
    cpu = torch.device("cpu")
    optimizer, scaler = make_optimizer(model, 1e-3, 0.9, 0.0), make_scaler(cpu)
    model.train()
    for _ in range(2):
        sgd_step(model, optimizer, scaler, _Images(2).images, TARGETS, cpu)
    assert counter.frame_count == 1
    eager.load_state_dict(model.state_dict())
    for _ in range(2):
        detections, _ = predict(model, _Images(5), cpu, batch_size=2, workers=0, progress=False)
    assert counter.frame_count == 2
    expected, _ = predict(eager, _Images(5), cpu, batch_size=2, workers=0, progress=False)
    for index in range(5):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(torch.as_tensor(detections[index][key]),
                                       torch.as_tensor(expected[index][key]), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- bf16 through --amp's switch
FAMILIES = ["resnet18", "da_resnet18", "se_resnet18", "eca_resnet18", "sge_resnet18", "cbam_resnet18",
            "resnet18_sa", "resnet18_mhsa", "resnet18_lga", "resnet18_la", "resnet18_ga"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", FAMILIES)
def test_bf16_training_steps_and_predict_give_float32_results(
        backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``amp=True`` through ``autocast_context`` (CPU_AMP: the CPU's bf16 autocast, the GPU's
    code path): two SGD steps whose losses are float32, finite and not skipped, and ``predict``
    whose raw detections (before the copy to numpy) are float32."""
    import ssd_da.engine.inference as inference
    import ssd_da.utils.device as device_utils
    from ssd_da.engine.step import make_optimizer, make_scaler, sgd_step
    from ssd_da.models.ssd import build_ssd

    monkeypatch.setattr(device_utils, "CPU_AMP", True)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_ssd(backbone, 3)
    optimizer, scaler = make_optimizer(model, 1e-3, 0.9, 5e-4), make_scaler(cpu)
    data = _Images(2)
    head_dtypes = []  # the network did run in bf16
    model.head.register_forward_hook(lambda m, i, out: head_dtypes.append(out["cls_logits"].dtype))
    model.train()
    totals = []
    for _ in range(2):
        losses, not_finite = sgd_step(model, optimizer, scaler, data.images, TARGETS, cpu, amp=True)
        assert all(v.dtype == torch.float32 for v in losses.values()) and not bool(not_finite)
        totals.append(float(sum(losses.values())))
    assert scaler.get_scale() == 1.0 and totals[1] != totals[0]  # both steps were applied
    raw = []
    real_to_host = inference._to_host
    monkeypatch.setattr(inference, "_to_host", lambda dets: raw.extend(dets) or real_to_host(dets))
    detections, _ = inference.predict(model, data, cpu, batch_size=2, workers=0, amp=True, progress=False)
    assert head_dtypes == [torch.bfloat16] * 3
    assert len(raw) == 2 and all(d[k].dtype == torch.float32 for d in raw for k in ("boxes", "scores"))
    assert all(np.isfinite(d["scores"]).all() and len(d["scores"]) > 0 for d in detections.values())


# ---------------------------------------------------------------- no tensor on a fixed device
def _keep_all_in_score_order(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                             threshold: float) -> torch.Tensor:
    """Stands in for torchvision's batched_nms on the meta device, where NMS cannot run (its
    output size depends on the values): every candidate kept, best first, on the inputs' device."""
    assert boxes.device == scores.device == labels.device
    return torch.argsort(scores, descending=True)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_model_loss_and_postprocessing_run_on_the_meta_device(
        backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole model on ``meta`` (a device that is not the CPU, as CUDA is not): the network,
    the loss with its backward, and the post-processing. An operation mixing a meta tensor
    with a CPU tensor raises ("Tensor on device cpu is not on the expected device meta"), so a
    tensor made on a fixed device (``torch.zeros(n)``, ``.cpu()``) anywhere on the way fails
    here as it would on a GPU. Targets stay real CPU tensors, as the loader gives them."""
    import torch.fx.experimental._config as fx_config

    import ssd_da.models.ssd as ssd_module

    if not hasattr(fx_config, "meta_nonzero_assume_all_nonzero"):
        pytest.skip("this torch has no meta kernel for nonzero")
    torch.manual_seed(0)
    model = ssd_module.build_ssd(backbone, 3).to("meta")
    images = torch.empty(2, 3, 300, 300, dtype=torch.uint8, device="meta")
    targets = [TARGETS[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    assert {v.device.type for v in losses.values()} == {"meta"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    model.eval()
    monkeypatch.setattr(ssd_module, "batched_nms", _keep_all_in_score_order)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # nonzero's size: all kept
        detections = model(images, original_sizes=[(300, 300), (375, 500)])
    assert all(v.device.type == "meta" for d in detections for v in d.values())
    assert detections[0]["boxes"].shape == (model.detections_per_img, 4)
