"""The errors the training and sampling CLIs report as one line on stderr."""

from __future__ import annotations

import os
import re
import sys


class TrainError(Exception):
    """An error the CLI reports as one line (bad flag, bad file, bad checkpoint)."""


class ConfigError(TrainError, ValueError):
    pass


class CheckpointError(TrainError):
    pass


def drop_closed_stderr() -> None:
    """Started with stderr closed (``2>&-``), Python sets sys.stderr to None, and
    ``print(..., file=sys.stderr)`` then writes to stdout: the CLIs' notes and errors would
    land in their output (a sample, a report). They go to devnull instead."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # for the rest of the process


def print_stdout(prog: str, text: object) -> int:
    """``print(text)``, flushed: exit status 0, or ``stdout_failed``'s where writing stdout
    fails (a full disk, a reader that closed the pipe)."""
    try:
        print(text, flush=True)
    except OSError as e:
        return stdout_failed(prog, e)
    return 0


def stdout_failed(prog: str, e: OSError) -> int:
    """The CLIs' end after an error writing stdout: one line on stderr (none for a closed
    pipe: its reader has what it wanted) and exit status 1. stdout is pointed at devnull, so
    the interpreter's flush at exit does not fail again with a traceback."""
    if not isinstance(e, BrokenPipeError):
        print(f"{prog}: error: cannot write the output: {e.strerror or e}", file=sys.stderr)
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind stdout (captured, None)
        pass
    return 1


def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (Python's, torch's CPU or CUDA allocator), else
    None (another error)."""
    text = str(e)
    if isinstance(e, MemoryError):
        return "out of memory"
    if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in text:
        return None
    size = re.search(r"(?:tried|Tried) to allocate (\d+ bytes|[\d.]+ \w+)", text)
    if size is None:
        return "out of memory"
    amount = size.group(1)
    if amount.endswith(" bytes"):
        n = float(amount.split()[0])
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
            if n < 1024 or unit == "PiB":
                break
            n /= 1024
        amount = f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
    return f"out of memory (tried to allocate {amount})"


def environment_error(e: BaseException, fix: str) -> str | None:
    """The CLIs' one line for a RuntimeError or MemoryError the user fixes outside the
    code: memory (``fix`` says which flags to lower), a FASTCHAR_GEMM the kernels refuse or,
    under torchrun, another rank gone; None for any other error, which keeps its traceback."""
    why = out_of_memory(e)
    if why is not None:
        return f"{why}: {fix}"
    text = first_line(e)
    if "Connection closed by peer" in text or "Connection reset by peer" in text:  # gloo
        return "lost contact with another rank, which failed or was stopped (see its error)"
    if "FASTCHAR_GEMM" in text or "unknown GEMM engine" in text:  # csrc/gemm.cpp
        text = text.removeprefix("fastchar: ")
        return text if "FASTCHAR_GEMM" in text else f"FASTCHAR_GEMM: {text}"
    return None


def first_line(e: BaseException) -> str:
    """An exception's message as one plain line (no colour codes), for the CLIs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip() or type(e).__name__
    return text.splitlines()[0]
