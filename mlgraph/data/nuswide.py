"""NUS-WIDE (official split) as a TFDS builder writing array_record, in two builder configs:

* 'concepts81' (the default): the 81 human-annotated concepts, as SALGL and the multi-label
  papers use them (described first, below);
* 'ov': the open-vocabulary / zero-shot protocol of BiAM, MKT and SigRL (docs/sigrl.md §3.3,
  §5.1): 925 seen tags ++ 81 unseen concepts, labels +1/-1 with 0 = ignored (see "Config 'ov'").

Config 'concepts81' reads `manual_dir` in the layout of the official NUS-WIDE download:

    Flickr/<folder>/<file>.jpg                 Concepts81.txt
    ImageList/Imagelist.txt                    ImageList/{Train,Test}Imagelist.txt
    Groundtruth/AllLabels/Labels_<concept>.txt

following SALGL's scripts/nuswide.py:

* Imagelist.txt lists every image once; backslashes become '/', and an entry is the image's path
  under `Flickr/` (a leading prefix that ends in a `Flickr` folder, such as
  `C:\\ImageData\\Flickr\\`, is cut off so that either form of the list works).
* `Labels_<concept>.txt` holds one 0/1 per Imagelist line; a mismatch in line count or any other
  value is an error naming the file (and line).
* Images with no positive concept are dropped (counted in `info.metadata['dropped_no_labels']`);
  the rest go to 'train' or 'test' by the official Train/Test lists. Images in neither list are
  dropped and counted in `info.metadata['unlisted']`; an image in both is an error.
* Classes are the concepts in Concepts81.txt order (alphabetical: airport ... zebra).

SALGL stops when a listed image is missing. Many Flickr URLs are dead, so local copies differ:
here a missing or unreadable image is reported by path and skipped
(`info.metadata['skipped'][split]`), and `strict=True` restores SALGL's stop with a DataError.
`image_id` (text) is the entry, e.g. "actor/0001_2124494179.jpg".

Config 'ov'
-----------
Classes: the seen tags = NUS_WID_Tags/TagList1k.txt (the 1,000 Flickr tags; also accepted at the
root of manual_dir) in file order, less the tags that are also concepts (75 in the real data,
computed from the files), then the 81 unseen concepts in Concepts81.txt order:
`class_names` = seen ++ unseen (925 + 81 = 1,006), `info.metadata['num_seen']` = 925. Features:
`labels` (uint8 [C], 1 = positive) and `ignored` (uint8 [C], 1 = the source gives no label for
that image and class: BiAM's label value 0). The labels come from one of two sources:

* raw NUS-WIDE files (`info.metadata['label_source']` = 'tags'): ImageList/ and
  Groundtruth/AllLabels/ as for 'concepts81', plus NUS_WID_Tags/AllTags1k.txt, one row per
  Imagelist.txt line of one 0/1 per TagList1k tag. Seen columns come from the tag matrix, unseen
  ones from Groundtruth, for both splits (the train split's unseen columns are there for
  analysis: a zero-shot trainer must use only the first `num_seen`). Every entry is known, so
  `ignored` is all zeros. Splits are the official lists; images in neither are dropped and
  counted (`unlisted`).
* BiAM's h5 label files ('label_source' = 'h5'): features/nus_wide_train.h5 (key
  `<name>-labels`: the 925 seen labels) and features/nus_wide_test.h5 (`<name>-labels`: the
  1,006 labels; `<name>-labels_81`, when present, must equal the last 81), value 1 = positive,
  -1 = negative, 0 = ignored. The images of a split are those of BiAM's name list
  (img_names.pkl / test_img_names.pkl at the root of manual_dir: a pickled list or array of
  names, or a dict holding one under 'img_names', as BiAM writes it), else every `-labels` key of
  the h5 file (sorted). The train file has no unseen labels, so the train split's 81 unseen
  columns are ignored (Groundtruth is not read in this mode). A BiAM name maps to its entry as
  BiAM's and MKT's loaders do: split on "_", folder = all parts but the last two joined by "_",
  file = the last two joined by "_" (".jpg" added when the name has no extension), e.g.
  "actor_0001_2124494179.jpg" -> "actor/0001_2124494179.jpg". ImageList/ is not read.

When AllTags1k.txt is there the raw files are used and the h5 files are not read. Unlike
'concepts81', images without any positive are kept (SigRL drops them per training batch and
counts them at test); `info.metadata['no_seen_positive'][split]` counts the listed images without
a positive seen label. Missing or unreadable images are skipped and reported as for
'concepts81' (`strict` stops). `image_id` is the entry, as for 'concepts81'.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import pickle

import numpy as np
import tensorflow_datasets as tfds

from mlgraph.data import builder_lib, images
from mlgraph.errors import DataError

SPLIT_LISTS = {"train": "TrainImagelist.txt", "test": "TestImagelist.txt"}


# The label files under Groundtruth/AllLabels are checked later, once the concepts are read.
REQUIRED = [
    "Flickr",
    "Concepts81.txt",
    "ImageList/Imagelist.txt",
    *(f"ImageList/{name}" for name in SPLIT_LISTS.values()),
    "Groundtruth/AllLabels",
]


LAYOUT = (
    "Flickr/, Concepts81.txt, ImageList/{Imagelist,TrainImagelist,TestImagelist}.txt, "
    "Groundtruth/AllLabels/"
)

# Config 'ov' (module docstring). TagList1k.txt is looked for in this order.
TAG_LISTS = ("NUS_WID_Tags/TagList1k.txt", "TagList1k.txt")
ALL_TAGS = "NUS_WID_Tags/AllTags1k.txt"
H5_FILES = {"train": "features/nus_wide_train.h5", "test": "features/nus_wide_test.h5"}
H5_NAME_LISTS = {"train": "img_names.pkl", "test": "test_img_names.pkl"}


@dataclasses.dataclass
class NusWideConfig(tfds.core.BuilderConfig):
    """The label space: the 81 concepts, or the open-vocabulary protocol (seen tags ++ concepts,
    with an `ignored` mask)."""

    open_vocabulary: bool = False


def check_manual_dir(root: str | pathlib.Path) -> pathlib.Path:
    """`root` as a path; a DataError names every NUS-WIDE file or folder it lacks."""
    return builder_lib.check_manual_dir(root, "NUS-WIDE", REQUIRED, LAYOUT)


def normalize_entry(line: str) -> str:
    """An image-list line as a '/'-separated path under Flickr/."""
    parts = line.strip().replace("\\", "/").split("/")
    if "Flickr" in parts:
        parts = parts[len(parts) - parts[::-1].index("Flickr") :]
    return "/".join(p for p in parts if p)


def read_list(path: pathlib.Path) -> list[str]:
    """Normalised entries of an image-list file, blank lines left out."""
    return [normalize_entry(line) for line in path.read_text().splitlines() if line.strip()]


def read_imagelist(root: pathlib.Path) -> list[str]:
    """The entries of ImageList/Imagelist.txt; an entry listed twice is an error."""
    path = root / "ImageList" / "Imagelist.txt"
    entries = read_list(path)
    dup = [e for e, n in collections.Counter(entries).items() if n > 1]
    if dup:
        raise DataError(
            f"{path}: {len(dup)} image(s) listed more than once, e.g. {', '.join(dup[:3])}"
        )
    return entries


def read_concepts(path: pathlib.Path) -> list[str]:
    """Concept names in file order; duplicates are an error."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no concept names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: concept(s) listed twice: {', '.join(dup)}")
    return names


