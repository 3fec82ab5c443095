"""Grad-CAM of SSD300 detections (ssd_da/visualize/cam.py) and tools/gradcam.py, on CPU.

The tests whose values need a detector that finds the objects (marked slow) use a
resnet18-SSD300 trained briefly on a fixed batch of two synthetic images (a red square, class 1,
and a blue disc, class 2, on noise). To stay within seconds the stem..layer3 keep their random
weights and their outputs are computed once; layer4 (the Grad-CAM layer), the extra blocks and
the head are trained, 80 Adam steps. Objects are ~140 px so that their default boxes lie on the
10x10 (layer4) and smaller maps, which depend on layer4. The other tests (targets resolved from
the model's own detections, layer paths, the command line) hold for any weights and use an
untrained detector.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.engine.checkpoint import load_detector, save_checkpoint
from ssd_da.models.ssd import build_ssd
from ssd_da.data.transforms import preprocess
from ssd_da.engine.inference import predict_image
from ssd_da.visualize.cam import (METHODS, AnchorScoreTarget, CamTarget, anchor_map_sizes,
                                  block_paths, default_layer, explain, get_method, resolve_layer)

from ssd_da.cli import gradcam as gradcam_tool

CLASSES = ["square", "disc"]
# (label, x1, y1, x2, y2) per image, in the 300x300 image's pixels.
SCENES = [[(1, 15, 20, 150, 155), (2, 150, 145, 290, 285)],
          [(2, 10, 150, 150, 290), (1, 140, 10, 285, 150)]]
TRAIN_STEPS = 80


def make_scene(objects: list[tuple[int, int, int, int, int]], seed: int) -> np.ndarray:
    """(300, 300, 3) uint8: grey noise, a red square for label 1, a blue disc for label 2."""
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 128, (300, 300, 3)) + 64).astype(np.uint8)
    yy, xx = np.mgrid[:300, :300]
    for label, x1, y1, x2, y2 in objects:
        if label == 1:
            image[y1:y2, x1:x2] = (230, 30, 30)
        else:
            inside = (xx - (x1 + x2) / 2) ** 2 + (yy - (y1 + y2) / 2) ** 2 <= ((x2 - x1) / 2) ** 2
            image[inside] = (30, 30, 230)
    return image


def train_detector(images: list[np.ndarray], steps: int) -> torch.nn.Module:
    """resnet18-SSD300 fitted to ``images`` / SCENES; stem..layer3 frozen (features cached)."""
    torch.manual_seed(0)
    model = build_ssd("resnet18", num_classes=len(CLASSES) + 1).eval()  # BN: running stats
    x = torch.cat([preprocess(im) for im in images])
    targets = [{"boxes": torch.tensor([o[1:] for o in objs], dtype=torch.float32),
                "labels": torch.tensor([o[0] for o in objs])} for objs in SCENES]
    bb = model.backbone
    with torch.no_grad():
        c2 = bb.layer2(bb.layer1(bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))))
        c3 = bb.layer3(c2)
    params = [*bb.layer4.parameters(), *model.extras.parameters(), *model.head.parameters()]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    for _ in range(steps):
        maps = [c2, c3, bb.layer4(c3)]
        for block in model.extras:
            maps.append(block(maps[-1]))
        losses = model.compute_loss(model.head(maps), targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model


def _scene_files(folder: Path) -> tuple[list[np.ndarray], list[Path]]:
    images = [make_scene(objs, seed) for seed, objs in enumerate(SCENES)]
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"scene{i}.png")
        Image.fromarray(image).save(paths[-1])
    return images, paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, checkpoint path, images, image paths): the detector trained on the scenes, for
    the tests whose expected values need a detector that finds the objects (marked slow)."""
    folder = tmp_path_factory.mktemp("gradcam")
    images, paths = _scene_files(folder)
    model = train_detector(images, TRAIN_STEPS)
    ckpt = folder / "resnet18.pth"
    save_checkpoint({"model": model.state_dict(), "backbone": "resnet18", "class_names": CLASSES,
                     "config": {"backbone": "resnet18"}, "iteration": TRAIN_STEPS}, ckpt)
    return model, ckpt, images, paths


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, untrained_checkpoint):
    """(model, checkpoint path, images, image paths) as ``trained`` but freshly initialised:
    for the plumbing (targets resolved from its own detections, layers, the CLI), which holds
    for any weights."""
    images, paths = _scene_files(tmp_path_factory.mktemp("gradcam_untrained"))
    ckpt = untrained_checkpoint("resnet18", CLASSES, 2)
    torch.manual_seed(2)  # the same weights as the checkpoint, built here independently
    model = build_ssd("resnet18", num_classes=len(CLASSES) + 1).eval()
    return model, ckpt, images, paths


