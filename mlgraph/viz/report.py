"""One self-contained HTML report of a training workdir: what the run was, how it trained, how
its model does at one step, class by class, and where it looks.

    python -m mlgraph.viz report --workdir DIR [--step N] [--no-ema] [--output report.html]

Sections (each drawn where the workdir has what it needs; what is not drawn is one `warning:`
line saying why, and a note in the page):

* the run: method, data set, steps, best step, wall time and training images/s (from the
  TensorBoard events), batch and image size, the whole config (collapsed);
* training curves from `metrics.jsonl` (`run_log`): loss, learning rate, every evaluation's
  mAP and EMA mAP, and the other mAPs the method logs (`spml_mAP`, SigRL's ZSL/GZSL); a resumed
  run's repeated steps drawn once;
* the evaluation at the chosen step (`--step`, default the workdir's step policy: the best
  step), scored again from its checkpoint as `python -m mlgraph.evaluate` scores it
  (`evaluate.score_workdir`): the metrics table of the model and its EMA; per-class AP sorted
  with each class's positives, and against class frequency; precision-recall curves of the
  five best and five worst classes; the label pairs most often confused (`class_errors`);
* example images: for the five worst classes, the highest-scored false positives and the
  lowest-scored false negatives, as thumbnails with their labels and scores;
* the method's own figures: SALGL's scene heatmaps and label clouds (`viz heatmap`,
  `viz labelcloud`), Scob's CAMs (`viz cam`), and the attention maps of the methods that attend
  over image positions (`mlgraph.viz.attention`), for the evaluation images with the most
  labels.

The per-class parts use the EMA model's scores (`--no-ema`: the model's). Figures are PNG and
thumbnails JPEG, inline as data URIs: the file opens from a laptop's disk or a bucket and
fetches nothing. Scoring the split is the one slow part (the model's forward over it); the
rest, for a 100,000-line log and a 40,504-image COCO evaluation, takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

import mlgraph
from mlgraph import config_lib, evaluation, paths
from mlgraph import workdir as workdirs
from mlgraph.data import datasets
from mlgraph.data import images as image_files
from mlgraph.errors import MlgraphError, WorkdirError, warn
from mlgraph.metric_writer import METRICS_FILE, TENSORBOARD_DIR
from mlgraph.viz import class_errors, run_log
from mlgraph.viz import report_figures as figs
from mlgraph.viz import report_html as h
from mlgraph.viz.report_html import Section

REPORT_FILE = "report.html"
N_CLASSES = 5  # best and worst classes drawn
N_EXAMPLES = 4  # false positives and false negatives shown per worst class
N_PAIRS = 10  # confused pairs listed
N_IMAGES = 3  # evaluation images the method's own figures are drawn for
THUMBNAIL = 160  # pixels, the longer side


@dataclasses.dataclass
class Evaluation:
    """What the report draws of the evaluation at one step.

    Attributes:
      step: the checkpoint step scored; split: the evaluation split's name.
      class_names: the C classes.
      scores: [N, C] the chosen model's probabilities; labels: [N, C] 0/1; mask: [N, C] bool
        (False: the pair counts in no metric); row n is example n of `source`.
      table: {'model': metrics, 'ema': metrics} as `python -m mlgraph.evaluate` reports them.
      views: the method's label views' metrics ({} when it has none).
      model: which model `scores` are ('EMA model' or 'model').
      source: the split's examples by row (`image`: the encoded image, `image_id`).
    """

    step: int
    split: str
    class_names: list[str]
    scores: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    table: dict[str, dict[str, float]]
    views: dict[str, dict[str, float]]
    model: str
    source: Any


@dataclasses.dataclass
class Notes:
    """What the report drew, and what it did not with the reason (one line each)."""

    drawn: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)

    def miss(self, what: str, why: str) -> str:
        """Record (and return) '<what> not drawn: <why>', on one line."""
        line = f"{what} not drawn: {' '.join(str(why).split())}"
        self.missing.append(line)
        return line


@dataclasses.dataclass(frozen=True)
class Written:
    """A written report: its `path`, `size` in bytes, the `seconds` it took, and `notes`."""

    path: epath.Path
    size: int
    seconds: float
    notes: Notes


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    """'1 h 02 min', '3 min 05 s', '12.3 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def run_section(
    workdir: epath.Path,
    config: ml_collections.ConfigDict | None,
    dataset: datasets.Dataset | None,
    found: dict[str, run_log.Curve],
    sessions: Sequence[run_log.Session],
) -> Section:
    """The run's identity: method, data set, steps, best step, wall time and images/s from the
    log, and its config collapsed."""
    items = [("workdir", h.esc(workdir))]
    last = max((int(c.steps[-1]) for c in found.values()), default=None)
    if config is not None:
        model = config.model
        backbone = model.get("backbone")
        items.append(("method", h.esc(model.name + (f" ({backbone})" if backbone else ""))))
        data = f"{config.data.name}"
        if dataset is not None:
            train = datasets.training_split(dataset, config.data).num_examples
            evaluated = len(dataset.sources[config.data.eval_split])
            data += (
                f": {dataset.num_classes} classes, {train} training images, {evaluated} "
                f"in '{config.data.eval_split}'"
            )
            total = config_lib.total_steps(config, train)
        else:
            total = config.total_steps or None
        items.append(("data set", h.esc(data)))
        steps = "none logged" if last is None else f"{last}"
        items.append(("steps", h.esc(steps + (f" of {total}" if total else ""))))
        items.append(("batch, image size", h.esc(f"{config.batch_size}, {config.image_size} px")))
        best = run_log.best_evaluation(found, config.best_metric)
        if best is not None:
            items.append(("best step", h.esc(f"{best[0]} ({config.best_metric} {best[1]:.2f})")))
    elif last is not None:
        items.append(("steps", h.esc(f"{last}")))
    if sessions:
        wall = run_log.wall_time(sessions)
        runs = f" in {len(sessions)} sessions" if len(sessions) > 1 else ""
        items.append(("wall time", h.esc(f"{_duration(wall)}{runs} (TensorBoard events)")))
        rate = run_log.train_images_per_s(sessions, config.batch_size) if config else None
        if rate is not None:
            items.append(
                ("training speed", h.esc(f"{rate:.1f} images/s (logged steps, evaluations in)"))
            )
    body = h.definitions(items)
    if config is not None:
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
        body += h.details("config", f"<pre>{h.esc(text)}</pre>")
    return Section("run", "the run", body)


