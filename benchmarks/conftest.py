"""pytest-benchmark suite set-up: ``pytest benchmarks/`` (not part of ``pytest tests``).

``--bench-device cpu|cuda`` picks the device (default: cuda when available).
Triton is timed on CUDA only: under TRITON_INTERPRET=1 its cases are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fastchar") is None:
    # A checkout that is not pip-installed: benchmark the checkout's package.
    sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption(
        "--bench-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device for pytest benchmarks/ (default: cuda when available, else cpu)",
    )


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    import torch

    device = pytestconfig.getoption("--bench-device")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but CUDA is not available")
    return device
