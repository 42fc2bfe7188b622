"""Heatmaps of SALGL's scene-conditional label co-occurrence probabilities (docs/salgl.md §6).

For each learned scene k, P_k[i, j] = C_k[i, j] / (C_k[i, i] + 1e-8) with the diagonal zeroed:
an estimate of P(label j | label i, scene k) from the co-occurrence counts `comatrix` [K, C, C]
(no transpose and no row normalisation, unlike the model's own `comatrix_to_prob`). Rows are
the given label i, columns the co-occurring label j.

Scenes are learned without supervision: scene k is an index, not a named scene.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlgraph import paths as storage
from mlgraph.errors import ConfigError

# Above this many classes the default view keeps the most frequent ones (a readable figure).
DEFAULT_TOP = 20
# Up to this many classes each cell is annotated with its value.
ANNOTATE_MAX = 15
# The original uses seaborn's 'rocket'; matplotlib's 'magma' is the closest built-in map.
CMAP = "magma"


def as_comatrix(comatrix: np.ndarray) -> np.ndarray:
    """`comatrix` as float64 [K, C, C]; raises ValueError for another shape."""
    comatrix = np.asarray(comatrix, np.float64)
    if comatrix.ndim != 3 or comatrix.shape[1] != comatrix.shape[2]:
        raise ValueError(f"comatrix: expected shape [K, C, C], got {list(comatrix.shape)}")
    return comatrix


def cooccurrence_prob(comatrix: np.ndarray) -> np.ndarray:
    """[K, C, C] counts -> [K, C, C] float64 P_k[i, j] = C_k[i, j] / (C_k[i, i] + 1e-8), diagonal 0.

    Rows of labels never counted in scene k are all zero.
    """
    comatrix = as_comatrix(comatrix)
    diag = np.diagonal(comatrix, axis1=1, axis2=2)[:, :, None]
    prob = comatrix / (diag + 1e-8)
    prob[:, np.arange(comatrix.shape[1]), np.arange(comatrix.shape[1])] = 0.0
    return prob


def label_counts(comatrix: np.ndarray) -> np.ndarray:
    """[K, C]: the diagonals d_k[c], how often label c was counted in scene k."""
    return np.diagonal(as_comatrix(comatrix), axis1=1, axis2=2).copy()


def scene_shares(comatrix: np.ndarray) -> np.ndarray:
    """[K]: each scene's share of all counted labels (its diagonal mass over the total); zeros
    when nothing was counted. With hard assignment this tracks the share of training images."""
    mass = label_counts(comatrix).sum(axis=1)
    total = mass.sum()
    return mass / total if total > 0 else np.zeros_like(mass)


def class_indices(class_names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """The positions in `class_names` of the `--classes` names `classes`, in their order.

    Raises:
      ConfigError: an unknown or repeated class name.
    """
    names = list(class_names)
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ConfigError(
            f"--classes: unknown class name(s) {', '.join(repr(c) for c in unknown)}; "
            f"known: {', '.join(names)}"
        )
    repeated = sorted({c for c in classes if list(classes).count(c) > 1})
    if repeated:
        raise ConfigError(f"--classes: repeated class name(s) {', '.join(repeated)}")
    return [names.index(c) for c in classes]


def select_classes(
    comatrix: np.ndarray,
    class_names: Sequence[str],
    classes: Sequence[str] | None = None,
    top: int | None = None,
) -> list[int]:
    """Indices of the classes to draw.

    `classes` (names, drawn in that order) wins; otherwise the `top` most frequent classes
    (summed over scenes), kept in data set order; with neither, every class when there are at
    most `DEFAULT_TOP`, else the `DEFAULT_TOP` most frequent.

    Raises:
      ConfigError: an unknown or repeated class name, or `top` < 1.
    """
    names = list(class_names)
    if classes:
        return class_indices(names, classes)
    if top is None:
        top = len(names) if len(names) <= DEFAULT_TOP else DEFAULT_TOP
    if top < 1:
        raise ConfigError(f"--top {top}: expected a positive number of classes")
    frequency = label_counts(comatrix).sum(axis=0)
    # A stable sort on -frequency: ties keep data set order.
    chosen = np.argsort(-frequency, kind="stable")[:top]
    return sorted(int(i) for i in chosen)


def heatmap_figure(
    prob: np.ndarray,
    names: Sequence[str],
    title: str,
    *,
    annotate: bool | None = None,
    cmap: str = CMAP,
) -> Figure:
    """A figure of one scene's [n, n] probability matrix `prob` (rows: given label, columns:
    co-occurring label), colour limits 0-1, with a colorbar.

    `annotate` writes each cell's value (default: when n <= `ANNOTATE_MAX`). The figure has an
    Agg canvas, so `fig.canvas.draw()` renders it without pyplot.
    """
    prob = np.asarray(prob, np.float64)
    n = len(names)
    if prob.shape != (n, n):
        raise ValueError(f"heatmap: a [{n}, {n}] matrix for {n} names, got {list(prob.shape)}")
    if annotate is None:
        annotate = n <= ANNOTATE_MAX
    side = max(5.0, 0.42 * n + 3.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(prob, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n), labels=list(names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("co-occurring label j")
    ax.set_ylabel("given label i")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="P(j | i, scene)")
    if annotate:
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                value = prob[i, j]
                # magma runs dark to light: dark text on the light upper half.
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    return fig


def scene_title(k: int, share: float, note: str = "") -> str:
    """'scene k: s% of counted labels' (+ a second line `note`)."""
    head = f"scene {k}: " + (f"{share:.1%} of counted labels" if share > 0 else "no labels counted")
    return f"{head}\n{note}" if note else head


def heatmaps(
    comatrix: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    classes: Sequence[str] | None = None,
    top: int | None = None,
    scene_notes: Sequence[str] | None = None,
    dpi: int = 150,
) -> list[pathlib.Path]:
    """Write `heatmap_scene{k}.png` for every scene k of `comatrix` [K, C, C] into `out_dir`.

    `class_names` names the C classes; `classes` / `top` pick the drawn ones (`select_classes`);
    `scene_notes[k]` is an optional second title line (e.g. the closest demo scene).

    Returns:
      The written paths, in scene order.
    """
    comatrix = as_comatrix(comatrix)
    k_scenes, c = comatrix.shape[:2]
    if len(class_names) != c:
        raise ValueError(f"heatmaps: {len(class_names)} class names for a comatrix of {c} classes")
    index = select_classes(comatrix, class_names, classes, top)
    names = [class_names[i] for i in index]
    prob = cooccurrence_prob(comatrix)[:, index][:, :, index]
    shares = scene_shares(comatrix)
    out_dir = storage.as_given(out_dir, "--output")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(k_scenes):
        note = scene_notes[k] if scene_notes else ""
        fig = heatmap_figure(prob[k], names, scene_title(k, float(shares[k]), note))
        path = out_dir / f"heatmap_scene{k}.png"
        storage.save_figure(fig, path, dpi=dpi)
        paths.append(path)
    return paths