def curves_section(found: dict[str, run_log.Curve]) -> Section:
    """The training curves of `run_log.panels`, one figure each."""
    items = []
    for title, ylabel, curves in run_log.panels(found):
        items.append(h.figure(figs.png(figs.curve_figure(title, ylabel, curves)), title))
    note = "<p>Each step once: where a resumed run logged a step again, its later value.</p>"
    return Section("curves", "training curves", note + h.grid(items))


def metrics_section(ev: Evaluation) -> Section:
    """The metrics table of the model and its EMA at the step (and the method's views)."""
    header = ["model"] + [head for _, head in evaluation.COLUMNS]
    names = {"model": "model", "ema": "EMA"}
    rows = [
        [names.get(row, row)] + [values.get(key, float("nan")) for key, _ in evaluation.COLUMNS]
        for row, values in ev.table.items()
    ]
    body = (
        f"<p>{len(ev.labels)} images of '{h.esc(ev.split)}', checkpoint step {ev.step}; "
        "metrics in percent (mAP_ni: ML-GCN's non-interpolated mAP, mAP_sp: the single-positive "
        "papers'; @3: each image's top 3).</p>" + h.table(header, rows)
    )
    if ev.views:
        keys = list(next(iter(ev.views.values())))
        vrows = [[n.upper()] + [m[k] for k in keys] for n, m in ev.views.items()]
        body += h.table(["view"] + [k.replace("_at", "@") for k in keys], vrows)
    return Section("evaluation", f"evaluation at step {ev.step}", body)


