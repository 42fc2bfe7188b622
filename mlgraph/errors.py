"""User-facing errors. The command-line entry points print these as one line and exit 2."""


class MlgraphError(Exception):
    """A problem with the user's input (config, files, data) that a message can explain."""


class ConfigError(MlgraphError):
    """A config field is missing, misspelt or has a value of the wrong kind."""


class DataError(MlgraphError):
    """A dataset folder or file is missing, incomplete or malformed."""


class WorkdirError(MlgraphError):
    """The workdir cannot be used (missing parent, written by another config, ...)."""
