"""Precision-recall and AP figures (ssd_da/utils/plots.py) of an evaluation result."""
from test_evaluation_voc import BOX, _img

from ssd_da.evaluation.voc import evaluate_voc


def test_pr_plots_write_pngs(tmp_path):
    from ssd_da.utils.plots import plot_ap_bars, plot_pr_curves

    ann = [_img([BOX, [20, 20, 29, 29]], [1, 2])]
    det = [_img([BOX, [50, 50, 59, 59]], [1, 3], scores=[0.9, 0.5])]
    res = evaluate_voc(det, ann, ["a", "potted plant", "c"])
    paths = plot_pr_curves(res, tmp_path / "pr")
    assert [p.name for p in paths] == ["pr_a.png", "pr_potted_plant.png"]  # "c" has no gt
    bars = plot_ap_bars(res, tmp_path / "ap.png")
    for p in paths + [bars]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
