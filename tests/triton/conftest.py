"""The Triton tests need the interpreter (set before Python starts, because kernels
are built when their modules import) or a CUDA device. Without either this directory
collects nothing, so the main ``pytest tests`` run does not import the kernels; run
it as its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton``."""

from __future__ import annotations

import os

import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]
