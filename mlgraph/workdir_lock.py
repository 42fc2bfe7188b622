"""One run per workdir: `DIR/lock.json` names the run that holds it (host, pid, start time).

A second run on a held workdir is refused with a `WorkdirError` naming the holder. A lock whose
run is gone is taken over with a one-line warning: on the same host, when its process no longer
exists; on any host, when its heartbeat (the file's modification time, touched every
`HEARTBEAT_S` by the holder) is older than `STALE_S`, as after a machine that was lost without
a chance to clean up. A run that ends in any way its Python code sees (finished, stopped,
an error) removes its lock.

On several processes only process 0 takes the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mlgraph import paths
from mlgraph.errors import StorageError, WorkdirError, warn

LOCK_FILE = "lock.json"
# A run writes its workdir throughout: where that cannot be, a writable copy resumes the run.
WRITABLE_COPY = "or copy the workdir to a writable disk and pass the copy as --workdir"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # no heartbeat for this long: the holder is gone


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe(holder: dict) -> str:
    """'host H, pid P, started T' of a lock's contents."""
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def stale_reason(holder: dict, age_s: float) -> str | None:
    """Why the run that wrote `holder` (a lock `age_s` seconds since its last heartbeat) is
    gone, or None while it may be running."""
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname()
    if here and isinstance(pid, int) and pid > 0 and not _process_exists(pid):
        return "its process no longer exists"
    if age_s > STALE_S:
        return f"no heartbeat for {age_s / 60:.0f} min"
    return None


class WorkdirLock:
    """The lock of one workdir, held from `acquire` to `release` (process 0 only)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = paths.path(workdir, "--workdir") / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _write_new(self) -> bool:
        """Create the lock file if there is none (atomically); whether this call created it."""
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
            "token": self.token,
        }
        return paths.create_new(self.path, json.dumps(record, indent=2))

    def _read(self) -> tuple[dict, float] | None:
        """(contents, seconds since its heartbeat) of the current lock, None when there is none."""
        try:
            text, mtime = self.path.read_text(), paths.mtime(self.path)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # torn write of a crashed run: treated as gone once it is old
        if not isinstance(holder, dict):
            holder = {}
        return holder, time.time() - mtime

    def acquire(self) -> None:
        """Take the lock, or take over a stale one (one warning line).

        Raises:
          WorkdirError: another live run holds it; the message names it.
          StorageError: the lock cannot be written (a read-only, full or unreachable workdir).
        """
        with paths.faults_as_errors(self.path, then=WRITABLE_COPY):
            self._take()
        self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._heartbeat.start()

    def _take(self) -> None:
        """Create the lock file, taking over a stale one."""
        for _ in range(3):  # a lock removed between our reads: try again
            if self._write_new():
                break
            found = self._read()
            if found is None:
                continue
            holder, age = found
            reason = stale_reason(holder, age)
            if reason is None:
                raise WorkdirError(
                    f"--workdir {self.path.parent}: in use by another run ({describe(holder)}; "
                    f"{self.path}); wait for it to end or use another workdir"
                )
            warn(
                f"--workdir {self.path.parent}: taking over the lock of a run that is gone "
                f"({describe(holder)}; {reason})"
            )
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            raise WorkdirError(f"--workdir {self.path.parent}: could not create {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                paths.touch(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        self._stop.set()
        found = self._read()
        if found is not None and found[0].get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path) -> Iterator[WorkdirLock]:
    """Hold `workdir`'s lock for the duration of the block (on every process: process 0
    takes it and tells the others whether it did).

    Raises:
      WorkdirError: the workdir is in use by another live run.
      StorageError: the lock cannot be written.
    """
    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except (WorkdirError, StorageError) as e:
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is None and not int(ok):
            error = WorkdirError(f"--workdir {lock.path.parent}: process 0 could not lock it")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if jax.process_index() == 0:
            lock.release()
