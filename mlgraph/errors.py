"""User-facing errors and warnings. The command-line entry points print an error as one line
and exit 2; `warn` prints a warning as one line and carries on."""


class MlgraphError(Exception):
    """A problem with the user's input (config, files, data) that a message can explain."""


class ConfigError(MlgraphError):
    """A config field is missing, misspelt or has a value of the wrong kind."""


class DataError(MlgraphError):
    """A dataset folder or file is missing, incomplete or malformed."""


class WorkdirError(MlgraphError):
    """The workdir cannot be used (missing parent, written by another config, ...)."""


class StorageError(MlgraphError):
    """A path names a storage system mlgraph cannot reach (a cloud scheme without its backend
    installed, or data records where the reader cannot open them)."""


def warn(message: str) -> None:
    """Print `warning: <message>` as one line on stderr (process 0 only: every process runs the
    same code), above any tqdm progress bar (TFDS's while building, predict's) rather than
    glued to it."""
    import sys

    import jax

    if jax.process_index() == 0:
        line = f"warning: {message}"
        if "tqdm" in sys.modules:  # a bar may be drawn: tqdm clears it, prints, redraws it
            sys.modules["tqdm"].tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)
