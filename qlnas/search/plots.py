"""The report's plots: the Pareto front over any two metrics as a staircase, and every trial's
learning curve, coloured by status (the same colours in both)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from qlnas.errors import UserError
from qlnas.fileio import atomic_path

log = logging.getLogger(__name__)

# The direction of each metric a trial reports, when the search does not optimise it.
KNOWN_MODES = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "train_loss": "min",
               "params_m": "min", "gmacs": "min", "gmacs_224": "min", "img_per_sec": "max"}
LABELS = {"val_top1": "val top-1", "val_top5": "val top-5", "val_loss": "val loss",
          "train_loss": "train loss", "params_m": "parameters (M)", "gmacs": "GMACs",
          "gmacs_224": "GMACs at 224 px", "img_per_sec": "training images/s"}
STATUS_COLORS = {"completed": "tab:blue", "pruned": "tab:gray", "diverged": "tab:red",
                 "errored": "black", "infeasible": "tab:purple", "running": "tab:orange"}
DEFAULT_PARETO = ("val_top1", "params_m")


@dataclass(frozen=True)
class Axis:
    """A metric and the direction in which it is better."""

    metric: str
    mode: str  # "max" or "min"

    @property
    def label(self) -> str:
        better = "higher" if self.mode == "max" else "lower"
        when = "" if self.metric in ("params_m", "gmacs", "gmacs_224") else "last epoch; "
        return f"{LABELS.get(self.metric, self.metric)} ({when}{better} is better)"


def pareto_axes(spec: str | None, objectives: list[dict]) -> tuple[Axis, Axis]:
    """The plot's (x, y) axes from `--pareto Y,X` (accuracy first reads naturally: "val_top1
    against gmacs"), or the search's two objectives, or val_top1 against params_m. A metric's
    direction is the search's when it optimises it, else `KNOWN_MODES`'."""
    modes = {**KNOWN_MODES, **{o["metric"]: o["mode"] for o in objectives}}
    if spec is None:
        names = [o["metric"] for o in objectives] if len(objectives) == 2 else DEFAULT_PARETO
    else:
        names = [n.strip() for n in spec.split(",")]
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise UserError(f"--pareto {spec}: expected two different metrics, e.g. "
                            "val_top1,gmacs")
        for name in names:
            if name not in modes:
                raise UserError(f"--pareto {spec}: unknown metric {name!r} (known: "
                                f"{', '.join(modes)})")
    y, x = names
    return Axis(x, modes[x]), Axis(y, modes[y])


def value(point: dict, metric: str) -> float | None:
    """The point's finite value of `metric`, else None."""
    v = point.get(metric)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _beats(a: dict, b: dict, axes: tuple[Axis, Axis]) -> bool:
    """`a` dominates `b`: at least as good on both axes, better on one."""
    signs = [1.0 if ax.mode == "max" else -1.0 for ax in axes]
    ga = [s * a[ax.metric] for s, ax in zip(signs, axes, strict=True)]
    gb = [s * b[ax.metric] for s, ax in zip(signs, axes, strict=True)]
    return all(p >= q for p, q in zip(ga, gb, strict=True)) and ga != gb


def pareto_front(points: list[dict], x: Axis, y: Axis) -> list[dict]:
    """The completed trials no other completed trial dominates on (x, y), sorted by x (a
    reused result is its source's model, already there)."""
    done = [p for p in points if p["status"] == "completed" and not p.get("reused_from")
            and value(p, x.metric) is not None and value(p, y.metric) is not None]
    front = [p for p in done if not any(_beats(o, p, (x, y)) for o in done)]
    return sorted(front, key=lambda p: (p[x.metric], p[y.metric]))


def staircase(front: list[dict], x: Axis, y: Axis) -> tuple[str, list[tuple[float, float]]]:
    """The step function of a front sorted by x: matplotlib's `where` and its vertices.

    The line bounds the region the front dominates. When x is minimised a front point holds
    its y rightwards until the next point (`post`); when maximised, leftwards (`pre`).
    """
    pts = [(p[x.metric], p[y.metric]) for p in front]
    where = "post" if x.mode == "min" else "pre"
    vertices = pts[:1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        vertices += [(x1, y0), (x1, y1)] if where == "post" else [(x0, y1), (x1, y1)]
    return where, vertices


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_figure(points: list[dict], x: Axis, y: Axis):
    """Every trial with both values, by status, and the completed trials' front as a
    staircase (a matplotlib Figure; the front's line is labelled "Pareto front")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [p for p in points
             if value(p, x.metric) is not None and value(p, y.metric) is not None]
    if points and not shown:
        log.warning("Pareto plot: no trial has both %s and %s", y.metric, x.metric)
    for status, color in STATUS_COLORS.items():
        pts = [p for p in shown if p["status"] == status]
        if pts:
            ax.scatter([p[x.metric] for p in pts], [p[y.metric] for p in pts], c=color,
                       label=f"{status} ({len(pts)})", alpha=0.8, zorder=3)
    front = pareto_front(points, x, y)
    if front:
        where, _ = staircase(front, x, y)
        ax.step([p[x.metric] for p in front], [p[y.metric] for p in front], where=where,
                c="tab:green", label=f"Pareto front ({len(front)})", zorder=2)
        for p in front:
            ax.annotate(p.get("model", p["trial"]), (p[x.metric], p[y.metric]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel(x.label)
    ax.set_ylabel(y.label)
    hidden = len(points) - len(shown)
    ax.set_title(f"{len(shown)} trials: {LABELS.get(y.metric, y.metric)} vs "
                 f"{LABELS.get(x.metric, x.metric)}"
                 + (f" ({hidden} without both values not shown)" if hidden else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(rows: list[dict], histories: dict[str, list[dict]]):
    """Val top-1 by epoch, one line per trial coloured by its status (each line's gid is its
    trial id); the legend counts the trials of each status, with a curve or not."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        epochs = [(h["epoch"], value(h, "val_top1")) for h in histories.get(row["trial"], ())]
        epochs = [(e, v) for e, v in epochs if isinstance(e, int | float) and v is not None]
        if epochs:
            ax.plot(*zip(*epochs, strict=True), "-", marker=".", markersize=3, lw=1,
                    c=STATUS_COLORS.get(row["status"], "tab:brown"), alpha=0.8,
                    gid=row["trial"])
    handles = []
    for status, color in STATUS_COLORS.items():
        n = sum(r["status"] == status for r in rows)
        if n:
            handles.append(ax.plot([], [], "-", c=color, label=f"{status} ({n})")[0])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.set_title(f"{len(rows)} trials: learning curves", fontsize=10)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


def plot_pareto(points: list[dict], x: Axis, y: Axis, path: Path) -> Path:
    """`pareto_figure` as a PNG."""
    return _save(pareto_figure(points, x, y), path)


def plot_curves(rows: list[dict], histories: dict[str, list[dict]], path: Path) -> Path:
    """`curves_figure` as a PNG."""
    return _save(curves_figure(rows, histories), path)


def _save(fig, path: Path) -> Path:
    """Write the figure as a PNG (atomically: a reader never sees half a file) and close it."""
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
