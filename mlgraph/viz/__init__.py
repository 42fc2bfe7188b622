"""Visualisations of SALGL's learned scenes (docs/salgl.md §6), from a training workdir.

    python -m mlgraph.viz heatmap --workdir DIR [--step N] [--no-ema] [--classes a,b | --top N]
    python -m mlgraph.viz labelcloud --workdir DIR [--step N] [--no-ema]

Both read the scene co-occurrence counts `comatrix` [K, C, C] from a training checkpoint
(`read_comatrix`) and the class names from the workdir's data set (`read_class_names`), then
draw one PNG per learned scene: `heatmaps` (P(label j | label i, scene k)) and `label_clouds`
(labels weighted by the share of their occurrences that went to the scene).

The scenes are learned without supervision, so scene k is only an index. For the embedded demo
data set, `match_demo_scenes` says which of the demo's true scenes each learned scene's label
mix resembles most (cosine similarity), labelled as such.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mlgraph.errors import ConfigError, DataError, WorkdirError
from mlgraph.viz.heatmap import (
    cooccurrence_prob,
    heatmap_figure,
    heatmaps,
    label_counts,
    scene_shares,
    select_classes,
)
from mlgraph.viz.labelcloud import cloud_frequencies, label_cloud_figure, label_clouds

__all__ = [
    "cloud_frequencies",
    "cooccurrence_prob",
    "demo_scene_notes",
    "heatmap_figure",
    "heatmaps",
    "label_cloud_figure",
    "label_clouds",
    "label_counts",
    "match_demo_scenes",
    "read_class_names",
    "read_comatrix",
    "scene_shares",
    "select_classes",
]


def _unwrap(entry: Any) -> Any:
    # Orbax stores an nnx.Variable's state as {'value': array}.
    if isinstance(entry, Mapping) and set(entry) == {"value"}:
        return entry["value"]
    return entry


def read_comatrix(
    workdir: str | pathlib.Path,
    step: int | None = None,
    ema: bool = True,
    purpose: str = "heatmaps",
) -> tuple[np.ndarray, int]:
    """(comatrix [K, C, C] float64, step) saved in `workdir`'s training checkpoints.

    `step` follows `mlgraph.workdir`'s step policy (by default the best step, else the newest
    readable); `ema` picks the EMA model's counts (else the live model's). `purpose` names what
    needs them, for the error message.

    Raises:
      WorkdirError: no checkpoints, a step that is not saved or readable, or a checkpoint
        without `comatrix` (not a SALGL run).
    """
    from mlgraph import workdir as workdirs

    state, step = workdirs.read_state(workdir, step, parts=("ema" if ema else "rest",))
    which = "the EMA model" if ema else "the model"
    holder = state.get("ema", {}) if ema else state
    comatrix = _unwrap(holder.get("rest", {}).get("comatrix"))
    if comatrix is None:
        raise WorkdirError(
            f"--workdir {workdir}: the step {step} checkpoint of {which} has no scene "
            f"co-occurrence counts ('comatrix'); {purpose} need a SALGL run"
        )
    comatrix = np.asarray(comatrix, np.float64)
    if comatrix.ndim != 3 or comatrix.shape[1] != comatrix.shape[2]:
        raise WorkdirError(
            f"--workdir {workdir}: 'comatrix' of step {step} has shape {list(comatrix.shape)}; "
            "expected [num_scenes, num_classes, num_classes]"
        )
    return comatrix, int(step)


def read_classes_file(path: str | pathlib.Path) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"--classes_file {path}: no such file")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"--classes_file {path}: no class names (expected one per line)")
    return names


def read_class_names(
    workdir: str | pathlib.Path, classes_file: str | pathlib.Path | None = None
) -> tuple[list[str], ml_collections.ConfigDict | None]:
    """(class names, the workdir's config or None).

    From `classes_file` when given (the config is then not read), else from the data set the
    workdir's `config.json` names (which must be built, or be an embedded demo set).
    """
    if classes_file:
        return read_classes_file(classes_file), None
    from mlgraph import workdir as workdirs
    from mlgraph.data import datasets

    config = workdirs.read_config(workdir)
    return list(datasets.open_dataset(config.data).class_names), config


def check_class_count(names: Sequence[str], comatrix: np.ndarray, source: str) -> None:
    """Raise ConfigError unless there is one name per class of `comatrix`."""
    if len(names) != comatrix.shape[1]:
        raise ConfigError(
            f"{source}: {len(names)} class names, but the checkpoint's comatrix counts "
            f"{comatrix.shape[1]} classes"
        )


def match_demo_scenes(
    comatrix: np.ndarray, class_names: Sequence[str], reference: Mapping[str, Any]
) -> list[tuple[str, float] | None]:
    """For each learned scene, (the reference scene whose class distribution its label counts
    resemble most, cosine similarity), or None for a scene with no counts.

    `reference` is the demo's `scenes.json` ({"scenes", "classes", "class_probabilities"}).
    Several learned scenes may match the same reference scene; this is a resemblance by
    counting, not an identity.
    """
    ref_names = list(reference["classes"])
    ref_probs = np.asarray(reference["class_probabilities"], np.float64)  # [S, C_ref]
    columns = [ref_names.index(n) if n in ref_names else -1 for n in class_names]
    ref = np.stack(
        [ref_probs[:, i] if i >= 0 else np.zeros(len(ref_probs)) for i in columns], axis=1
    )
    counts = label_counts(comatrix)
    out: list[tuple[str, float] | None] = []
    for row in counts:
        norm = np.linalg.norm(row)
        if norm == 0:
            out.append(None)
            continue
        cosine = ref @ row / (np.linalg.norm(ref, axis=1) * norm + 1e-12)
        best = int(np.argmax(cosine))
        out.append((str(reference["scenes"][best]), float(cosine[best])))
    return out


def demo_scene_notes(
    config: ml_collections.ConfigDict | None, comatrix: np.ndarray, class_names: Sequence[str]
) -> list[str] | None:
    """Title notes naming the closest true demo scene per learned scene, when the workdir was
    trained on the embedded 'demo' set (whose `scenes.json` is on disk); else None."""
    if config is None or config.data.name != "demo":
        return None
    from mlgraph.data import demo

    path = demo.ensure_demo("demo") / "scenes.json"
    if not path.is_file():
        return None
    matches = match_demo_scenes(comatrix, class_names, json.loads(path.read_text()))
    return [
        f"label mix closest to demo scene '{m[0]}' (cosine {m[1]:.2f})" if m else ""
        for m in matches
    ]
