"""The data sets mlgraph knows, one row each: the only list of them.

A config names its data set by a row's name (`config.data.name`); the build command, the
configs' recipes (`mlgraph.recipes.set_data`), the single-positive draws (`mlgraph.data.observed`)
and the tests read the row. A new data set is a TFDS builder module (a
`builder_lib.MultiLabelBuilder`) and one `register(DataSet(...))` here, or at the caller's
import time for a data set kept outside the package.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from mlgraph.errors import ConfigError

# How the single-positive draws order rows and classes (`mlgraph.data.observed`): the rules of
# Cole's and Scob's code for the data sets they published draws on, and for any other data set
# mlgraph's rule (image ids sorted as strings; every image must have a positive).
SPML_RULES = ("coco", "voc", "nuswide", "cub", "ids")


@dataclasses.dataclass(frozen=True)
class DataSet:
    """One data set.

    Attributes:
      name: how configs and the build command name it.
      builder: its TFDS builder class, as 'module:Class'.
      train_split: the split the papers train on.
      eval_split: the split the papers test on.
      num_classes: C as the papers use it (a build from other files may hold another
        count), or None when the user's files decide (a custom data set).
      builder_config: the builder config ('' = the builder's default).
      demo: the embedded data set written on first use (`mlgraph.data.demo`), '' for a data
        set built from the user's download.
      spml_rules: one of `SPML_RULES`.
      raw_order: what the draws need from the raw download that the built data set does not
        keep (the JSON's image order, the list files'), as 'module:function' of (manual_dir,
        split) -> `observed.SourceOrder`; '' when the built data set has it all.
    """

    name: str
    builder: str
    train_split: str
    eval_split: str
    num_classes: int | None
    builder_config: str = ""
    demo: str = ""
    spml_rules: str = "ids"
    raw_order: str = ""

    def __post_init__(self):
        if self.spml_rules not in SPML_RULES:
            raise ConfigError(
                f"data set {self.name!r}: spml_rules={self.spml_rules!r}; expected one of "
                f"{', '.join(SPML_RULES)}"
            )

    def builder_class(self) -> type:
        """The TFDS builder class."""
        return _resolve(self.builder)

    def raw_order_reader(self) -> Callable | None:
        """The function reading the raw files' order, or None."""
        return _resolve(self.raw_order) if self.raw_order else None


def _resolve(spec: str):
    """The object 'module:attr.attr' names."""
    module, _, qualname = spec.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


DATASETS: dict[str, DataSet] = {}


def register(row: DataSet) -> DataSet:
    """Add `row` (a name already registered is replaced: a test or a user's module may
    redefine one); returns it."""
    DATASETS[row.name] = row
    return row


def get(name: str) -> DataSet:
    """The row named `name`.

    Raises:
      ConfigError: an unknown name (the known ones listed).
    """
    if name not in DATASETS:
        raise ConfigError(
            f"config.data.name={name!r}: unknown data set; known: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[name]


def by_builder(tfds_name: str) -> DataSet | None:
    """The first row whose builder TFDS calls `tfds_name` (the name a built folder's
    dataset_info.json holds), or None. Rows that share a builder share its rules."""
    for row in DATASETS.values():
        if row.builder_class().name == tfds_name:
            return row
    return None


COCO_ORDER = "mlgraph.data.coco:source_order"
for _row in (
    DataSet(
        "coco2014", "mlgraph.data.coco:Coco2014", "train", "val", 80, "nonempty",
        spml_rules="coco", raw_order=COCO_ORDER,
    ),
    DataSet(
        "voc2007", "mlgraph.data.voc:Voc2007", "trainval", "test", 20,
        spml_rules="voc", raw_order="mlgraph.data.voc:Voc2007.source_order",
    ),
    DataSet(
        "voc2012", "mlgraph.data.voc:Voc2012", "train", "val", 20,
        spml_rules="voc", raw_order="mlgraph.data.voc:Voc2012.source_order",
    ),
    DataSet(
        "nuswide", "mlgraph.data.nuswide:NusWide", "train", "test", 81,
        spml_rules="nuswide", raw_order="mlgraph.data.nuswide:source_order",
    ),
    # The open-vocabulary protocol: 925 seen tags, then the 81 concepts held out of training.
    DataSet(
        "nuswide_ov", "mlgraph.data.nuswide:NusWide", "train", "test", 1006, "ov",
        spml_rules="nuswide", raw_order="mlgraph.data.nuswide:source_order",
    ),
    # Cole et al.'s fourth single-positive benchmark: the 312 binary attributes.
    DataSet(
        "cub", "mlgraph.data.cub:Cub2011", "train", "test", 312,
        spml_rules="cub", raw_order="mlgraph.data.cub:source_order",
    ),
    DataSet("custom", "mlgraph.data.custom:Custom", "train", "test", None),
    # The embedded sets, written in the COCO-2014 layout and built by its builder.
    DataSet(
        "demo", "mlgraph.data.coco:Coco2014", "train", "val", 13, "nonempty", demo="demo",
        spml_rules="coco", raw_order=COCO_ORDER,
    ),
    DataSet(
        "digits_mosaic", "mlgraph.data.coco:Coco2014", "train", "val", 10, "nonempty",
        demo="digits-mosaic", spml_rules="coco", raw_order=COCO_ORDER,
    ),
):  # fmt: skip
    register(_row)
