"""Packed (variable-length) Triton sequence launchers vs a per-sequence oracle.

The oracle runs each sequence on its own through the dense ``reference`` layer (input
weights the identity, so its input is the projected xp) with autograd for the backward,
and through the dense Triton launcher for the saved tensors (gates, cs, hn) and GRU's
grad_ghn, which the reference does not expose. Every launch variant that runs on this
device is checked, with one batch tile and with several.

Shape letters: T time, B batch (sequences), H hidden, G gates (4H / 3H / H), N packed rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
from _cases import DEVICE, VARIANTS
from parity import assert_close

import fastchar.triton._common as tcommon
from fastchar import reference
from fastchar.triton import gru, lstm, rnn
from fastchar.triton._common import use_variant

CELLS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}  # gates per hidden unit
LENGTHS = {  # sequence lengths, longest first (PackedSequence's sorted order)
    "mixed_with_1": [6, 4, 4, 2, 1],
    "random": sorted(
        torch.randint(1, 8, (6,), generator=torch.Generator().manual_seed(3)).tolist(), reverse=True
    ),
    "all_equal": [4, 4, 4],
    "B1": [5],
    "T1_B3": [1, 1, 1],
    "T1_B1": [1],
}
DTYPES = {"f64": torch.float64, "f32": torch.float32} if DEVICE == "cpu" else {"f32": torch.float32}
H = 17
# B=20 rows at BLOCK_B=16: the second batch tile holds the shortest sequences, so it
# stops early going forward and starts late going backward
MULTI_TILE_LENGTHS = [7, 7, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 3, 3, 3, 3, 2, 2, 1, 1]


def batch_sizes_of(lengths: list[int]) -> torch.Tensor:
    """PackedSequence.batch_sizes of sorted lengths: b_t = #{b : len_b > t}."""
    return torch.tensor([sum(n > t for n in lengths) for t in range(lengths[0])])


def make_case(cell: str, lengths: list[int], dtype: torch.dtype, h: int = H) -> dict:
    bs = batch_sizes_of(lengths)
    N, B, G = int(bs.sum()), len(lengths), CELLS[cell] * h
    gen = torch.Generator().manual_seed(len(lengths) * 31 + G)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype=dtype, device=DEVICE)

    return dict(
        batch_sizes=bs,
        xp=randn(N, G),  # [N, G]
        h0=randn(B, h),
        c0=randn(B, h),
        w_hh=randn(G, h, scale=1 / math.sqrt(h)),
        b_hn=randn(h),
        grad_out=randn(N, h),  # [N, H]
        grad_h_n=randn(B, h),
        grad_c_n=randn(B, h),
    )


def run_packed(cell: str, c: dict) -> dict[str, torch.Tensor]:
    """The packed launchers, forward then backward."""
    bs = c["batch_sizes"]
    if cell == "lstm":
        out, h_n, c_n, gates, cs = lstm.lstm_fwd(c["xp"], c["h0"], c["c0"], c["w_hh"], bs)
        grad_xp, grad_h0, grad_c0 = lstm.lstm_bwd(
            c["grad_out"], c["grad_h_n"], c["grad_c_n"], c["w_hh"], c["c0"], gates, cs, bs
        )
        fwd = dict(out=out, h_n=h_n, c_n=c_n, gates=gates, cs=cs)
        return fwd | dict(grad_xp=grad_xp, grad_h0=grad_h0, grad_c0=grad_c0)
    if cell == "gru":
        out, h_n, gates, hn = gru.gru_fwd(c["xp"], c["h0"], c["w_hh"], c["b_hn"], bs)
        grad_xp, grad_ghn, grad_h0 = gru.gru_bwd(
            c["grad_out"], c["grad_h_n"], c["w_hh"], c["h0"], out, gates, hn, bs
        )
        fwd = dict(out=out, h_n=h_n, gates=gates, hn=hn)
        return fwd | dict(grad_xp=grad_xp, grad_ghn=grad_ghn, grad_h0=grad_h0)
    relu = cell == "rnn_relu"
    out, h_n = rnn.rnn_fwd(c["xp"], c["h0"], c["w_hh"], relu, bs)
    grad_xp, grad_h0 = rnn.rnn_bwd(c["grad_out"], c["grad_h_n"], c["w_hh"], out, relu, bs)
    return dict(out=out, h_n=h_n, grad_xp=grad_xp, grad_h0=grad_h0)


