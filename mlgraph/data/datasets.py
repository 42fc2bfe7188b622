"""Finding, building and opening the TFDS data sets that mlgraph trains on."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mlgraph import paths
from mlgraph.data import builder_lib, images, registry, sources
from mlgraph.errors import ConfigError, DataError, StorageError, warn


def default_data_dir() -> pathlib.Path:
    """Where built data sets live unless the config says otherwise."""
    return pathlib.Path(os.environ.get("MLGRAPH_DATA", pathlib.Path.home() / "mlgraph_data"))


def builder_class(name: str) -> type:
    """The TFDS builder class of data set `name` (a row of `mlgraph.data.registry`)."""
    return registry.get(name).builder_class()


def make_builder(name: str, data_dir: str | pathlib.Path, builder_config: str = "", **kwargs):
    """A builder instance for data set `name` (array_record files) rooted at `data_dir`, in
    `builder_config` (default: the data set's own, e.g. 'ov' for nuswide_ov)."""
    row = registry.get(name)
    builder_config = builder_config or row.builder_config
    if builder_config:
        kwargs["config"] = builder_config
    return row.builder_class()(data_dir=str(data_dir), file_format="array_record", **kwargs)


def build(
    name: str,
    manual_dir: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    config: str = "",
    strict: bool = False,
    rebuild: bool = False,
    report: Callable[[str], None] | None = None,
    max_image_pixels: int = images.MAX_IMAGE_PIXELS,
):
    """Build `name` from the raw files in `manual_dir` into `data_dir`; the builder.

    TFDS writes into a temporary folder and renames it when complete, with the record of the
    source files read (`mlgraph.data.sources`) inside, so an interrupted build never leaves a
    folder that looks built. `strict` and `max_image_pixels` are the builder's
    (`builder_lib.MultiLabelBuilder`); the limit is recorded with the source files. Building
    again into the same place judges the current source:

    * unchanged since the build: the build is reused, and `report` gets one line saying so;
      with `strict`, a file that build skipped stops it, as a fresh strict build would;
    * changed, or the folder holds an incomplete build or one without a record: with `rebuild`
      it is built again (a warning line says why; the old build stays until the new one is
      complete), without it a DataError says why and names --rebuild.

    Raises:
      DataError: `manual_dir` is not a folder, the source changed and not `rebuild`, a skipped
        file under `strict`, or any error of the builder.
    """
    builder_lib.check_manual_dir(manual_dir, name, [], "")
    manual_dir = pathlib.Path(manual_dir)
    files = sources.record(builder_class(name).source_paths(manual_dir), manual_dir, data_dir)
    # The size limit decides which images a build holds, so a build is judged by it too.
    files[sources.option_key("max_image_pixels")] = str(max_image_pixels)

    def prepare():
        builder = make_builder(
            name,
            data_dir,
            config,
            strict=strict,
            max_image_pixels=max_image_pixels,
            source_files=files,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
        return builder

    built = pathlib.Path(make_builder(name, data_dir, config).data_dir)
    _finish_replacement(built)
    if not built.exists():
        return prepare()
    why = sources.change_since_built(built, files)
    if not why:
        builder = make_builder(name, data_dir, config, strict=strict)
        if strict:
            _stop_at_skipped(builder.info.metadata or {})
        if report:
            report(f"{built}: source files unchanged since it was built from {manual_dir}; reused")
        return builder
    if not rebuild:
        raise DataError(
            f"{built}: {why}; build with --rebuild to replace it, or into another --data_dir"
        )
    warn(f"{built}: {why}; rebuilding it")
    return _replace(built, prepare)


def _stop_at_skipped(metadata) -> None:
    """The DataError a strict build of the same source stops with: its first skipped file."""
    for skipped in metadata.get("skipped", {}).values():
        if skipped:
            raise DataError(f"{skipped[0]} (--strict)")


def _replaced(built: pathlib.Path) -> pathlib.Path:
    """Where a build being replaced waits until its replacement is complete."""
    return built.with_name(f"{built.name}.replaced")


def _finish_replacement(built: pathlib.Path) -> None:
    """Settle a replacement that was interrupted: the old build comes back when the new one
    never arrived, and goes once the new one is in place."""
    old = _replaced(built)
    if old.exists():
        if built.exists():
            shutil.rmtree(old)
        else:
            old.rename(built)


def _replace(built: pathlib.Path, prepare: Callable):
    """`prepare()`'s build in place of the one in `built`, which is kept aside until the new
    one is complete and restored if building fails."""
    old = _replaced(built)
    built.rename(old)
    try:
        builder = prepare()
    except BaseException:
        _finish_replacement(built)
        raise
    shutil.rmtree(old)
    return builder


@dataclasses.dataclass
class Dataset:
    """An opened data set: random-access sources per split and its class names."""

    name: str
    directory: pathlib.Path
    class_names: list[str]
    sources: dict[str, object]
    # The classes the builder itself holds out of training (NUS-WIDE 'ov': the 81 concepts
    # after the 925 seen tags), as positions; () when it defines no such split.
    unseen: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (made if missing) for the block."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_dataset(data: ml_collections.ConfigDict) -> Dataset:
    """Open the data set `config.data` names; the embedded demo sets are built on first use.

    Raises:
      ConfigError: an unknown data set or split.
      DataError: a data set that is not built in `config.data.data_dir`.
    """
    row = registry.get(data.name)
    if row.demo:
        from mlgraph.data import demo

        manual_dir = demo.ensure_demo(row.demo)
        data_dir = manual_dir.parent / f"{manual_dir.name}-tfds"
        # mlgraph's own files: a build that does not match them is simply made again, by one
        # process at a time (test workers and the processes of one host share the cache).
        with _exclusive(manual_dir.parent / f".{data_dir.name}.lock"):
            builder = build(data.name, manual_dir, data_dir, data.builder_config, rebuild=True)
    else:
        data_dir = data.data_dir or default_data_dir()
        if paths.is_cloud(data_dir):
            raise StorageError(f"config.data.data_dir={data_dir}: {paths.DATA_ON_CLOUD}")
        data_dir = pathlib.Path(data_dir)
        builder = make_builder(data.name, data_dir, data.builder_config)
        if (
            not pathlib.Path(builder.data_dir).is_dir()
            or not (pathlib.Path(builder.data_dir) / "dataset_info.json").exists()
        ):
            raise DataError(
                f"data set '{data.name}' is not built: looked in {builder.data_dir}; build it "
                f"once with: python -m mlgraph.data.build {data.name} --manual_dir RAW "
                f"--data_dir {data_dir}"
            )
    info = tfds.builder_from_directory(builder.data_dir).info
    class_names = list(info.metadata.get("class_names", [])) if info.metadata else []
    if not class_names:
        raise DataError(f"{builder.data_dir}: metadata has no class_names; rebuild the data set")
    splits = {data.train_split, data.eval_split}
    missing = [s for s in splits if s not in info.splits]
    if missing:
        raise ConfigError(
            f"config.data split(s) {', '.join(missing)} not in {data.name}; "
            f"available: {', '.join(info.splits)}"
        )
    read = tfds.builder_from_directory(builder.data_dir)
    # Images stay JPEG bytes; the pipeline decodes them (images.decode_rgb: PIL's pixels).
    sources = {
        s: read.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()})
        for s in splits
    }
    num_seen = info.metadata.get("num_seen") if info.metadata else None
    unseen = tuple(range(int(num_seen), len(class_names))) if num_seen else ()
    return Dataset(row.name, pathlib.Path(builder.data_dir), class_names, sources, unseen)


