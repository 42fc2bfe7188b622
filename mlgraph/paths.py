"""The one path type for the files mlgraph reads and writes outside the data records.

Every such path (the workdir and what is in it, `init_from`, `embed_path`, `graph_path`, the
converter's `--output`, evaluate/viz/predict outputs) goes through `path()`, which returns an
`etils.epath.Path`: a local path behaves as `pathlib` would (made absolute, as before); a
cloud path (`gs://...`, `s3://...`) is read and written through fsspec, with the optional extra
that provides its backend (`pip install 'mlgraph[gcs]'` installs gcsfs). Orbax and TensorStore
take the same `gs://` strings natively, so checkpoints need no staging.

Object stores have no append, no exclusive create and no rename of folders: `append_text`,
`create_new` and `touch` do what a local file does with one whole-object write.

A storage fault (a full disk, a read-only mount, a bucket that cannot be reached or is not
authorised) is one line: `storage_fault` says what it is, whichever layer raised it (OSError,
TensorStore's status, gcsfs, aiohttp, google-auth), and `faults_as_errors` turns it into a
`StorageError` naming the path, the space needed and free, and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import io
import logging
import os
import re
import shutil
from collections.abc import Iterator
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

# How the storage of each scheme finds its credentials (the README's Cloud Storage section).
CREDENTIALS = {
    "gs": "gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS=KEY.json",
    "s3": "aws configure, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}
CREDENTIALS["gcs"] = CREDENTIALS["gs"]

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
        quiet_cloud_echoes()
        return epath.Path(os.fspath(p))
    return epath.Path(os.fspath(p)).absolute()


def append_text(p: epath.Path, text: str) -> None:
    """Append `text` to the file `p` (created if missing), whole or not at all: a write that
    fails part way (a full disk) is cut off again, so the file keeps what it held. On object
    stores, which have no append, the object is rewritten whole (fine for logs of a few
    thousand lines)."""
    if not is_cloud(p):
        fd = os.open(os.fspath(p), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                rest = memoryview(text.encode())
                while rest:
                    rest = rest[os.write(fd, rest) :]
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
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
    try:
        tmp.write_text(text)
    except OSError:
        tmp.unlink(missing_ok=True)  # `p` is untouched
        raise
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
    if is_cloud(p):
        quiet_cloud_echoes()
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


# ---------------------------------------------------------------------------------------------
# Storage faults
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fault:
    """A storage fault in a few words (`words`), what usually mends it (`fix`), and whether
    figures of space say more (`no_space`)."""

    words: str
    fix: str
    no_space: bool = False


_BY_ERRNO = {
    errno.ENOSPC: Fault("no space left on device", "free some space", no_space=True),
    errno.EDQUOT: Fault("disk quota exceeded", "free some space or raise the quota", True),
    errno.EROFS: Fault("read-only file system", "make it writable"),
    errno.EACCES: Fault("permission denied", "make it writable"),
    errno.EPERM: Fault("operation not permitted", "make it writable"),
    errno.EIO: Fault("input/output error", "check the disk"),
}
# TensorStore reports an OS error inside its status text, e.g. `... [os_error_code='28']`.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
# TensorStore's status codes for a cloud store it cannot reach or may not use.
_TENSORSTORE_CLOUD = {
    "UNAVAILABLE": "unreachable",
    "DEADLINE_EXCEEDED": "unreachable",
    "PERMISSION_DENIED": "unauthorised",
    "UNAUTHENTICATED": "unauthorised",
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then its causes and contexts (each once)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _kinds(error: BaseException) -> set[str]:
    """The names of `error`'s classes (the optional libraries need not be importable)."""
    return {c.__name__ for c in type(error).__mro__}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _cloud_fault(kind: str, detail: str, scheme_: str | None) -> Fault:
    """A fault of a cloud store: 'unreachable' or 'unauthorised'."""
    hint = CREDENTIALS.get(scheme_ or "gs", CREDENTIALS["gs"])
    if kind == "unreachable":
        return Fault(
            f"cannot reach the storage service ({detail})",
            f"check the network and the credentials ({hint}; README: Cloud Storage)",
        )
    return Fault(
        f"not authorised ({detail})", f"check the credentials ({hint}; README: Cloud Storage)"
    )


