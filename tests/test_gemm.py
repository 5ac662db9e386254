"""The CPU step-GEMM engines and their plan: every engine this machine runs against
torch.mm and, inside every cell, against ``reference`` (forward and every gradient);
FASTCHAR_GEMM for each engine, including ones this CPU cannot run; the plan and its
cache file (corrupt, foreign, stale, unwritable).

Shape letters: M rows of A, N columns of op(W), K the reduced dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import CELLS, assert_close
from test_cpp import forward_backward, make_inputs, run_op

from fastchar import plan
from fastchar.backends import cpp_loaded

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="fastchar._C is not built")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
F32_ENGINES = ("mkl", "onednn", "fma")  # bf16dot and bf16fma are bf16 x bf16 kernels
OWN_ENGINES = ("fma", "bf16dot", "bf16fma")  # fastchar's micro-kernels
CELL_ENGINES = {torch.float32: ("mkl", "fma"), torch.bfloat16: ("mkl", "bf16fma", "bf16dot")}
WIDE_ENGINES = {torch.float32: ("mkl", "fma"), torch.bfloat16: ("mkl", "bf16dot")}


def runnable(dtype):
    return [e for e in plan.ENGINES if plan.why_not(e, dtype) is None]


def not_runnable(dtype):
    return [e for e in plan.ENGINES if plan.why_not(e, dtype) is not None]


ENGINE_CASES = [
    pytest.param(e, d, id=f"{e}-{name}")
    for name, d in DTYPES.items()
    for e in plan.ENGINES
    if cpp_loaded() and plan.why_not(e, d) is None
]
GEMM_SHAPES = {  # (M, N, K): rows of one and odd sizes; K past the FMA kernel's 256 block
    "M1": (1, 100, 33),
    "M5_N7_K70": (5, 7, 70),
    "M3_N33": (3, 33, 100),
    "M4_K600": (4, 100, 600),  # one row block over three K blocks
    "M17_N132_K300": (17, 132, 300),
    "M13_N100_K300": (13, 100, 300),  # balanced row blocks (6 + 7) where measured faster
    "M26_N40_K20": (26, 40, 20),  # 9 + 9 + 8
    "M7_K1": (7, 16, 1),
}


def test_float32_runs_on_at_least_two_engines():
    """mkl always runs; a second engine (onednn or fma) gives the plan a real choice."""
    assert "mkl" in runnable(torch.float32)
    assert len(runnable(torch.float32)) >= 2


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "add"])
@pytest.mark.parametrize("op", plan.OPS)
@pytest.mark.parametrize("shape", GEMM_SHAPES.values(), ids=GEMM_SHAPES.keys())
@pytest.mark.parametrize(("engine", "dtype"), ENGINE_CASES)
def test_engine_matches_mm(engine, dtype, shape, op, accumulate):
    M, N, K = shape
    trans_w, trans_a = op in ("nt", "cell"), op == "wide_tn"  # wide_tn: a stored [K, M]
    a = (torch.randn(K, M) if trans_a else torch.randn(M, K)).to(dtype)
    w = (torch.randn(N, K) if trans_w else torch.randn(K, N)).to(dtype)
    c = torch.randn(M, N) if accumulate else None
    limits = (("cell", CELL_ENGINES, "cell ops' GEMM"), ("wide", WIDE_ENGINES, "wide GEMMs"))
    for kind, engines, says in limits:
        if op.startswith(kind) and engine not in engines[dtype]:
            with pytest.raises(RuntimeError, match=says):
                plan.run(engine, a, w, op, c)
            return
    got = plan.run(engine, a, w, op, c)
    want = (a.double().t() if trans_a else a.double()) @ (w.double().t() if trans_w else w.double())
    if op.startswith("wide") and engine == "mkl" and dtype == torch.bfloat16:
        # ATen's bf16 matmul rounds its product to bfloat16 before it is added to C
        prod = got.double() - (c.double() if accumulate else 0)
        torch.testing.assert_close(prod, want, atol=2e-5 * K**0.5, rtol=2**-8)
        return
    if accumulate:
        want = want + c.double()
    # fp32 products of exactly-representable bf16 inputs: both dtypes round only the sums
    torch.testing.assert_close(got.double(), want, atol=2e-5 * K**0.5, rtol=1e-5)


@pytest.mark.skipif(
    not cpp_loaded() or plan.why_not("fma", torch.float32) is not None,
    reason="the fma engine does not run on this CPU",
)
@pytest.mark.parametrize("shape", [(21, 40, 300), (8, 16, 8), (5, 33, 7)], ids=str)
def test_fma_wide_tn_is_wide_nn_of_the_transpose(shape):
    """fma turns a transposed A's blocks into rows (8 x 8 tiles, then the leftover rows
    and columns) before its micro-kernels: the same bits as the same product with A
    already stored as rows."""
    M, N, K = shape
    a, w = torch.randn(K, M), torch.randn(K, N)
    tn = plan.run("fma", a, w, "wide_tn")
    assert torch.equal(tn, plan.run("fma", a.t().contiguous(), w, "wide_nn"))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("engine", plan.ENGINES)
def test_forcing_an_engine(engine, dtype, monkeypatch, cell="lstm"):
    """FASTCHAR_GEMM=<engine>: runs it where this CPU can, else a clear RuntimeError."""
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    inputs = make_inputs(cell, 3, 2, 4, 20, dtype)
    if plan.why_not(engine, dtype) is None:
        assert plan.choose(dtype, "nt", 2, 80, 20) == engine
        forward_backward(cell, "cpp", inputs)
    else:
        with pytest.raises(RuntimeError, match=f"FASTCHAR_GEMM={engine} cannot run"):
            forward_backward(cell, "cpp", inputs)


@pytest.mark.parametrize("engine", ["bf16fma", "bf16dot"])
def test_forcing_a_bf16_engine_where_bf16_matmuls_widen(engine, monkeypatch):
    """Where bf16 matmuls widen to float32 (CPUs without fast bf16 GEMMs, e.g. an AVX2
    EPYC), the backward's wide GEMMs run in float32: a forced bf16-only step engine leaves
    them on mkl instead of refusing a float32 product nobody asked it for."""
    if plan.why_not(engine, torch.bfloat16) is not None:
        pytest.skip(f"this CPU cannot run {engine}: {plan.why_not(engine, torch.bfloat16)}")
    monkeypatch.setattr(plan, "_bf16_widen", True)
    inputs = make_inputs("lstm", 12, 5, 8, 40, torch.float64)
    theirs = _bf16_errors("lstm", "torch", inputs)
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    assert plan.choose(torch.float32, "wide_tn", 60, 160, 40) == "mkl"
    mine = _bf16_errors("lstm", "cpp", inputs)
    for i, (m, t) in enumerate(zip(mine, theirs, strict=True)):
        assert 0 < m <= 2 * t + 1e-2, (engine, i, m, t)


@pytest.mark.parametrize("op", ["nn", "nt"])
@pytest.mark.parametrize("shape", GEMM_SHAPES.values(), ids=GEMM_SHAPES.keys())
def test_bf16fma_is_fma_on_widened_inputs(shape, op):
    """bf16fma reads W as bf16 pairs but runs the same FMA chain, k in order, as fma on W
    widened to float32: the results are equal bit for bit."""
    for e in ("fma", "bf16fma"):
        if plan.why_not(e, torch.bfloat16) is not None:
            pytest.skip(f"this CPU cannot run {e}: {plan.why_not(e, torch.bfloat16)}")
    M, N, K = shape
    a = torch.randn(M, K).bfloat16()
    w = (torch.randn(N, K) if op == "nt" else torch.randn(K, N)).bfloat16()
    c = torch.randn(M, N)
    for acc in (None, c):
        assert torch.equal(plan.run("bf16fma", a, w, op, acc), plan.run("fma", a, w, op, acc))


@pytest.mark.parametrize("op", ["nn", "nt"])
@pytest.mark.parametrize(
    ("engine", "dtype"), [c for c in ENGINE_CASES if c.values[0] in OWN_ENGINES]
)
def test_own_engines_give_a_row_the_same_bits_in_any_batch(engine, dtype, op):
    """A few rows (one row block: each panel group runs all of K before the next) and many
    (K blocks outside, every group inside) sum each element in the same order, k after k:
    a row's result has the same bits either way. K spans several K blocks (7 of k; 4 of
    bf16 pairs) and N's 13 panels fall into uneven groups."""
    M, N, K = 20, 200, 1600
    a = torch.randn(M, K).to(dtype)
    w = (torch.randn(N, K) if op == "nt" else torch.randn(K, N)).to(dtype)
    c = torch.randn(M, N)
    for acc in (None, c):
        many = plan.run(engine, a, w, op, acc)
        for rows in (1, 4):
            few = plan.run(engine, a[:rows], w, op, None if acc is None else acc[:rows])
            assert torch.equal(few, many[:rows]), (engine, op, rows)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("engine", "dtype"), ENGINE_CASES)
