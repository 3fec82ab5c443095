"""tools/detect.py and the drawing helpers (ssd_da/visualize/draw.py), on CPU.

detect.py's contract (one picture per image, a JSON equal to the model's output above --score)
does not depend on what the model has learned, so a seeded, untrained resnet18-SSD300 serves;
its softmax scores spread around 1/3, so a threshold between them keeps some and drops some.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.data.voc import load_rgb
from ssd_da.engine.checkpoint import load_detector
from ssd_da.engine.inference import predict_image
from ssd_da.utils.device import resolve_device
from ssd_da.models.names import display_name
from ssd_da.utils.plots import save_figure
from ssd_da.visualize.draw import cam_figure, draw_detections, figure_size_px, overlay_heatmap
from ssd_da.cli import detect as detect_tool
from ssd_da.config import load_config
from voc_tree import jpeg_bytes

CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, untrained_checkpoint):
    """(model, checkpoint path, [image paths]): two noise images of different sizes (PNG)."""
    folder = tmp_path_factory.mktemp("detect")
    ckpt = untrained_checkpoint("resnet18", CLASSES, 0)
    model, _ = load_detector(ckpt, "cpu")
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in (("a", (180, 240)), ("b", (320, 200))):
        paths.append(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return model, ckpt, paths


def test_detect_writes_pictures_and_json(setup, tmp_path):
    model, ckpt, paths = setup
    expected = {str(p): predict_image(model, load_rgb(p)) for p in paths}
    all_scores = np.concatenate([d["scores"] for d in expected.values()])
    score = float(np.median(all_scores))  # some detections pass, some do not
    out = tmp_path / "out"
    args = detect_tool.get_args_parser().parse_args(
        [*map(str, paths), "--checkpoint", str(ckpt), "--out", str(out), "--score", str(score),
         "--device", "cpu"])
    assert detect_tool.run(args) == 0
    records = json.loads((out / "detections.json").read_text())
    assert 0 < len(records) < len(all_scores)
    for path in map(str, paths):
        det = expected[path]
        keep = det["scores"] >= score
        mine = [r for r in records if r["image"] == path]
        assert [r["label"] for r in mine] == [CLASSES[l - 1] for l in det["labels"][keep]]
        # float32 model values survive the JSON round trip exactly (float64 holds them).
        np.testing.assert_array_equal(np.float32([r["score"] for r in mine]), det["scores"][keep])
        np.testing.assert_array_equal(np.float32([r["bbox"] for r in mine]).reshape(-1, 4),
                                      det["boxes"][keep])
        # The picture is the image with exactly those detections drawn, at the image's size.
        image = load_rgb(path)
        picture = load_rgb(out / (Path(path).stem + ".png"))
        assert picture.shape == image.shape
        drawn = draw_detections(image, det["boxes"][keep], det["labels"][keep],
                                det["scores"][keep], CLASSES)
        np.testing.assert_array_equal(picture, drawn)


def test_detect_errors(setup, tmp_path, capsys):
    _, ckpt, paths = setup
    parse = detect_tool.get_args_parser().parse_args
    other = tmp_path / "sub"
    other.mkdir()
    clash = other / paths[0].name
    clash.write_bytes(paths[0].read_bytes())
    assert detect_tool.run(parse([str(paths[0]), str(clash), "--checkpoint", str(ckpt),
                                   "--out", str(tmp_path / "o")])) == 2
    assert "a.png" in capsys.readouterr().err
    assert detect_tool.run(parse([str(paths[0]), "--checkpoint", str(ckpt), "--out", "o",
                                   "--score", "1.5"])) == 2
    assert "--score" in capsys.readouterr().err
    missing = tmp_path / "missing.jpg"
    proc = subprocess.run([sys.executable, detect_tool.__file__, str(missing),
                           "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"image {missing} does not exist" in proc.stderr


def test_display_name():
    assert display_name("da_resnet50", detector=True) == "DA-ResNet50-SSD"
    assert display_name("resnet18", detector=True) == "ResNet18-SSD"
    assert display_name("se_resnet101") == "SE-ResNet101"
    assert display_name("da_cs_resnet50", detector=True) == "DA(c>s)-ResNet50-SSD"
    assert display_name("vgg16", detector=True) == "vgg16-SSD"  # unknown: as given


def test_overlay_heatmap_by_hand():
    image = np.full((2, 3, 3), 100, np.uint8)
    # jet(0) = (0, 0, 0.5): 0.5 * 100 + 0.5 * (0, 0, 127.5) = (50, 50, 113.75) -> (50, 50, 114).
    np.testing.assert_array_equal(overlay_heatmap(image, np.zeros((2, 3)))[0, 0], [50, 50, 114])
    # jet(1) = (0.5, 0, 0) -> (114, 50, 50); alpha 0 gives the image back.
    np.testing.assert_array_equal(overlay_heatmap(image, np.ones((2, 3)))[1, 2], [114, 50, 50])
    np.testing.assert_array_equal(overlay_heatmap(image, np.ones((2, 3)), alpha=0.0), image)
    with pytest.raises(ValueError, match="cam: shape"):
        overlay_heatmap(image, np.zeros((3, 2)))
    for bad, got in ((image.astype(np.float32), "float32 array of shape"),
                     (image[..., 0], r"uint8 array of shape \(2, 3\)"), (image.tolist(), "list")):
        with pytest.raises(ValueError, match=r"image: expected an \(H, W, 3\) uint8 RGB array, got " + got):
            overlay_heatmap(bad, np.zeros((2, 3)))
        with pytest.raises(ValueError, match="image: expected"):
            draw_detections(bad, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0), CLASSES)


def test_draw_detections_pixels():
    image = np.zeros((50, 60, 3), np.uint8)
    out = draw_detections(image, np.array([[10.0, 20.0, 40.0, 45.0]]), np.array([1]),
                          np.array([0.9]), CLASSES)
    assert out[30, 10].tolist() == [31, 119, 180]  # left edge, tab10 colour of class 1
    assert out[45, 25].tolist() == [31, 119, 180]  # bottom edge
    assert out[35, 25].tolist() == [0, 0, 0]  # inside the box, below the caption: untouched
    assert image.max() == 0  # the input is not modified
    with pytest.raises(ValueError, match=r"labels: must lie in 1..2.*\['cat', 'dog'\]"):
        draw_detections(image, np.zeros((1, 4)), np.array([3]), np.array([0.5]), CLASSES)


def test_cam_figure_layout():
    assert figure_size_px(2, 3) == (900, 650)  # 3 x 3.0 in, 2 x 3.25 in, at 100 dpi
    assert figure_size_px(1, 2, dpi=70) == (420, 227)  # 2.0 x 3.25 x 70 = 227.5, truncated
    image = np.zeros((20, 30, 3), np.uint8)
    fig = cam_figure([[(image, "a"), (image, "b")], [(image, "c"), (image, "d")]])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c", "d"]
    left_col, right_col = fig.axes[0].get_position(), fig.axes[1].get_position()
    assert left_col.x1 <= 0.5 <= right_col.x0  # two columns, side by side
    assert fig.axes[2].get_position().y1 <= 0.5 <= fig.axes[0].get_position().y0
    buffer = io.BytesIO()
    save_figure(cam_figure([[(image, "a"), (image, "b")]], dpi=70), buffer)
    with Image.open(buffer) as png:
        assert png.size == (420, 227)
    with pytest.raises(ValueError, match="every row needs 2 panels"):
        cam_figure([[(image, "a"), (image, "b")], [(image, "c")]])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"--device: 'cuda:99' is not available"):
        resolve_device("cuda:99")


# -------------------------------------------------------------- inputs it refuses or leaves out
def detect_err(capsys, *argv: str) -> tuple[int, str]:
    code = detect_tool.main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    """a.jpg, a broken.jpg (its header reads, its pixels are cut short), c.jpg."""
    paths = [tmp_path / n for n in ("a.jpg", "broken.jpg", "c.jpg")]
    for path in paths:
        path.write_bytes(jpeg_bytes(64, 48, noise=True))
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])
    return paths


def test_detect_unreadable_image_stops_before_writing(images, tmp_path, capsys,
                                                      untrained_checkpoint, tiny_classes):
    images[1].write_bytes(b"not an image")
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    code, err = detect_err(capsys, *map(str, images), "--checkpoint", str(ckpt), "--out",
                       str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "1 of 3 images cannot be read, nothing was written" in err
    assert str(images[1]) in err and not (tmp_path / "out").exists()


def test_detect_undecodable_image_is_left_out_and_the_rest_written(images, tmp_path, capsys,
                                                                   untrained_checkpoint,
                                                                   tiny_classes):
    """Before: a.png written, then exit 2 with no detections.json."""
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    out = tmp_path / "out"
    code, err = detect_err(capsys, *map(str, images), "--checkpoint", str(ckpt), "--out", str(out),
                       "--device", "cpu", "--score", "0")
    assert code == 2 and "1 of 3 images could not be decoded" in err and "broken.jpg" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "detections.json"]
    written = {r["image"] for r in json.loads((out / "detections.json").read_text())}
    assert written == {str(images[0]), str(images[2])}


def test_detect_out_naming_a_file_fails_before_the_model_loads(images, tmp_path, capsys,
                                                               monkeypatch, untrained_checkpoint,
                                                               tiny_classes):
    """Before: a raw "[Errno 17] File exists" after the model had loaded."""
    out = tmp_path / "taken"
    out.write_text("x")

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(detect_tool, "load_detector", never)
    code, err = detect_err(capsys, str(images[0]), "--checkpoint",
                       str(untrained_checkpoint("resnet18", tiny_classes)), "--out", str(out))
    assert code == 2 and f"--out {out}: {out} exists and is not a folder" in err


def test_a_folder_given_as_a_file_is_called_a_folder(tmp_path, capsys, untrained_checkpoint,
                                                     tiny_classes):
    ckpt = untrained_checkpoint("resnet18", tiny_classes)
    code, err = detect_err(capsys, str(tmp_path), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"))
    assert code == 2 and f"image {tmp_path} is a folder" in err
    with pytest.raises(ValueError, match=f"config file {tmp_path} is a folder"):
        load_config(tmp_path)
