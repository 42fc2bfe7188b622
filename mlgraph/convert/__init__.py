"""PyTorch checkpoints -> mlgraph weights checkpoints (an Orbax tree + settings.json).

`convert_file(source, input, output, options)` is the library entry (the command line
`python -m mlgraph.convert` and `mlgraph.assets` both call it). Sources (`SOURCES`) name a table
module under `mlgraph.convert`; each defines `convert(state_dict, options) -> (module, settings)`
or `(module, settings, extra)`, where `settings` may hold "notes": lines for the conversion
summary (what a config using the weights must know), which are not written to settings.json,
and `extra` holds arrays of the method's per-example state that the checkpoint carries (Scob's
label estimator), saved beside the weights (`checkpointing.load_extra`).
Nothing heavy is imported here, so that importing one table module stays cheap.

The option `trust_pickle` (default false) is taken here, for every source: true reads a torch
file with `weights_only=False` (`mlgraph.convert.io.read_checkpoint`).

A table whose official code writes a config file next to its checkpoints names the file
(`CONFIG_FILES`) and the option that takes it (`CONFIG_OPTION`); without the option, the file
is looked for beside the checkpoint and in the folder above it (SALGL's experiment folder holds
`config.yaml` and `checkpoints/ema_best_model.pth`).

Settings a table had to assume are `settings["assumed"]`, {field: the value the conversion
took}, named with those values in one warning line, or with `strict` an error. A setting is
assumed when the weights cannot tell it and neither an option nor a config file gave it, and it
is a setting of the training run rather than of the official architecture: the image size of
every method (a CNN's weights fit any size; SSGRL's 576, ML-GCN's and Scob's 448), what the
official run took from its flags or config file (SALGL's config.yaml fields, Query2Label's
heads, SigRL's top-k and label set), and a transformer's head count read from no standard
width. Constants of the official code (SALGL's and Scob's 8 heads, SSGRL's 3 GGNN steps, OpenAI
CLIP's width // 64 heads) are the architecture converted, not assumptions.
"""

from __future__ import annotations

import importlib
import json
import pathlib
from collections.abc import Mapping
from typing import Any

SOURCES: dict[str, str] = {
    "torchvision_resnet": "mlgraph.convert.torchvision_resnet",
    "torchvision_mobilenet_v2": "mlgraph.convert.torchvision_mobilenet_v2",
    "timm_vit": "mlgraph.convert.timm_vit",
    "openai_clip": "mlgraph.convert.openai_clip",
    "bert": "mlgraph.convert.bert",
    "salgl": "mlgraph.convert.salgl",
    "ssgrl": "mlgraph.convert.ssgrl",
    "mlgcn": "mlgraph.convert.mlgcn",
    "q2l": "mlgraph.convert.q2l",
    "scob": "mlgraph.convert.scob",
    "sigrl": "mlgraph.convert.sigrl",
}


def find_config_file(checkpoint: pathlib.Path, names: tuple[str, ...]) -> pathlib.Path | None:
    """The first of `names` beside `checkpoint`, else in the folder above it."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def assumed_settings(settings: Mapping[str, Any]) -> list[str]:
    """'field=value' of each setting in `settings["assumed"]` ({field: the value the conversion
    took}), sorted by field."""
    return [f"{f}={json.dumps(v)}" for f, v in sorted(dict(settings.get("assumed", {})).items())]


def option_help(source: str) -> str:
    """The options of table `source`: the "Options:" section of its module's docstring."""
    module = importlib.import_module(SOURCES[source])
    doc = module.__doc__ or ""
    lines = doc[doc.index("Options:") :].splitlines()[1:] if "Options:" in doc else []
    kept = []
    for line in lines:
        if line.strip() and not line.startswith(" "):
            break
        kept.append(line)
    text = "\n".join(kept).rstrip() or "  (none)"
    return f"Options of --source {source} (--option KEY=VALUE, repeatable):\n{text}\n"


