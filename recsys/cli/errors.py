"""How `recsys-train` reports what went wrong: one line, and an exit status.

Status 2: the run cannot start or read its input as given (flags, data, a plan, a
checkpoint from another configuration, a missing file). Status 1: a failure during
training. `--debug` adds the traceback.
"""

from __future__ import annotations

import json

from mesh.planner import PlanningError
from recsys.data.examples import DataError
from recsys.data.formats import LineError
from recsys.training import CheckpointMismatch

USAGE, FAILURE = 2, 1


class UsageError(ValueError):
    """A setting or combination of flags the run cannot use."""


class TrainingFailure(RuntimeError):
    """An error raised while training, with the step it happened in."""

    def __init__(self, where: str, error: Exception):
        super().__init__(f"{where}: {_describe(error)}")
        self.error = error


# Input errors: found in the flags, the data (even while streaming it), a plan or a
# checkpoint, whenever they turn up.
_INPUT_ERRORS = (
    UsageError,
    DataError,
    LineError,
    CheckpointMismatch,
    PlanningError,
    json.JSONDecodeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_input_error(error: Exception) -> bool:
    """An error in what the run was given, whenever it turns up (data is read while training)."""
    return isinstance(error, _INPUT_ERRORS)


def exit_status(error: Exception) -> int:
    """USAGE for input errors, and for any ValueError before training (a setting that a
    library check refused); FAILURE for everything else."""
    if isinstance(error, TrainingFailure):
        return USAGE if isinstance(error.error, _INPUT_ERRORS) else FAILURE
    return USAGE if isinstance(error, (*_INPUT_ERRORS, ValueError)) else FAILURE


def message(error: Exception) -> str:
    """The error's one line."""
    return str(error) if isinstance(error, TrainingFailure) else _describe(error)


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {(error.strerror or type(error).__name__).lower()}"
    text = _one_line(str(error))
    if isinstance(error, _INPUT_ERRORS + (ValueError,)):  # their messages say what is wrong
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str) -> str:
    """A message's lines joined: "a:\n  b\n  c" -> "a: b; c"."""
    out = ""
    for line in filter(None, (x.strip() for x in text.splitlines())):
        out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out
