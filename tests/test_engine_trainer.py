"""Training loop: exact resume, non-finite loss handling, the sampler, DDP on CPU (gloo)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ssd_da.cli import train as train_tool

from ssd_da.config import load_config
from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.engine.checkpoint import load_checkpoint
from ssd_da.engine.loaders import ResumableTrainSampler
from ssd_da.engine.setup import lr_factor
from ssd_da.engine.trainer import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(data_root: Path, out: Path, **kw):
    items = {
        "demo": False, "data_root": str(data_root), "train_split": "voc07_trainval",
        "test_split": "voc07_test", "backbone": "da_resnet18", "pretrained": "none",
        "batch_size": 2, "iters": 4, "lr": 0.01, "lr_steps": [3], "warmup_iters": 2,
        "eval_every": 0, "ckpt_every": 1, "log_every": 1, "workers": 0, "eval_batch_size": 4,
        "output_dir": str(out),
    }
    items.update(kw)
    items.setdefault("classes", list(DEMO_CLASSES))
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def losses_of(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in recs if "loss" in r}


def test_lr_schedule_by_hand():
    cfg = load_config(None, ["warmup_iters=10", "warmup_factor=0.5", "lr_steps=[20,30]"])
    assert lr_factor(0, cfg) == pytest.approx(0.5)
    assert lr_factor(5, cfg) == pytest.approx(0.75)  # halfway from 0.5 to 1
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(19, cfg) == 1.0
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(30, cfg) == pytest.approx(0.01)


def test_sampler_shards_one_permutation_and_resumes():
    full = list(ResumableTrainSampler(10, batch_size=2, seed=3, start_iter=0, total_iters=7))
    # 5 batches per epoch: the first 5 iterations are one permutation of the 10 images.
    assert sorted(i for i, _ in full[:10]) == list(range(10))
    tail = list(ResumableTrainSampler(10, batch_size=2, seed=3, start_iter=3, total_iters=7))
    assert tail == full[6:]
    ranks = [list(ResumableTrainSampler(10, 2, 3, 0, 2, rank=r, world_size=2)) for r in (0, 1)]
    idx = [i for r in ranks for i, _ in r]
    assert sorted(idx) == sorted(set(idx)) and len(idx) == 8  # disjoint shards, whole batches
    with pytest.raises(ValueError, match="batch-size"):
        ResumableTrainSampler(3, batch_size=4, seed=0, start_iter=0, total_iters=1)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_devkit, tmp_path):
    straight = train(tiny_cfg(tiny_devkit, tmp_path / "a", iters=4))
    first = train(tiny_cfg(tiny_devkit, tmp_path / "b", iters=2))
    assert first["iterations"] == 2
    resumed = train(tiny_cfg(tiny_devkit, tmp_path / "b", iters=4), resume=tmp_path / "b/last.pth")
    assert resumed["iterations"] == 4
    la, lb = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    assert set(la) == {1, 2, 3, 4} and set(lb) == {1, 2, 3, 4}
    recs = [json.loads(x) for x in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if "loss" in r] == [1, 2, 3, 4]  # no duplicates on resume
    # The logged lr is the one each step used: warmup 1/3 -> 1 over 2 iterations, x0.1 at 3.
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert lrs == pytest.approx([0.01 / 3, 0.01 * (0.5 / 3 + 0.5), 0.01, 0.001])
    for it in la:
        assert lb[it] == pytest.approx(la[it], rel=1e-6, abs=1e-6), it
    wa = load_checkpoint(tmp_path / "a/last.pth")["model"]
    wb = load_checkpoint(tmp_path / "b/last.pth")["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "a/curves.png").stat().st_size > 1000
    assert (tmp_path / "a/best.pth").exists() and (tmp_path / "a/config.yaml").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good(tiny_devkit, tmp_path, monkeypatch, capsys):
    from ssd_da.models import ssd as ssd_module

    real_forward, calls = ssd_module.SSD300.forward, {"n": 0}

    def poisoned(self, images, targets=None, original_sizes=None):
        out = real_forward(self, images, targets, original_sizes)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(ssd_module.SSD300, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        train(tiny_cfg(tiny_devkit, tmp_path / "nan", iters=5))
    ckpt = load_checkpoint(tmp_path / "nan/last.pth")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    # The command line turns it into exit code 3 with the step in the message.
    calls["n"] = 0
    tool = train_tool
    cfg = tiny_cfg(tiny_devkit, tmp_path / "nan_cli", iters=5)
    argv = ["--data-root", str(tiny_devkit), "--output-dir", str(tmp_path / "nan_cli"),
            *(f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items()
              if k in ("classes", "batch_size", "iters", "workers", "pretrained", "demo", "lr", "backbone",
                       "train_split", "test_split", "log_every",
                       "lr_steps", "warmup_iters", "eval_every", "ckpt_every"))]
    assert tool.main(argv) == 3
    err = capsys.readouterr().err  # tqdm's progress bar goes to stderr too
    assert "train.py: error: non-finite loss at iteration 3" in err
    assert load_checkpoint(tmp_path / "nan_cli/last.pth")["iteration"] == 2


@pytest.mark.slow
def test_non_finite_gradient_stops_before_the_update(tiny_devkit, tmp_path, monkeypatch):
    from ssd_da.models import ssd as ssd_module

    real_forward, calls = ssd_module.SSD300.forward, {"n": 0}

    def poisoned(self, images, targets=None, original_sizes=None):
        out = real_forward(self, images, targets, original_sizes)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:  # finite value (0 * sqrt(0) = 0), NaN gradient (0 * inf)
                zero = self.head.classification_head.module_list[0].weight.sum() * 0
                out["classification"] = out["classification"] + 0 * torch.sqrt(zero)
        return out

    monkeypatch.setattr(ssd_module.SSD300, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at iteration 2"):
        train(tiny_cfg(tiny_devkit, tmp_path / "g", iters=4))
    ckpt = load_checkpoint(tmp_path / "g/last.pth")
    assert ckpt["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_mistyped_pretrained_path_is_an_error(tiny_devkit, tmp_path):
    with pytest.raises(FileNotFoundError, match="typo.pth"):
        train(tiny_cfg(tiny_devkit, tmp_path / "p", iters=1, pretrained=str(tmp_path / "typo.pth")))


@pytest.mark.parametrize("source", ["resnet18_imagenet.pth.tar", "weights.bin", "r18.pt"])
def test_pretrained_that_is_neither_file_nor_weights_name_is_an_error(source, tmp_path,
                                                                     monkeypatch):
    from ssd_da.engine.setup import build_model

    monkeypatch.chdir(tmp_path)  # none of these names exists here
    cfg = tiny_cfg(tmp_path, tmp_path / "o", backbone="resnet18", pretrained=source)
    with pytest.raises(FileNotFoundError, match=source.replace(".", r"\.")):
        build_model(cfg, 4, torch.device("cpu"))


def test_unreachable_weights_name_falls_back_to_scratch(tmp_path, monkeypatch, caplog):
    """Offline, a weights name trains from scratch, says so once (on rank 0 only) and records
    why in the run's backbone_init."""
    from ssd_da.engine import distributed as dist_utils
    from ssd_da.engine.setup import build_model
    from ssd_da.models import pretrained

    def offline(weights):
        raise RuntimeError(f"could not fetch {weights} (offline)")

    monkeypatch.setattr(pretrained, "_download", offline)
    cfg = tiny_cfg(tmp_path, tmp_path / "o", backbone="resnet18", pretrained="IMAGENET1K_V1")
    for main, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(dist_utils, "is_main_process", lambda: main)
        caplog.clear()
        with caplog.at_level("WARNING"):
            model, init = build_model(cfg, 4, torch.device("cpu"))
        assert init == "none (IMAGENET1K_V1 unreachable)"
        assert model.backbone.layer1[0].conv1.weight.shape == (64, 64, 3, 3)
        assert sum("unreachable" in r.getMessage() and "from scratch" in r.getMessage()
                   for r in caplog.records) == expected
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == expected


