"""The errors the training and sampling CLIs report as one line on stderr."""

from __future__ import annotations

import re


class TrainError(Exception):
    """An error the CLI reports as one line (bad flag, bad file, bad checkpoint)."""


class ConfigError(TrainError, ValueError):
    pass


class CheckpointError(TrainError):
    pass


def first_line(e: BaseException) -> str:
    """An exception's message as one plain line (no colour codes), for the CLIs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip() or type(e).__name__
    return text.splitlines()[0]