def convert_file(
    source: str,
    input: str | pathlib.Path,
    output: str | pathlib.Path,
    options: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Read `input`, convert it with the `source` table, write a weights checkpoint to `output`.

    Returns a summary: {"source", "input", "output", "params" (number of trainable values),
    "settings" (as written to settings.json), "notes" (lines: the container's other entries,
    such as epoch, best_mAP and optimizer, and the table's notes)}.

    `strict`: a setting that neither the weights nor a config file gives is an error rather
    than a warning line naming it.

    Raises:
      ConversionError: unknown source or options, weights that do not fit the model, or (with
        `strict`) a setting that had to be assumed.
      FileNotFoundError: `input` (or the parent of `output`) does not exist.
      FileExistsError: `output` exists already.
    """
    import jax
    from flax import nnx

    from mlgraph import paths
    from mlgraph.convert.core import ConversionError
    from mlgraph.convert.io import read_checkpoint

    table_module = _table_module(source)
    paths.check_backend(output, "--output")  # a gs:// output without gcsfs: one line, now
    input_path, output_path = pathlib.Path(input), paths.epath.Path(output)
    # Checked before the (possibly slow) conversion so that a re-run fails at once.
    if output_path.exists():
        raise FileExistsError(f"{output_path}: already exists; choose a new output path")
    options = dict(options or {})
    trust_pickle = options.pop("trust_pickle", False)
    if not isinstance(trust_pickle, bool):
        raise ConversionError(
            f"option trust_pickle={trust_pickle!r}: expected a bool, got "
            f"{type(trust_pickle).__name__}"
        )
    found_note = _config_file_option(table_module, input_path, options)
    checkpoint = read_checkpoint(input_path, trust_pickle=trust_pickle)
    try:
        module, settings, *extra = table_module.convert(checkpoint.state_dict, options)
    except ConversionError as e:
        raise ConversionError(f"{input_path}: {e}") from e
    params = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    settings = dict(settings) | {"source": source, "input": str(input_path)}
    notes = [checkpoint.note(), found_note, *settings.pop("notes", [])]
    if settings.get("assumed"):
        _report_assumed(table_module, settings, input_path, strict)
    from mlgraph import checkpointing

    tree = nnx.to_pure_dict(nnx.state(module))
    checkpointing.save_weights(output_path, tree, settings, extra=extra[0] if extra else None)
    return {
        "source": source,
        "input": str(input_path),
        "output": str(output_path),
        "params": int(params),
        "settings": settings,
        "notes": [n for n in notes if n],
    }


def _table_module(source: str):
    """The conversion table module of `source`.

    Raises:
      ConversionError: an unknown source, or one whose module is not available.
    """
    from mlgraph.convert.core import ConversionError

    if source not in SOURCES:
        raise ConversionError(
            f"unknown source {source!r}; valid sources: {', '.join(sorted(SOURCES))}"
        )
    try:
        return importlib.import_module(SOURCES[source])
    except ModuleNotFoundError as e:
        if e.name != SOURCES[source]:
            raise
        raise ConversionError(
            f"source {source!r}: its module {SOURCES[source]} is not available"
        ) from e


def _config_file_option(table_module, input_path: pathlib.Path, options: dict) -> str | None:
    """Fill the table's config-file option (SALGL's config.yaml, Q2L's config_new.json) from
    the file found beside the checkpoint, unless given; returns the note saying so, or None."""
    option = getattr(table_module, "CONFIG_OPTION", None)
    if not option or options.get(option):
        return None
    found = find_config_file(input_path, table_module.CONFIG_FILES)
    if found is None:
        return None
    options[option] = str(found)
    return f"settings read from {found} (--option {option}=FILE for another)"


def _report_assumed(table_module, settings: dict, input_path: pathlib.Path, strict: bool) -> None:
    """One warning line naming the settings the conversion had to assume, or (`strict`) a
    ConversionError."""
    from mlgraph.convert.core import ConversionError
    from mlgraph.errors import warn

    option = getattr(table_module, "CONFIG_OPTION", None)
    fix = (
        f"pass --option {option}=FILE (the official {table_module.CONFIG_FILES[0]})"
        if option
        else "pass " + " ".join(f"--option {f}=VALUE" for f in sorted(settings["assumed"]))
    )
    what = (
        f"{input_path}: settings that neither the weights nor a config file give: "
        f"{', '.join(assumed_settings(settings))}"
    )
    if strict:
        raise ConversionError(f"{what}; {fix} (--strict)")
    warn(f"{what} (assumed: the defaults); {fix}, or --strict to refuse")
