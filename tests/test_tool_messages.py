"""What the tools print must be true and name the problem (issue 10, points 11, 15 and 16):
Grad-CAM inputs, eval_voc's outputs, worker count and metric name, ablate's GPUs and log level,
offline pretrained weights. Each test failed before the fix it covers."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.cli import eval_voc
from ssd_da.cli import gradcam as gradcam_tool
from voc_tree import add_sample, write_set

from ssd_da.engine.checkpoint import save_checkpoint
from ssd_da.models.ssd import build_ssd

CLASSES = ["dog", "cat"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> tuple[Path, Path]:
    """(an untrained resnet18 detector checkpoint for CLASSES, a 300x200 RGB image)."""
    folder = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    ckpt = folder / "r18.pth"
    save_checkpoint({"model": build_ssd("resnet18", num_classes=3).state_dict(),
                     "backbone": "resnet18", "class_names": CLASSES, "config": {}}, ckpt)
    image = folder / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image)
    return ckpt, image


def gradcam(capsys, *argv: str) -> tuple[int, str]:
    code = gradcam_tool.main(list(argv))
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- 11 and 16: Grad-CAM
def test_gradcam_directory_is_named_as_a_folder(untrained, capsys):
    ckpt, image = untrained
    code, err = gradcam(capsys, str(image.parent), "--checkpoint", str(ckpt))
    assert code == 2 and f"image {image.parent} is a folder" in err


def test_gradcam_box_outside_the_image_is_refused(untrained, capsys, tmp_path):
    ckpt, image = untrained
    code, err = gradcam(capsys, str(image), "--checkpoint", str(ckpt), "--box", "310,10,400,50",
                        "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert code == 2
    assert "--box 310,10,400,50 lies entirely outside image" in err and "300x200" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("target", [["--box", "10,10,50,50"], ["--class", "dog"]])
def test_eigencam_with_a_target_is_refused(untrained, capsys, tmp_path, target):
    ckpt, image = untrained
    code, err = gradcam(capsys, str(image), "--checkpoint", str(ckpt), "--method", "eigencam",
                        *target, "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert code == 2 and "class-agnostic" in err and target[0] in err


def test_class_target_fallback_warns(untrained, caplog):
    from ssd_da.engine.checkpoint import load_detector
    from ssd_da.visualize.cam import CamTarget, explain

    ckpt, image = untrained
    model, _ = load_detector(ckpt, "cpu")
    with torch.no_grad():  # every default box: background logit 10, classes 0, so p(cat) < 1e-4
        for conv in model.head.classification_head.module_list:
            conv.weight.zero_()
            conv.bias.copy_(torch.tensor([10.0, 0.0, 0.0]).repeat(conv.bias.numel() // 3))
    pixels = np.asarray(Image.open(image).convert("RGB"))
    with caplog.at_level(logging.WARNING):
        result = explain(model, pixels, CamTarget("class", label=2), score_thresh=0.3,
                         class_names=CLASSES)
    assert "best box, none >= 0.3" in result.target.description
    assert "no detection of cat has score >= 0.3; explaining its best-scoring default box " \
           "instead (score 0.000)" in caplog.text


# ---------------------------------------------------------------- 11 and 15: eval_voc
@pytest.fixture()
def small_tree(tmp_path) -> tuple[Path, Path]:
    """(VOCdevkit with test = c (dog), d (cat), a file of perfect detections)."""
    root = tmp_path / "VOCdevkit"
    add_sample(root, "c", [("dog", (10, 10, 40, 30))])
    add_sample(root, "d", [("cat", (10, 10, 40, 30))])
    write_set(root, "test", ["c", "d"])
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": i, "label": n, "score": 0.9, "bbox": [10, 10, 40, 30]}
                                for i, n in (("c", "dog"), ("d", "cat"))]))
    return root, dets


def eval_cli(*argv: str) -> int:
    return eval_voc.main(list(argv))


def test_eval_json_metric_is_the_option_value(small_tree, tmp_path):
    root, dets = small_tree
    for metric in ("voc07", "area"):
        out = tmp_path / f"{metric}.json"
        assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes",
                        "dog,cat", "--metric", metric, "--no-coco", "--json", str(out)) == 0
        assert json.loads(out.read_text())["metric"] == metric


def test_eval_output_folder_that_is_a_file(small_tree, tmp_path, capsys):
    root, dets = small_tree
    plots = tmp_path / "plots"
    plots.write_text("")
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--plots", str(plots)) == 2
    assert f"--plots {plots}: {plots} exists and is not a folder" in capsys.readouterr().err
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--json", str(tmp_path)) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


def test_eval_other_classes_left_out_on_request(small_tree, capsys):
    root, dets = small_tree
    add_sample(root, "d", [("cat", (10, 10, 40, 30)), ("person", (1, 1, 5, 5)),
                           ("person", (5, 5, 9, 9))])
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco") == 2
    assert eval_cli("--detections", str(dets), "--data-root", str(root), "--classes", "dog,cat",
                    "--no-coco", "--ignore-other-classes") == 0
    out = capsys.readouterr().out
    assert "2 images; 2 objects of other classes left out (2 person)" in out
    assert "mAP" in out and "100.00" in out


def test_eval_workers_default_fits_the_machine():
    import os

    cores = len(os.sched_getaffinity(0))
    assert eval_voc.get_args_parser().parse_args(["--detections", "x"]).workers == min(4, cores)


# ---------------------------------------------------------------- 15: ablate, pretrained
def test_ablate_refuses_gpus_that_are_not_there(tmp_path, monkeypatch):
    from ssd_da.config import load_config
    from ssd_da.experiments.ablate import plan_runs, run_suite

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    specs = plan_runs(load_config(None, ["iters=2"]), ["resnet18"], [0, 1], tmp_path / "runs")
    with pytest.raises(ValueError, match=r"--gpus 0,1: GPU\(s\) 1 not found; the visible CUDA "
                                         r"devices are 0"):
        run_suite(specs, gpus=["0", "1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device is visible here"):
        run_suite(specs, gpus=["0"])
    assert not (tmp_path / "runs").exists()  # nothing started


def test_ablate_meta_fallback_is_not_reported_at_info(caplog):
    from ssd_da.experiments.results import measure_detector

    with caplog.at_level(logging.INFO):
        params, flops = measure_detector.__wrapped__("resnet18", 3)
    assert params > 0 and flops > 0
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "meta" in r.getMessage()]


def test_offline_weights_fail_quietly(monkeypatch, tmp_path, capsys):
    import urllib.request

    from ssd_da.models.pretrained import load_pretrained
    from ssd_da.models.resnet import build_resnet

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(RuntimeError, match="could not fetch .*no network"):
        load_pretrained(build_resnet("resnet18", num_classes=None), "IMAGENET1K_V1")
    printed = capsys.readouterr()
    assert "Downloading" not in printed.out + printed.err  # torch.hub says it on stdout or stderr
