"""Elman RNN Triton kernels (tanh or relu) and their host launchers.

Shape letters: T time, B batch, I input, H hidden, G = H.

  rnn_fwd(xp [T, B, H], h0 [B, H], w_hh [H, H], relu) -> out [T, B, H], h_n [B, H]
  rnn_bwd(grad_out, grad_h_n, w_hh, out, relu) -> grad_xp [T, B, H], grad_h0 [B, H]
  rnn_cell(x [B, I], h, w_ih, w_hh, b_ih, b_hh, relu) -> h' [B, H]

The activation's derivative comes from ``out`` (1 - h^2, or h > 0). The launch
variants are described in ``fastchar.triton._common``.
"""

from __future__ import annotations

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastchar.reference import bias_sum
from fastchar.triton._common import (
    grid_barrier,
    launch,
    load_prev,
    load_w,
    load_w_t,
    plan,
    rec_gate,
    tanh,
    tile_mask,
)


@triton.jit(do_not_specialize=["t0", "n_steps"])
def _fwd_kernel(
    xp_ptr,  # [T, B, H]
    h0_ptr,  # [B, H]
    w_ptr,  # [H, H]
    out_ptr,  # [T, B, H]
    B,
    H,
    RELU: tl.constexpr,
    t0,
    n_steps,
    sync_ptr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_IN_REGS: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    SYNC: tl.constexpr,
    CM: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_K)
    mask = tile_mask(rows, cols, B, H)
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH] in a [B, H] slab
    first = tl.cast(t0, tl.int64)

    if H_IN_REGS:
        h = load_prev(h0_ptr, out_ptr, first, rows, cols, B, H).to(ACC)
    if W_RESIDENT:
        w_t = load_w_t(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]

    for t in range(t0, t0 + n_steps):
        tt = tl.cast(t, tl.int64)
        if W_RESIDENT:
            if H_IN_REGS:
                hk = h.to(DOT)
            else:
                hk = load_prev(h0_ptr, out_ptr, tt, rows, kk, B, H, CM).to(DOT)
            a = tl.dot(hk, w_t, input_precision=PREC, out_dtype=ACC)
        else:
            a = tl.zeros((BLOCK_B, BLOCK_H), ACC)
            for k0 in range(0, H, BLOCK_K):
                hk = load_prev(h0_ptr, out_ptr, tt, rows, k0 + kk, B, H, CM).to(DOT)
                w = load_w_t(w_ptr, 0, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                a = tl.dot(hk, w, a, input_precision=PREC, out_dtype=ACC)

        a += tl.load(xp_ptr + tt * B * H + bh, mask=mask, other=0.0).to(ACC)
        if RELU:
            h_new = tl.maximum(a, 0.0)
        else:
            h_new = tanh(a)
        tl.store(out_ptr + tt * B * H + bh, h_new.to(out_ptr.dtype.element_ty), mask=mask)
        if H_IN_REGS:
            h = h_new
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (t - t0 + 1) * tl.num_programs(0))


@triton.jit(do_not_specialize=["s0", "n_steps"])
def _bwd_kernel(
    grad_out_ptr,  # [T, B, H]
    grad_hn_ptr,  # [B, H]
    w_ptr,  # [H, H]
    out_ptr,  # [T, B, H]
    dxp_ptr,  # [T, B, H] out
    dh0_ptr,  # [B, H] out
    T,
    B,
    H,
    RELU: tl.constexpr,
    s0,
    n_steps,
    sync_ptr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_IN_REGS: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    SYNC: tl.constexpr,
    CM: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
    FINAL: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    mask = tile_mask(rows, cols, B, H)
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH]

    if W_RESIDENT:
        w = load_w(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]
    else:
        w = 0
    # the pre-activation gradient of step t+1 when the program owns all of it
    d = tl.zeros((BLOCK_B, BLOCK_H), ACC)

    for s in range(s0, s0 + n_steps):
        tt = tl.cast(T - 1 - s, tl.int64)
        n_rows = tl.where(s > 0, B, 0)
        dh = tl.load(grad_out_ptr + tt * B * H + bh, mask=mask, other=0.0).to(ACC)
        dh = rec_gate(
            dh,
            dxp_ptr + (tt + 1) * B * H,
            0,
            n_rows,
            rows,
            j0,
            H,
            H,
            w_ptr,
            w,
            d,
            BLOCK_B,
            BLOCK_H,
            BLOCK_K,
            H_IN_REGS,
            W_RESIDENT,
            CM,
            ACC,
            PREC,
            DOT,
        )
        last = tile_mask(rows, cols, tl.where(s == 0, B, 0), H)
        dh += tl.load(grad_hn_ptr + bh, mask=last, other=0.0).to(ACC)
        h = tl.load(out_ptr + tt * B * H + bh, mask=mask, other=0.0).to(ACC)
        if RELU:
            d = tl.where(h > 0.0, dh, 0.0)
        else:
            d = dh * (1.0 - h * h)
        tl.store(dxp_ptr + tt * B * H + bh, d.to(dxp_ptr.dtype.element_ty), mask=mask)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (s - s0 + 1) * tl.num_programs(0))

    if FINAL:
        dh0 = tl.zeros((BLOCK_B, BLOCK_H), ACC)
        dh0 = rec_gate(
            dh0,
            dxp_ptr,
            0,
            B,
            rows,
            j0,
            H,
            H,
            w_ptr,
            w,
            d,
            BLOCK_B,
            BLOCK_H,
            BLOCK_K,
            H_IN_REGS,
            W_RESIDENT,
            CM,
            ACC,
            PREC,
            DOT,
        )
        tl.store(dh0_ptr + bh, dh0.to(dh0_ptr.dtype.element_ty), mask=mask)


def _forward(xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool) -> Tensor:
    T, B, H = xp.shape
    xp = xp.contiguous()
    out = xp.new_empty(T, B, H)  # [T, B, H]
    p = plan(B, H, 1, xp, T)
    args = (xp, h0.contiguous(), w_hh.contiguous(), out, B, H, relu)
    launch(_fwd_kernel, p, args, T, H, xp, backward=False)
    return out


def rnn_fwd(xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool):
    """Sequence forward: out [T, B, H], h_n [B, H]."""
    out = _forward(xp, h0, w_hh, relu)
    return out, out[-1].clone()


def rnn_bwd(grad_out: Tensor, grad_h_n: Tensor, w_hh: Tensor, out: Tensor, relu: bool):
    """Sequence backward: grad_xp [T, B, H], grad_h0 [B, H]."""
    T, B, H = out.shape
    grad_xp = out.new_empty(T, B, H)  # [T, B, H]
    grad_h0 = out.new_empty(B, H)
    p = plan(B, H, 1, out, T)
    args = (
        grad_out.contiguous(),
        grad_h_n.contiguous(),
        w_hh.contiguous(),
        out.contiguous(),
        grad_xp,
        grad_h0,
        T,
        B,
        H,
        relu,
    )
    launch(_bwd_kernel, p, args, T, H, out, backward=True)
    return grad_xp, grad_h0


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, relu=False):
    """One step from raw input x [B, I]: h' [B, H]."""
    xp = F.linear(x, w_ih, bias_sum(b_ih, b_hh)).unsqueeze(0)  # [1, B, H]
    return _forward(xp, h, w_hh, relu)[0]