@pytest.mark.slow
def test_resume_refuses_other_architecture(tiny_devkit, tmp_path):
    train(tiny_cfg(tiny_devkit, tmp_path / "r18", iters=1))
    from ssd_da.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="resnet18"):
        train(tiny_cfg(tiny_devkit, tmp_path / "r34", iters=2, backbone="resnet34"),
              resume=tmp_path / "r18/last.pth")


def test_cli_nan_exit_code_and_unknown_backbone(tiny_devkit, tmp_path):
    cmd = [sys.executable, str(ROOT / "tools/train.py"), "--backbone", "nope_resnet50",
           "--data-root", str(tiny_devkit), "--output-dir", str(tmp_path / "x"), "pretrained=none",
           "demo=false", "classes=[circle]"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2
    assert "nope_resnet50" in res.stderr and "da_resnet50" in res.stderr  # lists valid names


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_devkit, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "tools/train.py"), "--backbone", "resnet18",
           "--data-root", str(tiny_devkit), "--output-dir", str(out), "--device", "cpu",
           "--iters", "2", "--batch-size", "2", "--workers", "0", "pretrained=none",
           "train_split=voc07_trainval", "test_split=voc07_test", "classes=" + json.dumps(list(DEMO_CLASSES)),
           "eval_every=0", "ckpt_every=1", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_iters = [r["iter"] for r in records if "loss" in r]
    assert train_iters == [1, 2]  # rank 0 alone writes the log: one record per iteration
    assert sum("map" in r for r in records) == 1  # one (sharded, gathered) final evaluation
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iteration"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    assert math.isfinite(records[-1]["map"])
    # The run ends by checking that both ranks hold bit-identical weights (it would exit non-zero
    # otherwise, e.g. if the model were not wrapped in DDP and each rank stepped on its own shard).
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4
    assert "global batch 4" in res.stdout
    assert res.stderr.count("voc07_trainval (") == 1  # INFO lines from rank 0 only


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_worker(rank: int, port: int, diverge: bool, result_file: str) -> None:
    import torch.distributed as dist

    from ssd_da.engine.distributed import check_replicas_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))  # 0-dim
    model[1].running_mean += rank  # buffers may differ (per-process BatchNorm statistics)
    if diverge and rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-7
    try:
        check_replicas_agree(model)
        outcome = "agree"
    except RuntimeError as exc:
        outcome = str(exc)
    Path(f"{result_file}.{rank}").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow  # two processes, each importing torch: seconds, not milliseconds
