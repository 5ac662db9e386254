"""Which impl runs where for Triton: refusal on CPU without the interpreter, the
fallback of ``fused`` on CUDA without Triton, and ``python -m fastchar.info``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton

import fastchar.backends as backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_triton_on_cpu_without_interpreter_says_how_to_run_it():
    code = (
        "import torch, fastchar.ops as ops\n"
        "x = torch.randn(2, 1, 3); w_ih = torch.randn(4, 3); w_hh = torch.randn(4, 4)\n"
        "try:\n"
        "    ops.rnn(x, None, w_ih, w_hh, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = _python(code, interpret=False)
    assert result.returncode == 0, result.stderr
    assert "impl='triton' cannot run on cpu tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


def test_fused_on_cpu_never_picks_triton():
    assert backends.resolve("fused", "cpu") in ("cpp", "reference")


def test_fused_on_cuda_without_triton_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "triton_version", lambda: None)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falls back to 'reference' on cuda: Triton is not"):
        assert backends.resolve("fused", "cuda") == "reference"
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        backends.resolve("triton", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fused_on_cuda_without_a_device_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        assert backends.resolve("fused", "cuda") == "reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda_runs_triton():
    assert backends.resolve("fused", "cuda") == "triton"


def test_info_reports_triton():
    result = _python("import fastchar.info as i; i.main()", interpret=True)
    assert result.returncode == 0, result.stderr
    assert f"triton   {triton.__version__} (TRITON_INTERPRET=1: interpreter)" in result.stdout
    cpu = result.stdout.split("[cpu]")[1].split("[")[0]
    assert "triton     available" in cpu
