"""Convert a PyTorch checkpoint into a mlgraph weights checkpoint (Orbax tree + settings.json).

    python -m mlgraph.convert --source torchvision_resnet --input resnet101-63fe2227.pth \\
        --output weights/resnet101 [--option include_head=false ...]

The command line of `mlgraph.convert.convert_file`. Option values are parsed as JSON where they
can be (`true`, `3`, `"x"`, `[1, 2]`), otherwise kept as strings; `--source NAME --help` lists
a source's options. The output folder must not exist. A usage or conversion error is one line
`error: ...` on stderr and exit status 2. After the summary line, lines `note: ...` say what
else the file held (a training script's epoch, best_mAP, optimizer...), which config file the
settings came from, and what a config using the weights must set. Settings neither the weights,
an option nor the official config file give are named, with the values taken, in a
`warning: ...` line; `--strict` makes that an error. A file cut short (an interrupted download)
is `error: FILE: truncated: ...`.

Torch files are read safely (`weights_only=True`, numpy scalars allowed); a file that needs
more is refused with a line naming `--option trust_pickle=true`, which loads it with
`weights_only=False`: that executes any code pickled in the file, so use it only for files
from a source you trust.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from mlgraph import cli
from mlgraph.convert import SOURCES, convert_file, option_help

# A FlagValues of its own rather than absl's global FLAGS: `main` is called in-process (tests,
# notebooks) next to modules that define global flags of the same names (`mlgraph.evaluate`
# has --output), which absl would reject as duplicates.
_FLAGS = flags.FlagValues()
_SOURCE = flags.DEFINE_string(
    "source", None, f"Source table: {', '.join(sorted(SOURCES))}.", flag_values=_FLAGS
)
_INPUT = flags.DEFINE_string(
    "input", None, ".pth/.pt/.bin, .safetensors or .npz file.", flag_values=_FLAGS
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (must not exist).", flag_values=_FLAGS)
_OPTION = flags.DEFINE_multi_string(
    "option",
    [],
    "Source-specific KEY=VALUE, repeatable (e.g. include_head=false); trust_pickle=true for "
    "any source",
    flag_values=_FLAGS,
)
_STRICT = flags.DEFINE_boolean(
    "strict",
    False,
    "Refuse to convert when a setting is neither in the weights nor in a config file.",
    flag_values=_FLAGS,
)


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


def _error(message: str) -> None:
    # One line, whatever the message (torch's unpickling errors span several lines).
    line = " ".join(x.strip() for x in message.splitlines() if x.strip())
    print(f"error: {line}", file=sys.stderr)


def _source_named(args: list[str]) -> str | None:
    """The --source value in `args` (for --help), read before the flags are parsed."""
    for i, arg in enumerate(args):
        if arg.startswith("--source="):
            return arg.split("=", 1)[1]
        if arg == "--source" and i + 1 < len(args):
            return args[i + 1]
    return None


def usage_problem(args: Sequence[str]) -> str | None:
    """Parse `args` (without the program name) into the flags; what is wrong with them, or None.

    -h/--help prints the help (with --source, that source's options) and exits 0
    (`mlgraph.cli.parse`).
    """
    args = list(args)
    source = _source_named(args)
    usage = __doc__ + (f"\n{option_help(source)}" if source in SOURCES else "")
    try:
        rest = cli.parse(_FLAGS, args, usage)
    except app.UsageError as e:
        return str(e)
    # Checked here rather than by absl's required-flag validators so that --help needs none.
    missing = [f"--{f.name}" for f in (_SOURCE, _INPUT, _OUTPUT) if f.value is None]
    if rest:
        return f"unexpected arguments: {' '.join(rest)}"
    if missing:
        return f"required flags missing: {', '.join(missing)}"
    if _SOURCE.value not in SOURCES:
        choices = ", ".join(sorted(SOURCES))
        return f"--source: invalid choice: {_SOURCE.value!r} (choose from {choices})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `argv` without the program name (default: sys.argv[1:]).

    Returns the exit status (0, or 2 after a conversion error); raises SystemExit(2) on a
    usage error.
    """
    problem = usage_problem(sys.argv[1:] if argv is None else argv)
    if problem:
        _error(problem)
        raise SystemExit(2)
    # Our own notes (e.g. which container of a checkpoint was used) at INFO, others' at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mlgraph").setLevel(logging.INFO)

    from mlgraph.convert.core import ConversionError
    from mlgraph.errors import MlgraphError

    try:
        options = dict(parse_option(item) for item in _OPTION.value)
        summary = convert_file(
            _SOURCE.value, _INPUT.value, _OUTPUT.value, options, strict=_STRICT.value
        )
    except (ConversionError, MlgraphError, ValueError, OSError, ImportError) as e:
        _error(str(e))
        return 2
    settings = {k: v for k, v in summary["settings"].items() if k not in ("source", "input")}
    print(
        f"{summary['input']} -> {summary['output']}: {summary['params']:,} params, "
        f"settings {json.dumps(settings, sort_keys=True)}"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
