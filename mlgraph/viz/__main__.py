"""Figures from a training workdir: SALGL's learned scenes (one PNG per scene), Scob's
semantic guidance over images (one PNG per image and class), the attention maps of
Query2Label, SSGRL, SALGL and SigRL over images (one PNG per image), and one self-contained
HTML report of the whole run (`mlgraph.viz.report`).

    python -m mlgraph.viz heatmap --workdir DIR [--step N] [--ema | --no-ema] [--output OUT]
        [--classes NAME,NAME,... | --top N] [--classes_file NAMES.txt]
    python -m mlgraph.viz labelcloud --workdir DIR [--step N] [--ema | --no-ema] [--output OUT]
        [--classes_file NAMES.txt]
    python -m mlgraph.viz cam --workdir DIR IMAGE... [--step N] [--classes NAME,...]
        [--output OUT] [--classes_file NAMES.txt] [--max_image_pixels N]
    python -m mlgraph.viz attention --workdir DIR IMAGE... [--step N] [--no-ema]
        [--classes NAME,... | --top_k K] [--output OUT] [--classes_file NAMES.txt]
        [--label_embeddings E.npy] [--max_image_pixels N]
    python -m mlgraph.viz report --workdir DIR [--step N] [--no-ema] [--output report.html]

Writes `heatmap_scene{k}.png` / `labelcloud_scene{k}.png` / `cam_<image>_<class>.png` /
`attention_<image>.png` into OUT (default DIR/viz); `report` writes one HTML file (default
DIR/report.html), saying in one `warning:` line each what it could not draw. The step defaults
to the best checkpoint, SALGL's counts and the attention maps to the EMA model's.
`cam` draws the class the model scores highest, or each class of --classes; its images are
decoded as the builders decode them (`mlgraph.data.images`, the size limit --max_image_pixels).
`attention` draws each label of --classes or the --top_k (3) top-scored, over the image as the
run's evaluation transform gives it to the model (`mlgraph.viz.attention`; SigRL takes any
label name, those that are not classes of the run embedded with MiniLM or read from
--label_embeddings). Class names come from the data set in DIR/config.json, or from
--classes_file (one name per line). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from mlgraph import cli, viz
from mlgraph import paths as storage
from mlgraph.data import images as image_files
from mlgraph.errors import MlgraphError

COMMANDS = {
    "heatmap": "scene-conditional label co-occurrence probabilities",
    "labelcloud": "word clouds of the labels each scene collected",
    "cam": "Scob's Grad-CAM++ map and key masks over images",
    "attention": "attention maps of Query2Label, SSGRL, SALGL and SigRL over images",
    "report": "one self-contained HTML report of the run (curves, evaluation, figures)",
}
WITH_IMAGES = ("cam", "attention")  # the commands whose positional arguments are images
# flag: the commands that take it
ONLY_FOR = {
    "top": ("heatmap",),
    "classes": ("heatmap", "cam", "attention"),
    "classes_file": ("heatmap", "labelcloud", "cam", "attention"),
    "max_image_pixels": WITH_IMAGES,
    "top_k": ("attention",),
    "label_embeddings": ("attention",),
}

_FLAGS = flags.FlagValues()  # not absl's global FLAGS: see mlgraph.cli
_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir", flag_values=_FLAGS)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: best)", flag_values=_FLAGS)
_EMA = flags.DEFINE_bool(
    "ema",
    True,
    "use the EMA model's counts (default) or, with --no-ema, the model's",
    flag_values=_FLAGS,
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "output folder (default: WORKDIR/viz); report: the HTML file (default: WORKDIR/report.html)",
    flag_values=_FLAGS,
)
_CLASSES_FILE = flags.DEFINE_string(
    "classes_file",
    None,
    "class names, one per line (instead of opening the workdir's data set)",
    flag_values=_FLAGS,
)
_CLASSES = flags.DEFINE_string(
    "classes",
    None,
    "comma-separated class names to draw, in order (heatmap; cam, attention: default the "
    "top-scored)",
    flag_values=_FLAGS,
)
_TOP_K = flags.DEFINE_integer(
    "top_k",
    None,
    "attention: draw the K top-scored classes of each image (default 3)",
    flag_values=_FLAGS,
)
_LABEL_EMBEDDINGS = flags.DEFINE_string(
    "label_embeddings",
    None,
    "attention, SigRL: the embeddings (.npy [K, E]) of the --classes names that are not "
    "classes of the run, in their order",
    flag_values=_FLAGS,
)
_TOP = flags.DEFINE_integer(
    "top",
    None,
    "draw the N most frequent classes (default: all if at most 20, else 20)",
    flag_values=_FLAGS,
)
_MAX_IMAGE_PIXELS = image_files.define_max_pixels_flag(_FLAGS)
flags.mark_flag_as_required("workdir", flag_values=_FLAGS)
flags.mark_flags_as_mutual_exclusive(["classes", "top"], flag_values=_FLAGS)
flags.mark_flags_as_mutual_exclusive(["classes", "top_k"], flag_values=_FLAGS)
USAGE = "\n".join(
    [
        "usage: python -m mlgraph.viz {heatmap,labelcloud,cam,attention,report} --workdir DIR",
        "       python -m mlgraph.viz {cam,attention} --workdir DIR IMAGE...",
        "       python -m mlgraph.viz report --workdir DIR [--step N] [--output report.html]",
        "",
        *(f"  {name}: {text}" for name, text in COMMANDS.items()),
        "",
        *(f"--{flag}: {', '.join(owners)} only" for flag, owners in ONLY_FOR.items()),
        "--output: a folder (report: the HTML file)",
    ]
)


def run(
    command: str,
    workdir: str,
    step: int | None = None,
    ema: bool = True,
    output: str | None = None,
    classes_file: str | None = None,
    classes: str | None = None,
    top: int | None = None,
    images: Sequence[str] = (),
    max_image_pixels: int = image_files.MAX_IMAGE_PIXELS,
    top_k: int | None = None,
    label_embeddings: str | None = None,
) -> list[pathlib.Path]:
    """Run `command` (a key of COMMANDS) with the flags' values (and, for cam and attention,
    the image paths and their size limit); returns the written paths (and prints a summary)."""
    if command == "report":
        from mlgraph.viz import report  # imports jax: only for this command

        written = report.write(workdir, step=step, output=output, ema=ema)
        print(f"{workdir}: drew {'; '.join(written.notes.drawn)}")
        print(
            f"wrote {written.path} ({storage.size_text(written.size)}) in {written.seconds:.1f} s"
        )
        return [written.path]
    out_dir = storage.as_given(output or storage.epath.Path(workdir) / "viz", "--output")
    picked = [c.strip() for c in classes.split(",")] if classes else None
    if command == "attention":
        return _attention(
            workdir, images, out_dir, step, ema, picked, top_k, classes_file,
            label_embeddings, max_image_pixels,
        )  # fmt: skip
    if command == "cam":
        from mlgraph.viz import cam  # imports jax: only for this command

        names = viz.read_classes_file(classes_file) if classes_file else None
        drawn = cam.draw(
            workdir,
            images,
            out_dir,
            step=step,
            classes=picked,
            class_names=names,
            max_image_pixels=max_image_pixels,
        )
        for path, g in drawn:
            print(
                f"{g.class_name} (p = {g.probability:.2f}): {int(g.salient32.sum())} and "
                f"{int(g.salient16.sum())} salient patches -> {path}"
            )
        return [path for path, _ in drawn]
    purpose = "heatmaps" if command == "heatmap" else "label clouds"
    comatrix, step = viz.read_comatrix(workdir, step, ema, purpose)
    names, config = viz.read_class_names(workdir, classes_file)
    source = f"--classes_file {classes_file}" if classes_file else "the data set"
    viz.check_class_count(names, comatrix, source)
    notes = viz.demo_scene_notes(config, comatrix, names)
    if command == "heatmap":
        paths = viz.heatmaps(comatrix, names, out_dir, classes=picked, top=top, scene_notes=notes)
    else:
        paths = viz.label_clouds(comatrix, names, out_dir, scene_notes=notes)
    which = "EMA model" if ema else "model"
    print(f"{workdir}: step {step}, {which} counts, {comatrix.shape[0]} learned scenes")
    shares = viz.scene_shares(comatrix)
    counts = viz.label_counts(comatrix)
    for k, path in enumerate(paths):
        most_counted = [names[i] for i in counts[k].argsort()[::-1][:3] if counts[k, i] > 0]
        line = f"scene {k}: {shares[k]:.1%} of counted labels, most counted: "
        line += ", ".join(most_counted) or "none"
        if notes and notes[k]:
            line += f"; {notes[k]}"
        print(f"{line} -> {path}")
    return paths


def _attention(
    workdir, images, out_dir, step, ema, classes, top_k, classes_file, label_embeddings, max_pixels
) -> list[pathlib.Path]:
    """`attention`: one PNG per image (`mlgraph.viz.attention.draw`), a line per image."""
    from mlgraph.viz import attention  # imports jax: only for this command

    drawn = attention.draw(
        workdir,
        images,
        out_dir,
        step=step,
        ema=ema,
        classes=classes,
        top_k=attention.TOP_K if top_k is None else top_k,
        class_names=viz.read_classes_file(classes_file) if classes_file else None,
        label_embeddings=label_embeddings,
        max_image_pixels=max_pixels,
    )
    for image, (path, found) in zip(images, drawn, strict=True):
        name, _ = attention.METHODS[found.method]
        h, w = found.maps.shape[-2:]
        layers = f"{len(found.layers)} decoder layers, " if found.method == "q2l" else ""
        labels = ", ".join(
            f"{n} ({p:.2f})" for n, p in zip(found.labels, found.scores, strict=True)
        )
        print(f"{image}: {name}, {layers}{h}x{w} positions: {labels} -> {path}")
    return [path for path, _ in drawn]


def parse_command(argv: Sequence[str] | None) -> tuple[str, list[str]]:
    """Parse the flags; returns the command (the first positional argument) and the rest (the
    images of cam).

    Raises:
      app.UsageError: no command or an unknown one, extra arguments (but cam's images), or a
        flag the command does not take.
    """
    args = cli.parse(_FLAGS, argv, USAGE)
    valid = ", ".join(COMMANDS)
    if not args:
        raise app.UsageError(f"no command given; valid: {valid}")
    command, extra = args[0], args[1:]
    if command not in COMMANDS:
        raise app.UsageError(f"unknown command {command!r}; valid: {valid}")
    if extra and command not in WITH_IMAGES:
        raise app.UsageError(f"unexpected arguments: {' '.join(extra)}")
    if command in WITH_IMAGES and not extra:
        raise app.UsageError(
            f"{command}: no IMAGE given (python -m mlgraph.viz {command} --workdir DIR IMAGE...)"
        )
    for flag, owners in ONLY_FOR.items():
        if command not in owners and _FLAGS[flag].present:
            listed = " and ".join([", ".join(owners[:-1]), owners[-1]] if owners[1:] else owners)
            raise app.UsageError(f"--{flag}: only for {listed}")
    return command, list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a user error).

    `argv` holds the arguments after the program name (None: `sys.argv[1:]`).
    """
    try:
        command, images = parse_command(argv)
        run(
            command,
            _WORKDIR.value,
            step=_STEP.value,
            ema=_EMA.value,
            output=_OUTPUT.value,
            classes_file=_CLASSES_FILE.value,
            classes=_CLASSES.value,
            top=_TOP.value,
            images=images,
            max_image_pixels=_MAX_IMAGE_PIXELS.value,
            top_k=_TOP_K.value,
            label_embeddings=_LABEL_EMBEDDINGS.value,
        )
    except (app.UsageError, MlgraphError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
