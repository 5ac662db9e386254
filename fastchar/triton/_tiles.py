"""The kernels' device functions: tile loads and masks, the packed-sequence row helpers,
the recurrent product of one gate block, tanh and the persistent grid's barrier.

Shape letters as in ``_common``: B batch, H hidden, BB/BH/BK block sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, row_stride, CM: tl.constexpr):
    """[len(rows), len(cols)] tile of a row-major matrix, zero outside it."""
    offs = rows.to(tl.int64)[:, None] * row_stride + cols[None, :]
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=CM)


@triton.jit
def tile_mask(rows, cols, n_rows, n_cols):
    """In-bounds mask of a [rows, cols] tile. A scalar condition is folded into ``n_rows``
    (``tl.where(cond, B, 0)``) because the interpreter mis-types ``mask & scalar``."""
    return (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def rows_in(rows, cols, lo, hi, n_cols):
    """Mask of the tile's rows in [lo, hi) and columns below ``n_cols``."""
    return ((rows >= lo) & (rows < hi))[:, None] & (cols < n_cols)[None, :]


@triton.jit
def step_rows(steps_ptr, tt, B, PACKED: tl.constexpr):
    """(first row, number of rows) of step tt in a sequence tensor: tt * B and B for
    [T, B, *], off[tt] and b_tt from the ``packing`` table for packed [N, *]."""
    if PACKED:
        row0 = tl.load(steps_ptr + 2 * tt)
        n = tl.load(steps_ptr + 2 * tt + 1)
    else:
        row0 = tt * B
        n = B
    return row0, n


@triton.jit
def prev_row(steps_ptr, tt, B, PACKED: tl.constexpr):
    """First row of step tt-1 (any in-bounds value at tt == 0, where it is not read)."""
    if PACKED:
        prev0 = tl.load(steps_ptr + 2 * tl.maximum(tt - 1, 0))
    else:
        prev0 = (tt - 1) * B
    return prev0


@triton.jit
def load_prev(first_ptr, seq_ptr, tt, prev0, rows, cols, n_rows, H, CM: tl.constexpr):
    """Tile of step tt-1's state for step tt's first ``n_rows`` rows: ``first_ptr`` [B, H]
    (h0, c0) at tt == 0, else the rows from ``prev0`` of the sequence tensor ``seq_ptr``."""
    a = load_tile(first_ptr, rows, cols, tl.where(tt == 0, n_rows, 0), H, H, CM)
    b = load_tile(seq_ptr + prev0 * H, rows, cols, tl.where(tt > 0, n_rows, 0), H, H, CM)
    return a + b


@triton.jit
def load_w_t(w_ptr, gate, k0, j0, H, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """W_gate^T[k0:k0+BK, j0:j0+BH] from w_hh [G, H]: the forward product's operand."""
    k = k0 + tl.arange(0, BLOCK_K)
    j = j0 + tl.arange(0, BLOCK_H)
    offs = (gate * H + j).to(tl.int64)[None, :] * H + k[:, None]
    mask = (k < H)[:, None] & (j < H)[None, :]
    return tl.load(w_ptr + offs, mask=mask, other=0.0)


@triton.jit
def load_w(w_ptr, gate, m0, j0, H, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """W_gate[m0:m0+BK, j0:j0+BH] from w_hh [G, H]: the backward product's operand."""
    m = m0 + tl.arange(0, BLOCK_K)
    j = j0 + tl.arange(0, BLOCK_H)
    offs = (gate * H + m).to(tl.int64)[:, None] * H + j[None, :]
    mask = (m < H)[:, None] & (j < H)[None, :]
    return tl.load(w_ptr + offs, mask=mask, other=0.0)


@triton.jit
def rec_gate(
    acc,
    src_ptr,
    gate,
    n_rows,
    rows,
    j0,
    H,
    G,
    w_ptr,
    w_res,
    d_regs,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_IN_REGS: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    CM: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
):
    """acc + d_gate @ W_gate[:, j0:j0+BH]: one gate's share of dh_{t-1} = d_gates W_hh.

    d_gate is column block ``gate`` of a [B, G] slab at ``src_ptr`` (rows past
    ``n_rows`` read as zero), or ``d_regs`` when the program holds it in registers;
    W_gate comes from ``w_res`` when resident, else in BK chunks from ``w_ptr``.
    """
    kk = tl.arange(0, BLOCK_K)
    if H_IN_REGS:
        acc = tl.dot(d_regs.to(DOT), w_res, acc, input_precision=PREC, out_dtype=ACC)
    elif W_RESIDENT:
        d = load_tile(src_ptr + gate * H, rows, kk, n_rows, H, G, CM)
        acc = tl.dot(d.to(DOT), w_res, acc, input_precision=PREC, out_dtype=ACC)
    else:
        for m0 in range(0, H, BLOCK_K):
            d = load_tile(src_ptr + gate * H, rows, m0 + kk, n_rows, H, G, CM)
            w = load_w(w_ptr, gate, m0, j0, H, BLOCK_K, BLOCK_H).to(DOT)
            acc = tl.dot(d.to(DOT), w, acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def rec_gates(
    acc,
    src_ptr,
    n_rows,
    rows,
    j0,
    H,
    G,
    w_ptr,
    w_res,
    d_regs,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_IN_REGS: tl.constexpr,
    W_RESIDENT: tl.constexpr,
    CM: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    DOT: tl.constexpr,
):
    """``rec_gate`` for gates 0 .. len(d_regs) - 1 of one [B, G] slab, summed into acc:
    ``w_res`` and ``d_regs`` are tuples with one entry per gate."""
    for q in tl.static_range(len(d_regs)):
        acc = rec_gate(
            acc,
            src_ptr,
            q,
            n_rows,
            rows,
            j0,
            H,
            G,
            w_ptr,
            w_res[q],
            d_regs[q],
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
    return acc


@triton.jit
def tanh(x):
    # tl has no tanh that also runs in the interpreter. 2*sigmoid(2x) - 1 is exact in form
    # but cancels near zero: its absolute round-off (~1e-7 in float32) is all of a 1e-5
    # result. Below |x| = 1/16 the odd Taylor series to x^7 instead, whose first term left
    # out is < 1e-11 of x there. float64 keeps the formula: its round-off (~1e-16) is
    # below the series' float32 constants' own.
    y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    if x.dtype != tl.float64:
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        y = tl.where(tl.abs(x) < 0.0625, series, y)
    return y


@triton.jit
def grid_barrier(counter_ptr, target):
    """Wait until the programs sharing ``counter_ptr`` have all arrived ``target`` times.

    The release add publishes this program's stores of the step; the acquire spin
    makes the other programs' stores visible before anyone reads them.
    """
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()
