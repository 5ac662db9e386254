"""The training progress line."""

from __future__ import annotations

import math
import sys


class Progress:
    """One self-updating line on a terminal; plain log lines every ``interval`` steps otherwise.

    A disabled Progress (the ranks other than 0) prints nothing.
    """

    def __init__(self, total: int, interval: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total = total
        self.interval = interval
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._open = False

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        if not self.enabled:
            return
        text = (
            f"step {step}/{self.total} | loss {loss:.4f} ({loss / math.log(2):.3f} bpc) | "
            f"{tok_s:,.0f} tok/s | lr {lr:.2e}"
        )
        if self.tty:
            width = 30
            done = int(width * step / self.total)
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            self.stream.flush()
            self._open = True
        elif step % self.interval == 0:
            self.log(text)

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        print(text, file=self.stream, flush=True)
