"""Command line: `python -m mlgraph.main --config configs/NAME.py --workdir DIR`.

Trains the config in DIR, or resumes it from DIR's latest checkpoint. Config fields are
overridden with `--config.field=value`; the config is locked, so a misspelt field is an error.
Set MLGRAPH_DISTRIBUTED=1 (the launch scripts do) to call `jax.distributed.initialize()` first.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and logs (resumed).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags and load the config; a bad config file or override is one line on stderr
    and exit status 2."""
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises only when used
        return rest
    except OSError as e:
        from mlgraph import cli

        path = flags.FLAGS["config"].config_filename if "config" in flags.FLAGS else "?"
        print(
            f"error: --config {path}: cannot load the config ({cli.load_problem(e)})",
            file=sys.stderr,
        )
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
        match = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", text)
        culprit = next((a for a in overrides if match and match.group(1) in a.split("=")[0]), None)
        if match:
            hint = f"no config field '{match.group(1)}' (did you mean \"{match.group(2)}\"?)"
        else:
            hint = text.strip("'\"")
        print(f"error: {culprit + ': ' if culprit else ''}{hint}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    from mlgraph import cli

    cli.quiet_logs()
    if os.environ.get("MLGRAPH_DISTRIBUTED") == "1":
        jax.distributed.initialize()
    from mlgraph import train
    from mlgraph.errors import MlgraphError

    try:
        train.run(_CONFIG.value, _WORKDIR.value)
    except MlgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
