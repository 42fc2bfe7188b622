"""Scob's semantic guidance drawn over a user's images (docs/scob_spml.md §3.3): the Grad-CAM++ map
of a class and the two patch masks the training step derives from it.

    python -m mlgraph.viz cam --workdir DIR IMAGE... [--step N] [--classes a,b] [--output OUT]

For each image and class (by default the class the model scores highest) one PNG with three
panels: the image under the image-sized Grad-CAM++ map, and the image with the non-salient
patches of the stride-32 and the stride-16 grids dimmed (corners are never salient), as the
key masks of Scob's contrastive step see it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from mlgraph import paths as storage
from mlgraph.data import images as image_files
from mlgraph.errors import ConfigError, DataError, WorkdirError

DIM = 0.25  # brightness kept by a non-salient patch


@dataclasses.dataclass(frozen=True)
class Guidance:
    """One image's guidance for one class.

    Attributes:
      class_name: the class whose map it is; probability: the model's score for it.
      cam: the image-sized Grad-CAM++ map [S, S] in [0, 1].
      salient32, salient16: the salient patches of the two grids [S/32, S/32], [S/16, S/16].
    """

    class_name: str
    probability: float
    cam: np.ndarray
    salient32: np.ndarray
    salient16: np.ndarray


def read_image(
    path: str | pathlib.Path,
    size: int,
    mean,
    std,
    max_pixels: int = image_files.MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """(the image resized to size x size as uint8 RGB, the normalised float32 model input),
    the evaluation transform's resize and normalisation of the pixels a built data set holds
    for the file (`mlgraph.data.images.read_rgb`, under the size limit `max_pixels`).

    Raises:
      DataError: a missing or unreadable image file, or one over the limit.
    """
    try:
        pixels = image_files.read_rgb(path, max_pixels)
    except image_files.BadImage as e:
        raise DataError(str(e)) from None
    resized = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(resized)
    normalised = (pixels.astype(np.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return pixels, normalised.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _guidance(graphdef, state, image: jax.Array, target: jax.Array):
    """(class probabilities [C], the map [S, S], the two masks) of one image, one class."""
    from mlgraph.models import scob

    model = nnx.merge(graphdef, state)
    x32, x16 = model.features(image[None])
    logits = model.classifier(model.online(x32, x16)).astype(jnp.float32)
    full, s32, s16 = scob.guidance(model, x32, x16, target[None])
    return jax.nn.sigmoid(logits)[0], full[0], s32[0], s16[0]


def image_guidance(model, image: np.ndarray, class_names: Sequence[str], classes=None):
    """The `Guidance` of one normalised image [S, S, 3] for each of `classes` (names; default:
    the top-scored class), from a Scob model (`mlgraph.models.scob.guidance`).

    Raises:
      ConfigError: a class name the model does not have.
    """
    graphdef, state = nnx.split(model)
    image = jnp.asarray(image)
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise ConfigError(
                f"--classes: unknown class(es) {', '.join(unknown)}; the model's classes: "
                f"{', '.join(class_names)}"
            )
        targets = [list(class_names).index(c) for c in classes]
    else:
        probs = _guidance(graphdef, state, image, jnp.int32(0))[0]
        targets = [int(np.argmax(probs))]
    out = []
    for t in targets:
        probs, full, s32, s16 = (
            np.asarray(x) for x in _guidance(graphdef, state, image, jnp.int32(t))
        )
        out.append(Guidance(class_names[t], float(probs[t]), full, s32, s16))
    return out


def _patches(pixels: np.ndarray, salient: np.ndarray) -> np.ndarray:
    """`pixels` with the non-salient patches of `salient`'s grid dimmed."""
    scale = pixels.shape[0] // salient.shape[0]
    keep = np.kron(salient, np.ones((scale, scale), bool))
    return (pixels * np.where(keep, 1.0, DIM)[..., None]).astype(np.uint8)


def cam_figure(pixels: np.ndarray, guidance: Guidance, title: str) -> Figure:
    """Three panels: the image under the Grad-CAM++ map, and its salient patches of the
    stride-32 and stride-16 grids (the others dimmed)."""
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(pixels)
    shown = axes[0].imshow(guidance.cam, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=axes[0], shrink=0.8, label="Grad-CAM++")
    axes[0].set_title(f"{guidance.class_name} (p = {guidance.probability:.2f})")
    for ax, salient in zip(axes[1:], (guidance.salient32, guidance.salient16), strict=True):
        n = salient.shape[0]
        ax.imshow(_patches(pixels, salient))
        ax.set_title(f"{n}x{n} key mask: {int(salient.sum())} salient patches")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


def draw(
    workdir: str | pathlib.Path,
    images: Sequence[str],
    out_dir: str | pathlib.Path,
    *,
    step: int | None = None,
    classes: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    dpi: int = 120,
    max_image_pixels: int = image_files.MAX_IMAGE_PIXELS,
) -> list[tuple[pathlib.Path, Guidance]]:
    """Write `cam_<image stem>_<class>.png` into `out_dir` for each image and class, from the
    Scob model saved in `workdir` at `step` (default: its best checkpoint); `class_names`
    replaces the data set's names; images are decoded under the size limit
    `max_image_pixels` (`read_image`).

    Raises:
      WorkdirError: a workdir that did not train Scob (or has no checkpoint).
      DataError: an unreadable image; ConfigError: an unknown class name.
    """
    from mlgraph import workdir as workdirs

    if not images:
        raise ConfigError("cam: no IMAGE given (python -m mlgraph.viz cam --workdir DIR IMAGE...)")
    method = workdirs.read_config(workdir).model.name
    if method != "scob":
        raise WorkdirError(
            f"--workdir {workdir}: trained {method!r}; the cam figures need a Scob run "
            "(config.model.name='scob')"
        )
    run = workdirs.open_run(workdir, step, ema=False)
    names = list(class_names or run.dataset.class_names)
    if len(names) != run.dataset.num_classes:
        raise ConfigError(
            f"--classes_file: {len(names)} names for a model of {run.dataset.num_classes} classes"
        )
    model = run.model()
    size = run.config.image_size
    out_dir = storage.as_given(out_dir, "--output")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        mean, std = run.config.data.mean, run.config.data.std
        pixels, normalised = read_image(path, size, mean, std, max_image_pixels)
        for g in image_guidance(model, normalised, names, classes):
            title = f"{pathlib.Path(path).name}: step {run.step} of {workdir}"
            fig = cam_figure(pixels, g, title)
            target = out_dir / f"cam_{pathlib.Path(path).stem}_{g.class_name.replace(' ', '_')}.png"
            storage.save_figure(fig, target, dpi=dpi)
            written.append((target, g))
    return written
