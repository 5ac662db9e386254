"""The Triton tests need the interpreter (set before Python starts, because kernels
are built when their modules import) or a CUDA device. Without either this directory
collects nothing, so the main ``pytest tests`` run does not import the kernels; run
it as its own process: ``TRITON_INTERPRET=1 python -m pytest tests/triton``."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 parity means IEEE products: keep cuDNN and the kernels off TF32."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
