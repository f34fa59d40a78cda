"""The `recsys-train` command line: flags -> `RunConfig` (`flags`, `config`), what the run
trains with (`build`, `data`), the run itself (`loop`), and how it reports errors
(`errors`) and stalls (`watchdog`)."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

import jax

from recsys import host_malloc
from recsys.cli import errors, flags
from recsys.cli.build import start_devices, xla_deterministic
from recsys.cli.loop import run
from recsys.cli.report import report
from recsys.cli.watchdog import xla_collective_timeouts


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: exit status 0, or 2 for usage and input errors and 1 for failures during
    training, each reported as one line (`--debug`: with its traceback)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        config = flags.parse(argv)
        host_malloc.tune()  # before JAX computes anything
        # XLA reads these when its backend starts: XLA:CPU's own collective timeouts must
        # come after the step watchdog's, which names the step; XLA:GPU's deterministic ops.
        flags_now = xla_collective_timeouts(config.step_timeout, os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = xla_deterministic(config.deterministic, flags_now)
        start_devices(config)
        result = run(config)
        if jax.process_index() == 0:  # one report per run
            report(config, result)
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"recsys-train: error: {errors.message(e)}", file=sys.stderr, flush=True)
        return errors.exit_status(e)
    return 0
