"""Single-positive observed labels, bit-exact with Cole et al. 2021 and with Scob
(docs/scob_spml.md §1.2-§1.4, §1.8, §3.9, §6).

In the single-positive multi-label (SPML) setup every training image keeps exactly one of its
true positives; everything else is unknown. Two published schemes draw that positive:

* ``"cole"`` (Cole et al., `preproc/generate_observed_labels.py`): the 0/1 label matrix of a split,
  rows in Cole's order, classes in Cole's order; a fresh ``numpy.random.RandomState(1200)``; per row
  the indices of the positives are shuffled in place and the first is kept, then the indices of
  the negatives are shuffled too (``num_neg=0`` keeps none, but the shuffle consumes RNG state:
  docs/scob_spml.md §6 item 25). See :func:`cole_sample`.
* ``"scob"`` (Scob, `data/{coco,voc}.py` ``drop_to_single``): ``random.seed(114514)``, then
  ``random.choice(labels)`` per image, in Scob's image order, with Scob's class indices and each
  image's label list in Scob's order. See :func:`scob_sample`.

Which images have a row (both schemes)
    Cole's formatters (`format_coco.py`, `format_pascal.py`) and Scob's loaders list only images
    with at least one positive: COCO images with at least one annotation, VOC images marked ``1``
    in some per-class list (a class counts only with a non-difficult instance; mlgraph's VOC
    builder keeps difficult-only classes in ``labels`` on the training splits, so here the
    positives are ``labels & ~difficult``, Cole's and Scob's). So on COCO (config ``all``) and
    VOC, images without a positive are left out of the rows, exactly as there: their observed
    row is all zero and they are in neither part of :func:`cole_split`. NUS-WIDE's builder
    already drops such images. CUB is the other way round: Cole's `format_cub.py` keeps every
    image, so an image without a present attribute is a row of Cole's draw that keeps nothing
    (the draw of its empty positive list takes no random number, the shuffle of its negatives
    does), its line in the file has an empty class, and it is in Cole's cut; Scob has no CUB
    loader, and its draw (mlgraph's rule) leaves such images out. For the other data sets
    (custom ones, and any registered with ``spml_rules='ids'`` in `mlgraph.data.registry`) no
    source says what to do, so an image without a positive is an error naming it.

Row order (docs/scob_spml.md §1.2, §3.9), by the data set's ``spml_rules`` in
`mlgraph.data.registry` (the demo sets are built by the COCO builder, so they follow the COCO rules)
    ============  =================================================  ==========================
    data set      Cole                                               Scob
    ============  =================================================  ==========================
    COCO          image ids sorted as strings, cast back             the ``images`` order of the
                                                                     instances JSON (*)
    VOC           image file names ``<id>.jpg`` sorted               first appearance scanning
                                                                     classes 0..19 over the
                                                                     per-class lists (*)
    NUS-WIDE      ``ImageList/Imagelist.txt`` order (*)              as Cole (mlgraph's rule)
    CUB           ``CUB_200_2011/images.txt`` order (*)              as Cole (mlgraph's rule)
    others (ids)  image ids sorted as strings (mlgraph's rule)       as Cole (mlgraph's rule)
    ============  =================================================  ==========================

    (*) The built TFDS data set does not keep this order (TFDS stores examples in its own
    hashed order, and the COCO builder reads the JSON into an id-sorted list), so it must come
    from the raw files: pass ``source_order=read_source_order(name, manual_dir, split)``. Without
    it these fallbacks are used and written into the file's header: COCO/Scob: ascending image
    id; VOC/Scob: ids sorted (the official ``ImageSets/Main`` lists are sorted, so this is the
    same order); NUS-WIDE: ids sorted as strings (NOT known to equal Imagelist.txt's order);
    CUB: ascending image id (the official images.txt lists its ids in ascending order).

Class order
    Cole: COCO in the JSON's ``categories`` order (category-id order in the real files, which is
    the builder's order), VOC the alphabetical list (the builder's). When a ``source_order``
    lists the JSON's categories in another order (the test fixtures do), the columns are
    permuted so that the kept class is the one Cole's code keeps.
    Scob: COCO alphabetical by category name (not the builder's order, so each image's label
    list is mapped to Scob's indices and the drawn index back to a name); VOC alphabetical.
    Each COCO label list is ``list(set(...))`` of Scob's indices; CPython's set iteration order
    depends on the order the indices were added, so a real Python set is built by adding them in
    the order of the image's annotations in the JSON (from ``source_order``; without it, in the
    builder's class order: a documented fallback). VOC label lists are ascending; for NUS-WIDE,
    CUB and the others (no Scob code exists) ascending in the builder's class order. CUB's
    classes are its attributes in id order, Cole's.

Images the build skipped
    A build that skipped unreadable images (``info.metadata['skipped']``) has no row for them,
    while Cole's and Scob's code drew for them too: from the first such image on, the draws
    differ from theirs. The file's header then says how many were skipped.

Storage
    ``<built data dir>/observed_<split>_<scheme>.tsv``, UTF-8, ``\\n`` line ends: header lines
    starting with ``#`` (format, scheme, seed, data set and split, row and order rules), then one
    line per image, ``image_id<TAB>class_name`` (the kept positive), in the scheme's row order;
    a CUB image without a positive has ``image_id<TAB>`` (Cole's draw keeps nothing for it).
    No timestamps or paths, so rebuilding gives the same bytes. Written atomically, once, and
    reused; reading it back checks every line (see :func:`read_observed`).

The 20 % validation cut (docs/scob_spml.md §1.4)
    Cole cuts the official train split with ``RandomState(1200).permutation(N)`` over the rows in
    Cole's order: ``n_val = round(0.2 N)``, val = sorted(last n_val), train = sorted(first N -
    n_val) (:func:`cole_val_cut`, :func:`cole_split`). The following "subsampling" step
    (``RandomState(999)``, fraction 1.0) keeps ``round(1.0 * n) = n`` entries in sorted order, i.e.
    it is the identity, and is not reproduced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import random
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from mlgraph.data import registry
from mlgraph.errors import ConfigError, DataError

SCHEMES = ("cole", "scob")
COLE_SEED = 1200
SCOB_SEED = 114514
VAL_FRACTION = 0.2
FORMAT_LINE = "# mlgraph single-positive observed labels, format 1"

# The header's description of each rule, so that a user reading the file knows what was done.
COLE_ROWS = {
    "coco": "image ids sorted as strings (Cole's format_coco.py)",
    "voc": "image file names <id>.jpg sorted (Cole's format_pascal.py)",
    "nuswide": "the order of ImageList/Imagelist.txt (Cole: the provided files' order)",
    "cub": "the order of CUB_200_2011/images.txt, every image (Cole's format_cub.py)",
    "ids": "image ids sorted as strings (mlgraph's rule where no published code draws)",
}
SCOB_ROWS = {
    "coco": "the images order of the instances JSON (Scob's data/coco.py)",
    "voc": "first appearance in the per-class lists, classes 0..19 (Scob's data/voc.py)",
    "nuswide": "as Cole's (mlgraph's rule: Scob has no NUS-WIDE loader)",
    "cub": "as Cole's, images without a positive left out (mlgraph's rule: Scob has no CUB loader)",
    "ids": "as Cole's (mlgraph's rule: Scob has no loader for this data set)",
}
FALLBACKS = {
    ("cole", "nuswide"): "image ids sorted as strings, not known to be Imagelist.txt's order",
    ("scob", "coco"): "ascending image id, label sets filled in the builder's class order",
    ("scob", "voc"): "image ids sorted (the official ImageSets/Main lists are sorted)",
    ("scob", "nuswide"): "image ids sorted as strings, not known to be Imagelist.txt's order",
    ("cole", "cub"): "ascending image id (the official images.txt lists ids in ascending order)",
    ("scob", "cub"): "ascending image id (the official images.txt lists ids in ascending order)",
}
# Rules whose Cole draw has a row for an image without a positive (CUB: Cole's formatter keeps
# every image), written as ``image_id<TAB>`` with no class.
KEEPS_EMPTY_ROWS = frozenset({"cub"})
EMPTY_ROW_LINE = "# an empty class: the image has no positive; Cole's draw keeps none for it"


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"observed-label scheme '{scheme}': expected one of {', '.join(SCHEMES)}")


# --------------------------------------------------------------------------------- samplers


def cole_sample(
    labels: np.ndarray,
    seed: int = COLE_SEED,
    image_ids: Sequence | None = None,
    *,
    keep_empty: bool = False,
) -> np.ndarray:
    """Cole et al.'s single positive per row of a 0/1 label matrix (bit-exact).

    Args:
      labels: [N, C] 0/1 (or boolean) labels, rows and columns already in Cole's order.
      seed: seed of the fresh ``numpy.random.RandomState`` (Cole: 1200, one per phase).
      image_ids: names of the rows, for the error message only.
      keep_empty: a row without a positive keeps nothing, as Cole's sampler does for CUB's
        images without a present attribute (its negatives are shuffled all the same).

    Returns:
      uint8 [N, C]: 1 at the kept positive of each row, 0 elsewhere.

    Raises:
      DataError: a value other than 0/1, or (unless `keep_empty`) a row without any positive
        (Cole's COCO and VOC formatters never produce one; their sampler would silently keep
        nothing).
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise DataError(f"labels must be [N, C], got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise DataError("labels must be 0/1")
    empty = np.flatnonzero(~(y == 1).any(axis=1))
    if empty.size and not keep_empty:
        row = int(empty[0])
        name = f" (image {image_ids[row]})" if image_ids is not None else ""
        raise DataError(f"row {row}{name} has no positive label to keep")
    rng = np.random.RandomState(seed)
    out = np.zeros(y.shape, np.uint8)
    for i, row in enumerate(y):
        positives = np.flatnonzero(row == 1)
        rng.shuffle(positives)  # an empty list takes no random number, as in Cole's code
        if positives.size:
            out[i, positives[0]] = 1
        # Kept nothing of (num_neg=0), but Cole's code shuffles it: the draw moves the RNG on.
        rng.shuffle(np.flatnonzero(row != 1))
    return out


def scob_sample(
    label_lists: Sequence[Sequence], seed: int = SCOB_SEED, image_ids: Sequence | None = None
) -> list:
    """Scob's single positive per image: ``random.seed(seed)``, then ``random.choice`` per list.

    A private ``random.Random(seed)`` gives the same draws as seeding the global generator
    (both are ``seed(seed, version=2)``), without disturbing the caller's global state.

    Args:
      label_lists: each image's class indices in Scob's image order and Scob's list order.
      seed: Scob: 114514.
      image_ids: names of the images, for the error message only.

    Returns:
      The drawn entry per image (an index, or whatever the lists hold: the draw depends only on
      each list's length).

    Raises:
      DataError: an empty label list (Scob's loaders never produce one).
    """
    rng = random.Random(seed)
    out = []
    for i, labels in enumerate(label_lists):
        if not len(labels):
            name = f" (image {image_ids[i]})" if image_ids is not None else ""
            raise DataError(f"row {i}{name} has no positive label to keep")
        out.append(rng.choice(labels))
    return out


def cole_val_cut(
    num_rows: int, fraction: float = VAL_FRACTION, seed: int = COLE_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Cole's cut of the official train rows into (train rows, val rows), both sorted.

    ``n_val = round(fraction * num_rows)``; with ``p = RandomState(seed).permutation(num_rows)``,
    train = sorted(p[:num_rows - n_val]) and val = sorted(p[-n_val:]) (Cole's `generate_split`).

    Raises:
      DataError: n_val would be 0 (Cole's ``p[-0:]`` would then put every row into val too).
    """
    n_val = int(np.round(fraction * num_rows))
    if n_val == 0:
        raise DataError(
            f"{num_rows} row(s) are too few for a {fraction:g} validation cut (it keeps none)"
        )
    perm = np.random.RandomState(seed).permutation(num_rows)
    return np.sort(perm[: num_rows - n_val]), np.sort(perm[-n_val:])


# ---------------------------------------------------------------- the raw files' own order


@dataclasses.dataclass(frozen=True)
class SourceOrder:
    """What the raw files say about order that a built data set does not keep.

    Attributes:
      image_ids: the split's images in the raw files' order (COCO: the JSON's ``images``; VOC:
        ``ImageSets/Main/<split>.txt``; NUS-WIDE: ``ImageList/Imagelist.txt``).
      class_names: COCO: the JSON's ``categories`` in listed order (Cole's class order).
      annotations: COCO: per image id, the class name of each of its annotations in JSON order
        (repeats kept): the order Scob adds indices to the image's label set.
    """

    image_ids: tuple
    class_names: tuple[str, ...] | None = None
    annotations: Mapping[object, tuple[str, ...]] | None = None

    def digest(self) -> str:
        """A short fingerprint, written into the header so a different order is noticed."""
        ann = self.annotations or {}
        doc = [
            [str(i) for i in self.image_ids],
            list(self.class_names or ()),
            [[str(k), list(v)] for k, v in ann.items()],
        ]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def read_source_order(name: str, manual_dir: str | os.PathLike, split: str) -> SourceOrder:
    """The :class:`SourceOrder` of `split` of data set `name` (a row of
    `mlgraph.data.registry` with a `raw_order` reader: coco2014, voc2007, voc2012, nuswide ...)
    from its raw download folder (the build's ``manual_dir``).

    Raises:
      ConfigError: a data set whose order the built data keeps (no `raw_order` in its row) or
        an unknown split.
      DataError: a missing or malformed raw file, named.
    """
    row = registry.get(name)
    reader = row.raw_order_reader()
    if reader is None:
        readers = [r.name for r in registry.DATASETS.values() if r.raw_order]
        raise ConfigError(
            f"data set '{name}': no raw order to read (the built data set has all its rules "
            f"need); data sets with one: {', '.join(readers)}"
        )
    return reader(pathlib.Path(manual_dir), split)


# ------------------------------------------------------------------------ the built split


@dataclasses.dataclass
class BuiltSplit:
    """The label side of one split of a built data set, in TFDS source-position order."""

    directory: pathlib.Path
    name: str  # the TFDS builder name, e.g. "coco2014"
    split: str
    class_names: list[str]
    image_ids: list  # int (COCO) or str, per source position
    positives: np.ndarray  # bool [N, C]: the labels Cole and Scob count as positive
    skipped: int  # images of the split the build skipped

    @property
    def family(self) -> str:
        """The row and class rules of its data set (`registry.SPML_RULES`)."""
        return registry.by_builder(self.name).spml_rules


def _directory(data: str | os.PathLike | object) -> pathlib.Path:
    # A `datasets.Dataset` (from open_dataset) or the built folder holding dataset_info.json.
    return pathlib.Path(getattr(data, "directory", data))


def read_built_split(data: str | os.PathLike | object, split: str) -> BuiltSplit:
    """Image ids and positives of `split` of a built data set (images are not decoded).

    Args:
      data: the built data set's folder (the one holding ``dataset_info.json``, i.e.
        ``datasets.Dataset.directory``) or a ``datasets.Dataset``.
      split: a split of that data set.

    Raises:
      DataError: not a built data set, or one of a builder this module has no rules for.
      ConfigError: `split` is not one of its splits.
    """
    import tensorflow_datasets as tfds

    directory = _directory(data)
    if not (directory / "dataset_info.json").is_file():
        raise DataError(f"{directory}: not a built data set (no dataset_info.json)")
    builder = tfds.builder_from_directory(str(directory))
    name = builder.info.name
    if registry.by_builder(name) is None:
        raise DataError(
            f"{directory}: data set '{name}' has no row in mlgraph.data.registry, so no "
            "observed-label rules"
        )
    if split not in builder.info.splits:
        raise ConfigError(
            f"split '{split}' not in {directory}; available: {', '.join(builder.info.splits)}"
        )
    metadata = builder.info.metadata or {}
    class_names = list(metadata.get("class_names", []))
    if not class_names:
        raise DataError(f"{directory}: metadata has no class_names; rebuild the data set")
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    ids, rows = [], []
    for i in range(len(source)):
        example = source[i]
        image_id = example["image_id"]
        ids.append(image_id.decode() if isinstance(image_id, bytes) else int(image_id))
        y = np.asarray(example["labels"]) > 0
        if "difficult" in example:
            # VOC training splits count difficult-only classes; Cole's and Scob's lists do not.
            y &= np.asarray(example["difficult"]) == 0
        rows.append(y)
    positives = np.stack(rows) if rows else np.zeros((0, len(class_names)), bool)
    skipped = len(metadata.get("skipped", {}).get(split, []))
    return BuiltSplit(directory, name, split, class_names, ids, positives, skipped)


# --------------------------------------------------------------------------- the schemes


@dataclasses.dataclass
class Draw:
    """A scheme's result on a built split: rows in the scheme's order and the kept class."""

    rows: list[int]  # source positions, in the scheme's row order
    kept: list[str]  # the kept class name per row
    header: list[str]  # the file's header lines


def _source_positions(built: BuiltSplit, order: Sequence, rows: set[int]) -> list[int]:
    # `rows` (source positions) in the order of `order` (image ids of the raw files).
    where = {str(image_id): p for p, image_id in enumerate(built.image_ids)}
    listed = [where[str(i)] for i in order if str(i) in where and where[str(i)] in rows]
    if len(set(listed)) != len(listed):
        raise DataError(f"{built.directory}: the given source order lists an image twice")
    missing = rows - set(listed)
    if missing:
        first = built.image_ids[min(missing)]
        raise DataError(
            f"{built.directory}: image {first} of split '{built.split}' is not in the given "
            f"source order ({len(missing)} such image(s))"
        )
    return listed


def cole_rows(built: BuiltSplit, source: SourceOrder | None = None) -> list[int]:
    """Source positions of Cole's rows, in Cole's order (module docstring): the images with a
    positive, or every image where Cole's formatter keeps them all (CUB)."""
    if built.family in KEEPS_EMPTY_ROWS:
        rows = list(range(len(built.image_ids)))
        if source is not None:
            return _source_positions(built, source.image_ids, set(rows))
        return sorted(rows, key=lambda p: built.image_ids[p])
    rows = np.flatnonzero(built.positives.any(axis=1)).tolist()
    if built.family == "ids" and len(rows) != len(built.image_ids):
        first = int(np.flatnonzero(~built.positives.any(axis=1))[0])
        raise DataError(
            f"{built.directory}: image {built.image_ids[first]} of split '{built.split}' has "
            "no label, so no single positive can be kept (custom data sets: every image needs "
            "one)"
        )
    if built.family == "voc":
        return sorted(rows, key=lambda p: f"{built.image_ids[p]}.jpg")
    if built.family == "nuswide" and source is not None:
        return _source_positions(built, source.image_ids, set(rows))
    return sorted(rows, key=lambda p: str(built.image_ids[p]))


def _check_annotations(
    built: BuiltSplit, annotations: Mapping[object, Sequence[str]], rows: list[int]
) -> None:
    # The raw annotations must say what the build says, or the draws would be for other labels.
    for p in rows:
        names = annotations.get(built.image_ids[p], ())
        want = {built.class_names[c] for c in np.flatnonzero(built.positives[p])}
        if set(names) != want:
            raise DataError(
                f"{built.directory}: image {built.image_ids[p]} of split '{built.split}' has "
                f"classes {sorted(want)} but the given annotations say {sorted(set(names))}"
            )


def _cole_draw(built: BuiltSplit, source: SourceOrder | None) -> Draw:
    rows = cole_rows(built, source)
    classes = list(built.class_names)
    if source is not None and source.class_names is not None:
        if sorted(source.class_names) != sorted(classes):
            raise DataError(
                f"{built.directory}: the given class names differ from the built data set's"
            )
        classes = list(source.class_names)
    columns = [built.class_names.index(n) for n in classes]
    keep_empty = built.family in KEEPS_EMPTY_ROWS
    observed = cole_sample(
        built.positives[rows][:, columns].astype(np.uint8),
        image_ids=[built.image_ids[p] for p in rows],
        keep_empty=keep_empty,
    )
    kept = [classes[int(np.flatnonzero(r)[0])] if r.any() else "" for r in observed]
    header = [f"# rows: {COLE_ROWS[built.family]}"]
    if keep_empty:
        header.append(EMPTY_ROW_LINE)
    if classes != built.class_names:
        header.append("# classes: permuted to the source's category order")
    return Draw(rows, kept, header)


def _scob_lists(built: BuiltSplit, source: SourceOrder | None) -> tuple[list[int], list[list]]:
    # (rows in Scob's order, each row's label list in Scob's order, as class names).
    rows = cole_rows(built, None)
    family = built.family
    names = built.class_names
    if family == "coco":
        if source is not None:
            rows = _source_positions(built, source.image_ids, set(rows))
        else:
            rows = sorted(rows, key=lambda p: built.image_ids[p])
        annotations = source.annotations if source is not None else None
        if annotations is not None:
            _check_annotations(built, annotations, rows)
        scob_names = sorted(names)
        scob_index = {n: i for i, n in enumerate(scob_names)}
        lists = []
        for p in rows:
            if annotations is not None:
                added = annotations[built.image_ids[p]]
            else:
                added = [names[c] for c in np.flatnonzero(built.positives[p])]
            # Scob freezes list(set(...)); a real set, filled in the same order, gives its order.
            members: set[int] = set()
            for n in added:
                members.add(scob_index[n])
            lists.append([scob_names[i] for i in list(members)])
        return rows, lists
    if family == "voc":
        order = (
            _source_positions(built, source.image_ids, set(rows))
            if source is not None
            else sorted(rows, key=lambda p: built.image_ids[p])
        )
        rows, seen = [], set()
        for c in range(len(names)):
            for p in order:
                if built.positives[p, c] and p not in seen:
                    seen.add(p)
                    rows.append(p)
    else:
        # Scob's loaders list only images with a positive (it has none for these data sets).
        rows = [p for p in cole_rows(built, source) if built.positives[p].any()]
    return rows, [[names[c] for c in np.flatnonzero(built.positives[p])] for p in rows]


def _scob_draw(built: BuiltSplit, source: SourceOrder | None) -> Draw:
    rows, lists = _scob_lists(built, source)
    # Scob draws an index into its class list; drawing the name from the same list is the same
    # draw (random.choice depends only on the list's length).
    kept = scob_sample(lists, image_ids=[built.image_ids[p] for p in rows])
    header = [f"# rows: {SCOB_ROWS[built.family]}"]
    if built.family == "coco":
        header.append("# classes: Scob's indices are the class names sorted alphabetically")
    return Draw(rows, kept, header)


def draw(built: BuiltSplit, scheme: str, source: SourceOrder | None = None) -> Draw:
    """Run `scheme` ("cole" or "scob") on a built split; see the module docstring for the rules.

    Raises:
      ConfigError: an unknown scheme.
      DataError: an image without a positive where none is allowed, or a `source` that does not
        cover the built images or contradicts their labels.
    """
    _check_scheme(scheme)
    result = (_cole_draw if scheme == "cole" else _scob_draw)(built, source)
    seed = COLE_SEED if scheme == "cole" else SCOB_SEED
    rng = "numpy RandomState" if scheme == "cole" else "Python random"
    needs_source = (scheme, built.family) in FALLBACKS
    if source is not None and (needs_source or scheme == "cole" and source.class_names):
        order = f"# order source: the raw files (fingerprint {source.digest()})"
    elif needs_source:
        order = f"# order source: built data set, fallback: {FALLBACKS[(scheme, built.family)]}"
    else:
        order = "# order source: built data set"
    result.header = [
        FORMAT_LINE,
        f"# scheme: {scheme}",
        f"# seed: {seed} ({rng})",
        f"# data set: {built.name}, split: {built.split}, {len(result.rows)} images",
        *result.header,
        order,
    ]
    if built.skipped:
        result.header.append(
            f"# note: the build skipped {built.skipped} image(s) of this split that the "
            "original code draws for too; later draws differ from it"
        )
    result.header.append("# image_id<TAB>class_name (the kept positive)")
    return result


# ------------------------------------------------------------------------------ the file


def observed_path(data: str | os.PathLike | object, split: str, scheme: str) -> pathlib.Path:
    """Where the observed labels of `split` under `scheme` live, beside the built data set."""
    _check_scheme(scheme)
    return _directory(data) / f"observed_{split}_{scheme}.tsv"


def _write_atomic(path: pathlib.Path, text: str) -> None:
    # Temp file in the same folder + os.replace: a reader never sees half a file.
    with tempfile.NamedTemporaryFile(
        "wb", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as f:
        f.write(text.encode("utf-8"))
    os.replace(f.name, path)


def _header_lines(path: pathlib.Path) -> list[str]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line.rstrip("\n"))
    return lines


def observed_file(
    data: str | os.PathLike | object,
    split: str,
    scheme: str = "cole",
    *,
    source_order: SourceOrder | None = None,
) -> pathlib.Path:
    """The observed-labels file of `split`, written once beside the built data set.

    An existing file is reused. When `source_order` is given, the file must have been written
    from the same order (its header's fingerprint), or a DataError says to delete it; without
    `source_order` any file of this scheme and split is reused as it is.
    """
    return _ensure_file(read_built_split(data, split), scheme, source_order)


def _ensure_file(built: BuiltSplit, scheme: str, source_order: SourceOrder | None) -> pathlib.Path:
    path = observed_path(built.directory, built.split, scheme)
    if path.exists():
        if source_order is not None:
            expected = draw(built, scheme, source_order).header
            found = _header_lines(path)
            if found != expected:
                raise DataError(
                    f"{path}: written with another order or version than asked for (header "
                    f"differs); delete the file to write it again"
                )
        return path
    result = draw(built, scheme, source_order)
    body = "".join(
        f"{built.image_ids[p]}\t{c}\n" for p, c in zip(result.rows, result.kept, strict=True)
    )
    _write_atomic(path, "\n".join(result.header) + "\n" + body)
    return path


def read_observed(
    path: str | os.PathLike, built: BuiltSplit, scheme: str | None = None
) -> tuple[np.ndarray, list[int]]:
    """Read an observed-labels file back into ([N, C] uint8 by source position, rows in order).

    Checks: the format line, the scheme line (when `scheme` is given), one
    ``image_id<TAB>class_name`` per line, every image id known in the split and listed once,
    every class a known class and a positive of that image, and every image with a positive (a
    custom image, and in Cole's CUB draw: every image) listed; an empty class only in Cole's CUB
    draw, for an image without a positive.

    Raises:
      DataError: naming the file, the line and what was expected.
    """
    path = pathlib.Path(path)
    where = {str(image_id): p for p, image_id in enumerate(built.image_ids)}
    column = {n: c for c, n in enumerate(built.class_names)}
    out = np.zeros(built.positives.shape, np.uint8)
    rows: list[int] = []
    line_of: dict[int, int] = {}
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != FORMAT_LINE:
        raise DataError(f"{path}:1: expected the first line '{FORMAT_LINE}'")
    if scheme is not None and f"# scheme: {scheme}" not in lines:
        raise DataError(f"{path}: expected a header line '# scheme: {scheme}'")
    # Cole's CUB draw lists the images without a positive too, with an empty class.
    every_image = built.family in KEEPS_EMPTY_ROWS and "# scheme: cole" in lines
    for n, line in enumerate(lines, start=1):
        if line.startswith("#"):
            continue
        image_id, tab, name = line.partition("\t")
        if not tab or not image_id or not (name or every_image):
            raise DataError(f"{path}:{n}: expected 'image_id<TAB>class_name', found {line!r}")
        if image_id not in where:
            raise DataError(
                f"{path}:{n}: image id '{image_id}' is not in split '{built.split}' of "
                f"{built.directory}"
            )
        p = where[image_id]
        if p in line_of:
            raise DataError(
                f"{path}:{n}: image id '{image_id}' already listed on line {line_of[p]} "
                "(expected one positive per image)"
            )
        if not name:
            if built.positives[p].any():
                raise DataError(
                    f"{path}:{n}: image id '{image_id}' has positives but no class (expected "
                    "the kept positive after the tab)"
                )
            line_of[p] = n
            rows.append(p)
            continue
        if name not in column:
            raise DataError(
                f"{path}:{n}: unknown class '{name}' (expected one of the data set's "
                f"{len(column)} class names)"
            )
        if not built.positives[p, column[name]]:
            raise DataError(f"{path}:{n}: class '{name}' is not a positive of image '{image_id}'")
        line_of[p] = n
        out[p, column[name]] = 1
        rows.append(p)
    need = set(np.flatnonzero(built.positives.any(axis=1)).tolist())
    if built.family == "ids" or every_image:
        need = set(range(len(built.image_ids)))
    missing = sorted(need - set(line_of))
    if missing:
        which = "image" if every_image else "image with a positive"
        raise DataError(
            f"{path}: image '{built.image_ids[missing[0]]}' has no line ({len(missing)} image(s) "
            f"of split '{built.split}' missing; expected one line per {which})"
        )
    return out, rows


def observed_labels(
    data: str | os.PathLike | object,
    split: str,
    scheme: str = "cole",
    *,
    source_order: SourceOrder | None = None,
) -> np.ndarray:
    """The single-positive observed labels of `split`, aligned with its TFDS source positions
    (:func:`observed_rows`'s labels).

    Args:
      data: the built data set's folder (holding ``dataset_info.json``) or a
        ``datasets.Dataset``; the observed file is written there (see :func:`observed_file`).
      split: e.g. "train".
      scheme: "cole" (numpy seed 1200) or "scob" (Python random seed 114514).
      source_order: the raw files' order (:func:`read_source_order`) where the rule needs what
        the built data set lacks; see the module docstring for the fallbacks.

    Returns:
      uint8 [N, C] (N = the split's size, C = its classes in the built order): one 1 per image
      with a positive; rows of images without one (COCO 'all', VOC, CUB) are all zero.
    """
    return observed_rows(data, split, scheme, source_order=source_order)[0]


def observed_rows(
    data: str | os.PathLike | object,
    split: str,
    scheme: str = "cole",
    *,
    source_order: SourceOrder | None = None,
) -> tuple[np.ndarray, list[int]]:
    """(:func:`observed_labels`, the source positions the scheme's file lists, in its order):
    the images Cole's or Scob's code trains on. Those without a positive are listed only in
    Cole's CUB draw (module docstring); elsewhere they are left out."""
    built = read_built_split(data, split)
    return read_observed(_ensure_file(built, scheme, source_order), built, scheme)


@dataclasses.dataclass
class ColeSplit:
    """Cole's train/val cut of an official train split: TFDS source positions, listed in Cole's
    row order (Cole's sorted row indices, mapped to positions)."""

    train: np.ndarray  # int64 [N_train]
    val: np.ndarray  # int64 [N_val]
    observed_train: np.ndarray  # uint8 [N_train, C], rows as `train`
    observed_val: np.ndarray  # uint8 [N_val, C], rows as `val`


def cole_split(
    data: str | os.PathLike | object,
    split: str = "train",
    *,
    source_order: SourceOrder | None = None,
    fraction: float = VAL_FRACTION,
) -> ColeSplit:
    """Cole's 20 % validation cut of `split`, as TFDS source positions, with the observed labels.

    The permutation runs over the rows of Cole's observed file in its order (Cole's row order,
    whatever order source it was written from); each part is sorted by Cole's row index and then
    mapped to source positions (so the parts are in Cole's row order, not position order). Both
    parts take their observed labels from the one observed file of `split` (Cole: "observed
    labels for both come from the official-train file"). Images without a positive are in
    neither part, except on CUB, where Cole's rows hold every image.
    """
    built = read_built_split(data, split)
    observed, rows = read_observed(_ensure_file(built, "cole", source_order), built, "cole")
    train_rows, val_rows = cole_val_cut(len(rows), fraction)
    positions = np.asarray(rows, np.int64)
    train, val = positions[train_rows], positions[val_rows]
    return ColeSplit(train, val, observed[train], observed[val])
