"""SIGTERM and SIGINT as a request to stop after the current step with a checkpoint.

What a preemptible TPU VM, a SLURM job at its time limit or a user's Ctrl-C sends. The training
loop asks `StopSignals.should_stop(n)` after each of its steps (n counts the steps of this run
from 1) and, when it says so, finishes the step, writes a checkpoint and returns normally.

* One process: a Python handler sets a flag.
* Several processes (`jax.distributed`): JAX's preemption service catches SIGTERM on any host
  and all processes agree on the step to stop at (`reached_preemption_sync_point`), so they
  save the same step; a SIGINT is handed to that service as a SIGTERM to the same process.
  The counter starts at 1 in every run, so a notice that arrives before the first step is
  honoured at the first step.

A SIGINT is acknowledged at once on stderr (someone at a terminal pressed Ctrl-C); a second
SIGINT (or a second SIGTERM in one process) exits at once, status 128 + the signal's number,
without a checkpoint: the run resumes from its last one.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

from mlgraph.errors import warn


class StopSignals:
    """Context manager: SIGTERM and SIGINT handlers for the duration of a run.

    Args:
      on_exit: called before a second signal ends the process at once (e.g. to release the
        workdir's lock).
    """

    def __init__(self, on_exit: Callable[[], None] | None = None):
        self.received: str | None = None  # the first signal's name
        self._on_exit = on_exit
        self._previous: dict[int, object] = {}
        self._multi = False

    def __enter__(self) -> StopSignals:
        self._multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        # Several processes: SIGTERM stays with JAX's preemption service (its C++ handler).
        signums = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is not None:
            # os.write: safe wherever the main thread was interrupted (print may not be).
            os.write(
                2, f"{name} again: exiting now; the run resumes from its last checkpoint\n".encode()
            )
            if self._on_exit is not None:
                self._on_exit()
            os._exit(128 + signum)
        self.received = name
        if signum == signal.SIGINT:  # someone at a terminal: say that it was heard
            os.write(
                2,
                b"SIGINT: stopping after this step with a checkpoint; Ctrl-C again exits at once\n",
            )
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

    def should_stop(self, steps_this_run: int) -> bool:
        """Whether to stop after this step (call it after every step, on every process)."""
        if not self._multi:
            return self.received is not None
        try:
            return multihost_utils.reached_preemption_sync_point(steps_this_run)
        except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service)
            if steps_this_run == 1:
                warn(f"SIGTERM cannot stop this run with a checkpoint: {e}")
            return False

    def describe(self) -> str:
        """What stopped the run, for its last line."""
        if self.received is not None:
            return self.received
        return "a preemption notice (SIGTERM to one of the processes)"
