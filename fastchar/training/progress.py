"""The training progress line: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import math
import sys

from tqdm import tqdm


class Progress:
    """A tqdm bar on a terminal (log lines printed above it); plain log lines every
    ``interval`` steps otherwise. A disabled Progress (the ranks other than 0) prints
    nothing.
    """

    def __init__(self, total: int, interval: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total = total
        self.interval = interval
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._bar: tqdm | None = None

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        if not self.enabled:
            return
        text = f"loss {loss:.4f} ({loss / math.log(2):.3f} bpc) | {tok_s:,.0f} tok/s | lr {lr:.2e}"
        if self.tty:
            if self._bar is None:
                self._bar = tqdm(
                    total=self.total, initial=step - 1, file=self.stream, unit="step",
                    dynamic_ncols=True, leave=True,
                )  # fmt: skip
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()
        elif step % self.interval == 0:
            self.log(f"step {step}/{self.total} | {text}")

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar (the next output starts on a line of its own)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