def run_dense(cell: str, c: dict) -> dict[str, torch.Tensor]:
    """The dense launchers on a [T, B, *] case; same keys as ``run_packed``."""
    dense = {k: v for k, v in c.items() if k != "batch_sizes"} | {"batch_sizes": None}
    return run_packed(cell, dense)


def oracle(cell: str, c: dict) -> dict[str, torch.Tensor]:
    """Each sequence alone: reference (float64, autograd) for outputs, final states and
    the gradients of xp, h0, c0; the dense Triton launcher for the saved tensors."""
    bs = c["batch_sizes"].tolist()
    off = [sum(bs[:t]) for t in range(len(bs))]
    B, N = bs[0], sum(bs)
    lengths = [sum(b_t > b for b_t in bs) for b in range(B)]
    leaf = {k: c[k].double().requires_grad_() for k in ("xp", "h0", "c0")}
    w_hh, b_hn = c["w_hh"].double(), c["b_hn"].double()
    G, h = w_hh.shape
    eye = torch.eye(G, dtype=torch.float64, device=DEVICE)
    out_rows: list = [None] * N
    finals: dict[str, list] = {"h_n": [], "c_n": []}
    saved: dict[str, list] = {k: [None] * N for k in ("gates", "cs", "hn", "grad_ghn")}
    for b in range(B):
        rows = [off[t] + b for t in range(lengths[b])]
        x = leaf["xp"][rows].unsqueeze(1)  # [len_b, 1, G]
        h0, c0 = leaf["h0"][b : b + 1], leaf["c0"][b : b + 1]
        if cell == "lstm":
            out, h_n, c_n = reference.lstm(x, h0, c0, eye, w_hh)
            finals["c_n"].append(c_n)
        elif cell == "gru":
            b_hh = torch.cat([b_hn.new_zeros(2 * h), b_hn])  # xp already holds b_hr, b_hz
            out, h_n = reference.gru(x, h0, eye, w_hh, None, b_hh)
        else:
            nonlinearity = cell.split("_")[1]
            out, h_n = reference.rnn(x, h0, eye, w_hh, nonlinearity=nonlinearity)
        finals["h_n"].append(h_n)
        for t, r in enumerate(rows):
            out_rows[r] = out[t]
        one = {k: v[rows].unsqueeze(1) for k, v in c.items() if k in ("xp", "grad_out")}
        one |= {k: v[b : b + 1] for k, v in c.items() if k in ("h0", "c0", "grad_h_n", "grad_c_n")}
        one |= {"w_hh": c["w_hh"], "b_hn": c["b_hn"], "batch_sizes": None}
        dense = run_packed(cell, one)
        for k in saved:
            if k in dense:
                for t, r in enumerate(rows):
                    saved[k][r] = dense[k][t, 0]
    want = {"out": torch.cat(out_rows)}  # [N, H]
    want |= {k: torch.cat(v) for k, v in finals.items() if v}
    loss = (want["out"] * c["grad_out"].double()).sum()
    loss = loss + (want["h_n"] * c["grad_h_n"].double()).sum()
    if cell == "lstm":
        loss = loss + (want["c_n"] * c["grad_c_n"].double()).sum()
    names = ("xp", "h0", "c0") if cell == "lstm" else ("xp", "h0")
    grads = torch.autograd.grad(loss, [leaf[k] for k in names])
    want |= {f"grad_{k}": g for k, g in zip(names, grads, strict=True)}
    want |= {k: torch.stack(v) for k, v in saved.items() if v[0] is not None}
    return {k: v.detach() for k, v in want.items()}


