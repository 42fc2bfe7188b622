"""What every mlgraph TFDS builder shares: the `strict` switch, the image size limit, the
feature set, the check of the raw download folder and the record of the source files a
build was made from (`mlgraph.data.sources`, written into the build before TFDS moves it
into place).

Features: `image` (JPEG bytes, decoded on read), `labels` (multi-hot uint8 [C]), `image_id`
(int or text), and any extra multi-hot masks a data set has (VOC's `difficult`). Class names go
to `info.metadata['class_names']`, skipped files to `info.metadata['skipped'][split]`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from mlgraph.data import images, sources
from mlgraph.errors import DataError


def check_manual_dir(
    root: str | pathlib.Path, name: str, required: Sequence[str], layout: str
) -> pathlib.Path:
    """`root` as a path, once it is a folder holding every entry of `required`.

    Args:
      root: the raw download folder (`manual_dir`).
      name: the data set as the messages name it, e.g. "COCO-2014".
      required: files and folders, relative to `root`, that the builder reads.
      layout: the expected layout, quoted in the error.

    Raises:
      DataError: `root` is not a folder, or (one error naming all of them) entries are missing.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {name} manual_dir does not exist")
    missing = [entry for entry in required if not (root / entry).exists()]
    if missing:
        raise DataError(
            f"{root}: not a {name} folder, missing {', '.join(missing)} (expected {layout})"
        )
    return root


def find_one_of(root: pathlib.Path, candidates: Sequence[str], holds: str) -> pathlib.Path:
    """The first of `candidates` (files relative to `root`, the raw download folder) that exists.

    Raises:
      DataError: none exists; names the first, the others looked for, and what the file `holds`.
    """
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise DataError(
        f"{root}: missing {candidates[0]} (also looked for {', '.join(candidates[1:])}): {holds}"
    )


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """`DatasetInfo` that never looks for pre-computed metadata in TFDS's GCS bucket.

    TFDS calls `initialize_from_bucket` whenever a builder is made for a data set that is not
    built yet; with GCS disabled (the default) it finds nothing, but first makes an empty
    `tempfile.mkdtemp("tfds")` folder that it never removes, so every such call left one more
    empty folder in /tmp. Our data sets are the user's own files, so there is nothing to fetch.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to initialise: these data sets have no published metadata."""


class MultiLabelBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the data-set builders; subclasses set the class attributes below."""

    DESCRIPTION = ""
    HOMEPAGE: str | None = None
    IMAGE_ID = "text"  # 'int' or 'text'
    EXTRA_MULTIHOT: tuple[str, ...] = ()  # further multi-hot uint8 [C] features

    def __init__(
        self,
        *,
        strict: bool = False,
        max_image_pixels: int = images.MAX_IMAGE_PIXELS,
        source_files: dict[str, str] | None = None,
        **kwargs,
    ):
        """`strict`: a bad image or annotation is an error instead of being skipped and counted.
        `max_image_pixels`: the size limit of `images.rgb_jpeg_bytes`.
        `source_files`: the `sources.record` of the files this build reads, kept with it."""
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.source_files = source_files
        super().__init__(**kwargs)

    @classmethod
    def source_paths(cls, root: pathlib.Path) -> list[pathlib.Path]:
        """The files and folders a build from `root` (manual_dir) reads, for its record of
        `sources`; all of `root` unless a builder knows better."""
        return [root]

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config=download_config)
        if self.source_files is not None:
            # `data_dir` is TFDS's temporary folder here: the record arrives with the build.
            sources.write(pathlib.Path(self.data_dir), self.source_files)

    def _info(self) -> tfds.core.DatasetInfo:
        image_id = (
            tfds.features.Scalar(dtype=np.int64) if self.IMAGE_ID == "int" else tfds.features.Text()
        )
        features = {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "image_id": image_id,
            **{
                name: tfds.features.Tensor(shape=(None,), dtype=np.uint8)
                for name in self.EXTRA_MULTIHOT
            },
        }
        return LocalDatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            homepage=self.HOMEPAGE,
        )
