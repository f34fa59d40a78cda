"""`--profile STEPS`: a `jax.profiler` trace of a few train steps, for TensorBoard's
profile plugin or Perfetto (`plugins/profile/<run>/*.trace.json.gz` under the directory)."""

from __future__ import annotations

import jax


class StepProfile:
    """Traces the `steps` steps after `first` (which compiles, and is left out)."""

    def __init__(self, steps: int, directory: str, first: int):
        self.steps, self.directory, self.first = steps, directory, first
        self.active = False

    def __enter__(self) -> StepProfile:
        return self

    def after_step(self, step: int, loss: jax.Array) -> None:
        if not self.steps:
            return
        if step == self.first:
            jax.block_until_ready(loss)
            jax.profiler.start_trace(self.directory)
            self.active = True
        elif self.active and step == self.first + self.steps:
            jax.block_until_ready(loss)
            self._stop()

    def __exit__(self, *exc) -> None:
        if self.active:  # the run ended (or failed) inside the traced steps
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.active = False
