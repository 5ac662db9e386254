"""GRU Triton kernels (gate order r, z, n; b_hn inside r * (W_hn h + b_hn)) and launchers.

Shape letters: T time, B batch, I input, H hidden, G = 3H gates, N packed rows.

  gru_fwd(xp [T, B, G], h0 [B, H], w_hh [G, H], b_hn [H], batch_sizes=None)
      -> out [T, B, H], h_n [B, H], gates [T, B, G] (activated r, z, n), hn [T, B, H]
  gru_bwd(grad_out, grad_h_n, w_hh, h0, out, gates, hn, batch_sizes=None)
      -> grad_xp, grad_ghn, grad_h0
  gru_cell(x [B, I], h, w_ih, w_hh, b_ih, b_hh) -> h' [B, H]

With ``batch_sizes`` (a PackedSequence's, int64 on the CPU) every [T, B, *] tensor is
packed [N, *] instead, and h_n is each sequence's state after its own last step.

xp already holds b_ih + [b_hr, b_hz, 0]; hn = W_hn h_{t-1} + b_hn. The gradient of
W_hh h_{t-1} + b_hh equals grad_xp except in the n block (scaled by r): grad_ghn [T, B, H]
is that block, and the backward's recurrence reads r and z from grad_xp.
The launch variants are described in ``fastchar.triton._common``.
"""

from __future__ import annotations

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastchar.layout import split_gru_bias
from fastchar.triton._common import (
    acc_dtype,
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
    rec_gates,
    rows_in,
    step_rows,
    tanh,
    tile_mask,
)


