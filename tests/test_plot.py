"""vitzoo.plot: every label sits by its own point, clear of the other points and labels."""
import math
import os

import pytest

pytest.importorskip("matplotlib")

from matplotlib.text import Text  # noqa: E402

from vitzoo.plot import pareto_figure  # noqa: E402

# `make compare`'s default set as measured on 2026-11-24 (FLOPs in M, fastest-path img/s): crowded at the top left,
# where the old placement put mobilenetv3_large_100's label beside efficientvit_m4's point
DEFAULT_SET = [
    ("shvit_s1", 241.40, 392.4), ("shvit_s2", 365.51, 225.4), ("shvit_s3", 600.71, 160.7),
    ("shvit_s4", 986.43, 102.5), ("revit_t", 1139.65, 70.2), ("revit_s", 4714.69, 19.4),
    ("deit_tiny_patch16_224", 1258.41, 68.4), ("deit_small_patch16_224", 4608.34, 20.5),
    ("deit_base_patch16_224", 17582.74, 5.8), ("efficientvit_m2", 201.04, 438.2),
    ("efficientvit_m4", 299.31, 297.3), ("efficientvit_m5", 521.59, 157.6),
    ("mobilenetv3_large_100", 225.44, 313.1), ("fastvit_t8", 686.88, 104.2), ("fastvit_t12", 1393.50, 61.4),
]


def _overlap(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _gap(box, x, y):
    return math.hypot(max(box[0] - x, 0.0, x - box[2]), max(box[1] - y, 0.0, y - box[3]))


@pytest.mark.parametrize("points", [
    [(n, f * 1e6, t) for n, f, t in DEFAULT_SET],
    # a cluster whose markers nearly touch, far from the rest (the axes span two decades)
    [(f"model_{i}", 1e8 * (1 + 0.08 * i), 300 * (1 - 0.04 * i)) for i in range(5)]
    + [("far_a", 2e10, 4), ("far_b", 5e9, 30)],
])
def test_labels_sit_by_their_own_points(points):
    fig, placements = pareto_figure(points)
    ax = fig.axes[0]
    # where matplotlib actually drew each label (independent of the placement's own bookkeeping)
    fig.canvas.draw()  # positions the annotations
    renderer = fig.canvas.get_renderer()
    drawn = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}  # the text, not its leader
    assert set(drawn) == {p[0] for p in points} and len(placements) == len(points)
    assert [bool(t.arrow_patch) for t in ax.texts] == [p.leader for p in placements]
    centres = [ax.transData.transform((f / 1e9, t)) for _, f, t in points]
    boxes = [(drawn[name].x0, drawn[name].y0, drawn[name].x1, drawn[name].y1) for name, _, _ in points]
    radius = 3 * fig.dpi / 72  # scatter's default marker: 6 points across
    for i, (name, _, _) in enumerate(points):
        own = _gap(boxes[i], *centres[i])
        for j, (other, _, _) in enumerate(points):
            if j == i:
                continue
            marker = (centres[j][0] - radius, centres[j][1] - radius, centres[j][0] + radius, centres[j][1] + radius)
            assert _overlap(boxes[i], marker) == 0, f"{name}'s label covers {other}'s point"
            assert _overlap(boxes[i], boxes[j]) == 0, f"labels of {name} and {other} overlap"
            if not placements[i].leader:  # a label further out has a line to its point, which pairs them
                assert own < _gap(boxes[i], *centres[j]), f"{name}'s label is nearer {other}'s point than its own"


def test_check_writable_refuses_a_missing_folder_and_names_the_option(tmp_path):
    """``compare --plot`` and ``export --out`` check a single-file output alike: a missing folder is refused (not
    created) and named, an existing file is replaced only with ``--force``, the option the user can pass."""
    from vitzoo.plot import check_writable

    missing = tmp_path / "new" / "p.png"
    with pytest.raises(FileNotFoundError) as info:
        check_writable(missing)
    assert str(info.value) == (f"cannot write {missing}: folder {missing.parent} does not exist; create it first "
                               f"(mkdir -p {missing.parent}) or choose another --plot.")
    existing = tmp_path / "p.svg"
    existing.write_text("old")
    with pytest.raises(FileExistsError) as info:
        check_writable(existing)
    assert str(info.value) == (f"{existing} already exists; refusing to overwrite it. Pass --force to replace it or "
                               "choose another --plot.")
    assert check_writable(existing, force=True) == existing
    assert sorted(os.listdir(tmp_path)) == ["p.svg"]


def test_an_axis_spanning_less_than_a_decade_gets_more_than_one_label():
    """Found by an audit: throughputs of 285 and 535 img/s gave a y axis with one labelled tick (500)."""
    fig, _ = pareto_figure([("shvit_s1", 241.4e6, 285.0), ("efficientvit_m0", 79.2e6, 535.0)])
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.yaxis.get_ticklabels(minor=True) + ax.yaxis.get_ticklabels()
              if t.get_text() and low <= t.get_position()[1] <= high]
    assert {"300", "400", "500"} <= set(labels), labels
    # an axis spanning more than a decade keeps the sparse labels (2x and 5x of each decade)
    fig, _ = pareto_figure([(n, f * 1e6, t) for n, f, t in DEFAULT_SET])
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = {t.get_text() for t in ax.yaxis.get_ticklabels(minor=True) if t.get_text()
              and low <= t.get_position()[1] <= high}
    assert labels and "300" not in labels and "400" not in labels


def test_a_long_title_is_wrapped_inside_the_figure():
    """Found by an audit: the machine header of a CUDA machine (GPU name, two batch sizes) ran 150 pixels past both
    edges of the figure."""
    title = ("machine: AMD EPYC 7763 64-Core Processor, 2 threads, GPU NVIDIA H100 80GB HBM3; torch 2.14.1+cu126, "
             "timm 1.0.31; batch 16 on cpu, batch 256 on cuda")
    fig, _ = pareto_figure([("shvit_s1", 241.4e6, 285.0), ("deit_tiny", 1.26e9, 200.0)], title=title)
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
    assert fig.axes[0].title.get_text().replace("\n", " ") == title
