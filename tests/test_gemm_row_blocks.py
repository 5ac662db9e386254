"""The FMA kernels' row blocks where full blocks (12 rows with AVX-512, 6 with AVX2) leave
1-3 rows over (13 rows as 12 + 1, or balanced as 6 + 7; AVX2, 8 rows as 6 + 2 or 4 + 4):
which one runs is measured on the CPU at hand (``plan.row_blocks``), and either gives the
same product, bit for bit, on every engine and op that uses them."""

from __future__ import annotations

import pytest
import torch

from fastchar import plan
from fastchar.backends import cpp_loaded

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="fastchar._C is not built")

# fastchar's FMA kernels run (a GCC x86 build on an AVX2 or AVX-512 CPU), and which
FMA = cpp_loaded() and plan.why_not("fma", torch.float32) is None
AVX512 = FMA and "avx512f" in plan.cpu_flags()
# M rows that full blocks leave 1-3 over (and 12, 24: none over); N past one panel group
ROWS = (8, 9, 12, 13, 14, 15, 20, 24, 25, 27, 32, 37)
ENGINE_OPS = [
    pytest.param(e, d, op, id=f"{e}-{str(d)[6:]}-{op}")
    for e, d, ops in (
        ("fma", torch.float32, ("nn", "nt", "wide_nn", "wide_tn")),
        ("bf16dot", torch.bfloat16, ("nn", "nt", "wide_nn", "wide_tn")),
        ("bf16fma", torch.bfloat16, ("nn", "nt")),
    )
    for op in ops
    if cpp_loaded() and plan.why_not(e, d) is None
]


@pytest.fixture(autouse=True)
def _measured_blocks():
    yield
    plan.row_blocks("auto")


@pytest.mark.parametrize(("engine", "dtype", "op"), ENGINE_OPS)
def test_either_row_blocking_gives_the_same_product(engine, dtype, op):
    K, N = 300, 200  # K past the kernels' 256-step block
    for M in ROWS:
        trans_w, trans_a = op == "nt", op == "wide_tn"
        a = (torch.randn(K, M) if trans_a else torch.randn(M, K)).to(dtype)
        w = (torch.randn(N, K) if trans_w else torch.randn(K, N)).to(dtype)
        c = torch.randn(M, N)
        got = {}
        for mode in ("equal", "balanced"):
            assert plan.row_blocks(mode).startswith(mode)
            got[mode] = plan.run(engine, a, w, op, c)
        assert torch.equal(got["equal"], got["balanced"]), f"M={M}"
        A = a.double().t() if trans_a else a.double()
        want = A @ (w.double().t() if trans_w else w.double()) + c.double()
        err = (got["equal"].double() - want).abs().max().item()
        assert err <= 1e-4 * K**0.5 * want.abs().max().item(), f"M={M}: {err}"


# (M, equal, balanced) starts with each kernel width's full block (12 or 6 rows)
STARTS = {
    True: [
        (13, [0, 12, 13], [0, 6, 13]),
        (15, [0, 12, 15], [0, 7, 15]),
        (25, [0, 12, 24, 25], [0, 8, 16, 25]),
        (16, [0, 12, 16], [0, 12, 16]),  # 4 rows over: 12-row blocks either way
        (24, [0, 12, 24], [0, 12, 24]),
        (5, [0, 5], [0, 5]),
    ],
    False: [
        (8, [0, 6, 8], [0, 4, 8]),
        (9, [0, 6, 9], [0, 4, 9]),
        (32, [0, 6, 12, 18, 24, 30, 32], [0, 5, 10, 16, 21, 26, 32]),
        (10, [0, 6, 10], [0, 6, 10]),  # 4 rows over: 6-row blocks either way
        (12, [0, 6, 12], [0, 6, 12]),
        (5, [0, 5], [0, 5]),
    ],
}


@pytest.mark.skipif(not FMA, reason="this build or CPU runs no FMA kernels")
@pytest.mark.parametrize(("M", "equal", "balanced"), STARTS[AVX512])
def test_the_mode_sets_where_the_blocks_start(M, equal, balanced):
    plan.row_blocks("equal")
    assert plan.row_block_starts(M) == equal
    plan.row_blocks("balanced")
    assert plan.row_block_starts(M) == balanced
    plan.row_blocks("auto")
    measured = plan.row_blocks().startswith("balanced")
    assert plan.row_block_starts(M) == (balanced if measured else equal)


@pytest.mark.skipif(not FMA, reason="this build or CPU runs no FMA kernels")
def test_the_blocking_in_force_is_measured_and_said():
    said = plan.row_blocks("auto")
    assert said.startswith(("balanced (measured", "equal (measured")), said
    assert ("x the rate of 12 + 1" if AVX512 else "x the rate of 6 + 2") in said
    assert plan.row_blocks() == said  # measured once per process, kept
    assert plan.row_blocks("balanced") == "balanced (set)"
    assert plan.row_blocks() == "balanced (set)"
    assert plan.row_blocks("equal") == "equal (set)"


@pytest.mark.skipif(FMA, reason="this CPU runs fastchar's FMA kernels")
def test_without_fma_kernels_there_is_nothing_to_choose():
    assert plan.row_blocks().startswith("n/a: ")


def test_a_bad_mode_names_the_argument():
    with pytest.raises(ValueError, match="mode must be"):
        plan.row_blocks("fastest")