def check_packed(cell: str, c: dict, dtype: torch.dtype, want: dict | None = None) -> None:
    got = run_packed(cell, c)
    want = oracle(cell, c) if want is None else want
    assert got.keys() == want.keys()
    for name, a in got.items():
        b = want[name]
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert_close(a, b.to(a.dtype), dtype, name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_packed_parity(cell, lengths, dtype, variant):
    with use_variant(variant):
        check_packed(cell, make_case(cell, lengths, dtype), dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_streams_weights_in_chunks(cell, monkeypatch):
    """W_hh too large to keep resident: the product loops over BK-wide chunks of H."""
    monkeypatch.setattr(tcommon, "RESIDENT_MAX", 0)
    variant = "step" if DEVICE == "cpu" else "persistent"
    dtype = next(iter(DTYPES.values()))
    with use_variant(variant):
        check_packed(cell, make_case(cell, LENGTHS["mixed_with_1"], dtype, h=40), dtype)


def _plans():
    """Plans with BLOCK_B=16, so B=20 takes two batch tiles. Under the interpreter the
    persistent code path (grid barrier, state carried in registers, h_{t-1} read back)
    runs with a single program per batch tile, whose barriers never wait."""

    def make(variant, bh, bk):
        def plan(B, h, n_gates, like, T=0):
            Hp = max(16, triton.next_power_of_2(h))
            BH, BK = bh or Hp, bk or Hp
            return tcommon.Plan(variant, 16, BH, BK, 4, triton.cdiv(B, 16), triton.cdiv(h, BH))

        return plan

    plans = {
        "loop": make("loop", None, None),
        "step_htiles_streamed": make("step", 16, 16),
        "persistent_resident": make("persistent", None, None),
        "persistent_streamed": make("persistent", None, 16),
    }
    if DEVICE == "cuda":
        plans["persistent_htiles"] = make("persistent", 16, 16)
    return plans


PLANS = _plans()


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_packed_several_batch_tiles(cell, plan, monkeypatch):
    dtype = next(iter(DTYPES.values()))
    c = make_case(cell, MULTI_TILE_LENGTHS, dtype, h=20)
    want = oracle(cell, c)  # its one-sequence dense runs keep the default plan
    for module in (lstm, gru, rnn):
        monkeypatch.setattr(module, "plan", plan)
    check_packed(cell, c, dtype, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cell", CELLS)
def test_equal_batch_sizes_match_dense_exactly(cell, variant):
    """batch_sizes = [B] * T is the dense layout: the same numbers, bit for bit."""
    dtype = next(iter(DTYPES.values()))
    c = make_case(cell, [4, 4, 4], dtype)
    T, B = 4, 3
    dense = {k: v.view(T, B, -1) if k in ("xp", "grad_out") else v for k, v in c.items()}
    with use_variant(variant):
        got, want = run_packed(cell, c), run_dense(cell, dense)
    assert got.keys() == want.keys()
    for name, a in got.items():
        assert torch.equal(a, want[name].reshape(a.shape)), name


@pytest.mark.parametrize(
    "batch_sizes, match",
    [
        (torch.tensor([2, 3]), "non-increasing"),
        (torch.tensor([3, 0]), "non-increasing"),
        (torch.tensor([3, 2, 2]), "sum to"),
        (torch.tensor([3, 2], dtype=torch.int32), "1-D int64 CPU"),
        (torch.tensor([[3, 2]]), "1-D int64 CPU"),
    ],
    ids=["increasing", "zero", "wrong_sum", "int32", "2d"],
)
def test_bad_batch_sizes_are_refused(batch_sizes, match):
    c = make_case("rnn_tanh", [2, 2, 1], torch.float32)  # N = 5, B = 3
    with pytest.raises(ValueError, match=match):
        rnn.rnn_fwd(c["xp"], c["h0"], c["w_hh"], False, batch_sizes)
