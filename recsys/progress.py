"""A dependency-free progress line: a redrawn bar on a terminal, periodic lines in logs."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, *, stream=sys.stderr, enabled: bool = True, width: int = 30):
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled
        self.width = width
        self.interactive = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.last_logged = -1
        self.last_draw = 0.0

    def update(self, step: int, **fields: float) -> None:
        """step: steps done so far (1-based); fields: shown as `name value` pairs."""
        if not self.enabled:
            return
        text = " ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        done = step / self.total
        if self.interactive:
            now = time.monotonic()
            if now - self.last_draw < 0.1 and step < self.total:
                return
            self.last_draw = now
            filled = int(self.width * done)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text}")
            if step >= self.total:
                self.stream.write("\n")
        else:
            decile = int(10 * done)
            if decile == self.last_logged and step < self.total:
                return
            self.last_logged = decile
            self.stream.write(f"step {step}/{self.total} {text}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own, between progress updates."""
        if self.enabled:
            self.stream.write(("\n" if self.interactive else "") + text + "\n")
            self.stream.flush()


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