def classes_section(ev: Evaluation, ap: np.ndarray, positives: np.ndarray) -> Section:
    """Per-class AP sorted, with each class's positives; AP against frequency; the table."""
    names = ev.class_names
    _, worst = class_errors.best_and_worst(ap, N_CLASSES)
    items = [
        h.figure(figs.png(figs.class_ap_figure(names, ap, positives)), "per-class AP"),
        h.figure(
            figs.png(figs.ap_frequency_figure(names, ap, positives, label=worst)),
            "AP against class frequency",
        ),
    ]
    order = np.argsort(np.nan_to_num(ap, nan=-1.0), kind="stable")
    rows = [
        [names[c], "no positives" if np.isnan(ap[c]) else 100 * float(ap[c]), int(positives[c])]
        for c in order
    ]
    table = h.table(["class", "AP (%)", "positives"], rows)
    body = (
        f"<p>AP of the {h.esc(ev.model)} (VOC-2012 interpolated, as mAP), positives: the "
        "class's positive images in the split.</p>"
        + h.grid(items)
        + h.details(f"all {len(names)} classes, worst first", table)
    )
    return Section("classes", "per-class AP", body)


def pr_section(ev: Evaluation, ap: np.ndarray) -> Section:
    """Precision-recall curves of the best and the worst classes."""
    groups = []
    best_worst = class_errors.best_and_worst(ap, N_CLASSES)
    for kind, classes in zip(("best", "worst"), best_worst, strict=True):
        curves = class_errors.pr_curves(ev.scores, ev.labels, ev.mask, classes)
        groups.append((f"{len(classes)} {kind} classes", classes, curves))
    fig = figs.pr_figure(ev.class_names, groups, ap)
    body = (
        "<p>Interpolated precision (its mean over a class's positives is the AP), over the "
        "precision at each rank (faint).</p>" + h.figure(figs.png(fig), "precision-recall curves")
    )
    return Section("pr", "precision-recall curves", body)


def pairs_section(ev: Evaluation) -> Section:
    """The label pairs most often predicted together where only one is true."""
    names = ev.class_names
    pairs = class_errors.confused_pairs(ev.scores, ev.labels, ev.mask, N_PAIRS)
    intro = (
        "<p>Pairs of labels both predicted (score &ge; 0.5) on an image where exactly one of "
        "them is true, by the number of such images.</p>"
    )
    if not pairs:
        return Section("pairs", "confused label pairs", intro + "<p>None.</p>")
    rows = [[names[p.a], names[p.b], p.count, p.a_true, p.b_true] for p in pairs]
    header = ["label a", "label b", "images", "a true, b added", "b true, a added"]
    return Section("pairs", "confused label pairs", intro + h.table(header, rows, 2))


def _image_id(example: dict) -> str:
    image_id = example.get("image_id", "")
    return image_id.decode(errors="replace") if isinstance(image_id, bytes) else str(image_id)


def _thumbnail(ev: Evaluation, row: int, cls: int, score: float) -> str:
    """A thumbnail of example `row` captioned with its id, its score for `cls` and its labels."""
    example = ev.source[row]
    name = _image_id(example)
    labels = ", ".join(ev.class_names[c] for c in np.flatnonzero(ev.labels[row] > 0.5)) or "none"
    caption = f"{h.esc(name)}: {h.esc(ev.class_names[cls])} {score:.2f}<br>labels: {h.esc(labels)}"
    try:
        pixels = image_files.decode_rgb(example["image"], f"image {name}")
    except image_files.BadImage as e:
        return h.missing(f"image {name}: {e}")
    data, _, _ = figs.thumbnail(pixels, THUMBNAIL)
    return h.figure(data, f"image {name}", caption, mime="image/jpeg")


def examples_section(ev: Evaluation, ap: np.ndarray) -> Section:
    """For each worst class: its highest-scored false positives and lowest-scored false
    negatives."""
    _, worst = class_errors.best_and_worst(ap, N_CLASSES)
    found = class_errors.worst_examples(ev.scores, ev.labels, ev.mask, worst, N_EXAMPLES)
    body = (
        f"<p>For the {len(worst)} worst classes, the {h.esc(ev.model)}'s highest-scored false "
        "positives (score &ge; 0.5 without the label) and lowest-scored false negatives (score "
        "&lt; 0.5 with it).</p>"
    )
    for m in found:
        name = ev.class_names[m.cls]
        body += f"<h3>{h.esc(name)} (AP {100 * ap[m.cls]:.1f})</h3>"
        for kind, rows, scores in (
            ("false positives", m.false_positives, m.fp_scores),
            ("false negatives", m.false_negatives, m.fn_scores),
        ):
            thumbs = [
                _thumbnail(ev, int(r), m.cls, float(s)) for r, s in zip(rows, scores, strict=True)
            ]
            shown = h.grid(thumbs, "grid thumbs") if thumbs else "<p>none</p>"
            body += f"<p>{kind}:</p>{shown}"
    return Section("examples", "worst examples", body)


