"""Multi-node torchrun as docs/cluster.md shows it: two torchrun "nodes" on 127.0.0.1 meeting
through the c10d rendezvous, one gloo process each, training one run; every rank must end with
the same weights, and those are the weights in last.pth."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_da.data.demo import DEMO_CLASSES
from ssd_da.engine.checkpoint import load_checkpoint
from ssd_da.engine.distributed import parameter_digest
from ssd_da.models.ssd import build_ssd

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_c10d_nodes_end_with_identical_weights(tiny_devkit, tmp_path):
    out, port = tmp_path / "two_nodes", _free_port()
    # The same command on both "nodes" (docs/cluster.md, by hand): c10d picks the node ranks.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two",
           str(ROOT / "tools" / "train.py"), "--backbone", "resnet18", "--device", "cpu",
           "--data-root", str(tiny_devkit), "--output-dir", str(out), "--iters", "3",
           "--batch-size", "2", "--workers", "0", "pretrained=none", "eval_every=0",
           "train_split=voc07_trainval", "test_split=voc07_test", "lr_steps=[2]",
           "warmup_iters=1", "classes=" + json.dumps(list(DEMO_CLASSES))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4
    digests = summary["parameter_digests"]  # every rank's final weights, gathered by rank 0
    assert len(digests) == 2 and digests[0] == digests[1]
    ckpt = load_checkpoint(out / "last.pth")
    model = build_ssd("resnet18", num_classes=len(DEMO_CLASSES) + 1)
    model.load_state_dict(ckpt["model"])
    assert ckpt["iteration"] == 3 and parameter_digest(model) == digests[0]
