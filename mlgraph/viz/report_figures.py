"""The report's own figures (matplotlib, Agg, no pyplot): training curves, per-class AP and its
relation to class frequency, precision-recall curves, and image thumbnails; each as PNG (or,
for photographs, JPEG) bytes to inline in the page."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from mlgraph.viz import run_log

DPI = 100
MAX_POINTS = 2000  # per drawn curve (run_log.downsample); a 100,000-step log draws in a blink
MAX_BARS = 60  # classes drawn as bars; more: the worst and best halves, the rest in a table


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure, dpi: int = DPI) -> bytes:
    """`fig` as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def curve_figure(
    title: str, ylabel: str, curves: Sequence[run_log.Curve], max_points: int = MAX_POINTS
) -> Figure:
    """One panel of `curves` over steps; a curve of more than `max_points` points is drawn
    through `run_log.downsample`'s points (its spikes kept). The first curve is drawn boldest;
    a curve of one point (one evaluation) is a marker."""
    fig = _figure(5.4, 3.2)
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        keep = run_log.downsample(curve.steps, curve.values, max_points)
        style = {"marker": "o"} if len(keep) < 3 else {}
        ax.plot(
            curve.steps[keep],
            curve.values[keep],
            label=curve.name,
            linewidth=1.8 if i == 0 else 1.0,
            **style,
        )
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=8)
    return fig


def class_ap_figure(
    names: Sequence[str], ap: np.ndarray, positives: np.ndarray, max_bars: int = MAX_BARS
) -> Figure:
    """Per-class AP (%) as horizontal bars sorted from best (top) to worst, each labelled with
    its class and positive count; of more than `max_bars` classes, the best and the worst
    `max_bars / 2`. Classes without positives (no AP) are left out."""
    defined = np.flatnonzero(~np.isnan(ap))
    order = defined[np.argsort(-ap[defined], kind="stable")]
    shown = order
    if len(order) > max_bars:
        half = max_bars // 2
        shown = np.concatenate([order[:half], order[-half:]])
    fig = _figure(6.5, 1.2 + 0.2 * len(shown))
    ax = fig.add_subplot()
    y = np.arange(len(shown))[::-1]
    ax.barh(y, 100 * ap[shown], color="tab:blue")
    ax.set_yticks(y, labels=[f"{names[c]} ({positives[c]})" for c in shown], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    skipped = len(order) - len(shown)
    extra = f"; the middle {skipped} classes in the table below" if skipped else ""
    ax.set_title(f"per-class AP, sorted (positives in brackets){extra}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def ap_frequency_figure(
    names: Sequence[str], ap: np.ndarray, positives: np.ndarray, label: Sequence[int] = ()
) -> Figure:
    """Each class's AP (%) against its positive count (log scale), the classes of `label`
    named."""
    defined = np.flatnonzero(~np.isnan(ap))
    fig = _figure(5.4, 3.8)
    ax = fig.add_subplot()
    ax.scatter(positives[defined], 100 * ap[defined], s=14, alpha=0.7)
    for c in label:
        ax.annotate(
            names[c],
            (positives[c], 100 * ap[c]),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize=7,
        )
    if len(defined) and positives[defined].max() > 10 * max(positives[defined].min(), 1):
        ax.set_xscale("log")
    ax.set_xlabel("positive images in the split")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("per-class AP against class frequency")
    ax.grid(alpha=0.3)
    return fig


def pr_figure(
    names: Sequence[str],
    groups: Sequence[tuple[str, Sequence[int], Sequence[tuple]]],
    ap: np.ndarray,
) -> Figure:
    """Precision-recall curves, one panel per group (title, classes, their
    `metrics.precision_recall_curve` triples): the interpolated precision, whose mean over the
    positives is the class's AP, over the raw precision drawn faintly."""
    fig = _figure(11.0, 4.2)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (title, classes, curves) in zip(axes, groups, strict=True):
        for c, (recall, precision, envelope) in zip(classes, curves, strict=True):
            (line,) = ax.plot(
                np.concatenate([[0.0], recall]),
                np.concatenate([[envelope[0] if len(envelope) else 1.0], envelope]),
                drawstyle="steps-pre",
                label=f"{names[c]} (AP {100 * ap[c]:.1f})",
            )
            ax.plot(recall, precision, color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return fig


def thumbnail(pixels: np.ndarray, size: int = 160, quality: int = 85) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of the uint8 RGB image `pixels` shrunk to fit `size` x
    `size` (aspect kept; never enlarged)."""
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), image.width, image.height
