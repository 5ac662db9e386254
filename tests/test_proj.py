"""LSTM with proj_size (h_t = W_hr (o_t * tanh(c_t))) against torch.nn.LSTM: dense and
PackedSequence input, every impl that has it, outputs, h_n, c_n and every gradient; the
ops' gradcheck, opcheck and torch.compile; bfloat16; state_dict; errors; and the Triton
kernels' refusal (they have no projection).

Shape letters: T time, B batch, N packed rows, I input, H hidden, P proj_size.
Tolerances come from tests/parity.py, the one place they are set.
"""

from __future__ import annotations

import pytest
import torch
from parity import (
    assert_close,
    check_bf16_within_torchs,
    check_module_parity,
    check_packed_parity,
    flatten_out,
    make_pair,
    run_packed,
    skip_unless_runnable,
    state_shapes,
)
from torch.nn.utils.rnn import pack_padded_sequence

import fastchar.nn
from fastchar import backends, ops
from fastchar.reference import bias_sum

IMPLS = ["reference", "torch", "cpp"]
DTYPES = {"f64": torch.float64, "f32": torch.float32}

# (T, B, I, H, P) and module layout. H = 70 splits the units over two threads' slices.
DENSE = {
    "one_layer_h0": dict(shape=(5, 3, 4, 7, 3)),
    "two_layers_bidir_batchfirst": dict(
        shape=(4, 2, 3, 70, 33), num_layers=2, bidirectional=True, batch_first=True
    ),
    "t1_b1_nobias_zeros": dict(shape=(1, 1, 3, 9, 1), bias=False, with_state=False),
    "b17_2layers": dict(shape=(3, 17, 5, 33, 16), num_layers=2),
}
PACKED = {
    "sorted_h0": dict(lengths=[5, 3, 3, 1], enforce_sorted=True, H=7, P=3),
    "unsorted_2layers_bidir_batchfirst": dict(
        lengths=[2, 6, 1, 6, 3],
        enforce_sorted=False,
        H=70,
        P=20,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
    ),
    "all_equal_zeros_nobias": dict(
        lengths=[4, 4, 4], enforce_sorted=True, H=9, P=4, with_state=False, bias=False
    ),
    "all_length_one": dict(lengths=[1, 1, 1], enforce_sorted=False, H=5, P=2, num_layers=2),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", DENSE.values(), ids=DENSE.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_module_matches_torch_nn(impl, case, dtype):
    skip_unless_runnable(impl)
    case = dict(case)
    T, B, I, H, P = case.pop("shape")
    check_module_parity("lstm", impl, T, B, I, H, dtype=dtype, proj_size=P, **case)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", PACKED.values(), ids=PACKED.keys())
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_module_matches_torch_nn(impl, case, dtype):
    skip_unless_runnable(impl)
    case = dict(case)
    P = case.pop("P")
    check_packed_parity("lstm", impl, dtype=dtype, proj_size=P, **case)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_mode_dropout_between_layers(impl):
    # run_packed seeds the RNG alike before each module's forward, so the masks match
    skip_unless_runnable(impl)
    kw = dict(lengths=[2, 5, 1, 4], enforce_sorted=False, H=8, proj_size=5, num_layers=3)
    check_packed_parity("lstm", impl, dtype=torch.float64, dropout=0.5, bidirectional=True, **kw)
    (_, train, _), _ = run_packed("lstm", impl, dtype=torch.float64, dropout=0.5, **kw)
    (_, plain, _), _ = run_packed("lstm", impl, dtype=torch.float64, dropout=0.0, **kw)
    assert not torch.allclose(train[0], plain[0]), "dropout had no effect"


def test_unbatched_input_and_step():
    impl = "cpp" if backends.cpp_loaded() else "reference"
    ours, theirs = make_pair("lstm", impl, 3, 8, num_layers=2, proj_size=4)
    x = torch.randn(6, 3, dtype=torch.float64)
    for a, b in zip(flatten_out(ours(x)), flatten_out(theirs(x)), strict=True):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64, "unbatched")
    # step() runs the reference's projected cell, step by step, and matches forward
    out, hx = ours(x[:, None])
    h, steps = None, []
    for t in range(6):
        y, h = ours.step(x[t : t + 1], h)
        steps.append(y)
    assert_close(torch.stack(steps), out, torch.float64, "step outputs")
    for a, b in zip(h, hx, strict=True):
        assert_close(a, b, torch.float64, "step state")


