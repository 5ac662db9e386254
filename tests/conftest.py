"""Fixtures shared by the test suite (helpers and tolerances live in tests/parity.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

# The GEMM plan's cache file (fastchar.plan) goes to a fresh directory, not the user's
# cache: set before any test module imports fastchar.
os.environ["FASTCHAR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastchar-test-cache-")
# Named corpora (fastchar.training.corpora) are fetched into a fresh directory too.
os.environ["FASTCHAR_DATA_DIR"] = tempfile.mkdtemp(prefix="fastchar-test-data-")
os.environ.pop("FASTCHAR_GEMM", None)

import pytest
import torch

# Both removed at exit: registered before fastchar's own exit handler (the plan's save),
# so they run after it.
for _name in ("FASTCHAR_CACHE_DIR", "FASTCHAR_DATA_DIR"):
    atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_fallback_warning():
    """Turn fastchar's fused-fallback warning into an error inside the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastchar: impl='fused' falls back")
        yield
