"""Where a model looks: the attention maps of the methods whose predictions come from attention
over image positions, drawn over a user's images.

    python -m mlgraph.viz attention --workdir DIR IMAGE... [--classes a,b] [--top_k K]
        [--output OUT] [--step N] [--no-ema] [--label_embeddings E.npy]

One PNG per image (`attention_<image stem>.png`): a row per label (each of --classes, or the
`top_k` top-scored), a panel per attention layer, the map over the image as the model saw it
(the run's own evaluation transform). Each map is the attention the model computed in the
forward pass that scored the image, read from the model (the `nnx.Intermediate`s it sows with
`sow_weights=True`, or the weights its forward returns), never recomputed here:

* Query2Label (`q2l`): each label query's cross-attention over the h x w positions of the
  backbone's feature map, per decoder layer (docs/ssgrl_mlgcn.md §4.1): torch's
  `nn.MultiheadAttention` softmax over the keys, one per head, each summing to 1 over the
  positions. Drawn: the mean over the heads (what torch returns with its default
  `average_attn_weights=True`), also summing to 1; the maps of the query2labels authors are
  these multi-head cross-attention maps (SlongLiu/query2labels issue #12).
* SSGRL: semantic decoupling's per-label coefficients over the N positions of the pooled
  feature map, softmax over the positions (official `semantic.py` line 31,
  `F.softmax(coefficient, dim=2)`; docs/ssgrl_mlgcn.md §1.2 step 5): sums to 1.
* SALGL: the low-rank bilinear label-to-token attention alpha, softmax over the N tokens
  (official `models/utils.py`, `LowRankBilinearAttention`; docs/salgl.md §1.6): sums to 1.
  With a ViT backbone the first token is the class token, which is no image position: its
  weight is `Maps.outside` and the map holds the rest.
* SigRL: SDA's weights a[p, c, d] (official `OV/models/SDA.py`, `SemanticDecoupling`;
  docs/sigrl.md §2.4a), a softmax over the P patches for every label c and channel d; the map
  is their mean over the channels, which sums to 1 over the patches as each channel does. SDA
  weighs each label on its own, so any label name has a map: a name that is not one of the
  run's classes is queried through the label-embedding path SigRL scores unseen labels with
  (`model(images, label_embeddings=E)`), embedded with MiniLM when the run's label vectors are
  MiniLM's, else taken from --label_embeddings. The queried set is the run's classes followed
  by such names, so the scores are those of that set.

ML-GCN, the baseline, SPML and Scob do not predict from attention over positions: asking for
their maps is one error line (Scob's Grad-CAM++ guidance is `viz cam`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import pathlib
import textwrap
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlgraph import assets
from mlgraph import paths as storage
from mlgraph.data import images as image_files
from mlgraph.data import pipeline
from mlgraph.errors import ConfigError, DataError, WorkdirError
from mlgraph.viz.heatmap import class_indices

# config.model.name -> the method's name and what its maps are.
METHODS = {
    "q2l": ("Query2Label", "label-query cross-attention, mean of the heads"),
    "ssgrl": ("SSGRL", "semantic decoupling attention"),
    "salgl": ("SALGL", "label-to-token attention"),
    "sigrl": ("SigRL", "SDA patch weights, mean of the channels"),
}
OPEN_VOCABULARY = ("sigrl",)  # methods that take any label name
TOP_K = 3  # labels drawn per image without --classes
PANEL_INCHES = (3.2, 3.0)  # one map's panel (width, height)
MIN_WIDTH = 4.4  # inches: room for the title over a single column
DPI = 100


@dataclasses.dataclass(frozen=True)
class Maps:
    """One image's attention maps for the labels drawn.

    Attributes:
      method: `config.model.name`.
      labels: the label names, one row each.
      scores: the model's score of each label (sigmoid of its logit) in that forward pass [L].
      layers: the attention layers' names (Q2L: one per decoder layer; the others: one).
      maps: the maps drawn [L, layers, h, w] float32 over the feature grid (row-major, as the
        model flattens it); each sums to 1 - `outside`.
      heads: Q2L's per-head maps [L, layers, heads, h, w] (each head's sums to 1); None for
        the others.
      outside: [L, layers] the weight on tokens that are no image position (SALGL's ViT class
        token); 0 otherwise.
    """

    method: str
    labels: list[str]
    scores: np.ndarray
    layers: list[str]
    maps: np.ndarray
    heads: np.ndarray | None
    outside: np.ndarray


def supports(config: ml_collections.ConfigDict) -> bool:
    """Whether the run of `config` has attention maps (its method is one of `METHODS`)."""
    return config.model.name in METHODS


def check_supported(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Raise WorkdirError, naming the method and those that have maps, unless `supports`."""
    method = config.model.name
    if supports(config):
        return
    also = ""
    if method == "scob":
        also = (
            f" (Scob's Grad-CAM++ guidance: python -m mlgraph.viz cam --workdir {workdir} IMAGE...)"
        )
    raise WorkdirError(
        f"--workdir {workdir}: trained {method!r}, which does not predict from attention over "
        f"image positions; attention maps are drawn for {', '.join(METHODS)} runs" + also
    )


