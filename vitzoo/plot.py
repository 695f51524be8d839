"""Pareto plot of FLOPs against measured throughput, written as PNG, PDF or SVG (matplotlib, Agg backend).

A model is on the Pareto front when no other model has both at least its FLOPs and at least its throughput
(and is strictly better in one): for its amount of computation, nothing runs faster. FLOPs stand in for
capacity here; models below the front spend their FLOPs less efficiently on this machine.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from vitzoo.atomic import atomic_open, check_new_file

__all__ = ["LabelPlacement", "check_matplotlib", "check_writable", "pareto_figure", "pareto_front",
           "place_labels", "write_pareto_plot"]

Point = Tuple[str, float, float]  # (label, flops, throughput)
_TITLE_CHARS = 90  # characters per title line at fontsize 10 in the 8-inch figure (a machine header is longer)


def pareto_front(points: Sequence[Point]) -> List[Point]:
    """Points not dominated in (more FLOPs, more throughput), sorted by FLOPs."""
    front = [
        p
        for p in points
        if not any(q[1] >= p[1] and q[2] >= p[2] and (q[1] > p[1] or q[2] > p[2]) for q in points)
    ]
    return sorted(front, key=lambda p: p[1])


# label positions tried around a point: (direction x, direction y, horizontal / vertical alignment), nearest first
_DIRECTIONS = ((1, 0, "left", "center"), (-1, 0, "right", "center"), (1, 1, "left", "bottom"),
               (1, -1, "left", "top"), (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
               (0, 1, "center", "bottom"), (0, -1, "center", "top"))
_GAPS = (5.0, 11.0, 20.0, 32.0)  # label distance from its point, in typographic points
_MARKER_RADIUS = 4.0  # points; scatter's default marker (s=36) is 6 points wide, plus a margin
Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


@dataclass(frozen=True)
class LabelPlacement:
    """Where a point's label goes: offset from the point (typographic points), alignment, box (display pixels)."""

    dx: float
    dy: float
    ha: str
    va: str
    box: Box
    leader: bool  # placed far from its point: draw a line from the label to it


def _overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _distance(box: Box, x: float, y: float) -> float:
    return math.hypot(max(box[0] - x, 0.0, x - box[2]), max(box[1] - y, 0.0, y - box[3]))


def _segment_distance(a: Tuple[float, float], b: Tuple[float, float], p: Tuple[float, float]) -> float:
    (ax_, ay), (bx, by), (px, py) = a, b, p
    length2 = (bx - ax_) ** 2 + (by - ay) ** 2
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((px - ax_) * (bx - ax_) + (py - ay) * (by - ay)) / length2))
    return math.hypot(px - (ax_ + t * (bx - ax_)), py - (ay + t * (by - ay)))


def _candidate(x: float, y: float, w: float, h: float, gap: float, ux: int, uy: int, ha: str, va: str,
               px_per_pt: float) -> Tuple[float, float, Box]:
    """The offset (points) and box (pixels) of a ``w`` x ``h`` label ``gap`` points from (x, y) in one direction."""
    scale = gap / math.sqrt(2) if ux and uy else gap  # diagonal offsets keep the same distance
    dx, dy = ux * scale, uy * scale
    anchor_x, anchor_y = x + dx * px_per_pt, y + dy * px_per_pt
    x0 = anchor_x if ha == "left" else anchor_x - w if ha == "right" else anchor_x - w / 2
    y0 = anchor_y if va == "bottom" else anchor_y - h if va == "top" else anchor_y - h / 2
    return dx, dy, (x0, y0, x0 + w, y0 + h)