def evaluation_sections(ev: Evaluation) -> list[Section]:
    """The sections drawn from the evaluation at one step."""
    ap, positives = class_errors.class_ap(ev.scores, ev.labels, ev.mask)
    return [
        metrics_section(ev),
        classes_section(ev, ap, positives),
        pr_section(ev, ap),
        pairs_section(ev),
        examples_section(ev, ap),
    ]


def figures_section(
    key: str, title: str, intro: str, figures: Sequence[tuple[str, bytes]]
) -> Section:
    """A section of (title, PNG bytes) figures, two a row on a wide screen."""
    items = [h.figure(png, name, h.esc(name)) for name, png in figures]
    return Section(key, title, f"<p>{intro}</p>" + h.grid(items, "grid method"))


def attention_section(figures: Sequence[tuple[str, bytes]]) -> Section:
    """The attention maps: one figure per (title, PNG bytes), as
    `mlgraph.viz.attention.figures(run, image_paths, classes=None, top_k=3)` draws them."""
    return figures_section(
        "attention",
        "attention maps",
        "Each label's attention over the image positions, for the top-scored labels.",
        figures,
    )


# ---------------------------------------------------------------------------------------------
# The method's own figures
# ---------------------------------------------------------------------------------------------
def _pngs(folder: pathlib.Path, pattern: str) -> list[tuple[str, bytes]]:
    return [(p.stem, p.read_bytes()) for p in sorted(folder.glob(pattern))]


def salgl_figures(
    workdir: epath.Path, step: int, ema: bool, names: Sequence[str], config
) -> list[tuple[str, bytes]]:
    """SALGL's scene heatmaps and label clouds at `step`, as `viz heatmap` and `viz
    labelcloud` draw them."""
    from mlgraph import viz

    comatrix, _ = viz.read_comatrix(workdir, step, ema, "the report's heatmaps")
    viz.check_class_count(names, comatrix, "the data set")
    notes = viz.demo_scene_notes(config, comatrix, names)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        viz.heatmaps(comatrix, names, folder, scene_notes=notes)
        viz.label_clouds(comatrix, names, folder, scene_notes=notes)
        return _pngs(folder, "heatmap_*.png") + _pngs(folder, "labelcloud_*.png")


def example_images(ev: Evaluation, folder: pathlib.Path, n: int = N_IMAGES) -> list[str]:
    """Write the `n` evaluation images with the most labels (ties: the first) into `folder` as
    their files; returns their paths."""
    counts = (ev.labels > 0.5).sum(axis=1)
    rows = np.argsort(-counts, kind="stable")[:n]
    out = []
    for row in rows:
        example = ev.source[int(row)]
        name = re.sub(r"[^\w.-]", "_", _image_id(example)) or str(row)
        path = folder / f"{name}.jpg"  # the decoder reads the format from the bytes
        path.write_bytes(example["image"])
        out.append(str(path))
    return out


SCENES_INTRO = "P(label j | label i, scene) per learned scene, and the labels each collected."
CAMS_INTRO = (
    "Grad-CAM++ of the top-scored class and the two key masks, for the evaluation images with "
    "the most labels."
)


