"""Evaluation that steers training (`--eval-every`, `--early-stop`): the validation split
evaluated on a cadence, the history of those evaluations, early stopping on validation
log-loss, and the best state kept so that the final metrics come from it.

The best state lives in host or device memory as `trainer.to_logical` copies, or, with
`--checkpoint-dir`, in the checkpoint directory's `best/` (one checkpoint), where a
resumed run finds it again.
"""

from __future__ import annotations

import os

import numpy as np

from recsys import metrics
from recsys.training import Checkpointer, CheckpointMismatch


class MemoryKeeper:
    """The best state as a copy beside the training state (one more state's memory)."""

    def __init__(self):
        self.tree = None

    def keep(self, step: int, trainer, state) -> None:
        self.tree = trainer.to_logical(state)

    def discard_after(self, step: int) -> None:
        raise AssertionError("a run without checkpoints does not resume")

    def restore(self, trainer, template, step: int):
        return trainer.from_logical(template, self.tree)

    def close(self) -> None:
        self.tree = None


class CheckpointKeeper:
    """The best state as the one checkpoint in `directory`."""

    def __init__(self, directory: str):
        self.checkpoints = Checkpointer(directory, keep=1)

    def keep(self, step: int, trainer, state) -> None:
        self.checkpoints.save(step, trainer, state, {"best_step": step})

    def discard_after(self, step: int) -> None:
        """Forgets a best state written after `step` (by a run that then failed before
        its next checkpoint): the resumed run evaluates those steps again."""
        manager = self.checkpoints.manager
        for later in [s for s in manager.all_steps() if s > step]:
            manager.delete(later)

    def restore(self, trainer, template, step: int):
        self.checkpoints.wait()
        saved = self.checkpoints.latest_step()
        if saved != step:
            raise CheckpointMismatch(
                f"{self.checkpoints.directory} holds the state of step {saved}, "
                f"the run's best validation log-loss was at step {step}"
            )
        return self.checkpoints.restore(trainer, template)[0]

    def close(self) -> None:
        self.checkpoints.close()


class Validator:
    """Decides when to evaluate on the validation split and when to stop, and keeps the
    best state; `to_json` and `resume` carry its history through checkpoints."""

    def __init__(
        self, every: int, patience: int | None, checkpoint_dir: str | None, target_auc: float | None = None
    ):
        self.every, self.patience, self.target_auc = every, patience, target_auc
        self.keeper = (
            CheckpointKeeper(os.path.join(checkpoint_dir, "best")) if checkpoint_dir else MemoryKeeper()
        )
        self.history: list[dict] = []
        self.best_step: int | None = None
        self.stopped = False
        self.reached_target: int | None = None  # the step whose validation reached target_auc
        self.seconds = 0.0  # spent evaluating, kept out of the training rate

    def due(self, done: int, last: int) -> bool:
        """Whether to evaluate after `done` steps of a run that ends at step `last`."""
        return done % self.every == 0 or done == last

    @property
    def best(self) -> dict | None:
        return next((h for h in self.history if h["step"] == self.best_step), None)

    def record(self, step: int, probs: np.ndarray, labels: np.ndarray, trainer, state) -> bool:
        """Adds the evaluation after `step` steps, keeps `state` if it is the best so far;
        returns whether training should stop."""
        entry = {"step": step, "auc": metrics.auc(labels, probs), "logloss": metrics.logloss(labels, probs)}
        self.history.append(entry)
        best = self.best
        if best is None or entry["logloss"] < best["logloss"]:
            self.best_step = step
            self.keeper.keep(step, trainer, state)
        since_best = sum(h["step"] > self.best_step for h in self.history)
        if self.target_auc is not None and entry["auc"] >= self.target_auc:
            self.reached_target = step
        self.stopped = self.reached_target is not None or (
            self.patience is not None and since_best >= self.patience
        )
        return self.stopped

    def best_state(self, trainer, state, step: int):
        """The best state kept (`state` itself when it is the best, or none was kept)."""
        if self.best_step is None or self.best_step == step:
            return state
        return self.keeper.restore(trainer, state, self.best_step)

    def to_json(self) -> dict:
        return {
            "history": self.history,
            "best_step": self.best_step,
            "stopped": self.stopped,
            "reached_target": self.reached_target,
        }

    def resume(self, saved: dict | None, step: int) -> None:
        """Continues from a checkpoint at `step` whose metadata held `saved` (`to_json`)."""
        if saved is None:  # checkpoints of a run that did not validate are refused before this
            raise CheckpointMismatch("the checkpoint holds no validation history")
        self.history = list(saved["history"])
        self.best_step = saved["best_step"]
        self.stopped = saved["stopped"]
        self.reached_target = saved.get("reached_target")
        self.keeper.discard_after(step)

    def close(self) -> None:
        self.keeper.close()