def read_label_column(path: pathlib.Path, num_images: int) -> np.ndarray:
    """One concept's 0/1 column, checked against the number of Imagelist entries."""
    lines = path.read_text().splitlines()
    # Trailing blank lines are harmless; anything else must be exactly one 0/1 per line.
    while lines and not lines[-1].strip():
        lines.pop()
    values = [v.strip() for v in lines]
    bad = next((i for i, v in enumerate(values) if v not in ("0", "1")), None)
    if bad is not None:
        raise DataError(f"{path}:{bad + 1}: expected 0 or 1, found '{lines[bad]}'")
    if len(values) != num_images:
        raise DataError(
            f"{path}: {len(values)} lines, expected one per ImageList/Imagelist.txt entry "
            f"({num_images})"
        )
    return np.asarray(values) == "1"


def read_labels(root: pathlib.Path, concepts: list[str], num_images: int) -> np.ndarray:
    """uint8 [num_images, C] label matrix from Groundtruth/AllLabels."""
    folder = root / "Groundtruth" / "AllLabels"
    paths = [folder / f"Labels_{c}.txt" for c in concepts]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{folder}: missing label file(s) {', '.join(missing)}")
    labels = np.zeros((num_images, len(concepts)), np.uint8)
    for c, path in enumerate(paths):
        labels[:, c] = read_label_column(path, num_images)
    return labels