def unseen_classes(dataset: Dataset, data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Positions of the classes held out of training for zero-shot evaluation:
    `config.data.unseen_classes` (names), else the data set's own split (`Dataset.unseen`).

    Raises:
      ConfigError: a name that is not a class of the data set (the valid ones listed).
    """
    names = tuple(data.get("unseen_classes", ()))
    if not names:
        return dataset.unseen
    index = {n: i for i, n in enumerate(dataset.class_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(
            f"config.data.unseen_classes: {', '.join(map(repr, unknown))} not among the classes "
            f"of {dataset.name} ({', '.join(dataset.class_names[:20])}"
            f"{', ...' if len(dataset.class_names) > 20 else ''})"
        )
    if len(set(names)) == len(dataset.class_names):
        raise ConfigError("config.data.unseen_classes: every class is unseen; keep some seen")
    return tuple(sorted(index[n] for n in set(names)))


class Subset:
    """Random access to the examples of `source` at `positions`, in that order."""

    def __init__(self, source, positions):
        self.source = source
        self.positions = [int(i) for i in positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return self.source[self.positions[index]]


@dataclasses.dataclass(frozen=True)
class TrainingSplit:
    """The examples a run trains on.

    Attributes:
      source: random access; an example's position is its `batch["index"]`.
      num_classes: C.
      observed: the observed training labels [N, C] (single positives, the rest 0 =
        unknown) under a single-positive protocol (`config.data.observed`), else None (the
        full labels of each example are used).
      holdout: examples held out of the training split (with their full labels) for model
        selection (`config.data.val_fraction`), else None.
      unseen: positions of the classes held out for zero-shot evaluation (`unseen_classes`).
    """

    source: object
    num_classes: int
    observed: np.ndarray | None = None
    holdout: object | None = None
    unseen: tuple[int, ...] = ()

    @property
    def num_examples(self) -> int:
        return len(self.source)


def training_split(dataset: Dataset, data: ml_collections.ConfigDict) -> TrainingSplit:
    """The training examples `config.data` asks for: the train split, less the held-out part
    (`val_fraction`, cut as Cole et al. do), with the observed labels of `data.observed`.

    Raises:
      ConfigError: an unknown observed-label scheme or a val_fraction outside [0, 1).
    """
    from mlgraph.data import observed

    source = dataset.sources[data.train_split]
    unseen = unseen_classes(dataset, data)
    # Configs saved before these fields existed mean neither.
    scheme, fraction = data.get("observed", ""), data.get("val_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"config.data.val_fraction={fraction}: expected 0 <= f < 1")
    labels = rows = None
    if scheme:
        labels, rows = observed.observed_rows(dataset, data.train_split, scheme)
        labels = labels.astype(np.float32)
    if not fraction:
        if labels is None or len(rows) == len(source):
            return TrainingSplit(source, dataset.num_classes, labels, unseen=unseen)
        # Images without a row in Cole's or Scob's files (those without a positive, but on
        # Cole's CUB) are left out, as they are from both parts of the held-out cut.
        keep = np.sort(np.asarray(rows, np.int64))
        return TrainingSplit(Subset(source, keep), dataset.num_classes, labels[keep], unseen=unseen)
    cut = observed.cole_split(dataset, data.train_split, fraction=fraction)
    return TrainingSplit(
        Subset(source, cut.train),
        dataset.num_classes,
        None if labels is None else labels[np.asarray(cut.train, int)],
        Subset(source, cut.val),
        unseen,
    )