@pytest.fixture(scope="module")
def other_ckpt(untrained_checkpoint) -> Path:
    """An untrained da_resnet18 checkpoint with a different class list (3 classes)."""
    return untrained_checkpoint("da_resnet18", ["cat", "dog", "disc"], 1)


def box_mean(cam: np.ndarray, box) -> float:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return float(cam[y1:y2, x1:x2].mean())


@pytest.mark.slow  # needs the detector trained by the fixture
def test_detector_learned_the_scenes(trained):
    model, _, images, _ = trained
    for image, objects in zip(images, SCENES):
        det = predict_image(model, image)
        for label, *box in objects:
            mine = det["labels"] == label
            assert mine.any() and det["scores"][mine].max() > 0.5
            best = det["boxes"][mine][det["scores"][mine].argmax()]
            assert np.abs(best - np.array(box)).max() < 30  # pixels, on ~140 px objects


@pytest.mark.slow  # needs the detector trained by the fixture
def test_cam_size_range_and_class_dependence(trained):
    """At the original (non-square) size, in [0, 1], not constant, different per class, and
    each class's map puts more mass on its own object than on the other one."""
    model, _, images, _ = trained
    h, w = 240, 360  # resize the 300x300 scene: the model sees (almost) the same input
    image = np.asarray(Image.fromarray(images[0]).resize((w, h), Image.BILINEAR))
    sx, sy = w / 300, h / 300
    boxes = {label: (x1 * sx, y1 * sy, x2 * sx, y2 * sy) for label, x1, y1, x2, y2 in SCENES[0]}
    cams = {}
    for label in (1, 2):
        result = explain(model, image, CamTarget("class", label), class_names=CLASSES)
        cam = result.cam
        assert cam.shape == (h, w) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0 and cam.std() > 0.01
        assert set(result.target.labels.tolist()) == {label}
        assert result.target.description.startswith(CLASSES[label - 1])
        assert box_mean(cam, boxes[label]) > box_mean(cam, boxes[3 - label])
        cams[label] = cam
    assert np.abs(cams[1] - cams[2]).mean() > 0.05


def test_top_target_is_the_first_detection(untrained):
    model, _, images, _ = untrained
    result = explain(model, images[1], CamTarget("top"), class_names=CLASSES)
    det, target = result.detections, result.target
    assert target.anchors.shape == (1,)
    assert target.labels[0] == det["labels"][0] and target.anchors[0] == det["default_box"][0]
    assert target.scores[0] == pytest.approx(float(det["scores"][0]), abs=1e-6)
    np.testing.assert_allclose(target.boxes[0], det["boxes"][0], atol=1e-3)
    # The detections are the model's own output, and each carries the default box behind it.
    ref = predict_image(model, images[1])
    np.testing.assert_array_equal(det["boxes"], ref["boxes"])
    np.testing.assert_array_equal(det["labels"], ref["labels"])
    with torch.no_grad():
        probs = torch.softmax(model.head_outputs(preprocess(images[1]))["cls_logits"][0], -1)
    np.testing.assert_allclose(probs[det["default_box"], det["labels"]].numpy(), det["scores"],
                               atol=1e-6)


