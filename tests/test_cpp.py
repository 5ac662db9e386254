"""The C++ CPU kernels (impl="cpp") against reference and torch.nn: parity of outputs,
final states and every gradient, bfloat16 error, gradcheck, opcheck, torch.compile,
training and bad input.

Shape letters: T time, B batch, I input, H hidden, G gates (4H / 3H / H).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from parity import (
    CELLS,
    assert_close,
    check_bf16_within_torchs,
    check_module_parity,
    flatten_out,
    make_pair,
)

import fastchar.nn
from fastchar import ops, reference
from fastchar.backends import cpp_loaded, resolve
from fastchar.model import CharRNN

pytestmark = pytest.mark.skipif(
    not cpp_loaded(),
    reason="fastchar._C is not built (pip install --no-build-isolation -e .)",
)

N_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
SHAPES = {  # (T, B, I, H)
    "T1_B1": (1, 1, 3, 5),
    "T17_B3_H33": (17, 3, 4, 33),
    "T6_B8_H64": (6, 8, 16, 64),
}
LAYOUTS = {
    "2layers_bidir_batchfirst": dict(num_layers=2, bidirectional=True, batch_first=True),
    "3layers_bidir": dict(num_layers=3, bidirectional=True),
    "nobias": dict(bias=False),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def make_inputs(cell, T, B, I, H, dtype, bias=True, state=True, seq=True):
    """Leaf tensors for one layer (seq) or one cell step, named as in fastchar.ops."""
    G = N_GATES[cell] * H
    kw = dict(dtype=dtype)
    inputs = {"x": torch.randn(*((T, B, I) if seq else (B, I)), **kw)}
    inputs["h0"] = torch.randn(B, H, **kw) if state else None
    if cell == "lstm":
        inputs["c0"] = torch.randn(B, H, **kw) if state else None
    inputs["w_ih"] = torch.randn(G, I, **kw) / I**0.5
    inputs["w_hh"] = torch.randn(G, H, **kw) / H**0.5
    inputs["b_ih"] = torch.randn(G, **kw) if bias else None
    inputs["b_hh"] = torch.randn(G, **kw) if bias else None
    return inputs


def run_op(cell, impl, inputs, seq=True, **kwargs):
    """The op on ``inputs`` (make_inputs' order); ``kwargs`` (batch_sizes, w_hr) go with it."""
    name = cell.split("_")[0]
    fn = getattr(ops, name if seq else f"{name}_cell")
    extra = {"nonlinearity": cell.split("_")[1]} if name == "rnn" else {}
    result = fn(*inputs.values(), **extra, **kwargs, impl=impl)
    return list(result) if isinstance(result, tuple) else [result]


def forward_backward(cell, impl, inputs):
    """Outputs and the gradient of every tensor input under random output weights."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    results = run_op(cell, impl, {k: leaves.get(k) for k in inputs})
    gen = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=gen, dtype=r.dtype)).sum() for r in results)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [r.detach() for r in results], dict(zip(leaves, grads, strict=True))


def assert_same_run(cell, inputs, dtype, impl="cpp", oracle="reference"):
    got, got_grads = forward_backward(cell, impl, inputs)
    want, want_grads = forward_backward(cell, oracle, inputs)
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=False):
        assert_close(a, b, dtype, name)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], dtype, f"grad {name}")


def test_fused_runs_cpp_on_cpu():
    assert resolve("fused", "cpu") == "cpp"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_module_matches_torch(cell, shape, dtype):
    check_module_parity(cell, "cpp", *shape, dtype=dtype)


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_module_layouts_match_torch(cell, layout, with_state):
    check_module_parity(cell, "cpp", 7, 3, 4, 9, with_state=with_state, **layout)


@pytest.mark.parametrize("state", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_reference(cell, dtype, state):
    inputs = make_inputs(cell, 17, 3, 4, 33, dtype, state=state)
    assert_same_run(cell, inputs, dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_layer_without_bias_matches_reference(cell):
    inputs = make_inputs(cell, 5, 2, 3, 8, torch.float64, bias=False)
    assert_same_run(cell, inputs, torch.float64)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_cell_matches_reference_and_torch(cell, dtype, bias):
    inputs = make_inputs(cell, None, 3, 5, 33, dtype, bias=bias, seq=False)
    got = run_op(cell, "cpp", inputs, seq=False)
    for oracle in ("reference", "torch"):
        want = run_op(cell, oracle, inputs, seq=False)
        for name, a, b in zip(["h", "c"], got, want, strict=False):
            assert_close(a, b, dtype, f"{name} vs {oracle}")


@pytest.mark.parametrize("cell", CELLS)
def test_loss_on_one_output_matches_torch(cell):
    """Outputs the loss does not read reach the backward as None (no zero-filled
    [T, B, G] buffers); each single-output loss still gives torch's gradients."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    for k in range(3 if cell == "lstm" else 2):  # out, h_n, (c_n)
        grads = []
        for module in make_pair(cell, "cpp", 4, 9, num_layers=2):
            xi = x.clone().requires_grad_()
            flatten_out(module(xi))[k].pow(2).sum().backward()
            grads.append([xi.grad] + [p.grad for p in module.parameters()])
        for got, want in zip(*grads, strict=True):
            assert_close(got, want, torch.float64, f"output {k}")


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_forward(cell, monkeypatch):
    ours, _ = make_pair(cell, "cpp", 3, 6, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, hx_full = ours(x)
    name = cell.split("_")[0]

    def no_reference(*args, **kwargs):
        raise AssertionError("step without grad ran the reference, not the cell kernel")

    monkeypatch.setattr(reference, f"{name}_cell", no_reference)
    hx, steps = None, []
    with torch.no_grad():
        for t in range(x.shape[0]):
            y, hx = ours.step(x[t], hx)
            steps.append(y)
    assert_close(torch.stack(steps), out, torch.float64, "step outputs")
    for a, b in zip(flatten_out((None, hx))[1:], flatten_out((None, hx_full))[1:], strict=True):
        assert_close(a, b, torch.float64, "step state")


@pytest.mark.parametrize("cell", CELLS)
def test_step_under_grad_gives_torchs_gradients(cell):
    """The cell kernels have no backward: with grad mode on, step (and the *_cell ops) run
    the reference's differentiable step, so a loss over steps trains like torch.nn's."""
    ours, theirs = make_pair(cell, "cpp", 3, 6, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    losses = []
    for module, run in ((ours, "step"), (theirs, "forward")):
        xi = x.clone().requires_grad_()
        if run == "step":
            hx, ys = None, []
            for t in range(x.shape[0]):
                y, hx = module.step(xi[t], hx)
                ys.append(y)
            y = torch.stack(ys)
        else:
            y = module(xi)[0]
        y.pow(2).sum().backward()
        losses.append([xi.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*losses, strict=True):
        assert got is not None
        assert_close(got, want, torch.float64, "step gradient")
    inputs = make_inputs(cell, None, 2, 3, 5, torch.float32, seq=False)
    w = inputs["w_hh"].requires_grad_()
    (run_op(cell, "cpp", inputs, seq=False)[0].sum()).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_relu_propagates_nan_and_inf_as_torch():
    """relu(NaN) is NaN, as torch.relu's (a `x > 0 ? x : 0` turned it into 0), forward,
    step and backward (threshold_backward passes the gradient where h is NaN)."""
    ours, theirs = make_pair("rnn_relu", "cpp", 3, 4, dtype=torch.float32, num_layers=2)
    x = torch.randn(3, 2, 3)
    x[0, 0, 0] = float("nan")
    x[1, 1, 1] = float("inf")
    x[2, 1, 2] = -float("inf")
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, h_n = module(xi)
        out.sum().backward()
        results.append([out, h_n, xi.grad] + [p.grad for p in module.parameters()])
    assert results[1][0].isnan().any() and any(g.isnan().any() for g in results[1][3:])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    with torch.no_grad():
        step, _ = ours.step(x[0])
        want = theirs(x[:1])[0][0]
    assert step.isnan().any()
    torch.testing.assert_close(step, want, equal_nan=True)


@pytest.mark.parametrize("cell", CELLS)
def test_autocast_leaves_float64_alone(cell):
    """torch.autocast casts float32, not float64: a float64 module stays float64 and exact."""
    ours, theirs = make_pair(cell, "cpp", 3, 5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(x)[0]
            got_step = ours.step(x[0])[0]
    assert got.dtype == torch.float64 and got_step.dtype == torch.float64
    assert_close(got, want, torch.float64, "out under autocast")
    assert_close(got_step, want[0], torch.float64, "step under autocast")


def test_torch_func_grad_runs_the_reference_and_cpp_refuses_it(monkeypatch):
    """torch.func.grad cannot differentiate through the kernels' torch.autograd formulas:
    fused falls back to the reference (torch.nn's gradients, one warning), cpp refuses with
    a clear error; vmap alone still runs the kernels."""
    from torch.func import functional_call, grad, vmap

    monkeypatch.setattr(fastchar.backends, "_warned", set())  # the warning is once a reason
    ours, theirs = make_pair("lstm", "fused", 3, 4)
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,))[0].pow(2).sum()

    want = grad(loss(theirs))(params, x)
    with pytest.warns(RuntimeWarning, match="torch.func transforms"):
        got = grad(loss(ours))(params, x)
    for name in want:
        assert_close(got[name], want[name], torch.float64, f"grad {name}")
    ours.impl = "cpp"
    with pytest.raises(RuntimeError, match="impl='cpp'.*torch.func transforms"):
        grad(loss(ours))(params, x)
    xs = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        batched = vmap(lambda xi: ours(xi)[0])(xs)
        assert_close(batched[1], theirs(xs[1])[0], torch.float64, "vmap")


@pytest.mark.parametrize("cell", CELLS)
def test_functional_call_with_parameters_of_another_dtype(cell):
    """torch.func.functional_call swaps the parameters behind the module's back (no
    __setattr__): the input's dtype is checked against the swapped ones, as torch.nn does."""
    from torch.func import functional_call

    ours, theirs = make_pair(cell, "cpp", 3, 5, dtype=torch.float32)
    params = {k: v.detach().double() for k, v in theirs.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got = flatten_out(functional_call(ours, params, (x,)))
    want = flatten_out(functional_call(theirs, params, (x,)))
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=False):
        assert a.dtype == torch.float64
        assert_close(a, b, torch.float64, name)


def test_forward_ad_runs_the_reference_and_cpp_refuses_it(monkeypatch):
    """The kernels have no forward-mode formulas: while a torch.autograd.forward_ad dual
    level is open, fused runs the reference (torch.nn's tangents, one warning) and cpp
    refuses with a clear error."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(fastchar.backends, "_warned", set())
    ours, theirs = make_pair("gru", "fused", 3, 4, num_layers=2)
    x, t = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)

    def tangent(module):
        with fwAD.dual_level():
            return fwAD.unpack_dual(module(fwAD.make_dual(x, t))[0]).tangent

    want = tangent(theirs)
    with pytest.warns(RuntimeWarning, match="no forward-mode gradient"):
        got = tangent(ours)
    assert_close(got, want, torch.float64, "tangent")
    ours.impl = "cpp"
    with pytest.raises(RuntimeError, match="impl='cpp'.*no forward-mode gradient"):
        tangent(ours)
    assert ours(x)[0].shape == (5, 2, 4)  # outside a dual level the kernels run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_batched_grads_through_the_kernels(cell, dtype):
    """torch.autograd.functional.jacobian(vectorize=True) runs the backward under
    autograd.grad(is_grads_batched=True), whose vmap has no rule for the kernels' backward
    ops: the reference's backward runs, and the gradients, input and weights alike, are
    torch.nn's."""
    from torch.autograd.functional import jacobian

    ours, theirs = make_pair(cell, "cpp", 3, 4, dtype=dtype)
    x = torch.randn(3, 2, 3, dtype=dtype)
    got = jacobian(lambda a: ours(a)[0], x, vectorize=True)
    want = jacobian(lambda a: theirs(a)[0], x, vectorize=True)
    assert_close(got, want, dtype, "jacobian")
    weights = tuple(p.detach() for p in theirs.parameters())
    names = [name for name, _ in theirs.named_parameters()]

    def by_weights(module):
        def f(*ws):
            params = dict(zip(names, ws, strict=True))
            return torch.func.functional_call(module, params, (x,))[0]

        return jacobian(f, weights, vectorize=True)

    for name, a, b in zip(names, by_weights(ours), by_weights(theirs), strict=True):
        assert_close(a, b, dtype, f"jacobian by {name}")


def test_rnn_nonlinearity_is_fixed_at_construction():
    """torch.nn.RNN computes the nonlinearity it was built with (its mode); assigning
    ``nonlinearity`` later changes nothing there, nor on any impl here."""
    ours, theirs = make_pair("rnn_tanh", "cpp", 3, 4)
    ours.nonlinearity = theirs.nonlinearity = "relu"
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    want = theirs(x)[0]
    for impl in ("cpp", "reference", "torch"):
        ours.impl = impl
        assert_close(ours(x)[0], want, torch.float64, f"out ({impl})")


@pytest.mark.parametrize("cell", CELLS)
def test_thread_count_does_not_change_results(cell):
    """Two threads split the hidden units into per-thread slices; one thread runs them all."""
    inputs = make_inputs(cell, 5, 3, 4, 70, torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = forward_backward(cell, "cpp", inputs)
        torch.set_num_threads(3)
        many, many_grads = forward_backward(cell, "cpp", inputs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(["out", "h_n", "c_n"], many, one, strict=False):
        assert_close(a, b, torch.float64, name)
    for name in one_grads:
        assert_close(many_grads[name], one_grads[name], torch.float64, f"grad {name}")


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_error_within_torchs(cell):
    ours, theirs = make_pair(cell, "cpp", 16, 32, dtype=torch.float64)
    check_bf16_within_torchs(ours, theirs, torch.randn(24, 4, 16, dtype=torch.float64))


def test_bfloat16_rounding_is_torchs():
    """The gate passes round float32 to bfloat16 themselves (bit operations, csrc/common.h
    from_acc): ties to even, overflow to inf and NaN must come out as torch rounds them.
    With w_hh = 0, rnn_relu's backward writes dpre[t] = round(dh + grad_out[t]) for
    h > 0, and dh is grad_h_n at the last step."""
    T, B, H = 1, 4, 64
    gen = torch.Generator().manual_seed(0)
    # Sums of two bf16 values in float32: exact ties, near-ties, huge values that overflow
    # bf16 on rounding, infinities and NaN.
    a = torch.randn(B, H, generator=gen).bfloat16()
    steps = torch.tensor([2.0**-8, 2.0**-9, 3 * 2.0**-9, -(2.0**-8)]).repeat(16)
    b = (a.float() * steps).bfloat16()
    a[0, :4] = torch.tensor([3.3895e38, float("inf"), float("nan"), -3.3895e38]).bfloat16()
    b[0, :4] = torch.tensor([3.3895e38, 1.0, 1.0, -3.3895e38]).bfloat16()
    out = torch.ones(T, B, H, dtype=torch.bfloat16)  # h > 0: relu passes the gradient
    w_hh = torch.zeros(H, H, dtype=torch.bfloat16)
    grad_xp, _ = torch.ops.fastchar.rnn_bwd(b[None], a, w_hh, out, True)
    want = (a.float() + b.float()).bfloat16()
    got = grad_xp[0]
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    finite = ~want.isnan()  # NaN payloads differ between torch's own conversion paths
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))
    assert want[0, 0] == float("inf") and want[0, 3] == -float("inf")


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell):
    """float64 gradcheck of the sequence op through the autograd glue (checks *_bwd)."""
    inputs = make_inputs(cell, 4, 2, 3, 5, torch.float64)
    names = list(inputs)
    leaves = tuple(v.requires_grad_() for v in inputs.values())

    def fn(*args):
        return tuple(run_op(cell, "cpp", dict(zip(names, args, strict=True))))

    assert torch.autograd.gradcheck(fn, leaves)


def _op_args(cell):
    """Sample args for the fwd, bwd and cell ops of one cell (float64, small)."""
    name = cell.split("_")[0]
    relu = cell == "rnn_relu"
    T, B, H = 3, 2, 8
    G = N_GATES[cell] * H
    kw = dict(dtype=torch.float64, requires_grad=True)
    xp, h0 = torch.randn(T, B, G, **kw), torch.randn(B, H, **kw)
    w_hh = (torch.randn(G, H, dtype=torch.float64) / 4).requires_grad_()
    fwd_args = {
        "lstm": (xp, h0, torch.randn(B, H, **kw), w_hh),
        "gru": (xp, h0, w_hh, torch.randn(H, **kw)),
        "rnn": (xp, h0, w_hh, relu),
    }[name]
    fwd = getattr(torch.ops.fastchar, f"{name}_fwd")
    saved = [t.detach() for t in fwd(*fwd_args)]
    g_out, g_h = torch.randn_like(saved[0]), torch.randn_like(saved[1])
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args]
    bwd_args = {
        "lstm": lambda: (g_out, g_h, torch.randn_like(saved[2]), plain[3], plain[2], *saved[3:]),
        "gru": lambda: (g_out, g_h, plain[2], plain[1], saved[0], *saved[2:]),
        "rnn": lambda: (g_out, g_h, plain[2], saved[0], relu),
    }[name]()
    inputs = make_inputs(cell, None, B, 4, H, torch.float64, seq=False)
    cell_args = tuple(inputs.values()) + ((relu,) if name == "rnn" else ())
    return {"fwd": fwd_args, "bwd": bwd_args, "cell": cell_args}


@pytest.mark.parametrize("kind", ["fwd", "bwd", "cell"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_opcheck(cell, kind):
    """Schema, fake (meta) and autograd registration of every C++ op."""
    op = getattr(torch.ops.fastchar, f"{cell.split('_')[0]}_{kind}")
    torch.library.opcheck(op, _op_args(cell)[kind])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_lstm_bwd_sums_the_bias_gradient_in_its_loop(packed, dtype):
    """lstm_bwd(..., bias_grad=True): grad_bias [G] is grad_xp summed over its rows (dense
    [T, B, G] or packed [N, G]), to the dtype's rounding; empty without it; and the op's
    schema and fake hold with it (opcheck)."""
    T, B, H = 5, 3, 24
    G = 4 * H
    gen = torch.Generator().manual_seed(3)
    bs = torch.tensor([3, 3, 2, 2, 1]) if packed else None
    rows = (int(bs.sum()),) if packed else (T, B)
    xp = torch.randn(*rows, G, generator=gen).to(dtype)
    h0, c0 = (torch.randn(B, H, generator=gen).to(dtype) for _ in range(2))
    w_hh = (torch.randn(G, H, generator=gen) / 4).to(dtype)
    f = torch.ops.fastchar
    out, h_n, c_n, gates, cs = (
        f.lstm_fwd(xp, h0, c0, w_hh)
        if bs is None
        else f.lstm_seq(xp, h0, c0, torch.eye(G, dtype=dtype), None, w_hh, bs)
    )
    args = (torch.randn(out.shape, generator=gen).to(dtype), h_n, c_n, w_hh, c0, gates, cs, bs)
    grad_xp, _, _, grad_b = f.lstm_bwd(*args, True)
    want = grad_xp.double().flatten(0, -2).sum(0)
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert grad_b.dtype == dtype and grad_b.shape == (G,)
    torch.testing.assert_close(grad_b.double(), want, atol=tol, rtol=tol)
    assert f.lstm_bwd(*args)[3].numel() == 0
    if dtype == torch.float64:
        torch.library.opcheck(f.lstm_bwd, (*args, True))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_opcheck_seq(cell, bias):
    """lstm_seq / gru_seq / rnn_seq (the input projection inside the time loop): schema,
    fake and autograd registration, with and without a bias."""
    T, B, I, H = 3, 2, 5, 8
    G = N_GATES[cell] * H
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, h0, c0 = torch.randn(T, B, I, **kw), torch.randn(B, H, **kw), torch.randn(B, H, **kw)
    w_ih = (torch.randn(G, I, dtype=torch.float64) / 3).requires_grad_()
    w_hh = (torch.randn(G, H, dtype=torch.float64) / 4).requires_grad_()
    b = torch.randn(G, **kw) if bias else None
    if cell == "lstm":
        torch.library.opcheck(torch.ops.fastchar.lstm_seq, (x, h0, c0, w_ih, b, w_hh))
    elif cell == "gru":
        b_hn = torch.randn(H, **kw)
        torch.library.opcheck(torch.ops.fastchar.gru_seq, (x, h0, w_ih, b, w_hh, b_hn))
    else:
        torch.library.opcheck(torch.ops.fastchar.rnn_seq, (x, h0, w_ih, b, w_hh, True))


def test_no_hidden_units_or_input_features_is_an_error_not_a_crash():
    """H = 0 crashed the time loops (no units to split among the threads)."""
    T, B = 3, 2
    x, none = torch.randn(T, B, 4), torch.zeros(B, 0)
    e0, g0 = torch.zeros(0, 4), torch.zeros(0, 0)
    H0 = "the hidden size must be at least 1"
    raw = [
        (lambda: torch.ops.fastchar.lstm_seq(x, none, none, e0, None, g0), H0),
        (lambda: torch.ops.fastchar.gru_seq(x, none, e0, None, g0, torch.zeros(0)), H0),
        (lambda: torch.ops.fastchar.rnn_seq(x, none, e0, None, g0, False), H0),
        (lambda: torch.ops.fastchar.lstm_fwd(torch.zeros(T, B, 0), none, none, g0), H0),
        (lambda: torch.ops.fastchar.gru_fwd(torch.zeros(T, B, 0), none, g0, torch.zeros(0)), H0),
        (lambda: torch.ops.fastchar.rnn_fwd(torch.zeros(T, B, 0), none, g0, False), H0),
        (lambda: torch.ops.fastchar.rnn_seq(x[..., :0], torch.zeros(B, 5), torch.zeros(5, 0), None,
                                            torch.randn(5, 5), False, None), "input size"),
    ]  # fmt: skip
    for call, match in raw:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="w_hr must be"):
        torch.ops.fastchar.lstmp_seq(x, torch.zeros(B, 0), torch.zeros(B, 5), torch.randn(20, 4),
                                     None, torch.zeros(20, 0), torch.zeros(0, 5))  # fmt: skip
    for impl in ("cpp", "fused", "reference", "torch"):
        with pytest.raises(ValueError, match=r"gru: the hidden size \(w_hh.shape\[1\]\)"):
            ops.gru(x, None, torch.randn(0, 4), torch.randn(0, 0), impl=impl)
        with pytest.raises(ValueError, match=r"lstm: the input size \(x.shape\[-1\]\)"):
            ops.lstm(x[..., :0], None, None, torch.randn(20, 0), torch.randn(20, 5), impl=impl)


@pytest.mark.parametrize("impl", ["cpp", "reference", "torch"])
def test_cell_states_of_none_are_zeros(impl):
    """As torch.nn's cells read hx=None."""
    x = torch.randn(3, 4)
    w4, u4, w3, u3 = torch.randn(20, 4), torch.randn(20, 5), torch.randn(15, 4), torch.randn(15, 5)
    z = torch.zeros(3, 5)
    cases = [
        (ops.lstm_cell, (None, None), (z, z), (w4, u4)),
        (ops.lstm_cell, (None, z + 1), (z, z + 1), (w4, u4)),
        (ops.gru_cell, (None,), (z,), (w3, u3)),
        (ops.rnn_cell, (None,), (z,), (w4[:5], u4[:5])),
    ]
    with torch.no_grad():
        for op, given, zeros, weights in cases:
            got = op(x, *given, *weights, impl=impl)
            want = op(x, *zeros, *weights, impl=impl)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)


def test_bad_seq_input_names_the_argument():
    x, h0, c0 = torch.randn(3, 2, 5), torch.randn(2, 4), torch.randn(2, 4)
    w_ih, w_hh, b = torch.randn(16, 5), torch.randn(16, 4), torch.randn(16)
    with pytest.raises(RuntimeError, match="lstm_seq: w_ih has dtype"):
        torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih.double(), b, w_hh)
    with pytest.raises(ValueError, match="lstm_seq: w_ih must have shape"):
        torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih[:, :4], b, w_hh)
    with pytest.raises(ValueError, match="lstm_seq: bias must have shape"):
        torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih, b[:15], w_hh)
    with pytest.raises(ValueError, match="lstm_seq: c0 must have shape"):
        torch.ops.fastchar.lstm_seq(x, h0, c0[:1], w_ih, b, w_hh)
    with pytest.raises(ValueError, match="rnn_seq: x must be 3-D"):
        torch.ops.fastchar.rnn_seq(x[0], h0, w_ih[:4], b[:4], w_hh[:4], False)
    with pytest.raises(ValueError, match="gru_seq: b_hn must have shape"):
        torch.ops.fastchar.gru_seq(x, h0, w_ih[:12], b[:12], w_hh[:12], b[:3])
    with pytest.raises(RuntimeError, match="rnn_seq: bias has dtype"):
        torch.ops.fastchar.rnn_seq(x, h0, w_ih[:4], b[:4].double(), w_hh[:4], False)