def method_sections(
    workdir: epath.Path, ev: Evaluation, run: Any, config, ema: bool, notes: Notes
) -> list[Section]:
    """SALGL's scene figures, Scob's CAMs and the attention maps, where the method has them."""
    method = config.model.name
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        images = example_images(ev, pathlib.Path(tmp))
        if method == "salgl":
            what = "SALGL's scene heatmaps and label clouds"
            try:
                found = salgl_figures(workdir, ev.step, ema, ev.class_names, config)
                out.append(figures_section("scenes", "SALGL scenes", SCENES_INTRO, found))
                notes.drawn.append(what)
            except MlgraphError as e:
                out.append(Section("scenes", "SALGL scenes", h.missing(notes.miss(what, e))))
        if method == "scob":
            what = "Scob's CAMs"
            try:
                found = scob_figures(workdir, ev.step, images)
                out.append(figures_section("cams", "Scob CAMs", CAMS_INTRO, found))
                notes.drawn.append(what)
            except MlgraphError as e:
                out.append(Section("cams", "Scob CAMs", h.missing(notes.miss(what, e))))
        attention = attention_figures(run, config, images, notes)
        if attention is not None:
            out.append(attention_section(attention))
    return out


def scob_figures(workdir: epath.Path, step: int, images: Sequence[str]) -> list[tuple[str, bytes]]:
    """Scob's CAMs of `images` at `step`, as `viz cam` draws them."""
    from mlgraph.viz import cam  # imports jax

    with tempfile.TemporaryDirectory() as folder:
        cam.draw(workdir, images, folder, step=step)
        return _pngs(pathlib.Path(folder), "cam_*.png")


def attention_figures(
    run: Any, config, images: Sequence[str], notes: Notes
) -> list[tuple[str, bytes]] | None:
    """`mlgraph.viz.attention.figures` of `images` for a method it `supports`, else None."""
    from mlgraph.viz import attention  # imports jax

    if not attention.supports(config):
        return None
    try:
        found = attention.figures(run, images)
    except MlgraphError as e:
        notes.miss("attention maps", e)
        return None
    notes.drawn.append("attention maps")
    return found


# ---------------------------------------------------------------------------------------------
# Reading the workdir, writing the page
# ---------------------------------------------------------------------------------------------
def check_workdir(workdir: epath.Path) -> None:
    """Raise WorkdirError unless `workdir` exists and holds a run's config, log or checkpoints."""
    with paths.faults_as_errors(workdir, f"read --workdir {workdir}"):
        if not workdir.is_dir():
            raise WorkdirError(f"--workdir {workdir}: does not exist")
        names = (workdirs.CONFIG_FILE, METRICS_FILE, workdirs.CHECKPOINTS)
        held = [n for n in names if (workdir / n).exists()]
    if not held:
        raise WorkdirError(
            f"--workdir {workdir}: no {workdirs.CONFIG_FILE}, {METRICS_FILE} or "
            f"{workdirs.CHECKPOINTS}/ in it; not a training workdir (the folder given to "
            "python -m mlgraph.main --workdir)"
        )


def score(workdir: epath.Path, step: int | None, ema: bool) -> tuple[Evaluation, Any]:
    """(the `Evaluation` at `step` by the step policy, the opened run with `ema`'s model),
    scored as `python -m mlgraph.evaluate` scores it."""
    from mlgraph import evaluate  # an entry point with absl flags of its own: only here

    results, result, run = evaluate.score_workdir(workdir, step)
    table = {k: v for k, v in results.items() if k in ("model", "ema")}
    scores = result["scores"][1 if ema else 0]
    ev = Evaluation(
        step=run.step,
        split=results["split"],
        class_names=list(run.dataset.class_names),
        scores=scores,
        labels=result["labels"],
        mask=result["label_mask"],
        table=table,
        views=results.get("views", {}),
        model="EMA model" if ema else "model",
        source=run.dataset.sources[run.config.data.eval_split],
    )
    return ev, dataclasses.replace(run, ema=ema)