def assign_splits(root: pathlib.Path, entries: list[str]) -> np.ndarray:
    """Split name per Imagelist entry ('' for images in neither official list)."""
    lists = {
        split: set(read_list(root / "ImageList" / name)) for split, name in SPLIT_LISTS.items()
    }
    both = sorted(lists["train"] & lists["test"])
    if both:
        raise DataError(
            f"{root / 'ImageList'}: {len(both)} image(s) in both TrainImagelist.txt and "
            f"TestImagelist.txt, e.g. {', '.join(both[:3])}"
        )
    where = np.full(len(entries), "", dtype=object)
    for split, names in lists.items():
        where[[i for i, e in enumerate(entries) if e in names]] = split
    return where


def ov_label_source(root: pathlib.Path) -> str:
    """'tags' when NUS_WID_Tags/AllTags1k.txt is there (it wins), 'h5' when BiAM's h5 files are
    (one of them is enough to choose; the other is then checked for)."""
    if (root / ALL_TAGS).exists():
        return "tags"
    if any((root / rel).exists() for rel in H5_FILES.values()):
        return "h5"
    raise DataError(
        f"{root}: no NUS-WIDE open-vocabulary labels: expected {ALL_TAGS} (with ImageList/ and "
        f"Groundtruth/AllLabels/) or BiAM's {' and '.join(H5_FILES.values())}"
    )


def check_ov_manual_dir(root: pathlib.Path, source: str) -> pathlib.Path:
    """`root` once it holds what config 'ov' reads from `source` (TagList1k.txt aside)."""
    if source == "tags":
        return builder_lib.check_manual_dir(
            root, "NUS-WIDE", [*REQUIRED, ALL_TAGS], f"{LAYOUT}, {ALL_TAGS}"
        )
    required = ["Flickr", "Concepts81.txt", *H5_FILES.values()]
    return builder_lib.check_manual_dir(root, "NUS-WIDE", required, ", ".join(required))


def find_tag_list(root: pathlib.Path) -> pathlib.Path:
    """TagList1k.txt under NUS_WID_Tags/ or at the root of manual_dir."""
    return builder_lib.find_one_of(root, TAG_LISTS, "the NUS-WIDE tag names, one a line")


