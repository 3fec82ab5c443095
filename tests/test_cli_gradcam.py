"""tools/gradcam.py (ssd_da/cli/gradcam.py): the inputs it refuses and what it says it wrote.
The figures themselves: test_visualize_cam.py."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd_da.cli import gradcam as gradcam_tool
from ssd_da.engine.checkpoint import save_checkpoint
from ssd_da.models.ssd import build_ssd

DOG_CAT = ["dog", "cat"]


@pytest.fixture(scope="module")
def dog_cat_detector(tmp_path_factory) -> tuple[Path, Path]:
    """(an untrained resnet18 detector checkpoint for DOG_CAT, a 300x200 RGB image)."""
    folder = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    ckpt = folder / "r18.pth"
    save_checkpoint({"model": build_ssd("resnet18", num_classes=3).state_dict(),
                     "backbone": "resnet18", "class_names": DOG_CAT, "config": {}}, ckpt)
    image = folder / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(image)
    return ckpt, image


def gradcam_err(capsys, *argv: str) -> tuple[int, str]:
    code = gradcam_tool.main(list(argv))
    return code, capsys.readouterr().err


def test_gradcam_directory_is_named_as_a_folder(dog_cat_detector, capsys):
    ckpt, image = dog_cat_detector
    code, err = gradcam_err(capsys, str(image.parent), "--checkpoint", str(ckpt))
    assert code == 2 and f"image {image.parent} is a folder" in err


def test_gradcam_box_outside_the_image_is_refused(dog_cat_detector, capsys, tmp_path):
    ckpt, image = dog_cat_detector
    code, err = gradcam_err(capsys, str(image), "--checkpoint", str(ckpt), "--box", "310,10,400,50",
                        "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert code == 2
    assert "--box 310,10,400,50 lies entirely outside image" in err and "300x200" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("target", [["--box", "10,10,50,50"], ["--class", "dog"]])
def test_eigencam_with_a_target_is_refused(dog_cat_detector, capsys, tmp_path, target):
    ckpt, image = dog_cat_detector
    code, err = gradcam_err(capsys, str(image), "--checkpoint", str(ckpt), "--method", "eigencam",
                        *target, "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert code == 2 and "class-agnostic" in err and target[0] in err


def test_class_target_fallback_warns(dog_cat_detector, caplog):
    from ssd_da.engine.checkpoint import load_detector
    from ssd_da.visualize.cam import CamTarget, explain

    ckpt, image = dog_cat_detector
    model, _ = load_detector(ckpt, "cpu")
    with torch.no_grad():  # every default box: background logit 10, classes 0, so p(cat) < 1e-4
        for conv in model.head.classification_head.module_list:
            conv.weight.zero_()
            conv.bias.copy_(torch.tensor([10.0, 0.0, 0.0]).repeat(conv.bias.numel() // 3))
    pixels = np.asarray(Image.open(image).convert("RGB"))
    with caplog.at_level(logging.WARNING):
        result = explain(model, pixels, CamTarget("class", label=2), score_thresh=0.3,
                         class_names=DOG_CAT)
    assert "best box, none >= 0.3" in result.target.description
    assert "no detection of cat has score >= 0.3; explaining its best-scoring default box " \
           "instead (score 0.000)" in caplog.text


def test_gradcam_out_without_extension_names_the_file_written(dog_cat_detector, tmp_path, caplog):
    ckpt, image = dog_cat_detector
    parse = gradcam_tool.get_args_parser().parse_args
    with caplog.at_level(logging.INFO):
        code = gradcam_tool.run(parse([str(image), "--checkpoint", str(ckpt), "--out",
                                        str(tmp_path / "name"), "--device", "cpu"]))
    assert code == 0 and (tmp_path / "name.png").is_file()
    assert f"wrote {tmp_path / 'name.png'} " in caplog.text
    assert gradcam_tool.run(parse([str(image), "--checkpoint", str(ckpt), "--out",
                                    str(tmp_path / "g.xyz")])) == 2