def test_compile_fullgraph_matches_eager():
    """A small two-layer LSTM model traces as one graph and matches eager."""
    lstm = fastchar.nn.LSTM(6, 12, num_layers=2, batch_first=True, impl="cpp")
    head = torch.nn.Linear(12, 3)

    def loss_fn(x):
        return head(lstm(x)[0]).square().mean()

    x = torch.randn(2, 5, 6)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    # fastchar.nn.LSTM subclasses torch.nn.LSTM, which dynamo refuses unless told
    with torch._dynamo.config.patch(allow_rnn=True):
        got = compiled(x)
    got.backward()
    got_grads = [p.grad.clone() for p in lstm.parameters()]
    lstm.zero_grad()
    want = loss_fn(x)
    want.backward()
    assert_close(got, want, torch.float32, "compiled loss")
    for a, p in zip(got_grads, lstm.parameters(), strict=True):
        assert_close(a, p.grad, torch.float32, "compiled grad")


def test_training_loss_curve_matches_reference():
    """A few dozen Adam steps of a CharRNN give the same losses on cpp and reference."""
    # a learnable stream: each character follows from the two before it
    stream = [1, 2]
    for _ in range(40 * 4 * 17):
        stream.append((stream[-1] + 2 * stream[-2]) % 11)
    data = torch.tensor(stream[: 40 * 4 * 17]).view(40, 4, 17)
    curves = {}
    for impl in ("cpp", "reference"):
        torch.manual_seed(0)
        model = CharRNN(11, model="lstm", emb_dim=8, hidden=16, layers=2, impl=impl)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for batch in data:
            logits, _ = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[impl] = torch.tensor(losses)
    assert curves["cpp"][-1] < curves["cpp"][0] - 0.1, "training did not reduce the loss"
    torch.testing.assert_close(curves["cpp"], curves["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_inputs(cell):
    """Transposed and strided views give the same results as contiguous copies."""
    inputs = make_inputs(cell, 6, 3, 5, 7, torch.float64)
    views = {}
    for k, v in inputs.items():
        if v.dim() == 1:
            views[k] = torch.stack([v, v], 1)[:, 0]  # stride 2
        elif v.dim() == 2:
            views[k] = v.t().contiguous().t()
        else:
            views[k] = v.transpose(0, 1).contiguous().transpose(0, 1)
        assert not views[k].is_contiguous()
    assert_same_run(cell, views, torch.float64, oracle="reference")
    xp = torch.randn(3, 4, 2 * N_GATES[cell] * 5, dtype=torch.float64)[..., ::2]
    fwd = getattr(torch.ops.fastchar, f"{cell.split('_')[0]}_fwd")
    rest = {
        "lstm": (torch.zeros(4, 5), torch.zeros(4, 5), torch.eye(20, 5)),
        "gru": (torch.zeros(4, 5), torch.eye(15, 5), torch.zeros(5)),
        "rnn_tanh": (torch.zeros(4, 5), torch.eye(5), False),
        "rnn_relu": (torch.zeros(4, 5), torch.eye(5), True),
    }[cell]
    rest = tuple(r.double() if isinstance(r, torch.Tensor) else r for r in rest)
    for a, b in zip(fwd(xp, *rest), fwd(xp.contiguous(), *rest), strict=True):
        assert torch.equal(a, b)


def _lstm_fwd_args(**change):
    T, B, H = 3, 2, 4
    args = dict(
        xp=torch.randn(T, B, 4 * H),
        h0=torch.randn(B, H),
        c0=torch.randn(B, H),
        w_hh=torch.randn(4 * H, H),
    )
    args.update(change)
    return tuple(args.values())


BAD_FWD = {
    "h0_dtype": (dict(h0=torch.randn(2, 4, dtype=torch.float64)), RuntimeError, "h0 has dtype"),
    "c0_shape": (dict(c0=torch.randn(2, 5)), ValueError, "c0 must have shape"),
    "w_hh_shape": (dict(w_hh=torch.randn(16, 5)), ValueError, "w_hh must have shape"),
    "xp_gates": (dict(xp=torch.randn(3, 2, 15)), ValueError, "xp must be"),
    "xp_rank": (dict(xp=torch.randn(2, 16)), ValueError, "xp must be 3-D"),
    "half": (
        {k: v.half() for k, v in zip(["xp", "h0", "c0", "w_hh"], _lstm_fwd_args(), strict=True)},
        RuntimeError,
        "xp has dtype Half, which is not supported",
    ),
    "int": (
        dict(xp=torch.zeros(3, 2, 16, dtype=torch.int32)),
        RuntimeError,
        "xp has dtype Int, which",
    ),
}


@pytest.mark.parametrize("change, exc, match", BAD_FWD.values(), ids=BAD_FWD.keys())
def test_bad_op_input_names_the_argument(change, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.fastchar.lstm_fwd(*_lstm_fwd_args(**change))


def test_bad_bwd_and_cell_input_names_the_argument():
    xp, h0, c0, w_hh = _lstm_fwd_args()
    out, h_n, c_n, gates, cs = torch.ops.fastchar.lstm_fwd(xp, h0, c0, w_hh)
    with pytest.raises(RuntimeError, match="cs has dtype"):
        torch.ops.fastchar.lstm_bwd(out, h_n, c_n, w_hh, c0, gates, cs.double())
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.fastchar.lstm_bwd(out[:2], h_n, c_n, w_hh, c0, gates, cs)
    with pytest.raises(ValueError, match="hn must have shape"):
        g = torch.randn(3, 2, 12)
        torch.ops.fastchar.gru_bwd(out, h_n, w_hh[:12], h0, out, g, out[:, :1])
    with pytest.raises(ValueError, match="rnn_cell: b_ih must have shape"):
        torch.ops.fastchar.rnn_cell(h0, h0, w_hh[:4], w_hh[:4], torch.zeros(5), None, False)
    with pytest.raises(RuntimeError, match="w_ih has dtype"):
        torch.ops.fastchar.gru_cell(h0, h0, w_hh[:12].double(), w_hh[:12], None, None)
    with pytest.raises(RuntimeError, match="lstm_cell: b_hh has dtype Double"):
        torch.ops.fastchar.lstm_cell(h0, h0, h0, w_hh, w_hh, None, w_hh[:, 0].double())


def test_wrong_device_is_refused():
    x, w = torch.randn(3, 2, 4, device="meta"), torch.randn(16, 4, device="meta")
    with pytest.raises(RuntimeError, match="C\\+\\+ kernels run on CPU tensors only"):
        ops.lstm(x, None, None, w, w, impl="cpp")
    with pytest.raises(RuntimeError, match="h0 is on meta"):
        ops.gru(torch.randn(3, 2, 4), torch.zeros(2, 4, device="meta"), *[torch.randn(12, 4)] * 2)


def test_sequence_buffers_are_reused_counted_and_correct():
    """Buffers of 2 MB and more come from a cache of freed blocks (csrc/seq_buffers.cpp):
    a second call of the same shape gets the first call's blocks back, the profiler sees
    their bytes, and the results are the same as on fresh memory."""
    T, B, I, H = 16, 32, 8, 256  # gates [T, B, 4H] float32: 2 MB
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=gen)
    h0, c0 = torch.randn(B, H, generator=gen), torch.randn(B, H, generator=gen)
    w_ih = torch.randn(4 * H, I, generator=gen) * 0.1
    w_hh = torch.randn(4 * H, H, generator=gen) * 0.1

    def call():
        return torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih, None, w_hh)

    first = call()
    want = [t.clone() for t in first]
    blocks = {t.data_ptr() for t in first if t.nbytes >= 2**21}
    assert blocks, "no output is large enough to come from the cache"
    assert all(p % 2**21 == 0 for p in blocks)  # the cache's blocks are 2 MB-aligned
    del first
    with torch.profiler.profile(profile_memory=True) as prof:
        second = call()
    assert blocks <= {t.data_ptr() for t in second}
    for got, ref in zip(second, want, strict=True):
        assert torch.equal(got, ref)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated >= second[3].nbytes  # the gates buffer is counted


@pytest.mark.parametrize("value", ["12mb", "-5", "99999999999999999999", "64"])
def test_a_bad_sequence_cache_size_warns_and_keeps_the_default(value):
    """FASTCHAR_SEQ_CACHE_MB is read once per process, at the first large buffer: a fresh
    process. A value that is no whole number of MB says so (it was silently ignored); a
    good one says nothing."""
    script = (
        "import warnings, torch, fastchar.ops\n"
        "x, w = torch.randn(16, 32, 8), torch.randn(1024, 8)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.ops.fastchar.lstm_seq(x, torch.zeros(32, 256), torch.zeros(32, 256), w,"
        " None, torch.randn(1024, 256))\n"
        "print('|'.join(str(c.message) for c in caught))\n"
    )
    env = {**os.environ, "FASTCHAR_SEQ_CACHE_MB": value, "OMP_NUM_THREADS": "1"}
    got = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr
    want = f"fastchar: FASTCHAR_SEQ_CACHE_MB={value} is not a whole number of MB"
    if value == "64":
        assert "FASTCHAR_SEQ_CACHE_MB" not in got.stdout + got.stderr
        return
    assert want in got.stdout + got.stderr  # a Python warning, or c10's line on stderr