# ---------------------------------------------------------------------------------------------
# The model's own attention
# ---------------------------------------------------------------------------------------------
def _sown(tree: nnx.State, *path) -> jax.Array:
    """The one value sown at `path` of a popped `nnx.Intermediate` state."""
    for key in path:
        tree = tree[key]
    (value,) = tree.get_value()
    return value


@functools.partial(jax.jit, static_argnums=(0, 1))
def _attention(method: str, graphdef, state, images: jax.Array, queries: jax.Array | None):
    """(logits [B, C'], attention [B, layers, heads, C', N] float32) of one forward pass."""
    model = nnx.merge(graphdef, state)
    if method == "q2l":
        out = model(images, sow_weights=True)
        sown = nnx.pop(model, nnx.Intermediate)
        layers = [
            _sown(sown, "decoder", i, "multihead_attn", "attention_weights")
            for i in range(len(model.decoder))
        ]
        weights = jnp.stack(layers, axis=1)  # [B, layers, heads, K, N]
    elif method == "sigrl":
        out = model(images, label_embeddings=queries, sow_weights=True)
        weights = _sown(nnx.pop(model, nnx.Intermediate), "sda_weights")[:, None, None]
    else:  # ssgrl, salgl: the forward returns its attention
        out = model(images)
        weights = out["att_weights"][:, None, None]
    return out["logits"].astype(jnp.float32), weights.astype(jnp.float32)