@triton.jit(do_not_specialize=["t0", "n_steps"])
def _fwd_kernel(
    xp_ptr,  # [T, B, G]
    h0_ptr,  # [B, H]
    bhn_ptr,  # [H]
    w_ptr,  # [G, H]
    out_ptr,  # [T, B, H]
    gates_ptr,  # [T, B, G]
    hn_ptr,  # [T, B, H]
    steps_ptr,  # [T + 1, 2] int64 (off[t], b_t) when PACKED
    B,
    H,
    STORE_GATES: tl.constexpr,
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
    G = 3 * H
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_K)
    mask = tile_mask(rows, cols, B, H)
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH] in a [B, H] slab
    bg = rows.to(tl.int64)[:, None] * G + cols[None, :]  # gate r's [BB, BH] in a [B, G] slab
    first = tl.cast(t0, tl.int64)
    _, nb0 = step_rows(steps_ptr, first, B, PACKED)
    prev0 = prev_row(steps_ptr, first, B, PACKED)

    # this program's columns of h_{t-1}, for the z * h_{t-1} term (all of h when H_IN_REGS)
    h = load_prev(h0_ptr, out_ptr, first, prev0, rows, cols, nb0, H, CM).to(ACC)
    b_hn = tl.load(bhn_ptr + cols, mask=cols < H, other=0.0).to(ACC)[None, :]  # [1, BH]
    if W_RESIDENT:
        wr = load_w_t(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]
        wz = load_w_t(w_ptr, 1, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wn = load_w_t(w_ptr, 2, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)

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
                ar = tl.dot(hk, wr, input_precision=PREC, out_dtype=ACC)
                az = tl.dot(hk, wz, input_precision=PREC, out_dtype=ACC)
                an = tl.dot(hk, wn, input_precision=PREC, out_dtype=ACC)
            else:
                ar = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                az = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                an = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                for k0 in range(0, H, BLOCK_K):
                    hk = load_prev(h0_ptr, out_ptr, tt, prev0, rows, k0 + kk, nb, H, CM).to(DOT)
                    w = load_w_t(w_ptr, 0, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    ar = tl.dot(hk, w, ar, input_precision=PREC, out_dtype=ACC)
                    w = load_w_t(w_ptr, 1, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    az = tl.dot(hk, w, az, input_precision=PREC, out_dtype=ACC)
                    w = load_w_t(w_ptr, 2, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    an = tl.dot(hk, w, an, input_precision=PREC, out_dtype=ACC)

            x_t = xp_ptr + row0 * G + bg
            r = tl.sigmoid(ar + tl.load(x_t, mask=live, other=0.0).to(ACC))
            z = tl.sigmoid(az + tl.load(x_t + H, mask=live, other=0.0).to(ACC))
            hn = an + b_hn
            n = tanh(tl.load(x_t + 2 * H, mask=live, other=0.0).to(ACC) + r * hn)
            h = (1.0 - z) * n + z * h

            tl.store(out_ptr + row0 * H + bh, h.to(out_ptr.dtype.element_ty), mask=live)
            if STORE_GATES:
                g_t = gates_ptr + row0 * G + bg
                GT = gates_ptr.dtype.element_ty
                tl.store(g_t, r.to(GT), mask=live)
                tl.store(g_t + H, z.to(GT), mask=live)
                tl.store(g_t + 2 * H, n.to(GT), mask=live)
                tl.store(hn_ptr + row0 * H + bh, hn.to(GT), mask=live)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (t - t0 + 1) * tl.num_programs(0))


@triton.jit(do_not_specialize=["s0", "n_steps"])
def _bwd_kernel(
    grad_out_ptr,  # [T, B, H]
    grad_hn_ptr,  # [B, H]
    w_ptr,  # [G, H]
    h0_ptr,  # [B, H]
    out_ptr,  # [T, B, H]
    gates_ptr,  # [T, B, G]
    hn_ptr,  # [T, B, H]
    dxp_ptr,  # [T, B, G] out
    dghn_ptr,  # [T, B, H] out: the n block of the hidden-side gradient
    carry_ptr,  # [B, H] accumulation dtype: dh_t * z_t handed to step t-1 (zeros in)
    dh0_ptr,  # [B, H] out
    steps_ptr,  # [T + 1, 2] int64 (off[t], b_t) when PACKED
    T,
    B,
    H,
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
    G = 3 * H
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    mask = tile_mask(rows, cols, B, H)
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH]
    bg = rows.to(tl.int64)[:, None] * G + cols[None, :]  # [BB, BH]
    DT = dxp_ptr.dtype.element_ty

    carry = tl.load(carry_ptr + bh, mask=mask, other=0.0).to(ACC)
    if W_RESIDENT:
        wr = load_w(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]
        wz = load_w(w_ptr, 1, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wn = load_w(w_ptr, 2, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
    else:
        wr = 0
        wz = 0
        wn = 0
    # the hidden-side gradient of step t+1 when the program owns all of it; zero
    # before step T-1. In memory its r and z blocks are grad_xp's, its n block grad_ghn's.
    gr = tl.zeros((BLOCK_B, BLOCK_H), ACC)
    gz = tl.zeros((BLOCK_B, BLOCK_H), ACC)
    gn = tl.zeros((BLOCK_B, BLOCK_H), ACC)

    for s in range(s0, s0 + n_steps):
        tt = tl.cast(T - 1 - s, tl.int64)
        row0, nb = step_rows(steps_ptr, tt, B, PACKED)
        prev0 = prev_row(steps_ptr, tt, B, PACKED)
        if PACKED:
            # step t+1's rows (none after the last step): the others end at step t and
            # start from grad_h_n; rows >= nb read zeros, so their gradients and carry
            # come out zero
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
            nxt = dxp_ptr + nxt0 * G
            # rec_gate reads gate q's block at src + q * H; shifted so gate 2 lands on grad_ghn
            nxt_n = dghn_ptr + nxt0 * H - 2 * H
            rec = tl.zeros((BLOCK_B, BLOCK_H), ACC)
            rec = rec_gates(
                rec,
                nxt,
                n_rows,
                rows,
                j0,
                H,
                G,
                w_ptr,
                (wr, wz),
                (gr, gz),
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
            rec = rec_gate(
                rec,
                nxt_n,
                2,
                n_rows,
                rows,
                j0,
                H,
                H,
                w_ptr,
                wn,
                gn,
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
            dh = rec + carry + tl.load(grad_out_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            dh += tl.load(grad_hn_ptr + bh, mask=last, other=0.0).to(ACC)

            g_t = gates_ptr + row0 * G + bg
            r = tl.load(g_t, mask=live, other=0.0).to(ACC)
            z = tl.load(g_t + H, mask=live, other=0.0).to(ACC)
            n = tl.load(g_t + 2 * H, mask=live, other=0.0).to(ACC)
            hn = tl.load(hn_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            h_prev = load_prev(h0_ptr, out_ptr, tt, prev0, rows, cols, nb, H, CM).to(ACC)

            carry = dh * z
            dn = dh * (1.0 - z) * (1.0 - n * n)
            gz = dh * (h_prev - n) * z * (1.0 - z)
            gr = dn * hn * r * (1.0 - r)
            gn = dn * r

            d_t = dxp_ptr + row0 * G + bg
            tl.store(d_t, gr.to(DT), mask=live)
            tl.store(d_t + H, gz.to(DT), mask=live)
            tl.store(d_t + 2 * H, dn.to(DT), mask=live)
            tl.store(dghn_ptr + row0 * H + bh, gn.to(DT), mask=live)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (s - s0 + 1) * tl.num_programs(0))

    tl.store(carry_ptr + bh, carry.to(carry_ptr.dtype.element_ty), mask=mask)
    if FINAL:
        rec = carry
        rec = rec_gates(
            rec,
            dxp_ptr,
            B,
            rows,
            j0,
            H,
            G,
            w_ptr,
            (wr, wz),
            (gr, gz),
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
        rec = rec_gate(
            rec,
            dghn_ptr - 2 * H,
            2,
            B,
            rows,
            j0,
            H,
            H,
            w_ptr,
            wn,
            gn,
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
        tl.store(dh0_ptr + bh, rec.to(dh0_ptr.dtype.element_ty), mask=mask)


def _forward(
    xp: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor, store_gates: bool, batch_sizes=None
):
    *rows, G = xp.shape  # (T, B) or packed (N,)
    H = G // 3
    B = h0.shape[0]
    pk = packing(batch_sizes, rows[0], B, xp)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    xp, w_hh = xp.contiguous(), w_hh.contiguous()
    out = xp.new_empty(*rows, H)  # [T, B, H]
    # the cell stores no gates; a one-element stand-in, since a zero-size CUDA tensor
    # has a null pointer that Triton's launcher refuses
    gates = xp.new_empty(*rows, G) if store_gates else xp.new_empty(1)
    hn = xp.new_empty(*rows, H) if store_gates else xp.new_empty(1)
    p = plan(B, H, 3, xp, T)
    steps = None if pk is None else pk.steps
    args = (xp, h0.contiguous(), b_hn.contiguous(), w_hh, out, gates, hn, steps, B, H)
    args += (store_gates, pk is not None)
    launch(_fwd_kernel, p, args, T, H, xp, backward=False, pk=pk)
    return out, gates, hn, pk


def gru_fwd(xp: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor, batch_sizes: Tensor | None = None):
    """Sequence forward; see the module docstring for shapes and what is saved."""
    out, gates, hn, pk = _forward(xp, h0, w_hh, b_hn, store_gates=True, batch_sizes=batch_sizes)
    h_n = out[-1].clone() if pk is None else out.index_select(0, pk.last)  # [B, H]
    return out, h_n, gates, hn


def gru_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    out: Tensor,
    gates: Tensor,
    hn: Tensor,
    batch_sizes: Tensor | None = None,
):
    """Sequence backward: grad_xp [T, B, G], grad_ghn [T, B, H] (packed: [N, G], [N, H]),
    grad_h0 [B, H]."""
    *rows, G = gates.shape
    H = G // 3
    B = h0.shape[0]
    pk = packing(batch_sizes, rows[0], B, gates)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    grad_xp = gates.new_empty(*rows, G)  # [T, B, G]
    grad_ghn = gates.new_empty(*rows, H)  # [T, B, H]
    carry = gates.new_zeros(B, H, dtype=acc_dtype(gates.dtype))  # [B, H]
    grad_h0 = h0.new_empty(B, H)
    p = plan(B, H, 3, gates, T)
    args = (
        grad_out.contiguous(),
        grad_h_n.contiguous(),
        w_hh.contiguous(),
        h0.contiguous(),
        out.contiguous(),
        gates.contiguous(),
        hn.contiguous(),
        grad_xp,
        grad_ghn,
        carry,
        grad_h0,
        None if pk is None else pk.steps,
        T,
        B,
        H,
        pk is not None,
    )
    launch(_bwd_kernel, p, args, T, H, gates, backward=True, pk=pk)
    return grad_xp, grad_ghn, grad_h0


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step from raw input x [B, I]: h' [B, H]."""
    H = w_hh.shape[1]
    b_x, b_hn = split_gru_bias(x, H, b_ih, b_hh)
    xp = F.linear(x, w_ih, b_x).unsqueeze(0)  # [1, B, G]
    return _forward(xp, h, w_hh, b_hn, store_gates=False)[0][0]
