"""Convert a PyTorch checkpoint into a mlgraph weights checkpoint (Orbax tree + settings.json).

    python -m mlgraph.convert --source torchvision_resnet --input resnet101-63fe2227.pth \\
        --output weights/resnet101 [--option include_head=false ...]

Sources (`SOURCES`) name a table module under `mlgraph.convert`; each defines
`convert(state_dict, options) -> (module, settings)`. Option values are parsed as JSON where they
can be (`true`, `3`, `"x"`, `[1, 2]`), otherwise kept as strings. The output folder must not exist.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pathlib
import sys
from collections.abc import Mapping, Sequence
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
}


def parse_option(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value parsed as JSON (case-insensitive true/false/null)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {item!r}: expected key=value")
    lowered = text.strip().lower()
    if lowered in ("true", "false", "null", "none"):
        return key, {"true": True, "false": False}.get(lowered)
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def convert_file(
    source: str,
    input: str | pathlib.Path,
    output: str | pathlib.Path,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read `input`, convert it with the `source` table, write a weights checkpoint to `output`.

    Returns a summary: {"source", "input", "output", "params" (number of trainable values),
    "settings" (as written to settings.json)}.

    Raises:
      ConversionError: unknown source or options, or weights that do not fit the model.
      FileNotFoundError: `input` (or the parent of `output`) does not exist.
      FileExistsError: `output` exists already.
    """
    from mlgraph.convert.core import ConversionError

    if source not in SOURCES:
        raise ConversionError(
            f"unknown source {source!r}; valid sources: {', '.join(sorted(SOURCES))}"
        )
    input_path, output_path = pathlib.Path(input), pathlib.Path(output)
    # Checked before the (possibly slow) conversion so that a re-run fails at once.
    if output_path.exists():
        raise FileExistsError(f"{output_path}: already exists; choose a new output path")
    try:
        table_module = importlib.import_module(SOURCES[source])
    except ModuleNotFoundError as e:
        if e.name != SOURCES[source]:
            raise
        raise ConversionError(
            f"source {source!r}: its module {SOURCES[source]} is not available"
        ) from e

    import jax
    from flax import nnx

    from mlgraph import checkpointing
    from mlgraph.convert.io import read_state_dict

    state_dict = read_state_dict(input_path)
    try:
        module, settings = table_module.convert(state_dict, dict(options or {}))
    except ConversionError as e:
        raise ConversionError(f"{input_path}: {e}") from e
    params = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    settings = dict(settings) | {"source": source, "input": str(input_path)}
    checkpointing.save_weights(output_path, nnx.to_pure_dict(nnx.state(module)), settings)
    return {
        "source": source,
        "input": str(input_path),
        "output": str(output_path),
        "params": int(params),
        "settings": settings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mlgraph.convert",
        description="Convert a PyTorch checkpoint into a mlgraph weights checkpoint.",
    )
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--input", required=True, help=".pth/.pt/.bin, .safetensors or .npz")
    parser.add_argument("--output", required=True, help="output folder (must not exist)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="source-specific option, repeatable (e.g. include_head=false)",
    )
    args = parser.parse_args(argv)
    # Our own notes (e.g. which container of a checkpoint was used) at INFO, others' at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mlgraph").setLevel(logging.INFO)

    from mlgraph.convert.core import ConversionError

    try:
        options = dict(parse_option(item) for item in args.option)
        summary = convert_file(args.source, args.input, args.output, options)
    except (ConversionError, ValueError, OSError, ImportError) as e:
        # One line, whatever the exception text (torch's unpickling errors span several lines).
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 1
    settings = {k: v for k, v in summary["settings"].items() if k not in ("source", "input")}
    print(
        f"{summary['input']} -> {summary['output']}: {summary['params']:,} params, "
        f"settings {json.dumps(settings, sort_keys=True)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