def read_tags(path: pathlib.Path) -> list[str]:
    """Tag names of TagList1k.txt in file order; duplicates are an error."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no tag names")
    dup = sorted({n for n, k in collections.Counter(names).items() if k > 1})
    if dup:
        raise DataError(f"{path}: tag(s) listed twice: {', '.join(dup)}")
    return names


def ov_classes(tags: list[str], concepts: list[str]) -> tuple[list[str], int]:
    """(seen tags ++ concepts, number of seen tags): the seen tags are `tags` in order, less
    those that are also concepts (BiAM's get_seen_unseen_classes)."""
    unseen = set(concepts)
    seen = [t for t in tags if t not in unseen]
    return seen + list(concepts), len(seen)


def read_tag_matrix(path: pathlib.Path, num_images: int, num_tags: int) -> np.ndarray:
    """uint8 [num_images, num_tags] from AllTags1k.txt: one row per Imagelist.txt entry of
    `num_tags` whitespace-separated 0/1 values (trailing blank lines allowed)."""
    out = np.zeros((num_images, num_tags), np.uint8)
    rows, blank = 0, None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            values = line.split()
            if not values:
                blank = blank or lineno
                continue
            if blank is not None:  # a blank row before this one is a row without values
                lineno, values = blank, []
            if len(values) != num_tags:
                raise DataError(
                    f"{path}:{lineno}: {len(values)} values, expected {num_tags} (one 0 or 1 per "
                    "tag of TagList1k.txt)"
                )
            row = b"".join(values)
            if len(row) != num_tags or row.translate(None, b"01"):
                bad = next(v for v in values if v not in (b"0", b"1"))
                raise DataError(
                    f"{path}:{lineno}: expected 0 or 1, found '{bad.decode(errors='replace')}'"
                )
            if rows < num_images:
                out[rows] = np.frombuffer(row, np.uint8) - ord("0")
            rows += 1
    if rows != num_images:
        raise DataError(
            f"{path}: {rows} rows, expected one per ImageList/Imagelist.txt entry ({num_images})"
        )
    return out


def ov_rows_from_tags(
    root: pathlib.Path, tags: list[str], concepts: list[str]
) -> tuple[dict[str, list], int]:
    """({split: [(entry, {'labels', 'ignored'})]}, number of unlisted images) from the raw
    files: seen tags from AllTags1k.txt, concepts from Groundtruth, nothing ignored."""
    entries = read_imagelist(root)
    unseen = set(concepts)
    seen_columns = [i for i, t in enumerate(tags) if t not in unseen]
    tag_matrix = read_tag_matrix(root / ALL_TAGS, len(entries), len(tags))
    labels = np.concatenate(
        [tag_matrix[:, seen_columns], read_labels(root, concepts, len(entries))], axis=1
    )
    del tag_matrix  # 270 MB for the real data
    where = assign_splits(root, entries)
    none_ignored = np.zeros(labels.shape[1], np.uint8)
    rows = {
        split: [
            (entries[i], {"labels": labels[i], "ignored": none_ignored})
            for i in np.flatnonzero(where == split)
        ]
        for split in SPLIT_LISTS
    }
    return rows, int((where == "").sum())


def biam_entry(name: str, source: pathlib.Path) -> str:
    """A BiAM image name as an entry under Flickr/ (module docstring), e.g.
    'actor_0001_2124494179.jpg' -> 'actor/0001_2124494179.jpg'."""
    parts = name.split("_")
    if len(parts) < 3 or not all(parts):
        raise DataError(
            f"{source}: image name '{name}' is not <folder>_<number>_<photo id>[.jpg] as BiAM's are"
        )
    file = "_".join(parts[-2:])
    if "." not in parts[-1]:
        file += ".jpg"
    return f"{'_'.join(parts[:-2])}/{file}"


def read_name_list(path: pathlib.Path) -> list[str]:
    """BiAM's pickled image names: a list, tuple or array of str or bytes, or a dict holding one
    under 'img_names' (as BiAM's and MKT's loaders read it)."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception as e:  # any unpickling failure: not a name list
        raise DataError(
            f"{path}: cannot read a pickled name list ({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, dict):
        if "img_names" not in obj:
            raise DataError(f"{path}: a dict without the key 'img_names' (BiAM's name list)")
        obj = obj["img_names"]
    if isinstance(obj, np.ndarray):
        obj = obj.ravel().tolist()
    if not isinstance(obj, list | tuple) or not all(isinstance(n, str | bytes) for n in obj):
        raise DataError(f"{path}: expected a list of image names (str or bytes)")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in obj]
    dup = [n for n, k in collections.Counter(names).items() if k > 1]
    if dup:
        raise DataError(f"{path}: {len(dup)} name(s) listed twice, e.g. {', '.join(dup[:3])}")
    return names


def read_h5_vector(h5, path: pathlib.Path, key: str, size: int, what: str) -> np.ndarray:
    """int8 [size] label vector `key` of an open h5 file, each value 1, -1 or 0."""
    try:
        v = np.asarray(h5[key][()])
    except KeyError:
        raise DataError(f"{path}: no key '{key}'") from None
    if v.size != size:
        raise DataError(f"{path}: '{key}' has {v.size} values, expected {size} ({what})")
    v = v.reshape(size)
    bad = ~np.isin(v, (-1, 0, 1))
    if bad.any():
        raise DataError(f"{path}: '{key}' holds {v[bad][0]}, expected 1, -1 or 0")
    return v.astype(np.int8)


def ov_rows_from_h5(root: pathlib.Path, num_seen: int, num_unseen: int) -> dict[str, list]:
    """{split: [(entry, {'labels', 'ignored'})]} from BiAM's h5 label files (module docstring):
    1 -> positive, -1 -> negative, 0 -> ignored; the train split's unseen columns ignored."""
    try:
        import h5py
    except ImportError:
        raise DataError(
            f"{root}: reading BiAM's h5 label files needs h5py (pip install 'mlgraph[h5]')"
        ) from None
    sizes = {"train": num_seen, "test": num_seen + num_unseen}
    what = {
        "train": "the seen tags: TagList1k.txt less Concepts81.txt",
        "test": f"{num_seen} seen tags ++ {num_unseen} concepts",
    }
    rows, split_of = {}, {}
    for split, rel in H5_FILES.items():
        path = root / rel
        names_path = root / H5_NAME_LISTS[split]
        try:
            h5 = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: cannot read as HDF5 ({e})") from None
        with h5:
            if names_path.exists():
                names = read_name_list(names_path)
            else:
                names = sorted(k[: -len("-labels")] for k in h5.keys() if k.endswith("-labels"))
            rows[split] = []
            for name in names:
                entry = biam_entry(name, names_path if names_path.exists() else path)
                if entry in split_of:
                    raise DataError(
                        f"{path}: image '{name}' is also in the {split_of[entry]} split"
                    )
                split_of[entry] = split
                v = read_h5_vector(h5, path, f"{name}-labels", sizes[split], what[split])
                if split == "train":
                    v = np.concatenate([v, np.zeros(num_unseen, np.int8)])
                elif f"{name}-labels_81" in h5:
                    v81 = read_h5_vector(
                        h5, path, f"{name}-labels_81", num_unseen, "the Concepts81.txt concepts"
                    )
                    if (v81 != v[num_seen:]).any():
                        raise DataError(
                            f"{path}: '{name}-labels_81' differs from the last {num_unseen} "
                            f"values of '{name}-labels'"
                        )
                features = {
                    "labels": (v == 1).astype(np.uint8),
                    "ignored": (v == 0).astype(np.uint8),
                }
                rows[split].append((entry, features))
    return rows


class NusWide(builder_lib.MultiLabelBuilder):
    """NUS-WIDE multi-label classification ('train', 'test'; official lists): the 81 concepts
    (config 'concepts81', the default) or the open-vocabulary protocol (config 'ov')."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = "NUS-WIDE multi-label: image, multi-hot labels, image path."
    HOMEPAGE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
    BUILDER_CONFIGS = [
        NusWideConfig(name="concepts81", description="the 81 concepts; images without any dropped"),
        NusWideConfig(
            name="ov",
            description="open vocabulary: 925 seen tags ++ 81 unseen concepts, with `ignored`",
            open_vocabulary=True,
        ),
    ]
    DEFAULT_CONFIG_NAME = "concepts81"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unpack the NUS-WIDE images (Flickr/), ImageList.zip, Groundtruth.zip and "
        "Concepts81.txt into manual_dir; for config 'ov' also NUS_WID_Tags/ (TagList1k.txt, "
        "AllTags1k.txt), or BiAM's features/nus_wide_{train,test}.h5 with img_names.pkl and "
        "test_img_names.pkl."
    )

    @property
    def EXTRA_MULTIHOT(self) -> tuple[str, ...]:
        """Config 'ov' adds `ignored` (1 = no label for that image and class)."""
        return ("ignored",) if self.builder_config.open_vocabulary else ()

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """What either config may read: the official files, the tag files and BiAM's h5 files
        and name lists (one not there now counts as added when it appears)."""
        optional = (*TAG_LISTS, ALL_TAGS, *H5_FILES.values(), *H5_NAME_LISTS.values())
        return [root / entry for entry in (*REQUIRED, *optional)]

    def _split_generators(self, dl_manager):
        if self.builder_config.open_vocabulary:
            return self._ov_split_generators(pathlib.Path(dl_manager.manual_dir))
        root = check_manual_dir(pathlib.Path(dl_manager.manual_dir))
        concepts = read_concepts(root / "Concepts81.txt")
        entries = read_imagelist(root)
        labels = read_labels(root, concepts, len(entries))
        where = assign_splits(root, entries)
        has_label = labels.any(1)
        self.info.metadata["class_names"] = concepts
        self.info.metadata["skipped"] = {}
        self.info.metadata["dropped_no_labels"] = {
            split: int(((where == split) & ~has_label).sum()) for split in SPLIT_LISTS
        }
        self.info.metadata["unlisted"] = int((where == "").sum())
        rows = {
            split: [
                (entries[i], {"labels": labels[i]})
                for i in np.flatnonzero(has_label & (where == split))
            ]
            for split in SPLIT_LISTS
        }
        return {split: self._generate_examples(root, split, rows[split]) for split in SPLIT_LISTS}

    def _ov_split_generators(self, manual_dir: pathlib.Path):
        """Config 'ov': classes, labels and `ignored` from the raw tag files or BiAM's h5."""
        if not manual_dir.is_dir():
            raise DataError(f"{manual_dir}: NUS-WIDE manual_dir does not exist")
        source = ov_label_source(manual_dir)
        root = check_ov_manual_dir(manual_dir, source)
        concepts = read_concepts(root / "Concepts81.txt")
        tags = read_tags(find_tag_list(root))
        class_names, num_seen = ov_classes(tags, concepts)
        if source == "tags":
            rows, unlisted = ov_rows_from_tags(root, tags, concepts)
        else:
            rows, unlisted = ov_rows_from_h5(root, num_seen, len(concepts)), 0
        self.info.metadata["class_names"] = class_names
        self.info.metadata["num_seen"] = num_seen
        self.info.metadata["label_source"] = source
        self.info.metadata["skipped"] = {}
        self.info.metadata["unlisted"] = unlisted
        self.info.metadata["no_seen_positive"] = {
            split: sum(not f["labels"][:num_seen].any() for _, f in rows[split])
            for split in SPLIT_LISTS
        }
        return {split: self._generate_examples(root, split, rows[split]) for split in SPLIT_LISTS}

    def _generate_examples(self, root, split, rows):
        skipped = []
        for entry, features in rows:
            try:
                data, _ = images.rgb_jpeg_bytes(root / "Flickr" / entry, self.max_image_pixels)
            except images.BadImage as e:
                if self.strict:
                    raise DataError(f"{e} (--strict)") from None
                skipped.append(str(e))
                continue
            yield entry, {"image": data, **features, "image_id": entry}
        self.info.metadata["skipped"][split] = skipped


def source_order(root: pathlib.Path, split: str):
    """The raw files' image order the single-positive draws need (`observed.SourceOrder`):
    ImageList/Imagelist.txt's, which Cole's rows follow.

    Raises:
      DataError: the list file is missing.
    """
    from mlgraph.data.observed import SourceOrder

    del split  # one list for both splits
    path = root / "ImageList" / "Imagelist.txt"
    if not path.is_file():
        raise DataError(f"{path}: image list not found")
    return SourceOrder(image_ids=tuple(read_list(path)))