def place_labels(ax, points: Sequence[Point], fontsize: float) -> List[LabelPlacement]:
    """Label positions that keep every label off the other points' markers and off the other labels.

    Greedy, in display space (call once the axes' limits and layout are final): the most crowded points choose
    first; each takes the candidate position (8 directions, 4 distances) that overlaps the other markers and the
    labels already placed least, then that has the fewest other points nearer to it than its own (so a reader
    does not pair it with the wrong point), then that stays inside the axes, then the nearest. A label set
    further out than the nearest distance gets a leader line to its point.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    centres = [tuple(ax.transData.transform((flops / 1e9, tput))) for _, flops, tput in points]
    radius = _MARKER_RADIUS * px_per_pt
    markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in centres]
    frame = ax.get_window_extent(renderer)
    sizes = []
    for label, _, _ in points:
        text = ax.text(0, 0, label, fontsize=fontsize)
        extent = text.get_window_extent(renderer)
        text.remove()
        sizes.append((extent.width, extent.height))

    def crowding(i):
        return sum(1 / (1 + math.dist(centres[i], c)) for j, c in enumerate(centres) if j != i)

    placed: List[Box] = []
    result: List[Optional[LabelPlacement]] = [None] * len(points)
    for i in sorted(range(len(points)), key=crowding, reverse=True):
        (x, y), (w, h) = centres[i], sizes[i]
        best = None
        for rank, (gap, (ux, uy, ha, va)) in enumerate((g, d) for g in _GAPS for d in _DIRECTIONS):
            dx, dy, box = _candidate(x, y, w, h, gap, ux, uy, ha, va, px_per_pt)
            outside = w * h - _overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
            on_markers = sum(_overlap(box, m) for j, m in enumerate(markers) if j != i)
            on_labels = sum(_overlap(box, b) for b in placed)
            if gap > _GAPS[0]:  # the leader line, from the box's nearest edge to the point, must miss other markers
                near = (min(max(x, box[0]), box[2]), min(max(y, box[1]), box[3]))
                on_markers += sum(w * h for j, (cx, cy) in enumerate(centres)
                                  if j != i and _segment_distance(near, (x, y), (cx, cy)) < radius)
            own = _distance(box, x, y)
            nearer = sum(1 for j, (cx, cy) in enumerate(centres) if j != i and _distance(box, cx, cy) < own)
            # first keep clear of markers and labels, then of other points' closeness, then inside the axes;
            # among equals, the nearest position in _DIRECTIONS order
            cost = (round(on_markers + on_labels), nearer, round(outside), rank)
            if best is None or cost < best[0]:
                best = (cost, LabelPlacement(dx, dy, ha, va, box, leader=gap > _GAPS[0]))
        result[i] = best[1]
        placed.append(best[1].box)
    return [r for r in result if r is not None]


def check_matplotlib() -> None:
    """Raise ``ImportError`` with the install command when matplotlib is missing (check before measuring)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib, which is not installed: pip install matplotlib")


#: File formats by suffix (matplotlib's Agg canvas writes them without extra packages); no suffix: PNG.
PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", "": "png"}


