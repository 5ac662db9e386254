"""Elman RNN Triton kernels (tanh or relu) and their host launchers.

Shape letters: T time, B batch, I input, H hidden, G = H, N packed rows.

  rnn_fwd(xp [T, B, H], h0 [B, H], w_hh [H, H], relu, batch_sizes=None)
      -> out [T, B, H], h_n [B, H]
  rnn_bwd(grad_out, grad_h_n, w_hh, out, relu, batch_sizes=None)
      -> grad_xp [T, B, H], grad_h0 [B, H]
  rnn_cell(x [B, I], h, w_ih, w_hh, b_ih, b_hh, relu) -> h' [B, H]

With ``batch_sizes`` (a PackedSequence's, int64 on the CPU) every [T, B, *] tensor is
packed [N, *] instead, and h_n is each sequence's state after its own last step.

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
    launch,
    packing,
    plan,
)
from fastchar.triton._tiles import (
    grid_barrier,
    load_prev,
    load_w,
    load_w_t,
    prev_row,
    rec_gate,
    rows_in,
    step_rows,
    tanh,
    tile_mask,
)


@triton.jit(do_not_specialize=["t0", "n_steps"])
def _fwd_kernel(
    xp_ptr,  # [T, B, H]
    h0_ptr,  # [B, H]
    w_ptr,  # [H, H]
    out_ptr,  # [T, B, H]
    steps_ptr,  # [T + 1, 2] int64 (off[t], b_t) when PACKED
    B,
    H,
    RELU: tl.constexpr,
    PACKED: tl.constexpr,
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
    _, nb0 = step_rows(steps_ptr, first, B, PACKED)
    prev0 = prev_row(steps_ptr, first, B, PACKED)

    if H_IN_REGS:
        h = load_prev(h0_ptr, out_ptr, first, prev0, rows, cols, nb0, H, CM).to(ACC)
    if W_RESIDENT:
        w_t = load_w_t(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]

    for t in range(t0, t0 + n_steps):
        tt = tl.cast(t, tl.int64)
        row0, nb = step_rows(steps_ptr, tt, B, PACKED)
        prev0 = prev_row(steps_ptr, tt, B, PACKED)
        if PACKED:
            live = tile_mask(rows, cols, nb, H)
            run = pid_b * BLOCK_B < nb
        else:
            live = mask
            run = True
        # a finished row's state stays behind in registers unused: rows never restart
        if run:
            if W_RESIDENT:
                if H_IN_REGS:
                    hk = h.to(DOT)
                else:
                    hk = load_prev(h0_ptr, out_ptr, tt, prev0, rows, kk, nb, H, CM).to(DOT)
                a = tl.dot(hk, w_t, input_precision=PREC, out_dtype=ACC)
            else:
                a = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                for k0 in range(0, H, BLOCK_K):
                    hk = load_prev(h0_ptr, out_ptr, tt, prev0, rows, k0 + kk, nb, H, CM).to(DOT)
                    w = load_w_t(w_ptr, 0, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    a = tl.dot(hk, w, a, input_precision=PREC, out_dtype=ACC)

            a += tl.load(xp_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            if RELU:
                h_new = tl.where(a < 0.0, 0.0, a)  # torch.relu: NaN stays NaN
            else:
                h_new = tanh(a)
            tl.store(out_ptr + row0 * H + bh, h_new.to(out_ptr.dtype.element_ty), mask=live)
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
    steps_ptr,  # [T + 1, 2] int64 (off[t], b_t) when PACKED
    T,
    B,
    H,
    RELU: tl.constexpr,
    PACKED: tl.constexpr,
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
        row0, nb = step_rows(steps_ptr, tt, B, PACKED)
        if PACKED:
            # step t+1's rows (none after the last step): the others end at step t and
            # start from grad_h_n; rows >= nb read zeros, so their gradients come out zero
            nxt0, n_rows = step_rows(steps_ptr, tt + 1, B, PACKED)
            live = tile_mask(rows, cols, nb, H)
            last = rows_in(rows, cols, n_rows, nb, H)
            run = pid_b * BLOCK_B < nb
        else:
            nxt0 = (tt + 1) * B
            n_rows = tl.where(s > 0, B, 0)
            live = mask
            last = tile_mask(rows, cols, tl.where(s == 0, B, 0), H)
            run = True
        if run:
            dh = tl.load(grad_out_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            dh = rec_gate(
                dh,
                dxp_ptr + nxt0 * H,
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
            dh += tl.load(grad_hn_ptr + bh, mask=last, other=0.0).to(ACC)
            h = tl.load(out_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            if RELU:
                d = tl.where(h <= 0.0, 0.0, dh)  # threshold_backward
            else:
                d = dh * (1.0 - h * h)
            tl.store(dxp_ptr + row0 * H + bh, d.to(dxp_ptr.dtype.element_ty), mask=live)
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


def _forward(xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, batch_sizes=None):
    *rows, H = xp.shape  # (T, B) or packed (N,)
    B = h0.shape[0]
    pk = packing(batch_sizes, rows[0], B, xp)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    xp = xp.contiguous()
    out = xp.new_empty(*rows, H)  # [T, B, H]
    p = plan(B, H, 1, xp, T)
    steps = None if pk is None else pk.steps
    args = (xp, h0.contiguous(), w_hh.contiguous(), out, steps, B, H, relu, pk is not None)
    launch(_fwd_kernel, p, args, T, H, xp, backward=False, pk=pk)
    return out, pk


def rnn_fwd(xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, batch_sizes: Tensor | None = None):
    """Sequence forward: out [T, B, H] (packed [N, H]), h_n [B, H]."""
    out, pk = _forward(xp, h0, w_hh, relu, batch_sizes)
    return out, out[-1].clone() if pk is None else out.index_select(0, pk.last)


def rnn_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    w_hh: Tensor,
    out: Tensor,
    relu: bool,
    batch_sizes: Tensor | None = None,
):
    """Sequence backward: grad_xp [T, B, H] (packed [N, H]), grad_h0 [B, H]."""
    *rows, H = out.shape
    B = grad_h_n.shape[0]
    pk = packing(batch_sizes, rows[0], B, out)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    grad_xp = out.new_empty(*rows, H)  # [T, B, H]
    grad_h0 = out.new_empty(B, H)
    p = plan(B, H, 1, out, T)
    args = (
        grad_out.contiguous(),
        grad_h_n.contiguous(),
        w_hh.contiguous(),
        out.contiguous(),
        grad_xp,
        grad_h0,
        None if pk is None else pk.steps,
        T,
        B,
        H,
        relu,
        pk is not None,
    )
    launch(_bwd_kernel, p, args, T, H, out, backward=True, pk=pk)
    return grad_xp, grad_h0


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, relu=False):
    """One step from raw input x [B, I]: h' [B, H]."""
    xp = F.linear(x, w_ih, bias_sum(b_ih, b_hh)).unsqueeze(0)  # [1, B, H]
    return _forward(xp, h, w_hh, relu)[0][0]