def test_cell_op_with_each_engine_forced(engine, dtype, cell, monkeypatch):
    """The sampling step runs under every FASTCHAR_GEMM this CPU can run (engines with no
    cell kernel leave the cell on mkl): float32 matches reference; bfloat16 is within 2x
    torch's own bf16 error against float64."""
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    if dtype == torch.float32:
        inputs = make_inputs(cell, None, 3, 5, 33, torch.float32, seq=False)
        got = run_op(cell, "cpp", inputs, seq=False)
        want = run_op(cell, "reference", inputs, seq=False)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b, torch.float32, f"{engine} {cell} cell")
        return
    inputs = make_inputs(cell, None, 3, 70, 40, torch.float64, seq=False)
    bf = {k: v.bfloat16() for k, v in inputs.items()}
    want = run_op(cell, "reference", {k: v.double() for k, v in bf.items()}, seq=False)
    mine = run_op(cell, "cpp", bf, seq=False)
    theirs = run_op(cell, "torch", bf, seq=False)
    for m, t, w in zip(mine, theirs, want, strict=True):
        err, ref = (m.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        assert err <= 2 * ref + 1e-2, (engine, cell, err, ref)


def test_engine_this_cpu_lacks_is_a_clear_error(monkeypatch):
    lacking = not_runnable(torch.bfloat16) or not_runnable(torch.float32)
    dtype = torch.bfloat16 if not_runnable(torch.bfloat16) else torch.float32
    monkeypatch.setenv("FASTCHAR_GEMM", lacking[0])
    inputs = make_inputs("gru", 2, 3, 4, 16, dtype)
    with pytest.raises(RuntimeError, match=plan.why_not(lacking[0], dtype)[:30]):
        forward_backward("gru", "cpp", inputs)


def test_unknown_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTCHAR_GEMM", "blas9000")
    with pytest.raises(RuntimeError, match="unknown GEMM engine 'blas9000'.*choose from auto"):
        forward_backward("rnn_tanh", "cpp", make_inputs("rnn_tanh", 2, 2, 3, 8, torch.float32))


def test_forced_engine_ignores_case_and_blanks(monkeypatch):
    monkeypatch.setenv("FASTCHAR_GEMM", " MKL\n")
    assert plan.choose(torch.float32, "nt", 2, 16, 8) == "mkl"
    assert plan.forced_report()[0].startswith("FASTCHAR_GEMM=mkl forces every float32")
    monkeypatch.setenv("FASTCHAR_GEMM", "Auto ")
    assert plan.forced_report() == []
    assert plan.choose(torch.float32, "nt", 2, 16, 8) in runnable(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_deterministic_mode_times_nothing(dtype, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) no engine is chosen by timing (the
    plan's timings may choose differently from one process to the next, and engines round
    differently): nothing is measured or kept, and float32 runs fma (else mkl) throughout."""
    inputs = make_inputs("lstm", 5, 3, 4, 40, dtype)
    plan.clear()
    torch.use_deterministic_algorithms(True)
    try:
        got, got_grads = forward_backward("lstm", "cpp", inputs)
        assert plan.entries() == [] and plan._bf16_widen is None
        assert plan.bf16_matmul_widens()
    finally:
        torch.use_deterministic_algorithms(False)
    if dtype != torch.float32:
        return
    monkeypatch.setenv("FASTCHAR_GEMM", "fma" if plan.why_not("fma", dtype) is None else "mkl")
    want, want_grads = forward_backward("lstm", "cpp", inputs)
    for a, b in zip([*got, *got_grads.values()], [*want, *want_grads.values()], strict=True):
        assert torch.equal(a, b)


def test_auto_is_the_plan(monkeypatch):
    monkeypatch.setenv("FASTCHAR_GEMM", "auto")
    assert plan.choose(torch.float32, "nt", 5, 48, 40) in runnable(torch.float32)
    assert plan.choose(torch.float32, "cell", 1, 48, 40) in ("mkl", "fma")


LAYER_SHAPES = {  # (T, B, I, H)
    "T1_B1_H33": (1, 1, 3, 33),
    "T5_B3_H100": (5, 3, 4, 100),
    "T4_B17_H33": (4, 17, 5, 33),
}


@pytest.mark.parametrize("shape", LAYER_SHAPES.values(), ids=LAYER_SHAPES.keys())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("engine", F32_ENGINES)
def test_layer_on_each_engine_matches_reference(engine, cell, shape, monkeypatch):
    """Forward, final states and every gradient, float32, with the engine forced."""
    if plan.why_not(engine, torch.float32) is not None:
        pytest.skip(f"this CPU cannot run {engine}: {plan.why_not(engine, torch.float32)}")
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    inputs = make_inputs(cell, *shape, torch.float32)
    got, got_grads = forward_backward(cell, "cpp", inputs)
    monkeypatch.delenv("FASTCHAR_GEMM")
    want, want_grads = forward_backward(cell, "reference", inputs)
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=False):
        assert_close(a, b, torch.float32, f"{engine} {name}")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, f"{engine} grad {name}")


def _bf16_errors(cell, impl, inputs64):
    """Max abs error of a bf16 run's outputs and gradients against a float64 run."""
    bf = {k: None if v is None else v.to(torch.bfloat16) for k, v in inputs64.items()}
    exact = {k: None if v is None else v.to(torch.bfloat16).double() for k, v in inputs64.items()}
    got, got_grads = forward_backward(cell, impl, bf)
    want, want_grads = forward_backward(cell, "reference", exact)
    errs = [(a.double() - b).abs().max().item() for a, b in zip(got, want, strict=True)]
    errs += [(got_grads[n].double() - want_grads[n]).abs().max().item() for n in want_grads]
    return errs


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("engine", plan.ENGINES)
def test_bfloat16_layer_on_each_engine_within_torchs_error(engine, cell, monkeypatch):
    """bf16 with the engine forced: error against float64 at most 2x torch's own bf16 error."""
    if plan.why_not(engine, torch.bfloat16) is not None:
        pytest.skip(f"this CPU cannot run {engine} in bf16: {plan.why_not(engine, torch.bfloat16)}")
    inputs = make_inputs(cell, 12, 5, 8, 40, torch.float64)
    theirs = _bf16_errors(cell, "torch", inputs)
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    mine = _bf16_errors(cell, "cpp", inputs)
    for i, (m, t) in enumerate(zip(mine, theirs, strict=True)):
        assert 0 < m <= 2 * t + 1e-2, (engine, i, m, t)


@pytest.mark.parametrize(("engine", "dtype"), ENGINE_CASES)
def test_thread_count_does_not_change_results_on_any_engine(engine, dtype, monkeypatch):
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    inputs = make_inputs("lstm", 5, 3, 4, 70, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = forward_backward("lstm", "cpp", inputs)
        torch.set_num_threads(3)
        many, many_grads = forward_backward("lstm", "cpp", inputs)
    finally:
        torch.set_num_threads(threads)

    def check(a, b, what):
        # fastchar's kernels sum every element in one order whatever the split: equal bits;
        # the libraries' kernels may block a narrower slice differently: equal to rounding
        if engine in OWN_ENGINES:
            assert torch.equal(a, b), what
        elif dtype == torch.float32:
            assert_close(a, b, dtype, what)
        else:  # one bf16 rounding apart at most
            torch.testing.assert_close(a, b, msg=what)

    for a, b in zip(many, one, strict=True):
        check(a, b, engine)
    for name in one_grads:
        check(many_grads[name], one_grads[name], f"{engine} grad {name}")


def test_plan_keeps_its_choice():
    first = plan.choose(torch.float32, "nn", 6, 40, 120, 2)
    assert first in runnable(torch.float32)
    entry = dict(dtype=torch.float32, op="nn", M=6, N=40, K=120, engine=first)
    assert entry in plan.entries()
    for _ in range(3):
        assert plan.choose(torch.float32, "nn", 6, 40, 120, 2) == first


# ---- the cache file ----


def _write(path, **changes):
    data = plan._identity()
    data["entries"] = [
        dict(dtype="float32", op="nt", M=9, N=41, K=23, engine="mkl"),
        dict(dtype="bfloat16", op="nn", M=9, N=41, K=23, engine="mkl"),
    ]
    data.update(changes)
    path.write_text(json.dumps(data))


def test_cache_entries_are_used(tmp_path):
    """A valid file seeds the plan: its engine is taken without measuring."""
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    _write(path)
    assert plan.load_cache(path) == 2
    assert plan.choose(torch.float32, "nt", 9, 41, 23) == "mkl"
    assert plan.choose(torch.bfloat16, "nn", 9, 41, 23) == "mkl"


@pytest.mark.parametrize(
    "changes",
    [
        dict(cpu="Some Other CPU 9000"),
        dict(torch="1.0.0"),
        dict(fastchar="0.0.1"),
        dict(build="123-456"),
        dict(format=99),
    ],
    ids=["other_cpu", "other_torch", "other_fastchar", "rebuilt_extension", "other_format"],
)
def test_foreign_or_stale_cache_is_ignored_and_rewritten(tmp_path, changes):
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    _write(path, **changes)
    assert plan.load_cache(path) == 0
    assert plan.entries() == []
    plan.choose(torch.float32, "nt", 4, 32, 16)
    assert plan.save_cache(path)
    data = json.loads(path.read_text())
    assert {k: data[k] for k in plan._identity()} == plan._identity()
    assert [e["M"] for e in data["entries"]] == [4]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b"", b"[" * 200_000],  # RecursionError
    ids=["not_json", "not_utf8", "a_list", "empty", "nested_too_deep"],
)
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, content):
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    path.write_bytes(content)
    assert plan.load_cache(path) == 0
    plan.choose(torch.float32, "nn", 3, 24, 40)
    assert plan.save_cache(path)
    assert plan.load_cache(path) == 1


