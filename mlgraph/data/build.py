"""Build a data set once from the user's raw download into array_record files.

    python -m mlgraph.data.build NAME --manual_dir RAW --data_dir OUT [--config all] [--strict]
        [--rebuild] [--max_image_pixels N]

NAME is a data set of `mlgraph.data.registry` (coco2014, voc2007, voc2012, nuswide, nuswide_ov,
cub, custom); --config overrides its builder config (coco2014: nonempty, all; nuswide: concepts81,
ov).

Unreadable images are reported by path and skipped (counted in the summary), or with --strict
stop the build. Building again into the same folder reuses the build when its source files are
unchanged (one line says so; --strict then fails on what that build skipped); when they changed,
or the folder holds an incomplete build, it stops with one line saying what changed, and
--rebuild replaces the build (the old one is kept until the new one is complete). A JPEG over
--max_image_pixels is stored at 1/2, 1/4 or 1/8 scale, any other image over it is skipped
(`mlgraph.data.images`); the limit is part of what a build is judged by.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags

from mlgraph import cli, paths
from mlgraph.data import datasets, images, registry
from mlgraph.errors import MlgraphError, StorageError

FLAGS = flags.FlagValues()  # its own: see `mlgraph.cli`
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder of the raw download.", flag_values=FLAGS
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the built data set is written.", flag_values=FLAGS
)
_CONFIG = flags.DEFINE_string(
    "config",
    "",
    "Builder config (default: the data set's; e.g. coco2014: nonempty, all).",
    flag_values=FLAGS,
)
_STRICT = flags.DEFINE_bool(
    "strict", False, "Stop at the first unreadable image.", flag_values=FLAGS
)
_REBUILD = flags.DEFINE_bool(
    "rebuild",
    False,
    "Replace a build in --data_dir whose source files changed since.",
    flag_values=FLAGS,
)
_MAX_IMAGE_PIXELS = images.define_max_pixels_flag(FLAGS)
flags.mark_flags_as_required(["manual_dir", "data_dir"], flag_values=FLAGS)


def summarize(name: str, builder) -> str:
    """Images per split, mean labels per image, classes without positives, skipped files."""
    info = builder.info
    names = list(info.metadata.get("class_names", []))
    lines = [f"{name} ({len(names)} classes) in {builder.data_dir}"]
    for split in info.splits:
        source = builder.as_data_source(split=split)
        labels = np.stack([np.asarray(source[i]["labels"]) for i in range(len(source))])
        empty = [names[c] for c in np.flatnonzero(labels.sum(0) == 0)]
        skipped = info.metadata.get("skipped", {}).get(split, [])
        lines.append(
            f"  {split}: {len(source)} images, {labels.sum(1).mean():.3f} labels/image, "
            f"{len(skipped)} skipped, classes without positives: {', '.join(empty) or 'none'}"
        )
        lines.extend(f"    skipped {s}" for s in skipped)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m mlgraph.data.build NAME --manual_dir RAW --data_dir OUT ...`; the exit
    status: 0, or 2 after one `error:` line (bad usage, or a build that cannot be made)."""
    try:
        args = cli.parse(FLAGS, argv, __doc__)
        if len(args) != 1:
            buildable = [r.name for r in registry.DATASETS.values() if not r.demo]
            raise app.UsageError(f"give one data set name: {', '.join(sorted(buildable))}")
    except app.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cli.quiet_logs()
    name = args[0]
    try:
        if paths.is_cloud(_DATA_DIR.value):
            # Written here it could not be read back: build locally, then copy it to the bucket.
            raise StorageError(
                f"--data_dir {_DATA_DIR.value}: build into a local folder and copy it to the "
                f"bucket; {paths.DATA_ON_CLOUD}"
            )
        builder = datasets.build(
            name,
            pathlib.Path(_MANUAL_DIR.value),
            pathlib.Path(_DATA_DIR.value),
            _CONFIG.value,
            strict=_STRICT.value,
            rebuild=_REBUILD.value,
            report=print,
            max_image_pixels=_MAX_IMAGE_PIXELS.value,
        )
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(name, builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