@pytest.mark.slow  # needs the detector trained by the fixture
def test_box_target_and_fallback(trained):
    model, _, images, _ = trained
    disc = SCENES[0][1][1:]
    result = explain(model, images[0], CamTarget("box", box=disc), score_thresh=0.3)
    assert result.target.labels.tolist() == [2] and "IoU" in result.target.description
    # A box where nothing is detected falls back to the best-overlapping default box.
    corner = explain(model, images[0], CamTarget("box", box=(280.0, 0.0, 300.0, 15.0)),
                     score_thresh=0.99)
    assert "default box IoU" in corner.target.description


@pytest.mark.slow  # needs the detector trained by the fixture
def test_other_methods_and_layers(trained):
    model, _, images, _ = trained
    for method, layer in (("eigencam", None), ("gradcam++", "backbone.layer3.1")):
        cam = explain(model, images[0], method=method, layer=layer).cam
        assert cam.shape == (300, 300) and 0.0 <= cam.min() and cam.max() <= 1.0
        assert cam.std() > 0.01
    with pytest.raises(ValueError, match=r"unknown CAM method 'scorecam'.*eigencam.*gradcam"):
        get_method("scorecam")
    assert set(METHODS) == {"gradcam", "gradcam++", "eigencam"}


def test_layer_paths(untrained):
    model = untrained[0]
    assert default_layer(model) == "backbone.layer4.1"  # resnet18: two blocks per stage
    assert resolve_layer(model, "backbone.layer4.1") is model.backbone.layer4[1]
    assert block_paths(model) == [f"backbone.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    for bad in ("backbone.layer4.2", "head", "layer4.1"):
        with pytest.raises(ValueError, match=r"backbone\.layer1\.0, .*backbone\.layer4\.1"):
            resolve_layer(model, bad)


def test_end_slot_default_layer_is_the_module_ssd_reads():
    """resnet18_lga / resnet18_se: the default layer is the end-of-backbone module (SSD's 10x10
    map comes from its output), and its heatmap differs from layer4.1's, which lies before it."""
    torch.manual_seed(0)
    model = build_ssd("resnet18_lga", num_classes=3).eval()
    assert default_layer(model) == "backbone.end_attn"
    assert resolve_layer(model, "backbone.end_attn") is model.backbone.end_attn
    image = make_scene(SCENES[0], seed=3)
    target = CamTarget(kind="box", box=(0.0, 0.0, 299.0, 299.0))  # a box of the small maps
    at_module = explain(model, image, target=target).cam
    before = explain(model, image, target=target, layer="backbone.layer4.1").cam
    assert at_module.shape == before.shape == (300, 300)
    assert at_module.std() > 0.01 and np.abs(at_module - before).max() > 0.05
    assert default_layer(build_ssd("resnet18_se", num_classes=3)) == "backbone.end_attn"
    assert default_layer(build_ssd("da_resnet18", num_classes=3)) == "backbone.layer4.1"


def test_anchor_map_sizes_and_target_value_by_hand():
    model = build_ssd("resnet18", num_classes=3)
    # 38*38*4 = 5776 boxes on the 38x38 map, then 19*19*6 = 2166, 10*10*6 = 600, 150, 36, 4.
    assert anchor_map_sizes(model, [0, 5775, 5776, 7941, 7942, 8541, 8542, 8692, 8731]) == \
        [38, 38, 19, 19, 10, 10, 5, 3, 1]
    # Logits (0, ln 3, 0): p = 3/5, log-odds ln(3/5 / 2/5) = ln 1.5; (ln 2, 0, 0) for class 2:
    # p = 1/4, log-odds ln(1/3).
    logits = torch.tensor([[0.0, np.log(3.0), 0.0], [np.log(2.0), 0.0, 0.0]])
    value = AnchorScoreTarget([0, 1], [1, 2])(logits)
    assert float(value) == pytest.approx(np.log(1.5) + np.log(1 / 3), abs=1e-6)


def test_cli_figure_for_two_checkpoints(untrained, other_ckpt, tmp_path, monkeypatch):
    _, ckpt, images, paths = untrained
    out = tmp_path / "fig.png"
    figures, real_save = [], gradcam_tool.save_figure

    def keep(fig, path):
        figures.append(fig)
        real_save(fig, path)

    monkeypatch.setattr(gradcam_tool, "save_figure", keep)
    args = gradcam_tool.get_args_parser().parse_args(
        [*map(str, paths), "--checkpoint", str(ckpt), "--checkpoint", str(other_ckpt),
         "--out", str(out), "--draw-boxes", "--device", "cpu"])
    assert gradcam_tool.run(args) == 0
    # 2 images x (original + 2 checkpoints); a panel is 3.0 x 3.25 in at 100 dpi = 300 x 325 px.
    with Image.open(out) as fig:
        assert fig.size == (3 * 300, 2 * 325)
    # Rows are images, columns original | first checkpoint | second, titled by backbone.
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 6
    for row, path in enumerate(paths):
        original, first, second = titles[3 * row: 3 * row + 3]
        assert original == path.name
        assert re.fullmatch(r"ResNet18-SSD\ngradcam layer4\.1: (square|disc) [\d.]+ \(top\)", first)
        assert re.fullmatch(r"DA-ResNet18-SSD\ngradcam layer4\.1: (cat|dog|disc) [\d.]+ \(top\)",
                            second)
        np.testing.assert_array_equal(fig.axes[3 * row].images[0].get_array(), images[row])
    x0 = [ax.get_position().x0 for ax in fig.axes[:3]]
    assert x0 == sorted(x0)  # the columns run left to right in that order
    assert fig.axes[3].get_position().y1 <= fig.axes[0].get_position().y0  # image 2 below image 1


def run_cli(capsys, *argv: str) -> str:
    """Run tools/gradcam.py in-process; assert exit code 2 and return stderr."""
    code = gradcam_tool.main(list(argv))
    assert code == 2
    return capsys.readouterr().err


def test_cli_errors(untrained, other_ckpt, capsys):
    _, ckpt, _, paths = untrained
    img, ck = str(paths[0]), str(ckpt)
    err = run_cli(capsys, img, "--checkpoint", ck, "--layer", "backbone.layer5.0")
    assert "backbone.layer5.0" in err and "backbone.layer1.0" in err and "backbone.layer4.1" in err
    err = run_cli(capsys, img, "--checkpoint", ck, "--class", "dog")
    assert "'dog'" in err and "['square', 'disc']" in err
    # "disc" exists in both checkpoints, "square" only in the first: the second is named.
    err = run_cli(capsys, img, "--checkpoint", ck, "--checkpoint", str(other_ckpt),
                  "--class", "square")
    assert str(other_ckpt) in err and "['cat', 'dog', 'disc']" in err
    err = run_cli(capsys, img, "--checkpoint", ck, "--box", "10,10,5,40")
    assert "--box" in err


def test_cli_missing_image_exit_code(untrained, tmp_path):
    missing = tmp_path / "nope.jpg"
    proc = subprocess.run([sys.executable, gradcam_tool.__file__, str(missing),
                           "--checkpoint", str(untrained[1])], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"image {missing} does not exist" in proc.stderr


def test_checkpoint_round_trip(untrained):
    """The CLI's models (load_detector) give the detections of the model the checkpoint holds."""
    model, ckpt, images, _ = untrained
    loaded, state = load_detector(ckpt, "cpu")
    assert state["class_names"] == CLASSES
    a, b = predict_image(model, images[0]), predict_image(loaded, images[0])
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
