"""What a build was made from: a record of its source files, kept in the built folder, so that
building again into the same `--data_dir` can tell an unchanged source (the build is reused)
from a changed one (rebuilt, or refused without `--rebuild`).

The record holds every file under the builder's source paths (`source_paths` of
`builder_lib.MultiLabelBuilder`: by default all of `manual_dir`, the built folder left out when it
lies inside): text and annotation files (`HASHED` suffixes) by a SHA-256 of their content, as a
list fixed in place may keep its size and time; any other file (images, h5 arrays) by size and
modification time, which hashing every image would cost too much to read. A source path that
does not exist is left out, so that restoring it later counts as a file added. Paths
under `manual_dir` are recorded relative to it, so a moved download still matches its build.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable

RECORD = "source_files.json"
HASHED = frozenset({".txt", ".json", ".xml", ".csv", ".tsv", ".pkl"})
MISSING = "missing"
# How many names a change lists before "and N more".
SHOWN = 3


def option_key(name: str) -> str:
    """The record's entry of a build option that decides what the build holds (e.g. the image
    size limit): changing the option changes the build as a changed file would."""
    return f"option --{name}"


def file_state(path: str | os.PathLike) -> str:
    """How `path` is recorded: 'sha256:<hex>', 'size:mtime_ns' or 'unreadable'; `MISSING` when
    there is no such file."""
    try:
        if os.path.splitext(path)[1].lower() in HASHED:
            with open(path, "rb") as f:
                return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        stat = os.stat(path)
    except FileNotFoundError:
        return MISSING  # also a link to nothing
    except OSError:
        return "unreadable"  # the build reports it if it reads the file
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _key(path: str, root: pathlib.Path) -> str:
    """`path` as the record names it: relative to `root` when under it, else absolute."""
    inside = pathlib.Path(path).is_relative_to(root)
    key = os.path.relpath(path, root) if inside else os.path.abspath(path)
    return pathlib.PurePath(key).as_posix()


def _files_under(folder: pathlib.Path, root: pathlib.Path, exclude: str) -> dict[str, str]:
    """{key: `file_state`} of the files under `folder` (links followed, each real folder once),
    less `exclude`'s tree."""
    files, seen = {}, set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real == exclude or real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        prefix = _key(parent, root)  # once per folder: 100,000s of images share a few
        prefix = "" if prefix == "." else f"{prefix}/"
        for name in names:
            state = file_state(os.path.join(parent, name))
            if state != MISSING:
                files[prefix + name] = state
    return files


def record(
    paths: Iterable[pathlib.Path], root: pathlib.Path, exclude: str | pathlib.Path
) -> dict[str, str]:
    """{path: `file_state`} of every file in or under `paths`; a missing file is left out (one
    not there: restoring it adds it).

    Args:
      paths: the files and folders a build reads.
      root: `manual_dir`; paths under it are keyed relative to it, others absolutely.
      exclude: the built data folder, left out where it lies inside a source folder.
    """
    exclude = os.path.realpath(exclude)
    files = {}
    for path in paths:
        if path.is_dir():
            files.update(_files_under(path, root, exclude))
        elif (state := file_state(path)) != MISSING:
            files[_key(str(path), root)] = state
    return dict(sorted(files.items()))


def write(built: pathlib.Path, files: dict[str, str]) -> None:
    """Keep `files` (a `record`) in the built folder `built`, with the size of every file the
    build wrote so far (its data files), by which a partly copied build is told apart."""
    output = {p.name: p.stat().st_size for p in sorted(built.iterdir()) if p.is_file()}
    doc = {"files": files, "built": output}
    (built / RECORD).write_text(json.dumps(doc, separators=(",", ":")))


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def difference(old: dict[str, str], new: dict[str, str]) -> str:
    """What changed from `old` to `new` (two `record`s) in a few words; '' when nothing did."""
    kinds = {
        "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k]),
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
    }
    return "; ".join(f"{kind}: {_names(keys)}" for kind, keys in kinds.items() if keys)


def change_since_built(built: pathlib.Path, files: dict[str, str]) -> str:
    """Why the build in `built` is not the build of the source `files` (a `record`), as one
    clause; '' when it is.

    A folder without `dataset_info.json`, or missing a data file or holding one of another size
    than the build wrote, is an interrupted or partly copied build, never complete; one without
    a record was written before records were kept, so what it was built from is unknown.
    """
    if not (built / "dataset_info.json").is_file():
        return "an incomplete build (no dataset_info.json)"
    try:
        doc = json.loads((built / RECORD).read_text())
        old, output = dict(doc["files"]), dict(doc["built"])
    except FileNotFoundError:
        return f"built without a record of its source files ({RECORD})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its record of the source files ({RECORD}) is unreadable"
    for name, size in output.items():
        path = built / name
        if not path.is_file() or path.stat().st_size != size:
            return f"an incomplete build ({name} is missing or not the size it was written)"
    diff = difference(old, files)
    return f"its source files changed since it was built ({diff})" if diff else ""
