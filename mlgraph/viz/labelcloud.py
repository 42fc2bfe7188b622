"""Word clouds of the labels each learned SALGL scene collected (docs/salgl.md §6).

For scene k the weight of label c is int(200 * d_k[c] / sum_k' d_k'[c]), with d_k = diag(C_k)
the count of label c in scene k: the share of label c's occurrences assigned to scene k, so a
label that lands in one scene only is at full size there whatever its overall frequency.

Scenes are learned without supervision: scene k is an index, not a named scene.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlgraph import paths as storage
from mlgraph.viz.heatmap import as_comatrix, label_counts, scene_shares, scene_title

MAX_WEIGHT = 200  # the original's scale


def cloud_frequencies(comatrix: np.ndarray, class_names: Sequence[str]) -> list[dict[str, int]]:
    """Per scene, {label: int(200 * d_k[c] / sum_k' d_k'[c])}, zero weights left out.

    Labels never counted in any scene have no share and appear in no scene.
    """
    comatrix = as_comatrix(comatrix)
    if len(class_names) != comatrix.shape[1]:
        raise ValueError(
            f"label clouds: {len(class_names)} class names for a comatrix of "
            f"{comatrix.shape[1]} classes"
        )
    counts = label_counts(comatrix)  # [K, C]
    total = counts.sum(axis=0)
    out = []
    for row in counts:
        weights = {}
        for name, d, t in zip(class_names, row, total, strict=True):
            if t > 0:
                w = int(MAX_WEIGHT * d / t)
                if w > 0:
                    weights[name] = w
        out.append(weights)
    return out


def label_cloud_figure(
    frequencies: dict[str, int],
    title: str,
    *,
    width: int = 800,
    height: int = 400,
    seed: int = 0,
) -> Figure:
    """A figure with `title` over a white-background word cloud of `frequencies`, or a notice
    when there are none. The layout is fixed by `seed`."""
    fig = Figure(figsize=(width / 100, height / 100 + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    if frequencies:
        from wordcloud import WordCloud

        cloud = WordCloud(
            width=width, height=height, background_color="white", random_state=seed
        ).generate_from_frequencies(frequencies)
        ax.imshow(cloud.to_array(), interpolation="bilinear")
    else:
        ax.text(
            0.5,
            0.5,
            "no labels were assigned to this scene",
            ha="center",
            va="center",
            fontsize=16,
            transform=ax.transAxes,
        )
    return fig


def label_clouds(
    comatrix: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    scene_notes: Sequence[str] | None = None,
    dpi: int = 100,
) -> list[pathlib.Path]:
    """Write `labelcloud_scene{k}.png` for every scene k of `comatrix` [K, C, C] into `out_dir`.

    `scene_notes[k]` is an optional second title line. Returns the written paths in scene order.
    """
    comatrix = as_comatrix(comatrix)
    frequencies = cloud_frequencies(comatrix, class_names)
    shares = scene_shares(comatrix)
    out_dir = storage.as_given(out_dir, "--output")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, freq in enumerate(frequencies):
        note = scene_notes[k] if scene_notes else ""
        fig = label_cloud_figure(freq, scene_title(k, float(shares[k]), note))
        path = out_dir / f"labelcloud_scene{k}.png"
        storage.save_figure(fig, path, dpi=dpi)
        paths.append(path)
    return paths
