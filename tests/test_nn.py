"""fastchar.nn modules on the reference and torch paths vs torch.nn: parity, state_dict,
dropout, step(), dispatch and bad input."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from parity import CELLS, assert_close, check_module_parity, flatten_out, make_pair
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

import fastchar.backends as backends
import fastchar.nn
from fastchar import ops

SHAPES = {  # (T, B, I, H)
    "T1_B1": (1, 1, 3, 5),
    "T17_B3_H33": (17, 3, 4, 33),
    "T5_B2": (5, 2, 3, 8),
}
LAYOUTS = {
    "1layer": {},
    "2layers_bidir_batchfirst": dict(num_layers=2, bidirectional=True, batch_first=True),
    "nobias": dict(bias=False),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_reference_matches_torch(cell, shape, dtype):
    check_module_parity(cell, "reference", *shape, dtype=dtype)


@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_reference_layouts_match_torch(cell, layout, with_state):
    check_module_parity(cell, "reference", 6, 3, 4, 7, with_state=with_state, **layout)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_impl_is_torch(cell):
    check_module_parity(cell, "torch", 5, 2, 3, 6, num_layers=2, bidirectional=True)


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_input(cell):
    ours, theirs = make_pair(cell, "reference", 3, 5, num_layers=2)
    x = torch.randn(4, 3, dtype=torch.float64)
    for a, b in zip(flatten_out(ours(x)), flatten_out(theirs(x)), strict=True):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64, "unbatched")


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_round_trips_both_ways(cell):
    ours_cls, theirs_cls, extra = CELLS[cell]
    ours = ours_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    theirs = theirs_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    fresh = ours_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    fresh.load_state_dict(theirs.state_dict())
    for (n, a), (_, b) in zip(fresh.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("cell", CELLS)
def test_initialisation_is_torchs(cell):
    ours_cls, theirs_cls, extra = CELLS[cell]
    torch.manual_seed(123)
    ours = ours_cls(5, 9, num_layers=2, **extra)
    torch.manual_seed(123)
    theirs = theirs_cls(5, 9, num_layers=2, **extra)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_dropout_is_identity(cell):
    ours, theirs = make_pair(cell, "reference", 3, 5, num_layers=3, dropout=0.5)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for a, b in zip(flatten_out(ours(x)), flatten_out(theirs(x)), strict=True):
        assert_close(a, b, torch.float64, "eval dropout")


@pytest.mark.parametrize("cell", CELLS)
def test_train_mode_dropout_between_layers(cell):
    # p=1 zeroes every inter-layer activation in torch too, which makes training-mode
    # dropout deterministic and comparable; the last layer's output is never dropped.
    ours, theirs = make_pair(cell, "reference", 3, 5, num_layers=2, dropout=1.0)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got, want = flatten_out(ours(x)), flatten_out(theirs(x))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float64, "train dropout p=1")
    ours.dropout = 0.0
    assert not torch.allclose(ours(x)[0], got[0]), "dropout had no effect"


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_forward(cell, impl):
    ours, _ = make_pair(cell, impl, 3, 5, num_layers=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    out, hx_full = ours(x)
    hx = None
    steps = []
    for t in range(x.shape[0]):
        y, hx = ours.step(x[t], hx)
        steps.append(y)
    assert_close(torch.stack(steps), out, torch.float64, "step outputs")
    for a, b in zip(flatten_out((None, hx))[1:], flatten_out((None, hx_full))[1:], strict=True):
        assert_close(a, b, torch.float64, "step state")


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("impl", ["fused", "reference", "torch"])
@pytest.mark.parametrize("cell", CELLS)
def test_a_norm_parametrization_on_the_first_weight_is_torch_nns(cell, impl, norm):
    """weight_norm keeps two originals (original0, original1), spectral_norm one: the dtype
    check read `.original` and failed every forward of a weight_norm'd weight_ih_l0."""
    ours, theirs = make_pair(cell, impl, 4, 6, dtype=torch.float32)
    for m in (ours, theirs):
        getattr(torch.nn.utils.parametrizations, norm)(m, "weight_ih_l0")
    theirs.load_state_dict(ours.state_dict())  # spectral_norm's random u and v too
    x = torch.randn(5, 3, 4)
    (out, _), (want, _) = ours(x), theirs(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.step(x[0])
    with pytest.raises(ValueError, match="does not match weight dtype"):
        ours(x.double())


class _CountedDropout(torch.nn.Module):
    """A random parametrization (AWD-LSTM's weight dropout) that counts its runs."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def forward(self, w):
        self.runs += 1
        return F.dropout(w, 0.5, training=True)


@pytest.mark.parametrize("impl", ["fused", "reference", "torch"])
@pytest.mark.parametrize("cell", CELLS)
def test_a_parametrized_weight_is_computed_as_torch_nn_computes_it(cell, impl):
    """Once per forward, as torch.nn's forward does: a random one (weight dropout) draws
    what torch.nn draws for a seed, so outputs and gradients are torch.nn's."""
    ours, theirs = make_pair(cell, impl, 4, 6, dtype=torch.float32, num_layers=2)
    for m in (ours, theirs):
        parametrize.register_parametrization(m, "weight_hh_l0", _CountedDropout())
    x = torch.randn(5, 3, 4)
    outs, runs = [], []
    for m in (ours, theirs):
        torch.manual_seed(1)
        m.parametrizations.weight_hh_l0[0].runs = 0
        out, _ = m(x)
        out.sum().backward()
        outs.append((out, torch.rand(1)))  # the random stream after the forward too
        runs.append(m.parametrizations.weight_hh_l0[0].runs)
    assert runs[0] == runs[1]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    original = [m.parametrizations.weight_hh_l0.original.grad for m in (ours, theirs)]
    torch.testing.assert_close(original[0], original[1], rtol=1e-4, atol=1e-5)
    ours.parametrizations.weight_hh_l0[0].runs = 0
    with torch.no_grad():
        ours.step(x[0])
    assert ours.parametrizations.weight_hh_l0[0].runs == runs[0]  # step: once as well


def test_impl_can_change_after_construction():
    ours, theirs = make_pair("lstm", "torch", 3, 5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ours.impl = "reference"
    assert ours.impl == "reference" and "impl='reference'" in repr(ours)
    assert_close(ours(x)[0], theirs(x)[0], torch.float64, "after impl change")
    with pytest.raises(ValueError, match="impl must be one of"):
        ours.impl = "cuda"


@pytest.mark.parametrize("cell", CELLS)
def test_bad_module_input(cell):
    """Each bad input raises the exception type torch.nn's module raises for it."""
    ours, theirs = make_pair(cell, "reference", 3, 5, num_layers=2)
    bad_state = torch.zeros(1, 2, 5, dtype=torch.float64)  # needs [2, 2, 5]
    hx = (bad_state, bad_state) if cell == "lstm" else bad_state
    cases = [
        ((torch.randn(4, 2, 7, dtype=torch.float64),), RuntimeError, "input_size=3"),
        ((torch.randn(4, dtype=torch.float64),), ValueError, "2D .unbatched. or 3D"),
        (
            (torch.randn(4, 2, 3, dtype=torch.float64), hx),
            RuntimeError,
            "h0 of shape",
        ),
        ((torch.randn(4, 2, 3),), ValueError, r"input dtype \(torch.float32\) does not match"),
        ((torch.randn(0, 2, 3, dtype=torch.float64),), RuntimeError, "at least one time step"),
        (
            (PackedSequence(torch.randn(4, 2, 3, dtype=torch.float64), torch.tensor([2, 2])),),
            RuntimeError,
            "PackedSequence's data must be",
        ),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ours(*args)
        with pytest.raises(error):
            theirs(*args)
    ours.impl = "cpp"
    with pytest.raises(ValueError, match=r"x dtype \(torch.float32\) does not match"):
        ours.step(torch.randn(2, 3))


def test_op_errors_name_the_argument():
    x = torch.randn(5, 2, 3)
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(ValueError, match="h0 must have shape"):
        ops.lstm(x, torch.zeros(3, 4), None, w_ih, w_hh, impl="reference")
    with pytest.raises(RuntimeError, match="w_hh has dtype"):
        ops.lstm(x, None, None, w_ih, w_hh.double(), impl="reference")
    with pytest.raises(RuntimeError, match="b_ih is on meta"):
        ops.lstm(x, None, None, w_ih, w_hh, torch.zeros(16, device="meta"), impl="reference")
    with pytest.raises(ValueError, match="w_hh must be"):
        ops.gru(x, None, torch.randn(12, 3), torch.randn(12, 5), impl="reference")
    with pytest.raises(ValueError, match="at least one time step"):
        ops.rnn(x[:0], None, torch.randn(4, 3), torch.randn(4, 4), impl="reference")
    with pytest.raises(ValueError, match="nonlinearity"):
        ops.rnn(x, None, torch.randn(4, 3), torch.randn(4, 4), nonlinearity="gelu")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.rnn(x, None, torch.randn(4, 3), torch.randn(4, 4), impl="fast")


def test_explicit_impl_that_cannot_run_says_why():
    x = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="impl='cpp' cannot run on meta tensors"):
        fastchar.nn.LSTM(4, 4, impl="cpp", device="meta")(x.to("meta"))
    if backends.interpreter_on():
        pytest.skip("the Triton interpreter makes triton runnable on CPU")
    with pytest.raises(RuntimeError, match="impl='triton' cannot run on cpu"):
        fastchar.nn.GRU(4, 4, impl="triton")(x)


def test_fused_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    real_why_not = backends.why_not

    def why_not(impl, device):
        return "cpp is switched off" if impl == "cpp" else real_why_not(impl, device)

    monkeypatch.setattr(backends, "why_not", why_not)
    m = fastchar.nn.RNN(4, 4)
    assert m.impl == "fused"
    x = torch.randn(3, 2, 4)
    fallback = "falls back to 'reference' on cpu: cpp is switched off"
    with pytest.warns(RuntimeWarning, match=fallback):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # the same reason warns once


@pytest.mark.parametrize("cell", CELLS)
def test_float16_on_the_cpu_runs_as_torch_nn_does(cell, monkeypatch):
    """torch.nn's CPU RNNs run float16, the C++ kernels do not: ``fused`` falls back to the
    reference with its one warning (the module, its step and the functional op), and the
    explicit ``cpp`` refuses, naming the dtype."""
    if backends.why_not("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(backends, "_warned", set())
    ours, theirs = make_pair(cell, "fused", 4, 6, dtype=torch.float16, num_layers=2)
    x = torch.randn(5, 3, 4).half()
    why = "the C++ kernels run float32, float64 and bfloat16, not float16"
    with pytest.warns(RuntimeWarning, match=re.escape(f"falls back to 'reference' on cpu: {why}")):
        out, _ = ours(x)
    want, _ = theirs(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, want, atol=4e-3, rtol=1e-2)
    step_out, _ = ours.step(x[0])
    torch.testing.assert_close(step_out, out[0], atol=4e-3, rtol=1e-2)
    ours.impl = "cpp"
    with pytest.raises(RuntimeError, match="impl='cpp' cannot run on cpu tensors: .*not float16"):
        ours(x)
    with pytest.raises(RuntimeError, match="not float16"):
        ours.step(x[0])


def test_a_fallback_compiles_as_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) traces a fused module that falls back (here: float16)
    before any eager call: the warning is left out of the graph, and the next eager call
    gives it."""
    monkeypatch.setattr(backends, "_warned", set())
    torch._dynamo.reset()
    ours, theirs = make_pair("lstm", "fused", 4, 6, dtype=torch.float16)
    x = torch.randn(5, 3, 4).half()
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(ours, backend="eager", fullgraph=True)(x)[0]
    torch.testing.assert_close(got, theirs(x)[0], atol=4e-3, rtol=1e-2)
    with pytest.warns(RuntimeWarning, match="not float16"):
        ours(x)


def test_lstm_hx_of_three_tensors_is_torchs_error():
    ours, theirs = make_pair("lstm", "reference", 3, 5)
    x, h = torch.randn(4, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        theirs(x, (h, h, h))
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h0, c0\), got 3 tensors"):
        ours(x, (h, h, h))


def test_float16_layer_function_falls_back_or_refuses(monkeypatch):
    """The same through fastchar.ops (and under autocast to float16, which the functions
    see as the dtype they compute in)."""
    if backends.why_not("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(backends, "_warned", set())
    x, w_ih, w_hh = torch.randn(3, 2, 4), torch.randn(12, 4), torch.randn(12, 4)
    want, _ = ops.gru(x.half(), None, w_ih.half(), w_hh.half(), impl="reference")
    with pytest.warns(RuntimeWarning, match="not float16"):
        out, _ = ops.gru(x.half(), None, w_ih.half(), w_hh.half())
    assert torch.equal(out, want)
    with torch.autocast("cpu", dtype=torch.float16):
        out, _ = ops.gru(x, None, w_ih, w_hh)
    assert torch.equal(out, want)
    with pytest.raises(RuntimeError, match="impl='cpp' cannot run on cpu tensors: .*not float16"):
        ops.gru(x.half(), None, w_ih.half(), w_hh.half(), impl="cpp")


def test_fused_on_a_device_without_kernels_falls_back(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no fastchar kernel for meta tensors"):
        assert backends.resolve("fused", "meta") == "reference"


def test_info_reports_every_impl(capsys):
    from fastchar import info

    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert "torch    " + torch.__version__ in text
    for impl in backends.IMPLS:
        assert f"  {impl}" in text


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("cell", CELLS)
def test_autocast_runs_in_bf16_with_float32_grads(cell, impl, no_fallback_warning):
    if impl == "fused" and backends.why_not("cpp", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    ours_cls, _, extra = CELLS[cell]
    m = ours_cls(6, 8, num_layers=2, batch_first=True, impl=impl, **extra)
    x = torch.randn(3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x)
        y, _ = m.step(x[:, 0])
    assert out.dtype == y.dtype == torch.bfloat16
    out.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    m.impl = "reference"
    with torch.no_grad():
        ref, _ = m(x)  # float32, no autocast
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=0)
