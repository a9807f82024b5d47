"""Stopping a run cleanly: SIGTERM (a preemption, `kill`) or the first Ctrl-C (SIGINT) sets a flag, and the
loop saves a checkpoint and returns at the next step; a second Ctrl-C exits at once.

With several processes the notice may reach one host only: JAX's preemption sync manager (started by
jax.distributed.initialize) catches SIGTERM on any host and `reached_preemption_sync_point(step)` becomes
true on every host at the same step, where all of them save and stop.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class StopRequest:
    """A context that owns SIGTERM and SIGINT while the steps run; `should_stop(step)` says when to stop."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.stopped = False  # should_stop said so
        self._previous = {}

    def __enter__(self):
        # Several processes: JAX's preemption service owns SIGTERM, and a flag set on one host only would
        # leave the others waiting in the next collective.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # The next Ctrl-C ends the process at once (the default action: no traceback, no cleanup).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            log.warning("Ctrl-C: saving a checkpoint and stopping after this step (Ctrl-C again to quit now)")
        else:
            log.warning("%s: saving a checkpoint and stopping after this step", name)
        self.requested, self.signal_name = True, name

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                self.stopped = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled
                self.stopped = False
        else:
            self.stopped = self.requested
        return self.stopped

    @property
    def reason(self) -> str:
        return "Ctrl-C" if self.signal_name == "SIGINT" else (self.signal_name or "preemption")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if signum == signal.SIGINT and self.signal_name == "SIGINT":
                continue  # after one Ctrl-C the next still quits at once, however far the shutdown got
            signal.signal(signum, previous)
