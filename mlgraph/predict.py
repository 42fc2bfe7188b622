"""Labels for one's own image files, from a trained workdir or a converted checkpoint.

    python -m mlgraph.predict --workdir DIR IMAGE_OR_FOLDER... [--top_k 5] [--threshold 0.5]
        [--output preds.jsonl|preds.csv] [--batch_size 32] [--ema/--no-ema] [--step N]
        [--max_image_pixels N]
    python -m mlgraph.predict --checkpoint CONVERTED_DIR [--config F] [--class_names FILE] ...

Each image goes through the evaluation transform of the run's config (of `--config`; without
one, a converted checkpoint's images are resized to its training size and normalised with the
ImageNet mean and std, as the official test transforms do, and a warning says so), and gets
its labels (scores >= `--threshold`), its `--top_k` classes with their scores, and for SALGL
its scene probabilities. Folders are searched for image files recursively. Images are decoded
as the builders decode them (`mlgraph.data.images`: 16-bit and float images scaled to 8 bits;
a JPEG over `--max_image_pixels` decoded at a reduced scale, any other image over it refused).
A file that cannot be read as an image is reported in one line and skipped; when no file could
be read, that is an error and `--output` is not written. Class names come from the workdir's
data set, from a converted checkpoint's settings or `--config`'s data set, or from
`--class_names FILE` (one a line). Errors are one line on stderr and exit status 2.

The same from Python (e.g. a notebook):

    from mlgraph.predict import Predictor
    predictor = Predictor.from_workdir("/tmp/mlgraph_demo")
    for p in predictor.predict(["photo.jpg"], top_k=3):
        print(p["file"], p["labels"], p["top"])
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mlgraph import checkpointing, cli, config_lib
from mlgraph import paths as storage
from mlgraph.data import images as image_files
from mlgraph.errors import ConfigError, DataError, MlgraphError, warn
from mlgraph.workdir import open_run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def image_paths(inputs: Iterable[str | pathlib.Path]) -> list[pathlib.Path]:
    """The files named, and the image files (by suffix, `IMAGE_SUFFIXES`) under the folders
    named, recursively and sorted, in the order given.

    Raises:
      MlgraphError: a path that does not exist, or a folder without image files.
    """
    found = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not inside:
                raise MlgraphError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise MlgraphError(f"{path}: no such file or folder")
    return found


# ---------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------
def _forward(graphdef: nnx.GraphDef) -> Callable:
    """(params, rest, images) -> {'scores': sigmoid of the logits, 'scene_probs' if any}."""

    def forward(params, rest, images):
        outputs = nnx.merge(graphdef, params, rest)(images, train=False)
        result = {"scores": jax.nn.sigmoid(outputs["logits"].astype(jnp.float32))}
        if "scene_probs" in outputs:  # SALGL's scene of each image
            result["scene_probs"] = outputs["scene_probs"].astype(jnp.float32)
        return result

    return jax.jit(forward)


def _class_names(names: Sequence[str] | str | pathlib.Path | None) -> list[str] | None:
    if names is None or isinstance(names, list | tuple):
        return None if names is None else list(names)
    from mlgraph import textfiles

    return textfiles.read_names(names)


class Predictor:
    """A model with its evaluation transform and class names, for image files or arrays.

    Build one with `from_workdir` or `from_checkpoint`.

    Attributes:
      class_names: the C names, in the model's output order.
      config: the config whose evaluation transform (`config.data`, `config.image_size`) is
        applied.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        rest: Any,
        class_names: Sequence[str],
        config: ml_collections.ConfigDict,
        batch_size: int = 32,
    ):
        from mlgraph.data import pipeline

        self.class_names = list(class_names)
        self.config = config
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size={batch_size}: expected at least 1")
        self._params, self._rest = params, rest
        self._forward = _forward(graphdef)
        self._transform = pipeline.EvalTransform.from_config(config, len(self.class_names))

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_workdir(
        cls,
        workdir: str | pathlib.Path,
        *,
        step: int | None = None,
        ema: bool = True,
        class_names: Sequence[str] | str | pathlib.Path | None = None,
        batch_size: int = 32,
    ) -> Predictor:
        """The model (`ema`: its EMA) of a training workdir at `step` (by default the best
        step; `mlgraph.workdir`'s step policy), under the run's config; class names from its
        data set unless given (a list, or a file of one name a line).

        Raises:
          WorkdirError: no such workdir, no checkpoint, or a step that cannot be read.
        """
        run = open_run(workdir, step, ema)
        names = _class_names(class_names) or list(run.dataset.class_names)
        names = _check(names, run.dataset.num_classes)
        return cls(run.graphdef, run.params, run.rest, names, run.config, batch_size)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | pathlib.Path,
        config: ml_collections.ConfigDict | None = None,
        *,
        class_names: Sequence[str] | str | pathlib.Path | None = None,
        batch_size: int = 32,
    ) -> Predictor:
        """A converted whole-model checkpoint (`python -m mlgraph.convert`).

        With `config`, the model is built as `mlgraph.evaluate --checkpoint` builds it and the
        config's evaluation transform is used; without, the model is the one its settings
        describe, under a plain resize to its training size and the ImageNet normalisation (a
        warning line says so). Class names: `class_names`, else the settings' `class_names`,
        else `config`'s data set.

        Raises:
          ConfigError: not a whole model, or no class names to be found.
        """
        from mlgraph.convert import core

        settings = checkpointing.load_weights_settings(path)
        if settings.get("kind") != "model":
            raise ConfigError(
                f"--checkpoint {path}: holds a {settings.get('kind')} ('kind' in "
                "settings.json), not a whole model"
            )
        names = _class_names(class_names) or settings.get("class_names")
        if config is None:
            config = config_lib.base_config()
            config.image_size = int(settings["image_size"])
            warn(
                f"--checkpoint {path} without --config: images are resized to "
                f"{config.image_size}x{config.image_size} and normalised with the ImageNet "
                "mean and std; pass --config for a run's own evaluation transform"
            )
            module = core.load_converted(path)
            graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        else:
            from mlgraph import assets, train_state

            config = ml_collections.ConfigDict(config.to_dict())
            config.init_from = str(path)
            dataset = None
            if not names or config.model.get("embed_path") or config.model.get("graph_path"):
                from mlgraph.data import datasets

                dataset = datasets.open_dataset(config.data)
                names = names or list(dataset.class_names)
                config = assets.resolve(config, dataset.class_names, dataset.directory)
            _, graphdef, params, rest = train_state.create_model(config, settings["num_classes"])
        if not names:
            raise ConfigError(
                f"--checkpoint {path}: no class names (its settings.json has none); pass "
                "--class_names FILE (one name a line) or --config with the data set it was "
                "trained on"
            )
        return cls(
            graphdef, params, rest, _check(names, settings["num_classes"]), config, batch_size
        )

    # --- use ---------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """A uint8 RGB image [H, W, 3] -> the model's float input [S, S, 3]."""
        element = {"image": image, "labels": np.zeros(len(self.class_names), np.float32)}
        return self._transform.map(element)["image"]

    def scores(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Model outputs for preprocessed images [N, S, S, 3]: 'scores' [N, C] (sigmoid of
        the logits) and, for SALGL, 'scene_probs' [N, K]. Runs in batches of `batch_size`
        (the last one padded, so that one compilation serves every batch)."""
        batch = np.asarray(batch, np.float32)
        parts = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = jax.device_get(self._forward(self._params, self._rest, chunk))
            parts.append({k: v[: len(chunk) - pad] for k, v in out.items()})
        if not parts:
            return {"scores": np.zeros((0, len(self.class_names)), np.float32)}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict(
        self,
        files: Iterable[str | pathlib.Path],
        *,
        top_k: int = 5,
        threshold: float = 0.5,
        progress: bool = False,
        max_image_pixels: int = image_files.MAX_IMAGE_PIXELS,
    ) -> list[dict[str, Any]]:
        """One record per readable image of `files` (folders are searched, `image_paths`):
        'file', 'labels' (names with score >= threshold, best first), 'top' ([name, score]
        of the `top_k` best), 'scores' ({name: score}), and for SALGL 'scene_probs'.
        Images are decoded as the builders decode them (`images.read_rgb`: EXIF orientation,
        16-bit and float images scaled to 8 bits, the size limit `max_image_pixels`).
        Unreadable files, and images over the limit that cannot be decoded reduced, are
        reported in one warning line each and skipped."""
        from tqdm import tqdm

        paths = image_paths(files)
        records = []
        bar = tqdm(total=len(paths), unit="img", disable=not progress or None, file=sys.stderr)
        for start in range(0, len(paths), self.batch_size):
            read, inputs = [], []
            for path in paths[start : start + self.batch_size]:
                try:
                    pixels = image_files.read_rgb(path, max_image_pixels)
                    inputs.append(self.preprocess(pixels))
                    read.append(path)
                except image_files.BadImage as e:
                    warn(f"{e}; skipped")
            bar.update(min(self.batch_size, len(paths) - start))
            if not read:
                continue
            out = self.scores(np.stack(inputs))
            for i, path in enumerate(read):
                records.append(self._record(path, out, i, top_k, threshold))
        bar.close()
        return records

    def _record(self, path, out: dict, i: int, top_k: int, threshold: float) -> dict[str, Any]:
        scores = out["scores"][i]
        order = np.argsort(-scores, kind="stable")
        record = {
            "file": str(path),
            "labels": [self.class_names[c] for c in order if scores[c] >= threshold],
            "top": [[self.class_names[c], float(scores[c])] for c in order[:top_k]],
            "scores": {n: float(s) for n, s in zip(self.class_names, scores, strict=True)},
        }
        if "scene_probs" in out:
            record["scene_probs"] = [float(p) for p in out["scene_probs"][i]]
        return record


def _check(names: list[str], num_classes: int) -> list[str]:
    if len(names) != num_classes:
        raise ConfigError(
            f"{len(names)} class names for a model of {num_classes} classes; give one name "
            "per class, in the model's order"
        )
    return names


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_line(record: dict[str, Any]) -> str:
    """'FILE: label (0.97), ...; next: name (0.12), ...; scene 2 (0.81)' for one record."""
    shown = {name for name in record["labels"]}
    labels = ", ".join(f"{n} ({record['scores'][n]:.2f})" for n in record["labels"]) or "(none)"
    rest = [f"{n} ({s:.2f})" for n, s in record["top"] if n not in shown]
    line = f"{record['file']}: {labels}"
    if rest:
        line += f"; next: {', '.join(rest)}"
    if "scene_probs" in record:
        scene = int(np.argmax(record["scene_probs"]))
        line += f"; scene {scene} ({record['scene_probs'][scene]:.2f})"
    return line


def write_records(records: list[dict[str, Any]], path: pathlib.Path, class_names) -> None:
    """`.jsonl` (one record a line) or `.csv` (file, labels joined by ';', one score column a
    class, and `scene_<k>` columns for SALGL)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return
    scenes = len(records[0]["scene_probs"]) if records and "scene_probs" in records[0] else 0
    # Written whole, through a buffer: object stores (gs://) take a file in one write.
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "labels", *class_names, *(f"scene_{k}" for k in range(scenes))])
        for r in records:
            row = [
                r["file"],
                ";".join(r["labels"]),
                *(f"{r['scores'][n]:.6f}" for n in class_names),
            ]
            writer.writerow(row + [f"{p:.6f}" for p in r.get("scene_probs", [])])
        path.write_text(f.getvalue())


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
_FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", flag_values=_FLAGS)
_STEP = flags.DEFINE_integer(
    "step", None, "Its checkpoint step (default: the best).", flag_values=_FLAGS
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A converted whole-model checkpoint.", flag_values=_FLAGS
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file for --checkpoint (NAME.py[:ARG]; its transform).",
    flag_values=_FLAGS,
)
_CLASS_NAMES = flags.DEFINE_string(
    "class_names", None, "File of class names, one a line.", flag_values=_FLAGS
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Best classes listed per image.", flag_values=_FLAGS)
_THRESHOLD = flags.DEFINE_float(
    "threshold", 0.5, "Score from which a class is a label.", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Also write the predictions (.jsonl or .csv).", flag_values=_FLAGS
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=_FLAGS)
_EMA = flags.DEFINE_boolean(
    "ema", True, "Use the workdir's EMA model (--no-ema: the model).", flag_values=_FLAGS
)
_MAX_IMAGE_PIXELS = image_files.define_max_pixels_flag(_FLAGS)


def _config() -> ml_collections.ConfigDict | None:
    """The `--config` file's config, or None without one.

    Raises:
      ConfigError: the file does not load.
    """
    if not _FLAGS["config"].present:
        return None
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises only when used
        return config
    except OSError as e:
        path = _FLAGS["config"].config_filename
        raise ConfigError(
            f"--config {path}: cannot load the config ({cli.load_problem(e)})"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `argv` without the program name (default: sys.argv[1:]).

    Returns the exit status: 0, or 2 after an error (one line on stderr).
    """
    try:
        inputs = cli.parse(_FLAGS, argv, __doc__)
    except app.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.quiet_logs()
    try:
        if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
            raise ConfigError("give exactly one of --workdir DIR or --checkpoint PATH")
        if not inputs:
            raise ConfigError("give the image files or folders to label")
        output = storage.path(_OUTPUT.value, "--output") if _OUTPUT.value else None
        if output is not None and output.suffix not in (".jsonl", ".csv"):
            raise ConfigError(f"--output {output}: expected a .jsonl or .csv file")
        paths = image_paths(inputs)  # bad paths fail before the model is read
        if _WORKDIR.value:
            if _FLAGS["config"].present:
                raise ConfigError("--config goes with --checkpoint; a workdir has its own")
            predictor = Predictor.from_workdir(
                _WORKDIR.value,
                step=_STEP.value,
                ema=_EMA.value,
                class_names=_CLASS_NAMES.value,
                batch_size=_BATCH_SIZE.value,
            )
        else:
            predictor = Predictor.from_checkpoint(
                _CHECKPOINT.value,
                _config(),
                class_names=_CLASS_NAMES.value,
                batch_size=_BATCH_SIZE.value,
            )
        records = predictor.predict(
            paths,
            top_k=_TOP_K.value,
            threshold=_THRESHOLD.value,
            progress=True,
            max_image_pixels=_MAX_IMAGE_PIXELS.value,
        )
        if not records:
            raise DataError(
                f"none of the {len(paths)} files could be read as an image (each is named "
                "above); no predictions, nothing written"
            )
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for record in records:
        print(format_line(record))
    if output is not None:
        write_records(records, output, predictor.class_names)
        print(f"wrote {len(records)} predictions to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
