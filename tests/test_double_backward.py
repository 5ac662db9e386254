"""Gradients of gradients (create_graph=True) through the C++ layers: gradient penalties,
Hessian-vector products. torch.nn's CPU RNNs allow them; the fused backward kernels have
no derivative of their own, so under create_graph the sequence ops re-run the layer with
the reference's differentiable ops, and the ops without their input saved refuse clearly.

Shape letters: T time, B batch, N packed rows, I input, H hidden, P projection.
"""

from __future__ import annotations

import pytest
import torch
from parity import CELLS, assert_close, make_pair
from test_cpp import N_GATES, make_inputs, run_op

from fastchar import ops, reference
from fastchar.backends import cpp_loaded

pytestmark = pytest.mark.skipif(
    not cpp_loaded(),
    reason="fastchar._C is not built (pip install --no-build-isolation -e .)",
)

LENGTHS = [3, 3, 1]  # a packed batch: batch_sizes [3, 2, 2]


def _layer(cell, names, **kwargs):
    """fn(*leaves) -> the layer's outputs (fastchar.ops, impl='cpp'), the leaves in the order
    of ``names``; a w_hr leaf and ``kwargs`` (batch_sizes) go to the op by keyword."""

    def fn(*args):
        inputs = dict(zip(names, args, strict=True))
        w_hr = {"w_hr": inputs.pop("w_hr")} if "w_hr" in inputs else {}
        return tuple(run_op(cell, "cpp", inputs, **w_hr, **kwargs))

    return fn


def _gradgradcheck(cell, inputs, **kwargs):
    fn = _layer(cell, list(inputs), **kwargs)
    return torch.autograd.gradgradcheck(fn, tuple(v.requires_grad_() for v in inputs.values()))


@pytest.mark.parametrize("cell", CELLS)
def test_gradgradcheck_dense(cell):
    """Second derivatives of every input, against finite differences of the first."""
    assert _gradgradcheck(cell, make_inputs(cell, 3, 2, 2, 3, torch.float64))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_gradgradcheck_packed(cell):
    """A PackedSequence's rows (x [N, I], batch_sizes [3, 2, 2]) the same way."""
    inputs = make_inputs(cell, 3, 3, 2, 3, torch.float64)
    inputs["x"] = torch.randn(sum(LENGTHS), 2, dtype=torch.float64)
    assert _gradgradcheck(cell, inputs, batch_sizes=torch.tensor([3, 2, 2]))


