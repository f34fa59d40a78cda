"""`--log-dir DIR`: the run's curves as TensorBoard event files (`tensorboard --logdir
DIR`): the training loss and samples/s every 20 steps, the validation metrics at each
validation, the evaluation metrics at the end.
Written by process 0 only, through tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

import jax


class Curves:
    def __init__(self, directory: str | None):
        self.writer = None
        if directory is not None and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(directory)

    def add(self, step: int, values: dict[str, float | None]) -> None:
        """Scalars at `step`, by name ("train/loss"); None values are left out."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
