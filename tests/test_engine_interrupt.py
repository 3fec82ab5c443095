"""Pre-emption keeps the work (issue 21, point 7): SIGTERM, SIGINT and SIGUSR1 stop a run at
the end of the current step, write last.pth, print the resume command and exit 75; a second
Ctrl-C exits at once; the resumed run ends with the weights of an uninterrupted one. Before the
fix SIGTERM ended training with nothing saved since the last ckpt_every and SIGINT with a
KeyboardInterrupt traceback: the training tests below failed (no last.pth at the stop)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd_da.cli import ablate as ablate_tool
from ssd_da.cli import train as train_tool
from ssd_da.engine import trainer
from ssd_da.engine.checkpoint import load_checkpoint
from ssd_da.engine.interrupt import ignore_stop_signals, stop_on_signals, stop_requested
from ssd_da.utils.cli import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]


def args(devkit: Path, out: Path, classes: list[str], iters: int = 5) -> list[str]:
    """A resnet18 run of ``iters`` steps whose only periodic checkpoint would come at 100."""
    return ["--backbone", "resnet18", "--data-root", str(devkit), "--device", "cpu", "--iters",
            str(iters), "--batch-size", "2", "--workers", "0", "--eval-every", "0",
            "--output-dir", str(out), "pretrained=none", "train_split=voc07_trainval",
            "test_split=voc07_test", f"classes={json.dumps(classes)}", "ckpt_every=100",
            "log_every=1", "lr_steps=[]", "warmup_iters=0", "eval_batch_size=4", "lr=0.01"]


def signal_at(monkeypatch, iteration: int, signum: int) -> None:
    """Deliver ``signum`` to this process right after training step ``iteration``."""
    real = trainer.train_step

    def step(state, *a, **kw):
        out = real(state, *a, **kw)
        if state.iteration == iteration:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(trainer, "train_step", step)


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = train_tool.main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(tiny_devkit, tiny_classes, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_tool.main(args(tiny_devkit, out, tiny_classes)) == 0
    return load_checkpoint(out / "last.pth")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, at", [(signal.SIGTERM, 2), (signal.SIGINT, 3),
                                        (signal.SIGUSR1, 1)])
def test_signal_saves_and_resume_ends_as_uninterrupted(signum, at, uninterrupted, tiny_devkit,
                                                        tiny_classes, tmp_path, monkeypatch,
                                                        capsys):
    out = tmp_path / "run"
    signal_at(monkeypatch, at, signum)
    code, err = run(args(tiny_devkit, out, tiny_classes), capsys)
    name = signal.Signals(signum).name
    assert code == EXIT_INTERRUPTED == 75
    assert f"{name}: stopped at iteration {at} of 5 and saved {out / 'last.pth'}" in err
    assert f"continue with: python tools/train.py --resume {out / 'last.pth'}" in err
    assert "Traceback" not in err
    assert load_checkpoint(out / "last.pth")["iteration"] == at
    assert not (out / "summary.json").exists()  # an interrupted run is not "done"
    monkeypatch.undo()
    code, _ = run(["--resume", str(out / "last.pth")], capsys)
    assert code == 0
    resumed = load_checkpoint(out / "last.pth")
    assert resumed["iteration"] == 5
    for key, value in uninterrupted.items():
        assert torch.equal(resumed["model"][key], value), key  # bit for bit
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_second_ctrl_c_stops_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        signal.raise_signal(signal.SIGTERM)
        assert stop_requested() == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM: already stopping
        with pytest.raises(KeyboardInterrupt, match="at once"):
            signal.raise_signal(signal.SIGINT)
        with stop_on_signals():  # nested (a run inside a suite): the request is shared
            assert stop_requested() == "SIGTERM"
        assert stop_requested() == "SIGTERM"
    assert stop_requested() is None and signal.getsignal(signal.SIGINT) == before


@pytest.mark.slow
def test_second_ctrl_c_in_training_exits_130_without_traceback(tiny_devkit, tiny_classes,
                                                                tmp_path, monkeypatch, capsys):
    real = trainer.train_step

    def step(state, *a, **kw):
        out = real(state, *a, **kw)
        if state.iteration == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", step)
    code, err = run(args(tiny_devkit, tmp_path / "run", tiny_classes), capsys)
    assert code == 130 and "stopping at once" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A worker started by a scheduler's signal to every process of the job would die and
    break the step the main process is finishing; workers ignore the stop signals."""
    code = ("import signal, os, sys; from ssd_da.engine.interrupt import ignore_stop_signals;"
            "ignore_stop_signals(0); os.kill(os.getpid(), signal.SIGTERM);"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGUSR1); sys.exit(7)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 7
    from ssd_da.engine.loaders import make_train_loader

    loader = make_train_loader(list(range(4)), 2, 0, 0, 1, workers=0, pin_memory=False)
    assert loader.worker_init_fn is ignore_stop_signals


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tiny_devkit, tiny_classes, tmp_path):
    """As SLURM pre-empts: SIGTERM to every process of the job (workers included), a real
    subprocess of tools/train.py; it saves, says how to continue and exits 75."""
    out = tmp_path / "run"
    argv = args(tiny_devkit, out, tiny_classes, iters=400)
    argv[argv.index("--workers") + 1] = "1"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *argv],
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-2000:]
    stopped = load_checkpoint(out / "last.pth")["iteration"]
    assert 1 <= stopped < 400 and f"stopped at iteration {stopped} of 400" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_ablate_saves_the_current_run_and_a_rerun_finishes(tiny_devkit, tiny_classes, tmp_path,
                                                           monkeypatch, capsys):
    root = tmp_path / "suite"
    argv = ["--backbones", "resnet18", "--seed-list", "0", "--output-dir", str(root),
            "--data-root", str(tiny_devkit), "--device", "cpu", "--iters", "3", "--batch-size",
            "2", "--workers", "0", "pretrained=none", "train_split=voc07_trainval",
            "test_split=voc07_test", f"classes={json.dumps(tiny_classes)}", "ckpt_every=100",
            "log_every=1", "lr_steps=[]", "warmup_iters=0", "eval_batch_size=4"]
    parse = ablate_tool.get_args_parser().parse_intermixed_args
    signal_at(monkeypatch, 2, signal.SIGTERM)
    monkeypatch.setattr("ssd_da.experiments.results.measure_detector", lambda b, n: (1, 1))
    assert ablate_tool.run(parse(argv)) == 75
    err = capsys.readouterr().err
    assert "SIGTERM: stopped at iteration 2 of 3" in err and "rerun the same command" in err
    assert load_checkpoint(root / "resnet18" / "seed0" / "last.pth")["iteration"] == 2
    monkeypatch.undo()
    monkeypatch.setattr("ssd_da.experiments.results.measure_detector", lambda b, n: (1, 1))
    assert ablate_tool.run(parse(argv)) == 0
    assert json.loads((root / "resnet18" / "seed0" / "summary.json").read_text())["iterations"] == 3


def test_a_stop_request_is_forwarded_to_a_training_subprocess():
    """ablate --gpus: a SIGTERM sent to the runner alone reaches each run's train.py."""
    from ssd_da.engine.interrupt import wait_forwarding_stop

    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75));"
             "print('ready', flush=True); time.sleep(60); sys.exit(0)")
    with stop_on_signals():
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        signal.raise_signal(signal.SIGTERM)
        started = time.monotonic()
        assert wait_forwarding_stop(proc, poll_s=0.05) == 75
        assert time.monotonic() - started < 10
