"""Command line: `python -m mlgraph.main --config configs/NAME.py --workdir DIR`.

Trains the config in DIR, or resumes it from DIR's latest checkpoint. Config fields are
overridden with `--config.field=value`; the config is locked, so a misspelt field is an error.
Set MLGRAPH_DISTRIBUTED=1 (the launch scripts do) to call `jax.distributed.initialize()` first.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mlgraph import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and logs (resumed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Entry point after flag parsing."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

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
    app.run(main, flags_parser=cli.parse_config_flags)