def model_attention(
    model: nnx.Module, method: str, images: jax.Array, queries: jax.Array | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B, C'], attention [B, layers, heads, C', N]) of `model` (a `METHODS` method's
    model, in evaluation mode) on normalised `images` [B, S, S, 3], from one forward pass:
    the weights the model computed and used (module docstring). `queries`: SigRL's label
    embeddings [C', E] (None: its table, every class); ignored by the others."""
    if method not in METHODS:
        raise ValueError(f"{method!r} has no attention maps; methods: {', '.join(METHODS)}")
    if method == "sigrl" and queries is None:
        queries = model.label_embeddings[...]
    graphdef, state = nnx.split(model)
    logits, weights = _attention(method, graphdef, state, jnp.asarray(images), queries)
    return np.asarray(logits), np.asarray(weights)


def leading_tokens(model: nnx.Module, method: str) -> int:
    """How many of the tokens the attention runs over come before the image positions: SALGL
    over a ViT's tokens has the class token first; every other case attends over positions
    only (SigRL's CLIP tower drops its class token from the local features)."""
    backbone = model.backbone
    vit = hasattr(backbone, "cls_token") or hasattr(backbone, "class_embedding")
    return 1 if method == "salgl" and vit else 0


def grid_maps(weights: np.ndarray, lead: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps [..., h, w], outside [...]) of weights [..., N] over `lead` leading non-image
    tokens and a square grid of the N - lead positions, row-major.

    Raises:
      ValueError: N - lead positions that are no square grid.
    """
    n = weights.shape[-1] - lead
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} image positions are no square grid")
    return weights[..., lead:].reshape(*weights.shape[:-1], side, side), weights[..., :lead].sum(-1)


# ---------------------------------------------------------------------------------------------
# A run's maps of an image
# ---------------------------------------------------------------------------------------------
def read_image(
    path: str | pathlib.Path,
    config: ml_collections.ConfigDict,
    num_classes: int,
    max_pixels: int = image_files.MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """(the pixels the model sees, uint8 [S, S, 3]; the model input, float32 [S, S, 3]): the
    image file decoded as the builders decode it (`mlgraph.data.images.read_rgb`, under the
    size limit `max_pixels`) through the run's evaluation transform
    (`mlgraph.data.pipeline.EvalTransform`, as `mlgraph.predict` applies it).

    Raises:
      DataError: a missing or unreadable image file, or one over the limit.
    """
    try:
        rgb = image_files.read_rgb(path, max_pixels)
    except image_files.BadImage as e:
        raise DataError(str(e)) from None
    transform = pipeline.EvalTransform.from_config(config, num_classes)
    element = {"image": rgb, "labels": np.zeros(num_classes, np.float32)}
    normalised = transform.map(element)["image"]
    # The transform's resize or crop, undone only in its normalisation: what the model saw.
    seen = (normalised * transform.std + transform.mean) * 255.0
    return np.clip(np.rint(seen), 0, 255).astype(np.uint8), normalised


def _queried(model, config, classes, names, label_embeddings) -> tuple[list[str], jax.Array]:
    """SigRL's queried label set for `classes`: (its names, its embeddings [C', E]), the run's
    classes (its table) followed by the names that are not among them (`module docstring`).

    Raises:
      ConfigError: names without embeddings to be had (`assets.query_embeddings`), or
        --label_embeddings with no such name.
    """
    table = model.label_embeddings[...]
    new = list(dict.fromkeys(c for c in classes or () if c not in names))
    if not new:
        if label_embeddings:
            raise ConfigError(
                f"--label_embeddings {label_embeddings}: every --classes name is a class of "
                "the run, queried with the run's own embeddings; leave it out"
            )
        return list(names), table
    extra = assets.query_embeddings(
        config,
        new,
        int(table.shape[1]),
        label_embeddings,
        asked=f"--classes {', '.join(new)} (not classes of the run)",
        names_file="NAMES.txt",
    )
    return [*names, *new], jnp.concatenate([table, jnp.asarray(extra, table.dtype)])


def maps(
    run,
    image: np.ndarray,
    classes: Sequence[str] | None = None,
    top_k: int = TOP_K,
    *,
    class_names: Sequence[str] | None = None,
    label_embeddings: str | None = None,
) -> Maps:
    """The attention maps of one normalised image [S, S, 3] (`read_image`) under the model of
    `run` (a `mlgraph.workdir.Run`), for each of `classes` (names, in that order) or, without
    them, the `top_k` top-scored classes; `class_names` replaces the data set's names (one per
    class). SigRL takes any name (module docstring); `label_embeddings` is then a .npy of the
    embeddings of the names that are not classes of the run, in their order.

    Raises:
      WorkdirError: a method without attention maps.
      ConfigError: an unknown (closed vocabulary) or repeated class name, a name without
        embeddings, `top_k` < 1, or class names that do not match the model's classes.
    """
    check_supported(run.config, run.workdir)
    method = run.config.model.name
    names = list(class_names or run.dataset.class_names)
    if len(names) != run.dataset.num_classes:
        raise ConfigError(
            f"--classes_file: {len(names)} names for a model of {run.dataset.num_classes} classes"
        )
    if top_k < 1:
        raise ConfigError(f"--top_k {top_k}: expected at least 1")
    if label_embeddings and method not in OPEN_VOCABULARY:
        raise ConfigError(
            f"--label_embeddings {label_embeddings}: a {method} run scores its own classes "
            f"only; label names are queried by {', '.join(OPEN_VOCABULARY)} runs"
        )
    model = run.model()
    queried, queries = names, None
    if method in OPEN_VOCABULARY:
        queried, queries = _queried(model, run.config, classes, names, label_embeddings)
    picked = class_indices(queried, classes) if classes else None
    logits, weights = model_attention(model, method, np.asarray(image)[None], queries)
    scores = 0.5 * (1.0 + np.tanh(0.5 * logits[0]))  # the sigmoid, without overflow
    if picked is None:
        # The run's classes compete (ties keep their order).
        picked = [int(i) for i in np.argsort(-scores[: len(names)], kind="stable")[:top_k]]
    chosen = np.moveaxis(weights[0][:, :, picked], 2, 0)  # [L, layers, heads, N]
    per_head, outside = grid_maps(chosen, leading_tokens(model, method))
    count = per_head.shape[1]
    layers = [f"decoder layer {i + 1}" for i in range(count)] if method == "q2l" else ["map"]
    return Maps(
        method=method,
        labels=[queried[i] for i in picked],
        scores=scores[picked],
        layers=layers,
        maps=per_head.mean(axis=2),
        heads=per_head if method == "q2l" else None,
        outside=outside.mean(axis=2),
    )


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def attention_figure(pixels: np.ndarray, found: Maps, title: str) -> Figure:
    """A panel per label (rows) and layer (columns): `pixels` [S, S, 3] under the map,
    stretched over the image one grid cell per feature position, on a colour scale from the
    label's smallest to its largest weight (shared by its layers, so that they compare; an
    untrained model's maps are nearly uniform, and a scale from 0 would show them flat)."""
    rows, cols = len(found.labels), len(found.layers)
    width, height = PANEL_INCHES
    fig = Figure(figsize=(max(width * cols, MIN_WIDTH), height * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    size = pixels.shape[0]
    method_name, what = METHODS[found.method]
    h, w = found.maps.shape[-2:]
    for r, label in enumerate(found.labels):
        low, top = float(found.maps[r].min()), float(found.maps[r].max())
        for c, layer in enumerate(found.layers):
            ax = axes[r, c]
            ax.imshow(pixels)
            shown = ax.imshow(
                found.maps[r, c],
                cmap="jet",
                alpha=0.5,
                vmin=low,
                vmax=max(top, low + 1e-12),
                interpolation="nearest",
                extent=(0, size, size, 0),
            )
            name = f"{label} ({found.scores[r]:.2f})"
            ax.set_title(name if cols == 1 else f"{name}, {layer}", fontsize=9)
            ax.set_axis_off()
        fig.colorbar(shown, ax=axes[r, -1], shrink=0.8, label=f"weight (uniform: 1/{h * w})")
    # About 13 characters an inch at 9 points: long workdir paths wrap instead of being cut.
    heading = f"{title}\n{method_name}: {what}, {h}x{w} positions"
    chars = int(fig.get_figwidth() * 13)
    wrapped = "\n".join(textwrap.fill(line, chars) for line in heading.splitlines())
    fig.suptitle(wrapped, fontsize=9)
    return fig


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _title(path: str | pathlib.Path, run) -> str:
    return f"{pathlib.Path(path).name}: step {run.step} of {run.workdir}"


def figures(
    run,
    image_paths: Sequence[str | pathlib.Path],
    classes: Sequence[str] | None = None,
    top_k: int = TOP_K,
    *,
    class_names: Sequence[str] | None = None,
    label_embeddings: str | None = None,
    max_image_pixels: int = image_files.MAX_IMAGE_PIXELS,
    dpi: int = DPI,
) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) of each image's figure (`attention_figure` of its `maps`) under the
    model of `run` (a `mlgraph.workdir.Run` of a method that `supports`); for an HTML report.

    Raises:
      WorkdirError: a method without attention maps; DataError: an unreadable image;
      ConfigError: see `maps`.
    """
    return [
        (title, _png(fig, dpi))
        for title, fig, _ in _figures(
            run, image_paths, classes, top_k, class_names, label_embeddings, max_image_pixels
        )
    ]


def _figures(run, image_paths, classes, top_k, class_names, label_embeddings, max_pixels):
    """(title, figure, Maps) of each image, made one at a time."""
    check_supported(run.config, run.workdir)
    for path in image_paths:
        pixels, image = read_image(path, run.config, run.dataset.num_classes, max_pixels)
        found = maps(
            run,
            image,
            classes,
            top_k,
            class_names=class_names,
            label_embeddings=label_embeddings,
        )
        title = _title(path, run)
        yield title, attention_figure(pixels, found, title), found


def draw(
    workdir: str | pathlib.Path,
    images: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    step: int | None = None,
    ema: bool = True,
    classes: Sequence[str] | None = None,
    top_k: int = TOP_K,
    class_names: Sequence[str] | None = None,
    label_embeddings: str | None = None,
    max_image_pixels: int = image_files.MAX_IMAGE_PIXELS,
    dpi: int = DPI,
) -> list[tuple[pathlib.Path, Maps]]:
    """Write `attention_<image stem>.png` into `out_dir` for each image, from the model saved
    in `workdir` at `step` (default: its best checkpoint; `ema`: the EMA model's weights).

    Raises:
      WorkdirError: a workdir whose method has no attention maps (checked before the model is
        read), or no checkpoint; DataError: an unreadable image; ConfigError: see `maps`.
    """
    from mlgraph import workdir as workdirs

    if not images:
        raise ConfigError(
            "attention: no IMAGE given (python -m mlgraph.viz attention --workdir DIR IMAGE...)"
        )
    check_supported(workdirs.read_config(workdir), workdir)
    run = workdirs.open_run(workdir, step, ema=ema)
    out_dir = storage.as_given(out_dir, "--output")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    made = _figures(run, images, classes, top_k, class_names, label_embeddings, max_image_pixels)
    for path, (_, fig, found) in zip(images, made, strict=True):
        target = out_dir / f"attention_{pathlib.Path(path).stem}.png"
        storage.save_figure(fig, target, dpi=dpi)
        written.append((target, found))
    return written