def test_state_dict_both_ways_and_initialisation():
    torch.manual_seed(3)
    ours = fastchar.nn.LSTM(3, 6, proj_size=2, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(3, 6, proj_size=2, num_layers=2, bidirectional=True)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    assert "weight_hr_l1_reverse" in sd_ours and sd_ours["weight_hr_l0"].shape == (2, 6)
    for k in sd_theirs:  # torch's initialisation, drawn in torch's order
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    fresh = fastchar.nn.LSTM(3, 6, proj_size=2, num_layers=2, bidirectional=True)
    fresh.load_state_dict(sd_theirs)
    back = torch.nn.LSTM(3, 6, proj_size=2, num_layers=2, bidirectional=True)
    back.load_state_dict(fresh.state_dict())
    x = torch.randn(4, 2, 3)
    for a, b in zip(flatten_out(fresh(x)), flatten_out(back(x)), strict=True):
        assert_close(a, b, torch.float32, "state_dict")


def _op_inputs(lengths, I=3, H=6, P=4, dtype=torch.float64):
    """Packed (lengths given) or dense ([T, B] from lengths all equal) op inputs."""
    torch.manual_seed(5)
    T, B = max(lengths), len(lengths)
    x = torch.randn(T, B, I, dtype=dtype)
    bs = None
    if len(set(lengths)) > 1:
        p = pack_padded_sequence(x, torch.tensor(lengths))
        x, bs = p.data, p.batch_sizes

    def leaf(*shape):
        return (0.5 * torch.randn(*shape, dtype=dtype)).requires_grad_()

    tensors = [
        x.clone().requires_grad_(),
        leaf(B, P),  # h0
        leaf(B, H),  # c0
        leaf(4 * H, I),
        leaf(4 * H, P),
        leaf(4 * H),
        leaf(4 * H),
        leaf(P, H),  # w_hr
    ]
    return tensors, bs


def _op(impl, bs):
    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return ops.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, impl=impl, batch_sizes=bs, w_hr=w_hr)

    return f


LENGTHS = {"dense": [3, 3], "packed": [4, 3, 3, 1]}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_op_gradcheck(impl, lengths):
    skip_unless_runnable(impl)
    tensors, bs = _op_inputs(lengths)
    assert torch.autograd.gradcheck(_op(impl, bs), tuple(tensors))


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_op_zero_states_and_one_output(lengths):
    # h0, c0 None: zeros of widths P and H; a loss on out alone leaves grad_h_n, grad_c_n
    # None for the kernel's backward to fill
    skip_unless_runnable("cpp")
    tensors, bs = _op_inputs(lengths)
    x, h0, c0, *w = tensors
    got = _op("cpp", bs)(x, None, None, *w)
    want = _op("torch", bs)(x, torch.zeros_like(h0), torch.zeros_like(c0), *w)
    B = len(lengths)
    assert [tuple(t.shape) for t in got] == [tuple(want[0].shape), (B, 4), (B, 6)]
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=True):
        assert_close(a, b, torch.float64, name)
    g_got = torch.autograd.grad(got[0].sum(), [x, *w])
    g_want = torch.autograd.grad(want[0].sum(), [x, *w])
    for k, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
        assert_close(a, b, torch.float64, f"grad {k}")


def _seq_args(lengths, dtype=torch.float64):
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), bs = _op_inputs(lengths, dtype=dtype)
    return (x, h0, c0, w_ih, bias_sum(b_ih, b_hh).detach().requires_grad_(), w_hh, w_hr, bs)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_opcheck(lengths):
    skip_unless_runnable("cpp")
    torch.library.opcheck(torch.ops.fastchar.lstmp_seq, _seq_args(lengths))


def test_op_compiles_fullgraph():
    skip_unless_runnable("cpp")
    x, h0, c0, w_ih, bias, w_hh, w_hr, bs = _seq_args([5, 3, 1], torch.float32)

    def f(x, h0, c0):
        out, h_n, c_n, _, _, _ = torch.ops.fastchar.lstmp_seq(x, h0, c0, w_ih, bias, w_hh, w_hr, bs)
        return out.sum() + h_n.sum() + c_n.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, h0, c0), f(x, h0, c0), torch.float32, "compiled")


def test_thread_count_does_not_change_results():
    skip_unless_runnable("cpp")
    tensors, bs = _op_inputs([5, 4, 4, 2], I=4, H=70, P=33)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = _op("cpp", bs)(*tensors)
            grads = torch.autograd.grad(sum(o.sum() for o in out), tensors)
            runs.append((out, grads))
    finally:
        torch.set_num_threads(threads)
    for k, (a, b) in enumerate(zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1], strict=True)):
        assert_close(a, b, torch.float64, f"result {k}")


def test_bfloat16_error_within_torchs():
    skip_unless_runnable("cpp")
    ours, theirs = make_pair("lstm", "cpp", 16, 48, dtype=torch.float64, proj_size=24)
    assert "weight_hr_l0" in dict(ours.named_parameters())
    check_bf16_within_torchs(ours, theirs, torch.randn(20, 4, 16, dtype=torch.float64))