def test_cache_rows_that_do_not_fit_are_dropped(tmp_path):
    """Unknown engines, bad shapes and engines this CPU cannot run never enter the plan."""
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    bad = [
        dict(dtype="float32", op="nt", M=0, N=8, K=8, engine="mkl"),
        dict(dtype="float32", op="nt", M=2, N=8, K=8, engine="no-such-engine"),
        dict(dtype="float64", op="nt", M=2, N=8, K=8, engine="mkl"),
        dict(dtype="float32", op="nt", M=2, N=8, K=8, engine="bf16dot"),
        dict(dtype="float32", op="nn", M=2, N=8, K=8, engine="bf16fma"),
        dict(dtype="float32", op="cell", M=2, N=8, K=8, engine="onednn"),
        dict(dtype="float32", op="tn", M=2, N=8, K=8, engine="mkl"),
        dict(dtype="float32", M=2, N=8, K=8, engine="mkl"),
        "not a row",
    ]
    good = dict(dtype="float32", op="nt", M=5, N=8, K=8, engine="mkl")
    _write(path, entries=[*bad, good])
    assert plan.load_cache(path) == 1
    assert plan.entries() == [dict(good, dtype=torch.float32)]


@pytest.mark.parametrize("entries", [None, 5, "x", {"M": 2}], ids=repr)
def test_cache_whose_entries_are_not_a_list_is_ignored(tmp_path, entries):
    """A file with the right identity but no list of entries: ignored, as a corrupt file
    is (it crashed `import fastchar.ops`, and so every command, until deleted by hand)."""
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    _write(path, entries=entries)
    assert plan.load_cache(path) == 0
    assert plan.entries() == []


