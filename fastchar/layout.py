"""Tensor layouts that the ops (fastchar.ops) and the Triton kernels (fastchar.triton)
share, kept here so that neither package imports the other's internals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cell state and accumulation dtype: float32 for half types, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def split_gru_bias(x: Tensor, H: int, b_ih: Tensor | None, b_hh: Tensor | None):
    """GRU biases as the kernels take them: (the bias folded into the input GEMM [3H],
    b_hn [H], which stays inside the recurrence: n = tanh(x_n + r * (h W_hn^T + b_hn)))."""
    if b_hh is None:
        return b_ih, x.new_zeros(H)
    b_rz = F.pad(b_hh[: 2 * H], (0, H))  # [b_hr, b_hz, 0]
    return (b_rz if b_ih is None else b_ih + b_rz), b_hh[2 * H :]
