"""absl flags for the entry points that are also called as functions, `main(argv) -> status`.

`absl.app.run` parses the process-wide `flags.FLAGS`, and two modules defining the same name
there (`--workdir`, `--output`, `--data_dir`) is a DuplicateFlagError as soon as both are
imported into one process, as the tests import several entry points. So these entry points
keep their flags in a `flags.FlagValues` of their own and parse an argument list with `parse`,
which keeps the conventions their users rely on: `-h`/`--help`, `--no-NAME` for a boolean flag
(absl's own spelling `--noNAME` works too), and bad usage as one `app.UsageError` line.

Also here, for every entry point: `quiet_logs`, which keeps other libraries' INFO logs out of
the commands' output, and `load_problem`, why a `--config` file did not load.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, usage: str) -> list[str]:
    """Parse `argv` into `flag_values`, every flag starting from its default.

    Args:
      flag_values: the entry point's own flags.
      argv: the arguments after the program name; None reads `sys.argv[1:]`.
      usage: printed, above the flags' help, for -h or --help.

    Returns:
      The positional arguments, in order.

    Raises:
      app.UsageError: an unknown flag, a bad value or a missing required flag (one line).
      SystemExit: status 0, after printing the help.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"{usage.rstrip()}\n{flag_values.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    booleans = {name for name in flag_values if flag_values[name].boolean}
    argv = [
        f"--no{arg[len('--no-') :]}"
        if arg.startswith("--no-") and arg[len("--no-") :] in booleans
        else arg
        for arg in argv
    ]
    # A second call in one process (tests, notebooks) must not inherit the first one's values.
    flag_values.unparse_flags()
    try:
        return flag_values(["", *argv])[1:]
    except flags.Error as e:
        raise app.UsageError(" ".join(str(e).split())) from None


def quiet_logs() -> None:
    """Show only warnings from absl logging: Orbax and TFDS log every checkpoint read and write
    at INFO, and the commands' own lines say what matters. TFDS's advice to install OpenCV is
    dropped too: images decode with Pillow, as intended."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_NO_OPENCV_ADVICE)  # added once however often called


class _NoOpenCVAdvice:
    """A logging filter for TFDS's 'OpenCV is not installed' warning."""

    def filter(self, record) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


_NO_OPENCV_ADVICE = _NoOpenCVAdvice()


def load_problem(error: OSError) -> str:
    """Why a `--config` file did not load, in a few words (ml_collections wraps the reason)."""
    if isinstance(error.__cause__, OSError) or "No such file" in str(error):
        return "no such file"
    return str(error).splitlines()[0]
