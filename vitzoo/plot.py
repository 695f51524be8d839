"""Pareto plot of FLOPs against measured throughput, written as a PNG (matplotlib, Agg backend).

A model is on the Pareto front when no other model has both at least its FLOPs and at least its throughput
(and is strictly better in one): for its amount of computation, nothing runs faster. FLOPs stand in for
capacity here; models below the front spend their FLOPs less efficiently on this machine.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple, Union

from vitzoo.atomic import atomic_open

__all__ = ["pareto_front", "write_pareto_plot", "check_writable"]

Point = Tuple[str, float, float]  # (label, flops, throughput)


def pareto_front(points: Sequence[Point]) -> List[Point]:
    """Points not dominated in (more FLOPs, more throughput), sorted by FLOPs."""
    front = [
        p
        for p in points
        if not any(q[1] >= p[1] and q[2] >= p[2] and (q[1] > p[1] or q[2] > p[2]) for q in points)
    ]
    return sorted(front, key=lambda p: p[1])


_OFFSETS = ((5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"))


def _label_offsets(points: Sequence[Point]) -> List[Tuple[int, int, str]]:
    """Per point, the label offset (points, alignment) whose label lies furthest from labels placed before it."""
    logs = [(math.log10(f), math.log10(t)) for _, f, t in points]
    span = [max(v[i] for v in logs) - min(v[i] for v in logs) or 1.0 for i in (0, 1)]
    placed: List[Tuple[float, float]] = []
    chosen = []
    for (x, y), (label, _, _) in zip(logs, points):
        def anchor(offset):  # label centre in axes-fraction units (a plot ~ 500 x 350 points)
            dx, dy, ha = offset
            width = 5.0 * len(label) * (1 if ha == "left" else -1)
            return x / span[0] + (dx + width / 2) / 500, y / span[1] + (dy + 3) / 350

        best = max(_OFFSETS, key=lambda o: min((math.dist(anchor(o), p) for p in placed), default=0.0))
        placed.append(anchor(best))
        chosen.append(best)
    return chosen


def check_writable(path: Union[str, Path], force: bool = False) -> Path:
    """Return ``path`` as a Path, refusing an existing file unless ``force`` and a missing parent folder.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
        FileNotFoundError: The parent folder does not exist.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")
    return path


def write_pareto_plot(
    points: Sequence[Point],
    path: Union[str, Path],
    *,
    title: str = "FLOPs vs measured throughput",
    ylabel: str = "throughput (img/s)",
    force: bool = False,
) -> Path:
    """Write a labelled scatter of (FLOPs, throughput) with the Pareto front drawn, atomically.

    Args:
        points: ``(label, flops, throughput)`` per model; FLOPs are MACs, throughput in img/s.
        path: Output PNG file.
        title: Figure title (e.g. the machine and batch size).
        ylabel: Y-axis label.
        force: Overwrite an existing file.

    Returns:
        The path written.

    Raises:
        ValueError: No point with positive FLOPs and throughput.
        FileExistsError: See :func:`check_writable`.
    """
    path = check_writable(path, force)
    points = [(str(lbl), float(f), float(t)) for lbl, f, t in points if f and t and f > 0 and t > 0]
    if not points:
        raise ValueError("nothing to plot: need at least one model with positive FLOPs and measured throughput")

    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot, no GUI backend
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 5.5), dpi=120)
    ax = fig.add_subplot()
    front = pareto_front(points)
    on_front = {p[0] for p in front}
    for (label, flops, tput), (dx, dy, ha) in zip(points, _label_offsets(points)):
        color = "tab:red" if label in on_front else "tab:blue"
        ax.scatter(flops / 1e9, tput, color=color, zorder=3)
        ax.annotate(label, (flops / 1e9, tput), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8)
    ax.plot([p[1] / 1e9 for p in front], [p[2] for p in front], "--", color="tab:red", label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers; minor ticks labelled at 2x and 5x only
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("FLOPs (GMACs, fused)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()

    with atomic_open(path, force=force) as f:
        fig.savefig(f, format="png")
    return path
