"""Users' text files (class lists, split files): UTF-8, or a one-line error that says where."""

from __future__ import annotations

import pathlib

from mlgraph.errors import DataError


def read_utf8(path: str | pathlib.Path) -> str:
    """The text of `path`, decoded as UTF-8 (a byte-order mark is dropped).

    Raises:
      DataError: the file is missing, or not UTF-8: names the file, the first bad byte and
        its offset and line.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def read_names(path: str | pathlib.Path) -> list[str]:
    """One name a line (surrounding spaces and blank lines dropped), e.g. class names."""
    return [line.strip() for line in read_utf8(path).splitlines() if line.strip()]