def test_gradgradcheck_projection():
    """An LSTM with proj_size (lstmp_seq): h is P = 2 wide, c H = 3 wide."""
    B, H, P = 2, 3, 2
    inputs = make_inputs("lstm", 3, B, 2, H, torch.float64)
    inputs["h0"] = torch.randn(B, P, dtype=torch.float64)
    inputs["w_hh"] = torch.randn(4 * H, P, dtype=torch.float64) / P**0.5
    inputs["w_hr"] = torch.randn(P, H, dtype=torch.float64) / H**0.5
    assert _gradgradcheck("lstm", inputs)


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_penalty_matches_torch_nn(cell):
    """A WGAN-GP style penalty |d out^2 / d x|^2 through two bidirectional layers: its
    gradient with respect to every parameter equals torch.nn's, and so does the first
    derivative that it is built from."""
    ours, theirs = make_pair(cell, "cpp", 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = module(xi)[0]
        (g,) = torch.autograd.grad(out.pow(2).sum(), xi, create_graph=True)
        penalty = g.pow(2).sum()
        results.append([g.detach(), *torch.autograd.grad(penalty, list(module.parameters()))])
    names = ["d out^2 / dx"] + [f"d penalty / d {n}" for n, _ in ours.named_parameters()]
    for name, got, want in zip(names, *results, strict=True):
        assert want.abs().max() > 0, name  # the penalty does reach every parameter
        assert_close(got, want, torch.float64, f"{cell}: {name}")


@pytest.mark.parametrize("cell", CELLS)
def test_plain_backward_runs_the_kernels(cell, monkeypatch):
    """The re-run is only for create_graph: a plain backward never calls the reference."""
    inputs = make_inputs(cell, 3, 2, 2, 3, torch.float64)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    fn = _layer(cell, list(leaves))
    name = cell.split("_")[0]

    def refuse(*args, **kwargs):
        raise AssertionError(f"reference.{name} ran")

    monkeypatch.setattr(reference, name, refuse)
    out = fn(*leaves.values())[0]
    torch.autograd.grad(out.sum(), list(leaves.values()))
    with pytest.raises(AssertionError, match=f"reference.{name} ran"):
        torch.autograd.grad(fn(*leaves.values())[0].sum(), leaves["x"], create_graph=True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_projected_input_ops_refuse_create_graph(cell):
    """torch.ops.fastchar.*_fwd take the projected input xp and do not keep it, so they
    cannot re-run the layer: create_graph stops with a RuntimeError that says what to use
    instead (a silently zero second derivative is what it prevents)."""
    T, B, H = 3, 2, 4
    G = N_GATES["rnn_tanh" if cell == "rnn" else cell] * H
    xp = torch.randn(T, B, G, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    w_hh = (torch.randn(G, H, dtype=torch.float64) / 2).requires_grad_()
    args = {
        "lstm": (xp, h0, torch.randn(B, H, dtype=torch.float64), w_hh),
        "gru": (xp, h0, w_hh, torch.zeros(H, dtype=torch.float64)),
        "rnn": (xp, h0, w_hh, False),
    }[cell]
    out = getattr(torch.ops.fastchar, f"{cell}_fwd")(*args)[0]
    torch.autograd.grad(out.sum(), xp, retain_graph=True)  # first order still works
    with pytest.raises(RuntimeError, match=f"fastchar::{cell}_fwd.*create_graph"):
        torch.autograd.grad(out.sum(), xp, create_graph=True)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_one_tensor_in_two_slots_gets_each_slots_gradient_once(cell):
    """ops.lstm(x, s, s, ...) or ops.rnn(x, h0, w, w): under create_graph the gradient of
    the shared tensor is what a plain backward gives (each slot's share, summed once), not
    twice that, and a penalty built on it matches the reference's."""
    H = 4
    G = N_GATES[cell] * H
    x = torch.randn(3, 2, H, dtype=torch.float64)
    w = (torch.randn(G, H, dtype=torch.float64) / 2).requires_grad_()
    s = (torch.randn(2, H, dtype=torch.float64) / 2).requires_grad_()

    def run(impl):
        if cell == "lstm":
            return ops.lstm(x, s, s, torch.randn(G, H, dtype=torch.float64), w, impl=impl)[0]
        return ops.rnn(x, s, w, w, impl=impl)[0]  # w [H, H] as w_ih and w_hh

    results = {}
    for impl in ("cpp", "reference"):
        torch.manual_seed(1)
        loss = run(impl).pow(2).sum()
        plain = torch.autograd.grad(loss, [s, w], retain_graph=True)
        graph = torch.autograd.grad(loss, [s, w], create_graph=True)
        penalty = torch.autograd.grad(sum(g.pow(2).sum() for g in graph), [s, w])
        for a, b in zip(plain, graph, strict=True):
            assert_close(b.detach(), a, torch.float64, f"{impl}: create_graph vs plain")
        results[impl] = penalty
    for a, b in zip(results["cpp"], results["reference"], strict=True):
        assert_close(a, b, torch.float64, "penalty vs reference")


def test_bias_changed_in_place_before_backward():
    """As with torch.nn, an in-place change to a bias (a constraint, an EMA) between the
    forward and a plain backward is no error (the kernels' backward never reads it). A
    create_graph backward re-runs the layer from its inputs: from a bias that changed since
    (GRU's b_hn is a view of bias_hh) it refuses clearly rather than use the new values."""
    for cell in CELLS:
        m = make_pair(cell, "cpp", 3, 4)[0]
        out = m(torch.randn(5, 2, 3, dtype=torch.float64))[0]
        with torch.no_grad():
            m.bias_hh_l0.mul_(0.5)
        out.sum().backward(retain_graph=True)
        if cell == "gru":
            with pytest.raises(RuntimeError, match="a bias, .* was modified in place"):
                torch.autograd.grad(out.sum(), m.weight_hh_l0, create_graph=True)


@pytest.mark.parametrize("cell", CELLS)
def test_w_ih_changed_in_place_when_x_needs_no_gradient(cell):
    """The plain backward reads w_ih only for x's gradient: where x needs none, changing w_ih
    in place between the forward and the backward is no error and changes no gradient, as
    with torch.nn (GRU and RNN; its LSTM on the CPU raised); a create_graph backward, which
    re-runs the layer from w_ih, refuses. x itself stays saved (an activation kept on ctx
    would outlive the backward): changing it in place is autograd's error."""
    grads = []
    for change in (False, True):
        torch.manual_seed(0)
        m = make_pair(cell, "cpp", 3, 4)[0]
        out = m(torch.randn(5, 2, 3, dtype=torch.float64))[0]
        if change:
            with torch.no_grad():
                m.weight_ih_l0.mul_(0.5)
        out.sum().backward(retain_graph=True)
        grads.append([m.weight_ih_l0.grad, m.weight_hh_l0.grad])
        if change:
            with pytest.raises(RuntimeError, match="w_ih where x needs no gradient"):
                torch.autograd.grad(out.sum(), m.weight_hh_l0, create_graph=True)
    for a, b in zip(*grads, strict=True):
        assert_close(b, a, torch.float64, "after the in-place change")
    m = make_pair(cell, "cpp", 3, 4)[0]
    m.weight_ih_l0.requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True) * 1.0
    out = m(x)[0]
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
