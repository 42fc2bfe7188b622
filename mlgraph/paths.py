"""The one path type for the files mlgraph reads and writes outside the data records.

Every such path (the workdir and what is in it, `init_from`, `embed_path`, `graph_path`, the
converter's `--output`, evaluate/viz/predict outputs) goes through `path()`, which returns an
`etils.epath.Path`: a local path behaves as `pathlib` would (made absolute, as before); a
cloud path (`gs://...`, `s3://...`) is read and written through fsspec, with the optional extra
that provides its backend (`pip install 'mlgraph[gcs]'` installs gcsfs). Orbax and TensorStore
take the same `gs://` strings natively, so checkpoints need no staging.

Object stores have no append, no exclusive create and no rename of folders: `append_text`,
`create_new` and `touch` do what a local file does with one whole-object write.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from typing import Any

from etils import epath

from mlgraph.errors import StorageError

# scheme -> (module that serves it through fsspec, the extra that installs it)
BACKENDS = {
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "s3": ("s3fs", "s3"),
}
# What a data dir on Cloud Storage needs: array_record opens files with the local file API.
DATA_ON_CLOUD = (
    "array_record (used by grain) reads local files only: mount the bucket with Cloud Storage "
    "FUSE (gcsfuse) and pass the mounted folder, or copy the data to a local disk"
)

PathLike = str | os.PathLike
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(p: PathLike) -> str | None:
    """The URI scheme of `p` ('gs' for gs://bucket/x), None for a local path."""
    match = _SCHEME.match(os.fspath(p))
    return match.group(1).lower() if match else None


def is_cloud(p: PathLike) -> bool:
    """Whether `p` names an object in cloud storage rather than a local file."""
    return scheme(p) is not None


def bucket(p: PathLike) -> str:
    """The bucket of the cloud path `p` with its scheme ('gs://b' for gs://b/x/y)."""
    s = scheme(p)
    rest = os.fspath(p).split("://", 1)[1]
    return f"{s}://{rest.split('/', 1)[0]}"


def check_backend(p: PathLike, what: str = "") -> None:
    """Raise a one-line `StorageError` when `p` is a cloud path whose fsspec backend is not
    installed (naming the extra that installs it); nothing for local paths.

    Args:
      p: the path.
      what: how the user gave it (e.g. '--workdir', 'config.init_from'), for the message.
    """
    s = scheme(p)
    if s is None:
        return
    where = f"{what} {os.fspath(p)}" if what else os.fspath(p)
    if s not in BACKENDS:
        known = ", ".join(f"{k}://" for k in BACKENDS)
        raise StorageError(f"{where}: unknown storage scheme {s}:// (mlgraph reads {known})")
    module, extra = BACKENDS[s]
    if importlib.util.find_spec(module) is None:
        raise StorageError(
            f"{where}: {s}:// paths need the {module} backend; install it with "
            f"pip install 'mlgraph[{extra}]'"
        )


def path(p: PathLike, what: str = "") -> epath.Path:
    """`p` as an `epath.Path`: local paths absolute (as `pathlib.Path(p).absolute()`), cloud
    paths as they are.

    Raises:
      StorageError: a cloud path whose backend is not installed (`check_backend`).
    """
    check_backend(p, what)
    if is_cloud(p):
        return epath.Path(os.fspath(p))
    return epath.Path(os.fspath(p)).absolute()


def append_text(p: epath.Path, text: str) -> None:
    """Append `text` to the file `p` (created if missing). On object stores, which have no
    append, the object is rewritten whole (fine for logs of a few thousand lines)."""
    if not is_cloud(p):
        with open(os.fspath(p), "a") as f:
            f.write(text)
        return
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)


def replace_text(p: epath.Path, text: str) -> None:
    """Replace the contents of `p` with `text` atomically: a temporary file and `os.replace`
    locally; one object write (atomic by itself) on object stores."""
    if is_cloud(p):
        p.write_text(text)
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def create_new(p: epath.Path, text: str) -> bool:
    """Create `p` holding `text` if it does not exist; whether this call created it.

    Atomic locally (O_EXCL). On object stores it is check-then-write, so two runs started in
    the same second could both win: the lock it serves is a guard against mistakes, not a
    mutex (the heartbeat and the holder's token catch the rare loser on release).
    """
    if not is_cloud(p):
        try:
            fd = os.open(os.fspath(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if p.exists():
        return False
    p.write_text(text)
    return True


def touch(p: epath.Path) -> None:
    """Set the modification time of the existing file `p` to now (an object is rewritten with
    the same contents: object stores keep no settable mtime)."""
    if is_cloud(p):
        p.write_bytes(p.read_bytes())
    else:
        os.utime(os.fspath(p))


def mtime(p: epath.Path) -> float:
    """The modification time of `p` in seconds since the epoch.

    Raises:
      FileNotFoundError: there is no such file.
    """
    if not is_cloud(p):
        return os.stat(os.fspath(p)).st_mtime
    if not p.exists():
        raise FileNotFoundError(os.fspath(p))
    return float(p.stat().mtime)


def move(src: epath.Path, dst: epath.Path) -> None:
    """Move the file or folder `src` to `dst` (a copy then a delete on object stores)."""
    if not is_cloud(src) and not is_cloud(dst):
        import shutil

        shutil.move(os.fspath(src), os.fspath(dst))
        return
    if src.is_dir():
        for child in src.iterdir():
            move(child, dst / child.name)
        with contextlib.suppress(OSError):
            src.rmtree(missing_ok=True)
    else:
        src.copy(dst, overwrite=True)
        src.unlink()


class CloudRecordWriter:
    """A tensorboardX record writer for object stores: the event file is kept in memory and
    the whole object is written on each flush (tensorboardX appends, object stores cannot)."""

    def __init__(self, target: str):
        self.path = epath.Path(target)
        self.buffer = io.BytesIO()
        self.closed = False

    def write(self, data: bytes) -> None:
        """Add the bytes of one record."""
        self.buffer.write(data)

    def flush(self) -> None:
        """Write the event file as it stands to the object store."""
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        """Flush a last time."""
        if not self.closed:
            self.flush()
            self.closed = True


class _CloudWriterFactory:
    """What tensorboardX's `register_writer_factory` expects for a URI prefix."""

    def open(self, target: str) -> Any:
        """A writer for the event file `target`."""
        return CloudRecordWriter(target)

    def directory_check(self, target: str) -> None:
        """Object stores need no folders made."""
        del target


def register_tensorboard() -> None:
    """Let tensorboardX's `SummaryWriter` write event files to every cloud scheme in
    `BACKENDS` (it knows s3:// through boto3 only)."""
    from tensorboardX import record_writer

    for s in BACKENDS:
        record_writer.register_writer_factory(s, _CloudWriterFactory())


def as_given(p: PathLike, what: str = "") -> epath.Path:
    """`p` as an `epath.Path` without making a local path absolute (for paths that are
    printed back to the user as they typed them).

    Raises:
      StorageError: a cloud path whose backend is not installed (`check_backend`).
    """
    check_backend(p, what)
    return epath.Path(os.fspath(p))


def save_figure(fig: Any, target: epath.Path, **kwargs: Any) -> None:
    """`fig.savefig(target, **kwargs)` for local and cloud targets (matplotlib writes local
    files only: a cloud target gets the PNG bytes in one write)."""
    if not is_cloud(target):
        fig.savefig(os.fspath(target), **kwargs)
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format=target.suffix.lstrip(".") or "png", **kwargs)
    target.write_bytes(buffer.getvalue())