def test_cache_dimensions_that_are_not_shapes_are_dropped(tmp_path):
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    row = dict(dtype="float32", op="nt", N=8, K=8, engine="mkl")
    bad = [dict(row, M=m) for m in (float("inf"), 1e30, 2**70, True, 2.5, "7", -3)]
    _write(path, entries=[*bad, dict(row, M=5)])  # json writes inf as Infinity
    assert plan.load_cache(path) == 1
    assert plan.entries() == [dict(row, M=5, dtype=torch.float32)]


def test_saving_keeps_what_another_process_saved_since(tmp_path):
    """Two processes that finish together: the second to save keeps the first's shapes,
    and its own choice where both chose the same shape."""
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    mine = dict(dtype="float32", op="nt", M=9, N=41, K=23)
    _write(path, entries=[dict(mine, engine="fma")])
    assert plan.load_cache(path) == 1  # this process's choice for `mine`: fma
    other = dict(dtype="float32", op="nn", M=3, N=5, K=7, engine="mkl")
    _write(path, entries=[dict(mine, engine="mkl"), other])  # another process saved since
    plan.choose(torch.float32, "nt", 2, 16, 8)  # something new to save
    assert plan.save_cache(path)
    saved = json.loads(path.read_text())["entries"]
    shapes = [(e["op"], e["M"], e["N"], e["K"]) for e in saved]
    assert sorted(shapes) == [("nn", 3, 5, 7), ("nt", 2, 16, 8), ("nt", 9, 41, 23)]
    assert dict(mine, engine="fma") in saved and other in saved
    plan.clear()
    assert plan.load_cache(path) == 3