def plot_format(path: Union[str, Path]) -> str:
    """matplotlib's format name for ``path``'s suffix.

    Raises:
        ValueError: A suffix other than .png, .pdf or .svg.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"--plot {path}: the plot is written as PNG, PDF or SVG, chosen by the file's suffix "
                         f"(.png, .pdf, .svg); got {suffix!r}")
    return PLOT_FORMATS[suffix]


def check_writable(path: Union[str, Path], force: bool = False) -> Path:
    """Return ``path`` as a Path, refusing an existing file unless ``force`` and a missing parent folder.

    Raises:
        ValueError: The suffix is not .png, .pdf or .svg (:func:`plot_format`).
        FileExistsError, FileNotFoundError, OSError: See :func:`check_new_file`.
    """
    path = Path(path)
    plot_format(path)
    return check_new_file(path, force, option="--plot", example_name="pareto.png")


def _minor_label(value: float, view: Sequence[float]) -> str:
    """A log axis's minor tick label: at 2x and 5x of each decade only, or at every minor tick when the axis spans
    less than a decade (286-535 img/s would otherwise show a single labelled tick, 500)."""
    low, high = sorted(abs(v) for v in view)
    if low > 0 and high / low < 10:
        return f"{value:.3g}"
    return f"{value:g}" if f"{value:e}"[0] in "25" else ""


def pareto_figure(points: Sequence[Point], *, title: str = "FLOPs vs measured throughput",
                  ylabel: str = "throughput (img/s)", groups: Optional[Sequence[str]] = None):
    """The plot as a matplotlib ``Figure`` (Agg canvas), and where each point's label went (in ``points`` order).

    ``groups`` (one name per point, e.g. the device it was measured on) gives each group its own colour and its own
    Pareto front: a CPU model is never "dominated" by a GPU row. A long ``title`` is wrapped to the figure's width.

    Raises:
        ValueError: No point with positive FLOPs and throughput, or ``groups`` not one name per point.
    """
    if groups is not None and len(groups) != len(points):
        raise ValueError(f"groups must name one group per point: {len(groups)} groups for {len(points)} points")
    grouped = [(str(lbl), float(f), float(t), "" if groups is None else str(g))
               for (lbl, f, t), g in zip(points, groups or [None] * len(points)) if f and t and f > 0 and t > 0]
    if not grouped:
        raise ValueError("nothing to plot: need at least one model with positive FLOPs and measured throughput")
    points = [p[:3] for p in grouped]

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot, no GUI backend
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(dict.fromkeys(p[3] for p in grouped))
    for i, group in enumerate(names):
        members = [p[:3] for p in grouped if p[3] == group]
        front = pareto_front(members)
        on_front = {p[0] for p in front}
        # one group: the front red, the rest blue; several: a colour per group, the points off its front hollow
        colour = "tab:red" if len(names) == 1 else f"C{i}"
        for label, flops, tput in members:
            off = label not in on_front
            ax.scatter(flops / 1e9, tput, zorder=3, color="tab:blue" if off and len(names) == 1 else colour,
                       facecolors="none" if off and len(names) > 1 else None)
        ax.plot([p[1] / 1e9 for p in front], [p[2] for p in front], "--", color=colour, zorder=2,
                label="Pareto front" + (f" ({group})" if len(names) > 1 else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers; minor ticks labelled at 2x and 5x only
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _, axis=axis: _minor_label(v, axis.get_view_interval())))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("FLOPs (GMACs, fused)")
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, _TITLE_CHARS, break_on_hyphens=False), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()  # the layout is final before the labels are placed in display space

    fontsize = 8
    placements = place_labels(ax, points, fontsize)
    for (label, flops, tput), where in zip(points, placements):
        line = dict(arrowstyle="-", color="0.45", lw=0.6, shrinkA=1, shrinkB=4) if where.leader else None
        ax.annotate(label, (flops / 1e9, tput), textcoords="offset points", xytext=(where.dx, where.dy),
                    ha=where.ha, va=where.va, fontsize=fontsize, arrowprops=line)
    ax.legend(loc="best")
    return fig, placements


def write_pareto_plot(
    points: Sequence[Point],
    path: Union[str, Path],
    *,
    title: str = "FLOPs vs measured throughput",
    ylabel: str = "throughput (img/s)",
    force: bool = False,
    groups: Optional[Sequence[str]] = None,
) -> Path:
    """Write a labelled scatter of (FLOPs, throughput) with the Pareto front drawn, atomically.

    Args:
        points: ``(label, flops, throughput)`` per model; FLOPs are MACs, throughput in img/s.
        path: Output file: PNG, PDF or SVG by its suffix (no suffix: PNG).
        title: Figure title (e.g. the machine and batch size).
        ylabel: Y-axis label.
        force: Overwrite an existing file.
        groups: One name per point (e.g. its device): a colour and a Pareto front per group.

    Returns:
        The path written.

    Raises:
        ValueError: No point with positive FLOPs and throughput.
        FileExistsError: See :func:`check_writable`.
    """
    path = check_writable(path, force)
    fig, _ = pareto_figure(points, title=title, ylabel=ylabel, groups=groups)
    with atomic_open(path, force=force) as f:
        fig.savefig(f, format=plot_format(path))
    return path