def render(
    workdir: epath.Path,
    config: ml_collections.ConfigDict | None,
    dataset: datasets.Dataset | None,
    records: Sequence[dict] | None,
    sessions: Sequence[run_log.Session],
    ev: Evaluation | None,
    notes: Notes,
    more: Callable[[], list[Section]] = list,
) -> str:
    """The page from what was read (None: not read, its note already in `notes`); `more`
    gives the method's sections. Records what it draws (and does not) in `notes`."""
    found = run_log.curves(records or [])
    sections = [run_section(workdir, config, dataset, found, sessions)]
    notes.drawn.append("the run")
    if not sessions:
        notes.miss(
            "wall time and images/s",
            f"no TensorBoard events in {workdir / TENSORBOARD_DIR}",
        )
    elif config is not None and run_log.train_images_per_s(sessions, config.batch_size) is None:
        notes.miss(
            "training images/s",
            f"no session in {workdir / TENSORBOARD_DIR} logged two training steps "
            f"(config.log_every_steps={config.log_every_steps})",
        )
    if records is not None:
        if found:
            sections.append(curves_section(found))
            panels = [title for title, _, _ in run_log.panels(found)]
            notes.drawn.append(f"training curves ({', '.join(panels)})")
        if not any(run_log.MAIN_MAP.match(n) for n in found):
            line = notes.miss(
                "mAP curves",
                f"{workdir / METRICS_FILE} holds no evaluation (the run stopped before its "
                "first, at config.eval_every_steps)",
            )
            sections.append(Section("curves-map", "evaluation mAP", h.missing(line)))
    if ev is not None:
        sections += evaluation_sections(ev)
        notes.drawn.append(
            f"the evaluation at step {ev.step} ({ev.model}: metrics, per-class AP, "
            "precision-recall curves, confused pairs, worst examples)"
        )
        sections += more()
    else:
        reason = next((m for m in notes.missing if m.startswith("the evaluation")), "")
        sections.append(Section("evaluation", "evaluation", h.missing(reason)))
    method = config.model.name if config is not None else "?"
    title = f"{method} run: {workdir.name}"
    subtitle = f"{workdir}" + (f", step {ev.step}" if ev is not None else "")
    footer = (
        f"written by python -m mlgraph.viz report (mlgraph {mlgraph.__version__}) on "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    if notes.missing:
        missing = "".join(h.missing(line) for line in notes.missing)
        sections[0] = dataclasses.replace(sections[0], body=missing + sections[0].body)
    return h.page(title, subtitle, sections, footer, mlgraph.__version__)


def write(
    workdir: str | pathlib.Path,
    step: int | None = None,
    output: str | pathlib.Path | None = None,
    ema: bool = True,
) -> Written:
    """Write the report of `workdir` at `step` (default: the step policy's) to `output`
    (default: DIR/report.html); a part that cannot be drawn is one `warning:` line and a note
    in the page, and the rest is written.

    Raises:
      WorkdirError: no such workdir, or one without a config, log or checkpoints; a `--step`
        that is not saved or cannot be read (the user asked for that one).
      StorageError: the report cannot be written.
    """
    start = time.perf_counter()
    workdir = paths.path(workdir, "--workdir")
    check_workdir(workdir)
    target = paths.as_given(output, "--output") if output else workdir / REPORT_FILE
    notes = Notes()
    config = dataset = records = ev = run = None
    try:
        config = workdirs.read_config(workdir)
    except MlgraphError as e:
        notes.miss("the config", e)
    try:
        records = run_log.read_records(workdir)
        if records is None:
            notes.miss("training curves", f"{workdir / METRICS_FILE} does not exist")
    except MlgraphError as e:
        notes.miss("training curves", e)
    try:
        sessions = run_log.read_sessions(workdir)
    except MlgraphError as e:
        sessions = []
        notes.miss("wall time and images/s", e)
    what = "the evaluation at a step, example images and the method's figures"
    if config is None:
        notes.miss(what, f"no config of the run in {workdir}")
    else:
        try:
            ev, run = score(workdir, step, ema)
            dataset = run.dataset
        except MlgraphError as e:
            if step is not None:
                raise
            notes.miss(what, e)
            try:
                dataset = datasets.open_dataset(config.data)
            except MlgraphError:
                pass  # the line above names the reason
    more = lambda: method_sections(workdir, ev, run, config, ema, notes)  # noqa: E731
    text = render(workdir, config, dataset, records, sessions, ev, notes, more)
    for line in notes.missing:
        warn(f"report: {line}")
    data = text.encode()
    with paths.faults_as_errors(
        target, needed=len(data), then="or write it elsewhere with --output FILE"
    ):
        paths.replace_text(target, text)
    return Written(target, len(data), time.perf_counter() - start, notes)
