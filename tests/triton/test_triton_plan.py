"""Which launch variant ``plan`` picks for which shapes, on an H100-like device (132
SMs) and under the interpreter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fastchar.triton._common as tc


def cuda_like(dtype=torch.bfloat16):
    return SimpleNamespace(is_cuda=True, dtype=dtype, device="cuda:0")


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(tc, "_sm_count", lambda device: 132)
    monkeypatch.setattr(tc, "interpreter_on", lambda: False)  # compiled, as on the GPU


@pytest.mark.parametrize(
    "B, H, n_gates, want",
    [
        (32, 64, 4, ("loop", 16, 64, 1, 2)),
        (128, 33, 3, ("loop", 16, 64, 1, 8)),
        (8, 128, 1, ("loop", 16, 128, 1, 1)),
        (64, 16, 1, ("loop", 64, 16, 1, 1)),
        (16, 768, 4, ("persistent", 16, 16, 48, 1)),
        (64, 512, 3, ("persistent", 64, 16, 32, 1)),
        (128, 1024, 4, ("persistent", 64, 16, 64, 2)),
        (1024, 1024, 4, ("persistent", 64, 128, 8, 16)),
        (4096, 1024, 4, ("step", 64, 16, 64, 64)),
    ],
)
def test_cuda_plan(h100, B, H, n_gates, want):
    p = tc.plan(B, H, n_gates, cuda_like())
    assert (p.variant, p.BLOCK_B, p.BLOCK_H, p.n_htiles, p.n_btiles) == want
    assert p.n_htiles * p.BLOCK_H >= H and p.n_btiles * p.BLOCK_B >= B
    if p.variant == "persistent":
        assert p.n_htiles * p.n_btiles <= 132


def test_single_step_skips_the_barrier(h100):
    assert tc.plan(1, 512, 4, cuda_like(), T=1).variant == "step"
    assert tc.plan(1, 512, 4, cuda_like(), T=2).variant == "persistent"


def test_loop_variant_up_to_a_byte_budget(h100):
    assert tc.plan(32, 64, 4, cuda_like(torch.bfloat16)).variant == "loop"
    assert tc.plan(32, 64, 4, cuda_like(torch.float32)).variant == "persistent"
    assert tc.plan(32, 32, 4, cuda_like(torch.float32)).variant == "loop"
    assert tc.plan(32, 65, 4, cuda_like(torch.bfloat16)).variant == "persistent"


def test_resident_weights_only_within_budget(h100):
    p = tc.plan(16, 128, 4, cuda_like())
    assert p.variant == "persistent" and p.w_resident(128)
    assert 4 * p.BLOCK_H * p.BLOCK_K <= tc.RESIDENT_MAX
    p = tc.plan(16, 768, 4, cuda_like())
    assert not p.w_resident(768) and p.BLOCK_K == 64


def test_forced_persistent_that_cannot_fit_is_refused(h100):
    with tc.use_variant("persistent"), pytest.raises(RuntimeError, match="do not fit"):
        tc.plan(8192, 1024, 4, cuda_like())


def test_environment_variable_forces_a_variant(h100, monkeypatch):
    monkeypatch.setenv("FASTCHAR_TRITON_VARIANT", "step")
    assert tc.plan(32, 64, 4, cuda_like()).variant == "step"
    monkeypatch.setenv("FASTCHAR_TRITON_VARIANT", "fastest")
    with pytest.raises(ValueError, match="FASTCHAR_TRITON_VARIANT must be one of"):
        tc.plan(32, 64, 4, cuda_like())


def test_interpreter_plan():
    cpu = torch.empty(0)
    assert tc.plan(3, 33, 4, cpu).variant == "loop"
    assert tc.plan(3, 200, 4, cpu).variant == "step"
    with tc.use_variant("persistent"), pytest.raises(RuntimeError, match="needs a CUDA"):
        tc.plan(3, 33, 4, cpu)


def test_interpreter_plans_cuda_tensors_as_it_runs_them(monkeypatch):
    """The interpreter takes CUDA tensors too (TRITON_INTERPRET=1 on a GPU machine) and
    still runs one program at a time, in float32 for the half types: no persistent grid,
    whose barrier would spin forever, and no bfloat16 products."""
    monkeypatch.setattr(tc, "interpreter_on", lambda: True)
    monkeypatch.setattr(tc, "_sm_count", lambda device: 132)
    assert tc.plan(3, 200, 4, cuda_like()).variant == "step"
    assert tc.plan(16, 768, 4, cuda_like(), T=8).variant == "step"
    with tc.use_variant("persistent"), pytest.raises(RuntimeError, match="needs a CUDA"):
        tc.plan(3, 33, 4, cuda_like())
    assert tc.dot_type(cuda_like(torch.bfloat16)) == tc.tl.float32


def test_tf32_follows_cudnn_flag():
    cpu = torch.empty(0)
    assert tc.dot_precision(cpu) == "ieee"
    fp32 = cuda_like(torch.float32)
    with torch.backends.cudnn.flags(allow_tf32=True):
        assert tc.dot_precision(fp32) == "tf32"
        assert tc.dot_precision(cuda_like(torch.bfloat16)) == "ieee"
    with torch.backends.cudnn.flags(allow_tf32=False):
        assert tc.dot_precision(fp32) == "ieee"
