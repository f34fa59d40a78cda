"""A watchdog that turns a stalled step into one clear error line.

A step that stops making progress (a collective some device never joins, a device that
stopped answering) blocks inside XLA, where Python cannot interrupt it, and XLA:CPU
aborts the whole process with a C++ stack dump after 40 s. The watchdog waits for each
step's result on a thread of its own. When one has been running for longer than
`timeout` seconds, it prints a line naming the step (and what the caller says of the
run) and ends the process with status 1: the stalled threads would never return, so
exiting is the only way out. `xla_collective_timeouts` moves XLA:CPU's own timeouts past
the watchdog's, so the watchdog speaks first.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import jax

# XLA:CPU's flags for how long a collective may wait before it warns that it may be
# stuck and before it aborts the process.
_WARN_FLAG = "--xla_cpu_collective_call_warn_stuck_timeout_seconds"
_ABORT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


def xla_collective_timeouts(timeout: float, flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with XLA:CPU's collective timeouts past `timeout`,
    unless the user set them. XLA reads them when the first backend starts."""
    if timeout <= 0:
        return flags
    extra = []
    if _WARN_FLAG not in flags:
        extra.append(f"{_WARN_FLAG}={int(timeout) + 30}")
    if _ABORT_FLAG not in flags:
        extra.append(f"{_ABORT_FLAG}={int(timeout) + 60}")
    return " ".join([flags, *extra]).strip()


class StepWatchdog:
    """Watches steps in the order they were dispatched.

    Args:
      timeout: seconds a step may run (from when the previous one finished); 0: never.
      describe: what to say of the run after the step, e.g. "strategy grid, mesh
        host=2,device=4".
      on_stall: called with the error line instead of printing it and exiting (tests).
    """

    def __init__(self, timeout: float, describe: str = "", on_stall: Callable[[str], None] | None = None):
        self.timeout, self.describe = timeout, describe
        self._on_stall = on_stall or _exit_with
        self._pending: queue.Queue = queue.Queue()
        self._waiting: tuple[str, float] | None = None
        self._closed = threading.Event()
        self._threads = []
        if timeout > 0:
            for target in (self._wait_in_order, self._check):
                thread = threading.Thread(target=target, daemon=True, name=f"recsys-{target.__name__}")
                thread.start()
                self._threads.append(thread)

    def watch(self, what: str, value) -> None:
        """`value` (arrays) is the result of `what` ("step 12"): it must be ready in time."""
        if self.timeout > 0:
            self._pending.put((what, value))

    def close(self) -> None:
        """Stops watching (the steps dispatched so far are no longer timed)."""
        self._closed.set()
        self._pending.put(None)
        for thread in self._threads:
            thread.join(timeout=1)

    def __enter__(self) -> StepWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_in_order(self) -> None:
        while not self._closed.is_set():
            item = self._pending.get()
            if item is None:
                return
            what, value = item
            self._waiting = (what, time.monotonic())
            try:
                jax.block_until_ready(value)
            except Exception:  # the step's own error reaches the caller where it reads it
                pass
            self._waiting = None

    def _check(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while not self._closed.wait(interval):
            waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout:
                run = f" ({self.describe})" if self.describe else ""
                self._on_stall(
                    f"{waiting[0]} did not finish within {self.timeout:g} s{run}: the devices "
                    "stopped making progress; raise --step-timeout if a step can take this long"
                )
                return


def _exit_with(line: str) -> None:
    print(f"recsys-train: error: {line}", file=sys.stderr, flush=True)
    os._exit(1)