@pytest.mark.parametrize("diverge", [False, True])
def test_check_replicas_agree_two_processes(diverge, tmp_path):
    import torch.multiprocessing as mp

    result = str(tmp_path / "r")
    mp.spawn(_replica_worker, args=(_free_port(), diverge, result), nprocs=2)
    outcomes = [Path(f"{result}.{r}").read_text() for r in (0, 1)]
    if diverge:
        assert all("replicas diverged" in o for o in outcomes)
    else:
        assert outcomes == ["agree", "agree"]


def test_warmup_longer_than_the_schedule_is_reported(tmp_path, caplog):
    from ssd_da.config_checks import validate_config

    with caplog.at_level("WARNING", logger="ssd_da.config"):
        validate_config(tiny_cfg(tmp_path, tmp_path, iters=4, warmup_iters=2, lr_steps=[3]))
        assert not caplog.records
        validate_config(tiny_cfg(tmp_path, tmp_path, iters=300, warmup_iters=500, lr_steps=[220]))
        validate_config(tiny_cfg(tmp_path, tmp_path, iters=300, warmup_iters=500, lr_steps=[]))
        # Step k uses lr_factor(k), full only from k = warmup_iters: equal is already too long.
        validate_config(tiny_cfg(tmp_path, tmp_path, iters=300, warmup_iters=300, lr_steps=[]))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "warmup_iters=300 runs past the end" in messages[2]
    assert lr_factor(299, tiny_cfg(tmp_path, tmp_path, iters=300, warmup_iters=300,
                                   lr_steps=[])) < 1.0
    assert "warmup_iters=500 runs past the first lr step (iteration 220)" in messages[0]
    assert "warmup_iters=22" in messages[0]
    assert "the end of training (iteration 300)" in messages[1]