def test_op_errors_name_the_argument():
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), _ = _op_inputs([3, 3])
    x, h0, c0, w_ih, w_hh, w_hr = (t.detach() for t in (x, h0, c0, w_ih, w_hh, w_hr))
    with pytest.raises(ValueError, match=r"lstm: w_hr must be \[P, H\] with 0 < P < H"):
        ops.lstm(x, None, None, w_ih, w_hh, w_hr=w_hr.t(), impl="reference")
    with pytest.raises(ValueError, match=r"lstm: w_hh must have shape \[24, 4\]"):
        ops.lstm(x, None, None, w_ih, w_hh[:, :3], w_hr=w_hr, impl="reference")
    with pytest.raises(ValueError, match=r"lstm: h0 must have shape \[2, 4\]"):
        ops.lstm(x, c0, c0, w_ih, w_hh, w_hr=w_hr, impl="reference")
    with pytest.raises(ValueError, match=r"lstm: c0 must have shape \[2, 6\]"):
        ops.lstm(x, h0, h0, w_ih, w_hh, w_hr=w_hr, impl="reference")
    with pytest.raises(RuntimeError, match="lstm: w_hr has dtype torch.float32"):
        ops.lstm(x, h0, c0, w_ih, w_hh, w_hr=w_hr.float(), impl="reference")
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        fastchar.nn.LSTM(3, 4, proj_size=4)  # torch.nn's own check


def test_cpp_op_errors_name_the_argument():
    skip_unless_runnable("cpp")
    x, h0, c0, w_ih, bias, w_hh, w_hr, _ = (
        t.detach() if isinstance(t, torch.Tensor) else t for t in _seq_args([3, 3])
    )
    op = torch.ops.fastchar.lstmp_seq
    with pytest.raises(ValueError, match=r"lstmp_seq: w_hh must have shape \[24, 4\]"):
        op(x, h0, c0, w_ih, bias, w_hh[:, :3], w_hr)
    with pytest.raises(ValueError, match=r"lstmp_seq: h0 must have shape \[2, 4\]"):
        op(x, c0, c0, w_ih, bias, w_hh, w_hr)
    with pytest.raises(RuntimeError, match="lstmp_seq: w_hr has dtype Float"):
        op(x, h0, c0, w_ih, bias, w_hh, w_hr.float())
    out, h_n, c_n, gates, cs, _ = op(x, h0, c0, w_ih, bias, w_hh, w_hr)
    with pytest.raises(ValueError, match=r"lstmp_bwd: grad_out must have shape \[3, 2, 4\]"):
        torch.ops.fastchar.lstmp_bwd(gates[..., :6], h_n, c_n, w_hh, w_hr, c0, gates, cs)


def test_triton_has_no_projection(monkeypatch):
    # Pretend Triton runs here: fused on CUDA falls back to the reference with a warning
    # that says why, and an explicit impl="triton" refuses
    monkeypatch.setattr(backends, "why_not", lambda impl, device_type: None)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton kernels have no LSTM projection"):
        assert backends.resolve("fused", "cuda", "proj_size") == "reference"
    assert backends.resolve("fused", "cuda") == "triton"
    with pytest.raises(RuntimeError, match="impl='triton' cannot run .* no LSTM projection"):
        backends.resolve("triton", "cpu", "proj_size")
    assert backends.resolve("cpp", "cpu", "proj_size") == "cpp"
    m = fastchar.nn.LSTM(3, 5, proj_size=2, impl="triton")
    with pytest.raises(RuntimeError, match="no LSTM projection"):
        m(torch.randn(2, 1, 3))


def test_state_shapes_helper_knows_proj():
    m = torch.nn.LSTM(3, 5, proj_size=2, num_layers=2, bidirectional=True)
    assert state_shapes(m, 7) == [(4, 7, 2), (4, 7, 5)]


def test_no_time_steps():
    # T = 0 through the op and its backward: the final states are the initial ones
    skip_unless_runnable("cpp")
    x, h0, c0, w_ih, bias, w_hh, w_hr, _ = _seq_args([3, 3])
    x = x.detach()[:0].requires_grad_()
    out, h_n, c_n, _, _, _ = torch.ops.fastchar.lstmp_seq(x, h0, c0, w_ih, bias, w_hh, w_hr)
    assert out.shape == (0, 2, 4)
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    g_h, g_c = torch.randn_like(h_n), torch.randn_like(c_n)
    grads = torch.autograd.grad((h_n, c_n), (h0, c0, w_hh), (g_h, g_c), allow_unused=True)
    assert torch.equal(grads[0], g_h) and torch.equal(grads[1], g_c)
    assert grads[2] is None or not grads[2].any()
