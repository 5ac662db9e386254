"""LSTM Triton kernels (gate order i, f, g, o) and their host launchers.

Shape letters: T time, B batch, I input, H hidden, G = 4H gates, N packed rows.

  lstm_fwd(xp [T, B, G], h0 [B, H], c0 [B, H], w_hh [G, H], batch_sizes=None)
      -> out [T, B, H], h_n [B, H], c_n [B, H], gates [T, B, G] (activated), cs [T, B, H]
  lstm_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, batch_sizes=None)
      -> grad_xp, grad_h0, grad_c0
  lstm_cell(x [B, I], h, c, w_ih, w_hh, b_ih, b_hh) -> h', c' [B, H]

cs is float32 for bfloat16/float16 inputs. With ``batch_sizes`` (a PackedSequence's,
int64 on the CPU) every [T, B, *] tensor is packed [N, *] instead, and h_n, c_n are each
sequence's state after its own last step. The launch variants are described in
``fastchar.triton._common``.
"""

from __future__ import annotations

import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from fastchar.layout import state_dtype
from fastchar.reference import bias_sum
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
    c0_ptr,  # [B, H]
    w_ptr,  # [G, H]
    out_ptr,  # [T, B, H]
    gates_ptr,  # [T, B, G]
    cs_ptr,  # [T, B, H]
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
    G = 4 * H
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_K)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH] in a [B, H] slab
    bg = rows.to(tl.int64)[:, None] * G + cols[None, :]  # gate i's [BB, BH] in a [B, G] slab
    first = tl.cast(t0, tl.int64)
    _, nb0 = step_rows(steps_ptr, first, B, PACKED)
    prev0 = prev_row(steps_ptr, first, B, PACKED)

    c = load_prev(c0_ptr, cs_ptr, first, prev0, rows, cols, nb0, H, CM).to(ACC)
    if H_IN_REGS:
        h = load_prev(h0_ptr, out_ptr, first, prev0, rows, cols, nb0, H, CM).to(ACC)
    if W_RESIDENT:
        wi = load_w_t(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]
        wf = load_w_t(w_ptr, 1, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wg = load_w_t(w_ptr, 2, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wo = load_w_t(w_ptr, 3, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)

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
                ai = tl.dot(hk, wi, input_precision=PREC, out_dtype=ACC)
                af = tl.dot(hk, wf, input_precision=PREC, out_dtype=ACC)
                ag = tl.dot(hk, wg, input_precision=PREC, out_dtype=ACC)
                ao = tl.dot(hk, wo, input_precision=PREC, out_dtype=ACC)
            else:
                ai = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                af = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                ag = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                ao = tl.zeros((BLOCK_B, BLOCK_H), ACC)
                for k0 in range(0, H, BLOCK_K):
                    hk = load_prev(h0_ptr, out_ptr, tt, prev0, rows, k0 + kk, nb, H, CM).to(DOT)
                    w = load_w_t(w_ptr, 0, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    ai = tl.dot(hk, w, ai, input_precision=PREC, out_dtype=ACC)
                    w = load_w_t(w_ptr, 1, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    af = tl.dot(hk, w, af, input_precision=PREC, out_dtype=ACC)
                    w = load_w_t(w_ptr, 2, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    ag = tl.dot(hk, w, ag, input_precision=PREC, out_dtype=ACC)
                    w = load_w_t(w_ptr, 3, k0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
                    ao = tl.dot(hk, w, ao, input_precision=PREC, out_dtype=ACC)

            x_t = xp_ptr + row0 * G + bg
            i = tl.sigmoid(ai + tl.load(x_t, mask=live, other=0.0).to(ACC))
            f = tl.sigmoid(af + tl.load(x_t + H, mask=live, other=0.0).to(ACC))
            g = tanh(ag + tl.load(x_t + 2 * H, mask=live, other=0.0).to(ACC))
            o = tl.sigmoid(ao + tl.load(x_t + 3 * H, mask=live, other=0.0).to(ACC))
            c = f * c + i * g
            h_new = o * tanh(c)

            tl.store(out_ptr + row0 * H + bh, h_new.to(out_ptr.dtype.element_ty), mask=live)
            tl.store(cs_ptr + row0 * H + bh, c.to(cs_ptr.dtype.element_ty), mask=live)
            if STORE_GATES:
                g_t = gates_ptr + row0 * G + bg
                GT = gates_ptr.dtype.element_ty
                tl.store(g_t, i.to(GT), mask=live)
                tl.store(g_t + H, f.to(GT), mask=live)
                tl.store(g_t + 2 * H, g.to(GT), mask=live)
                tl.store(g_t + 3 * H, o.to(GT), mask=live)
            if H_IN_REGS:
                h = h_new
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (t - t0 + 1) * tl.num_programs(0))


@triton.jit(do_not_specialize=["s0", "n_steps"])
def _bwd_kernel(
    grad_out_ptr,  # [T, B, H]
    grad_hn_ptr,  # [B, H]
    w_ptr,  # [G, H]
    c0_ptr,  # [B, H]
    gates_ptr,  # [T, B, G]
    cs_ptr,  # [T, B, H]
    dxp_ptr,  # [T, B, G] out: gradient of the pre-activations
    dc_ptr,  # [B, H] accumulation dtype: grad_c_n in, grad_c0 out
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
    G = 4 * H
    j0 = pid_h * BLOCK_H
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = j0 + tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (cols < H)[None, :]
    bh = rows.to(tl.int64)[:, None] * H + cols[None, :]  # [BB, BH]
    bg = rows.to(tl.int64)[:, None] * G + cols[None, :]  # [BB, BH]
    DT = dxp_ptr.dtype.element_ty

    dc = tl.load(dc_ptr + bh, mask=mask, other=0.0).to(ACC)
    if W_RESIDENT:
        wi = load_w(w_ptr, 0, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)  # [BK, BH]
        wf = load_w(w_ptr, 1, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wg = load_w(w_ptr, 2, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
        wo = load_w(w_ptr, 3, 0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
    else:
        wi = 0
        wf = 0
        wg = 0
        wo = 0
    # the gate gradients of step t+1 when the program owns them all; zero before step T-1
    di = tl.zeros((BLOCK_B, BLOCK_H), ACC)
    df = tl.zeros((BLOCK_B, BLOCK_H), ACC)
    dg = tl.zeros((BLOCK_B, BLOCK_H), ACC)
    do = tl.zeros((BLOCK_B, BLOCK_H), ACC)

    for s in range(s0, s0 + n_steps):
        tt = tl.cast(T - 1 - s, tl.int64)
        row0, nb = step_rows(steps_ptr, tt, B, PACKED)
        prev0 = prev_row(steps_ptr, tt, B, PACKED)
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
            nxt = dxp_ptr + nxt0 * G
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
                (wi, wf, wg, wo),
                (di, df, dg, do),
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
            dh = rec + tl.load(grad_out_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            dh += tl.load(grad_hn_ptr + bh, mask=last, other=0.0).to(ACC)

            g_t = gates_ptr + row0 * G + bg
            i = tl.load(g_t, mask=live, other=0.0).to(ACC)
            f = tl.load(g_t + H, mask=live, other=0.0).to(ACC)
            g = tl.load(g_t + 2 * H, mask=live, other=0.0).to(ACC)
            o = tl.load(g_t + 3 * H, mask=live, other=0.0).to(ACC)
            c = tl.load(cs_ptr + row0 * H + bh, mask=live, other=0.0).to(ACC)
            c_prev = load_prev(c0_ptr, cs_ptr, tt, prev0, rows, cols, nb, H, CM).to(ACC)

            tc = tanh(c)
            dc += dh * o * (1.0 - tc * tc)
            di = dc * g * i * (1.0 - i)
            df = dc * c_prev * f * (1.0 - f)
            dg = dc * i * (1.0 - g * g)
            do = dh * tc * o * (1.0 - o)
            if PACKED:
                dc = tl.where(live, dc * f, dc)  # a row not started yet keeps grad_c_n
            else:
                dc = dc * f

            d_t = dxp_ptr + row0 * G + bg
            tl.store(d_t, di.to(DT), mask=live)
            tl.store(d_t + H, df.to(DT), mask=live)
            tl.store(d_t + 2 * H, dg.to(DT), mask=live)
            tl.store(d_t + 3 * H, do.to(DT), mask=live)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, (s - s0 + 1) * tl.num_programs(0))

    tl.store(dc_ptr + bh, dc.to(dc_ptr.dtype.element_ty), mask=mask)
    if FINAL:
        rec = tl.zeros((BLOCK_B, BLOCK_H), ACC)
        rec = rec_gates(
            rec,
            dxp_ptr,
            B,
            rows,
            j0,
            H,
            G,
            w_ptr,
            (wi, wf, wg, wo),
            (di, df, dg, do),
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


def _forward(xp: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, store_gates: bool, batch_sizes=None):
    *rows, G = xp.shape  # (T, B) or packed (N,)
    H = G // 4
    B = h0.shape[0]
    pk = packing(batch_sizes, rows[0], B, xp)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    xp, w_hh = xp.contiguous(), w_hh.contiguous()
    out = xp.new_empty(*rows, H)  # [T, B, H]
    # the cell stores no gates; a one-element stand-in, since a zero-size CUDA tensor
    # has a null pointer that Triton's launcher refuses
    gates = xp.new_empty(*rows, G) if store_gates else xp.new_empty(1)
    cs = xp.new_empty(*rows, H, dtype=state_dtype(xp.dtype))  # [T, B, H]
    p = plan(B, H, 4, xp, T)
    steps = None if pk is None else pk.steps
    args = (xp, h0.contiguous(), c0.contiguous(), w_hh, out, gates, cs, steps, B, H)
    args += (store_gates, pk is not None)
    launch(_fwd_kernel, p, args, T, H, xp, backward=False, pk=pk)
    return out, gates, cs, pk


def lstm_fwd(xp: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, batch_sizes: Tensor | None = None):
    """Sequence forward; see the module docstring for shapes and what is saved."""
    out, gates, cs, pk = _forward(xp, h0, c0, w_hh, store_gates=True, batch_sizes=batch_sizes)
    if pk is None:
        return out, out[-1].clone(), cs[-1].to(xp.dtype, copy=True), gates, cs
    h_n = out.index_select(0, pk.last)  # [B, H]
    return out, h_n, cs.index_select(0, pk.last).to(xp.dtype), gates, cs


def lstm_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    w_hh: Tensor,
    c0: Tensor,
    gates: Tensor,
    cs: Tensor,
    batch_sizes: Tensor | None = None,
):
    """Sequence backward: grad_xp [T, B, G] (packed [N, G]), grad_h0 [B, H], grad_c0 [B, H]."""
    *rows, G = gates.shape
    H = G // 4
    B = c0.shape[0]
    pk = packing(batch_sizes, rows[0], B, gates)
    T = rows[0] if pk is None else len(pk.batch_sizes)
    dtype = gates.dtype
    grad_xp = gates.new_empty(*rows, G)  # [T, B, G]
    dc = grad_c_n.to(acc_dtype(dtype), copy=True).contiguous()  # [B, H]
    grad_h0 = c0.new_empty(B, H)
    p = plan(B, H, 4, gates, T)
    args = (
        grad_out.contiguous(),
        grad_h_n.contiguous(),
        w_hh.contiguous(),
        c0.contiguous(),
        gates.contiguous(),
        cs.contiguous(),
        grad_xp,
        dc,
        grad_h0,
        None if pk is None else pk.steps,
        T,
        B,
        H,
        pk is not None,
    )
    launch(_bwd_kernel, p, args, T, H, gates, backward=True, pk=pk)
    return grad_xp, grad_h0, dc.to(dtype)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step from raw input x [B, I]: (h', c') [B, H]."""
    xp = F.linear(x, w_ih, bias_sum(b_ih, b_hh)).unsqueeze(0)  # [1, B, G]
    out, _, cs, _ = _forward(xp, h, c, w_hh, store_gates=False)
    return out[0], cs[0].to(x.dtype, copy=True)