def test_a_directory_at_the_cache_path_leaves_no_temp_file(tmp_path):
    plan.clear()
    path = tmp_path / "gemm-plan.json"
    path.mkdir()
    plan.choose(torch.float32, "nt", 2, 16, 8)
    assert plan.save_cache(path) is False
    assert [p.name for p in tmp_path.iterdir()] == ["gemm-plan.json"]


def test_unwritable_cache_directory_is_not_an_error(tmp_path):
    plan.clear()
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    plan.choose(torch.float32, "nt", 2, 16, 8)
    assert plan.save_cache(blocker / "sub" / "gemm-plan.json") is False


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", str(tmp_path))
    assert plan.cache_path() == tmp_path / "gemm-plan.json"
    monkeypatch.delenv("FASTCHAR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan.cache_path() == tmp_path / "xdg" / "fastchar" / "gemm-plan.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not a cache next to each working dir
    assert plan.cache_path() == tmp_path / "home" / ".cache" / "fastchar" / "gemm-plan.json"
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", "~/fc")  # not a directory named "~"
    assert plan.cache_path() == tmp_path / "home" / "fc" / "gemm-plan.json"


def _no_home(monkeypatch):
    """As in a container run with a uid that has no passwd entry and no HOME."""
    import pwd

    def no_entry(uid):
        raise KeyError(uid)

    for name in ("FASTCHAR_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)


def test_no_home_directory_keeps_no_cache(monkeypatch, tmp_path):
    from fastchar.info import gemm_report

    _no_home(monkeypatch)
    assert plan.cache_path() is None
    line = next(ln for ln in gemm_report(False) if ln.startswith("  cache"))
    assert line.startswith("  cache      none: no home directory is known")
    plan.clear()
    plan.choose(torch.float32, "nt", 2, 16, 8)
    assert plan.load_cache(None) == 0 and plan.save_cache(None) is False
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", "~nosuchuser-fastchar/x")  # not a dir named ~...
    assert plan.cache_path() is None
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", str(tmp_path))  # it names one: kept there
    assert plan.cache_path() == tmp_path / "gemm-plan.json"


def test_no_home_directory_imports_and_says_where_corpora_go(monkeypatch):
    """import fastchar.nn reads the plan's cache: without a home it has none (it used to
    raise "Could not determine home directory" at import); a corpus to fetch names the
    variable to set."""
    from fastchar.data import DataError
    from fastchar.training import corpora

    _no_home(monkeypatch)
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    plan._install()  # what importing fastchar does
    with pytest.raises(DataError, match=f"no home directory is known; set {corpora.DATA_DIR_ENV}"):
        corpora.fetch(corpora.FETCHED["shakespeare"])


def test_relative_cache_dir_is_one_directory(monkeypatch, tmp_path):
    """A relative FASTCHAR_CACHE_DIR is read and written in the same place, whatever the
    working directory is by the time the process saves at exit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", "rel")
    path = plan.cache_path()
    assert path == tmp_path / "rel" / "gemm-plan.json" and path.is_absolute()


def test_info_says_when_a_parent_cannot_be_searched(monkeypatch, tmp_path):
    from fastchar.info import gemm_report

    target = tmp_path / "locked" / "cache"
    real_exists = Path.exists

    def exists(self, *a, **k):
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *a, **k)

    monkeypatch.setenv("FASTCHAR_CACHE_DIR", str(target))
    monkeypatch.setattr(Path, "exists", exists)
    line = next(ln for ln in gemm_report(False) if ln.startswith("  cache"))
    assert line.endswith(
        f"(not writable: {target} is not accessible (Permission denied); each process "
        "measures again)"
    )


def test_cpu_model_has_its_family_and_model(tmp_path, monkeypatch):
    """A VM names a Zen 3 and a Zen 4 alike ("AMD EPYC"): the numbers tell them apart, in
    info, the benchmarks' header and the plan cache's identity."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
    cpuinfo.write_text(block.format(0) + "\n" + block.format(1).replace("17", "99"))
    monkeypatch.setattr(plan, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    plan._cpuinfo.cache_clear()  # read once per process: again for each fake file
    try:
        assert plan.cpu_model() == "AMD EPYC (cpu family 25, model 17)"
        cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
        plan._cpuinfo.cache_clear()
        assert plan.cpu_model() == "Some CPU"
    finally:
        plan._cpuinfo.cache_clear()  # the real file's again for the tests after this one


def test_info_prints_cpu_engines_and_plan():
    from fastchar.info import report

    text = report()
    assert plan.cpu_model() in text
    for engine in plan.ENGINES:
        assert engine in text
    assert "-> " in text.split("[cpu gemm]")[1]


def test_info_says_what_fastchar_gemm_forces_and_where_it_cannot(monkeypatch):
    from fastchar.info import gemm_report

    monkeypatch.setenv("FASTCHAR_GEMM", "bogus")
    assert any("FASTCHAR_GEMM=bogus is not an engine" in ln for ln in gemm_report(False))
    monkeypatch.setenv("FASTCHAR_GEMM", "mkl")
    lines = gemm_report(False)
    for name in ("float32", "bfloat16"):
        assert f"  forced     FASTCHAR_GEMM=mkl forces every {name} step GEMM onto mkl" in lines
    monkeypatch.setenv("FASTCHAR_GEMM", "bf16dot")
    assert any("bf16dot cannot run float32 here" in ln for ln in gemm_report(False))


def test_info_says_when_the_cache_cannot_be_kept(monkeypatch, tmp_path):
    from fastchar.info import gemm_report

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", str(blocker / "sub"))
    line = next(ln for ln in gemm_report(False) if ln.startswith("  cache"))
    assert line.endswith(f"(not writable: {blocker} is no directory; each process measures again)")
    monkeypatch.setenv("FASTCHAR_CACHE_DIR", str(tmp_path / "new" / "dir"))  # made at the save
    line = next(ln for ln in gemm_report(False) if ln.startswith("  cache"))
    assert line == f"  cache      {tmp_path / 'new' / 'dir' / 'gemm-plan.json'}"


def test_measuring_does_not_move_the_random_stream():
    """A run that measures the plan and one that reads it from the cache draw the same
    dropout masks and batches."""
    torch.manual_seed(7)
    want = torch.rand(5)
    plan.clear()
    torch.manual_seed(7)
    plan.choose(torch.float32, "nt", 3, 64, 48)
    plan.choose(torch.float32, "cell", 2, 64, 48)
    plan.bf16_matmul_widens()
    assert torch.equal(torch.rand(5), want)


@pytest.mark.parametrize("widen", [True, False], ids=["widen", "native"])
def test_bf16_linear_follows_the_measured_choice(widen, monkeypatch):
    """fastchar's linear: float32 then rounded where bf16 GEMMs are slow, else torch's."""
    import torch.nn.functional as F

    from fastchar.ops._common import linear

    monkeypatch.setattr(plan, "_bf16_widen", widen)
    x, w, b = torch.randn(6, 40).bfloat16(), torch.randn(24, 40).bfloat16(), torch.randn(24)
    got = linear(x, w, b.bfloat16())
    assert got.dtype == torch.bfloat16
    wide = F.linear(x.float(), w.float(), b.bfloat16().float()).bfloat16()
    assert torch.equal(got, wide if widen else F.linear(x, w, b.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, as CharRNN trains
        got = linear(x.float(), w.float(), b)
    assert got.dtype == torch.bfloat16
    if widen:
        assert torch.equal(got, F.linear(x.float(), w.float(), b).bfloat16())


def test_bf16_choice_is_measured_outside_autocast(monkeypatch):
    """Under autocast both timed products would run in bf16 and the choice would be noise."""
    calls = []
    monkeypatch.setattr(plan, "_bf16_widen", None)
    monkeypatch.setattr(
        plan, "_measure_bf16_widens", lambda: calls.append(torch.is_autocast_enabled("cpu"))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan.bf16_matmul_widens()
    assert calls == [False]


def test_bf16_choice_is_measured_on_real_tensors_under_compile(monkeypatch):
    """First asked while torch.compile traces a bf16 backward (fake tensors, a tracer's
    proxies), the matmuls are still timed for real: a choice from fake timings would be kept
    in the cache. A one-graph trace of CharRNN's bf16 head takes the answer as a constant."""
    from torch._subclasses.fake_tensor import is_fake

    from fastchar.model import CharRNN
    from fastchar.nn import LSTM

    timed = []
    time_mm = plan._time_mm

    def recording_time_mm(a, b, dtype):
        timed.append(type(a) is torch.Tensor and not is_fake(a))
        return time_mm(a, b, dtype)

    monkeypatch.setattr(plan, "_bf16_widen", None)
    monkeypatch.setattr(plan, "_time_mm", recording_time_mm)
    torch._dynamo.reset()
    lstm = LSTM(8, 16, impl="cpp").bfloat16()
    x = torch.randn(5, 2, 8).bfloat16().requires_grad_()
    with torch._dynamo.config.patch(allow_rnn=True):
        out = torch.compile(lstm, backend="aot_eager", fullgraph=True)(x)[0]
        out.float().sum().backward()
        assert timed and all(timed)
        model = CharRNN(20, hidden=16, impl="cpp").bfloat16()
        ids = torch.randint(0, 20, (2, 6))
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        compiled = torch.compile(model, backend=backend, fullgraph=True)
        assert torch.equal(compiled(ids)[0], model(ids)[0])  # the same ops as eager
        # A new answer (plan.clear() and a new measurement) traces again: it is a guarded
        # global in the graph, not a constant baked in.
        monkeypatch.setattr(plan, "_bf16_widen", not plan._bf16_widen)
        assert torch.equal(compiled(ids)[0], model(ids)[0])
    assert len(graphs) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("trans_a", [True, False], ids=["tn", "nn"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("engine", ["auto", "mkl", "fma", "bf16dot"])
def test_mm_sum_matches_float64(engine, dtype, trans_a, monkeypatch):
    """The backward passes' wide GEMMs: two terms (one a column block of a wider tensor, as
    the GRU's gradients are), M past one thread's row range and one A block, K past one K
    block and odd; float32 accumulation, one rounding to the input dtype."""
    if engine not in ("auto", *WIDE_ENGINES[dtype]):
        pytest.skip(f"{engine} has no {dtype} wide kernel (it leaves the wide GEMMs on mkl)")
    if engine != "auto" and plan.why_not(engine, dtype) is not None:
        pytest.skip(f"this CPU cannot run {engine}: {plan.why_not(engine, dtype)}")
    monkeypatch.setenv("FASTCHAR_GEMM", engine)
    M, N = 400, 40
    a, b = [], []
    for K in (601, 7):
        wide = torch.randn(K, 2 * M) if trans_a else torch.randn(M, 2 * K)
        a.append((wide[:, :M] if trans_a else wide[:, :K]).to(dtype))  # a column block: a view
        b.append(torch.randn(K, N).to(dtype))
    got = torch.ops.fastchar.mm_sum(a, b, trans_a)
    assert got.dtype == dtype and got.shape == (M, N)
    terms = [
        (x.double().t() if trans_a else x.double()) @ y.double() for x, y in zip(a, b, strict=True)
    ]
    want = sum(terms)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=2e-5 * 608**0.5, rtol=1e-5)
    elif engine in ("fma", "bf16dot"):  # float32 sums, one rounding to bf16: half an ulp
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2**-8)
    else:  # ATen rounds each term's product to bf16 too: half an ulp of the largest term
        atol = sum(t.abs().max().item() for t in terms) * 2**-8
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=2**-8)


def test_mm_sum_is_the_same_on_any_thread_count(monkeypatch):
    monkeypatch.setenv("FASTCHAR_GEMM", "fma")
    a, b = [torch.randn(300, 260)], [torch.randn(300, 50)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastchar.mm_sum(a, b, True)
        torch.set_num_threads(3)
        many = torch.ops.fastchar.mm_sum(a, b, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_mm_sum_bad_input_names_the_argument():
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    with pytest.raises(ValueError, match="same positive length"):
        torch.ops.fastchar.mm_sum([x], [y, y], True)
    with pytest.raises(ValueError, match="term 0 has a"):
        torch.ops.fastchar.mm_sum([x], [y], False)  # [6, 4] @ [6, 3]
    with pytest.raises(RuntimeError, match="b.*dtype"):
        torch.ops.fastchar.mm_sum([x], [y.double()], True)
    with pytest.raises(ValueError, match=r"a\[i\] must be 2-D"):
        torch.ops.fastchar.mm_sum([x[None]], [y], True)


@pytest.mark.parametrize("trans_a", [True, False], ids=["tn", "nn"])
def test_mm_sum_bf16_tall_product_in_row_blocks(trans_a):
    """bfloat16 products taller than the float32 accumulator's block (256K elements) are
    accumulated a block of rows at a time: every block lands in its place."""
    M, N, K = 3000, 100, 50
    a = (torch.randn(K, M) if trans_a else torch.randn(M, K)).bfloat16()
    b = torch.randn(K, N).bfloat16()
    got = torch.ops.fastchar.mm_sum([a, a], [b, -2 * b], trans_a)
    want = -((a.double().t() if trans_a else a.double()) @ b.double())
    terms = (a.double().t() if trans_a else a.double()).abs() @ b.double().abs()
    torch.testing.assert_close(got.double(), want, atol=terms.max().item() * 2**-7, rtol=2**-7)
