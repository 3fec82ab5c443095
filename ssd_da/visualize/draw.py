"""Pictures: detection boxes on images, heatmap overlays, and the Grad-CAM comparison figure.

Images are (H, W, 3) uint8 RGB arrays; boxes are (K, 4) xyxy in that image's pixels, 0-based,
as ``SSD300`` returns them with ``original_sizes``. The figure is drawn on a bare
``matplotlib.figure.Figure`` (no pyplot state), with a size that depends only on the number of
rows and columns, so its pixel size is known in advance (:func:`figure_size_px`); save it with
:func:`ssd_da.utils.plots.save_figure`.
"""
from __future__ import annotations

import logging
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PANEL_INCHES", "FIGURE_DPI", "overlay_heatmap", "draw_detections",
           "figure_size_px", "cam_figure"]

logger = logging.getLogger(__name__)

# One panel (image plus a two-line title) is 3.0 x 3.25 inches. Both are exact in binary, so
# cols * 3.0 * dpi and rows * 3.25 * dpi are computed exactly; matplotlib's Agg canvas truncates
# them to whole pixels (int()), and figure_size_px does the same.
PANEL_INCHES: tuple[float, float] = (3.0, 3.25)
FIGURE_DPI: int = 100
_TITLE_INCHES = 0.5  # room above each image for its title
_MARGIN_INCHES = 0.05


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            return
        got = f"{image.dtype} array of shape {image.shape}"
    else:
        got = type(image).__name__
    raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {got}")


def overlay_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5,
                    colormap: str = "jet") -> np.ndarray:
    """Blend a (H, W) heatmap in [0, 1], coloured with ``colormap``, onto a (H, W, 3) uint8
    image: ``(1 - alpha) * image + alpha * colour``. Returns (H, W, 3) uint8."""
    _check_image(image)
    if cam.shape != image.shape[:2]:
        raise ValueError(f"cam: shape {cam.shape} differs from the image's {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    colour = matplotlib.colormaps[colormap](np.clip(cam, 0.0, 1.0))[..., :3]  # (H, W, 3) in [0, 1]
    blend = (1.0 - alpha) * image.astype(np.float64) / 255.0 + alpha * colour
    return np.round(blend * 255.0).astype(np.uint8)


def _class_colour(label: int) -> tuple[int, int, int]:
    """A fixed colour per class (tab10, cycling), so a class looks the same in every picture."""
    r, g, b, _ = matplotlib.colormaps["tab10"]((int(label) - 1) % 10)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str], line_width: int = 2) -> np.ndarray:
    """Draw boxes with "name score" captions on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (K, 4) xyxy in the image's pixels, 0-based.
        labels: (K,) classes in 1..C (0 is background and is never a detection).
        scores: (K,) detection scores.
        class_names: the C object-class names; label l is ``class_names[l - 1]``.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    _check_image(image)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels, scores = np.asarray(labels), np.asarray(scores)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"boxes/labels/scores: lengths differ "
                         f"({len(boxes)}, {len(labels)}, {len(scores)})")
    if len(labels) and (labels.min() < 1 or labels.max() > len(class_names)):
        raise ValueError(f"labels: must lie in 1..{len(class_names)} "
                         f"(class_names {list(class_names)}), "
                         f"got {sorted(set(labels.tolist()))}")
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for box, label, score in zip(boxes, labels, scores):
        colour = _class_colour(label)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        caption = f"{class_names[int(label) - 1]} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_h = bottom - top + 2
        # Caption above the box, or inside its top edge when the box touches the image top.
        ty = y1 - text_h if y1 - text_h >= 0 else y1
        draw.rectangle([x1, ty, x1 + right - left + 4, ty + text_h], fill=colour)
        draw.text((x1 + 2, ty + 1 - top), caption, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def figure_size_px(rows: int, cols: int, dpi: int = FIGURE_DPI) -> tuple[int, int]:
    """(width, height) in pixels of :func:`cam_figure`'s output saved at ``dpi``."""
    return int(cols * PANEL_INCHES[0] * dpi), int(rows * PANEL_INCHES[1] * dpi)


def cam_figure(panels: Sequence[Sequence[tuple[np.ndarray, str]]], dpi: int = FIGURE_DPI,
               title_size: float = 8.0) -> Figure:
    """A grid figure: ``panels[r][c] = (image (H, W, 3) uint8, title)``; every row has the same
    number of columns (for Grad-CAM: the original, then one overlay per checkpoint).

    Each panel takes :data:`PANEL_INCHES`, so the figure is ``cols * 3.0`` x ``rows * 3.25``
    inches (:func:`figure_size_px` at ``dpi``); images keep their aspect ratio inside it.
    """
    if not panels or not panels[0]:
        raise ValueError("panels: need at least one row with at least one (image, title) panel")
    cols = len(panels[0])
    if any(len(row) != cols for row in panels):
        raise ValueError(f"panels: every row needs {cols} panels, got {[len(r) for r in panels]}")
    rows = len(panels)
    fig_w, fig_h = cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    inner_w = PANEL_INCHES[0] - 2 * _MARGIN_INCHES
    inner_h = PANEL_INCHES[1] - _TITLE_INCHES - _MARGIN_INCHES
    for r, row in enumerate(panels):
        for c, (image, title) in enumerate(row):
            _check_image(image, f"panels[{r}][{c}]")
            left = (c * PANEL_INCHES[0] + _MARGIN_INCHES) / fig_w
            bottom = (fig_h - (r + 1) * PANEL_INCHES[1] + _MARGIN_INCHES) / fig_h
            ax = fig.add_axes((left, bottom, inner_w / fig_w, inner_h / fig_h))
            ax.imshow(image, interpolation="antialiased")
            ax.set_title(title, fontsize=title_size)
            ax.set_axis_off()
    return fig
