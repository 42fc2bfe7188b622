"""absl flags for the entry points that are also called as functions, `main(argv) -> status`.

`absl.app.run` parses the process-wide `flags.FLAGS`, and two modules defining the same name
there (`--workdir`, `--output`, `--data_dir`) is a DuplicateFlagError as soon as both are
imported into one process, as the tests import several entry points. So these entry points
keep their flags in a `flags.FlagValues` of their own and parse an argument list with `parse`,
which keeps the conventions their users rely on: `-h`/`--help`, `--no-NAME` for a boolean flag
(absl's own spelling `--noNAME` works too), and bad usage as one `app.UsageError` line.

The entry points on absl's global flags with a `--config` file (`mlgraph.main`, `evaluate`,
`bench`) parse with `parse_config_flags`, which says in one line what is wrong with the config
file or a `--config.FIELD=VALUE` override (`config_problem`).

Also here, for every entry point: `quiet_logs`, which keeps other libraries' INFO logs out of
the commands' output, and `load_problem`, why a `--config` file did not load.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from collections.abc import Sequence

import ml_collections
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
    except (AttributeError, KeyError) as e:  # a `--config.FIELD` override the config lacks
        raise app.UsageError(config_problem(e, argv)) from None


def parse_config_flags(argv: list[str]) -> list[str]:
    """An `app.run` flags parser for an entry point on absl's global FLAGS with a `--config`
    file: a config that does not load, an override of a field it lacks or a bad flag is one
    `error:` line on stderr and exit status 2.

    Returns:
      The positional arguments, after the program name (`argv[0]`).
    """
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if config is not None:
            config.keys()  # a config file that failed to load raises only when used
        return rest
    except (OSError, AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        print(f"error: {config_problem(e, argv[1:])}", file=sys.stderr)
    sys.exit(2)


def config_problem(error: Exception, args: Sequence[str]) -> str:
    """One line for an `error` parsing the command line `args` (without the program name) of
    an entry point with a `--config` file: the file does not load, an override names a field
    the config lacks (`--config.FIELD=VALUE: ...`, naming the config file, the level and its
    fields), or absl's own message on one line."""
    path = _last_value(args, "--config")
    if isinstance(error, OSError):
        return f"--config {path}: cannot load the config ({load_problem(error)})"
    text = " ".join(str(error).replace("\\n", "\n").replace("\\'", "'").split())
    if "Error whilst parsing config file" in str(error):
        # ml_collections puts the whole traceback of get_config's error in its message.
        reason = [line for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
        return f"--config {path}: {reason[-1].split(': ', 1)[-1]}"
    overrides = [a for a in args if re.match(r"--?(no)?config\.", a)]
    found = _unknown_override(path, overrides) if path and overrides else None
    # A KeyError's text comes quoted.
    return found or (text[1:-1] if text[:1] in "'\"" and text[-1:] == text[:1] else text)


def _last_value(args: Sequence[str], name: str) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in `args`, None without one."""
    value = None
    for i, arg in enumerate(args):
        if arg in (name, name[1:]) and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith((f"{name}=", f"{name[1:]}=")):
            value = arg.split("=", 1)[1]
    return value


def _unknown_override(path: str, overrides: Sequence[str]) -> str | None:
    """`OVERRIDE: why` for the first of `overrides` that names a field the config at `path`
    lacks, or None (also when the file itself does not load: absl's message says why)."""
    file, _, arg = path.partition(":")  # `NAME.py:ARG` calls get_config(ARG), as absl does
    try:
        spec = importlib.util.spec_from_file_location("mlgraph_config_file", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception:  # only to explain an override: absl's message stands otherwise
        return None
    for override in overrides:
        field = re.sub(r"^--?(no)?config\.", "", override.split("=", 1)[0])
        problem = _field_problem(config, field.split("."), path)
        if problem:
            return f"{override}: {problem}"
    return None


def _field_problem(
    config: ml_collections.ConfigDict, names: Sequence[str], path: str
) -> str | None:
    """Why `config.<names joined by dots>` is not a field of `config` (loaded from `path`), or
    None when it is: a misspelt name gets its close match, another its level's fields."""
    node, where = config, "config"
    for name in names:
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            return f"{where} of {path} is a {type(node).__name__}, not a group of fields"
        fields = sorted(str(k) for k in node.keys())
        if name not in fields:
            close = difflib.get_close_matches(name, fields, 1, 0.75)
            if close:
                return f"no config field '{name}' (did you mean \"{close[0]}\"?)"
            return (
                f"no config field '{name}' in {where} of {path} (its fields: {', '.join(fields)})"
            )
        node, where = node[name], f"{where}.{name}"
    return None


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
