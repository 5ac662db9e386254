"""The GPU-only launch variant (persistent grid barrier) and a loop/step sample, dense
and packed, compiled for sm_90 with Triton's bundled ptxas, in a child process without
the interpreter: CPU-only CI cannot run them, but it can see that they lower."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with a GPU the kernels compile and run for real"
)
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = os.path.join(ROOT, "tests", "triton", "_compile_sm90.py")
    result = subprocess.run(
        [sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok   ") == 22, result.stdout