def _one_fault(error: BaseException, scheme_: str | None) -> Fault | None:
    """The fault `error` itself reports (not its causes), or None."""
    kinds, detail = _kinds(error), _first_line(error)
    if kinds & {"ClientConnectorError", "ServerTimeoutError", "gaierror", "TransportError"}:
        return _cloud_fault("unreachable", detail, scheme_)
    if "GoogleAuthError" in kinds:
        return _cloud_fault("unauthorised", detail, scheme_)
    code = getattr(error, "code", None) if "HttpError" in kinds else None
    if code in (401, 403):
        return _cloud_fault("unauthorised", detail, scheme_)
    if isinstance(error, OSError) and error.errno in _BY_ERRNO:
        return _BY_ERRNO[error.errno]
    if isinstance(error, ValueError):  # TensorStore's status as a ValueError
        found = _TENSORSTORE_ERRNO.search(str(error))
        if found and int(found.group(1)) in _BY_ERRNO:
            return _BY_ERRNO[int(found.group(1))]
        status = str(error).split(":", 1)[0]
        if status in _TENSORSTORE_CLOUD:
            return _cloud_fault(_TENSORSTORE_CLOUD[status], detail, scheme_)
    return None


def storage_fault(error: BaseException, p: PathLike | None = None) -> Fault | None:
    """The storage fault behind `error` (it, its causes or contexts), or None when it is not
    one: a full disk or quota, a read-only or unwritable folder, an I/O error, or a cloud
    store that cannot be reached or is not authorised (`p`: the path used, whose scheme picks
    the credentials hint)."""
    scheme_ = scheme(p) if p is not None else None
    return next((f for e in _chain(error) if (f := _one_fault(e, scheme_)) is not None), None)


def size_text(num_bytes: float) -> str:
    """`num_bytes` for people: '512 B', '266.0 KiB', '1.3 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError  # unreachable


def free_bytes(p: PathLike) -> int | None:
    """Free space on the disk that holds the local path `p` (or its nearest existing parent);
    None for a cloud path."""
    if is_cloud(p):
        return None
    folder = epath.Path(os.fspath(p)).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(os.fspath(folder)).free
    except OSError:
        return None


def fault_message(fault: Fault, what: str, p: PathLike, needed: int | None, then: str) -> str:
    """`cannot WHAT: WORDS (N needed, M free); FIX, THEN` (the figures for a full disk)."""
    figures = []
    if fault.no_space:
        if needed is not None:
            figures.append(f"about {size_text(needed)} needed")
        free = free_bytes(p)
        if free is not None:
            figures.append(f"{size_text(free)} free")
    space = f" ({', '.join(figures)})" if figures else ""
    return f"cannot {what}: {fault.words}{space}; {fault.fix}{', ' + then if then else ''}"


@contextlib.contextmanager
def faults_as_errors(
    p: PathLike, what: str | None = None, needed: int | None = None, then: str = ""
) -> Iterator[None]:
    """Turn a storage fault inside the block into a one-line `StorageError` (other errors
    pass unchanged).

    Args:
      p: the path the block reads or writes.
      what: what the block does, for the message (default: 'write P').
      needed: bytes the write needs, shown for a full disk.
      then: what to do once the fault is mended (e.g. 'then run the same command').
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        fault = storage_fault(e, p)
        if fault is None:
            raise
        message = fault_message(fault, what or f"write {os.fspath(p)}", p, needed, then)
        raise StorageError(message) from e


class _QuietCloudEchoes(logging.Filter):
    """Drops gcsfs's log records of a failure it raises to its caller anyway (the caller
    reports it in one line), and its notice that it could not tell a bucket's layout (it
    falls back to the layout mlgraph uses)."""

    ECHOES = ("out of retries on exception", "non-retriable exception", "bucket type")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(echo in message for echo in self.ECHOES)


_QUIET_CLOUD_ECHOES = _QuietCloudEchoes()


def quiet_cloud_echoes() -> None:
    """Keep gcsfs's echoes of the failures it raises off the terminal (added once)."""
    logging.getLogger("gcsfs").addFilter(_QUIET_CLOUD_ECHOES)
