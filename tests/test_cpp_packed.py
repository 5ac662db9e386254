"""The C++ sequence ops on packed sequences (``batch_sizes``, PackedSequence order):
outputs, each sequence's final state and every gradient against torch.nn's packed
LSTM/GRU/RNN, gradcheck, opcheck, torch.compile and bad batch sizes.

Shape letters: T time, B batch, N packed rows, I input, H hidden, G gates (4H / 3H / H).
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_close
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastchar.ops  # noqa: F401  (registers the ops' autograd and fakes)
from fastchar.backends import cpp_loaded
from fastchar.reference import bias_sum

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="fastchar._C is not built")

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}
LENGTHS = {  # sequence lengths, longest first as torch packs them
    "mixed": [7, 5, 5, 2, 1],
    "all_equal": [4, 4, 4],
    "one_step": [1, 1],
    "one_sequence": [6],
}


def seq_op(cell: str, m, data, h0, c0, batch_sizes):
    """The C++ op for layer 0 of the torch.nn module m: (outputs [N, H], final states...)."""
    w_ih, w_hh, b_ih, b_hh = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0
    if cell == "lstm":
        out, h_n, c_n, _, _ = torch.ops.fastchar.lstm_seq(
            data, h0, c0, w_ih, bias_sum(b_ih, b_hh), w_hh, batch_sizes
        )
        return out, h_n, c_n
    if cell == "gru":
        H = w_hh.shape[1]
        b_x = b_ih + torch.cat((b_hh[: 2 * H], b_hh.new_zeros(H)))
        out, h_n, _, _ = torch.ops.fastchar.gru_seq(
            data, h0, w_ih, b_x, w_hh, b_hh[2 * H :], batch_sizes
        )
        return out, h_n
    return torch.ops.fastchar.rnn_seq(
        data, h0, w_ih, bias_sum(b_ih, b_hh), w_hh, False, batch_sizes
    )


def packed_case(cell, lengths, dtype, I=4, H=33):
    torch.manual_seed(len(lengths) * 7 + H)
    m = TORCH[cell](I, H).to(dtype)
    T, B = max(lengths), len(lengths)
    p = pack_padded_sequence(torch.randn(T, B, I, dtype=dtype), torch.tensor(lengths))
    data = p.data.clone().requires_grad_()
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    return m, p.batch_sizes, data, h0, c0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("H", [33, 64])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("cell", TORCH)
def test_packed_op_matches_torch_nn(cell, lengths, H, dtype):
    m, bs, data, h0, c0 = packed_case(cell, lengths, dtype, H=H)
    states = (h0[None], c0[None]) if cell == "lstm" else h0[None]
    out, s_n = m(PackedSequence(data, bs), states)
    want = [out.data, *(t[0] for t in (s_n if cell == "lstm" else (s_n,)))]
    got = list(seq_op(cell, m, data, h0, c0, bs))
    for name, g, w in zip(("out", "h_n", "c_n"), got, want, strict=False):
        assert_close(g, w, dtype, name)
    inputs = [data, h0] + ([c0] if cell == "lstm" else []) + list(m.parameters())
    grads = [torch.randn_like(w) for w in want]
    g_want = torch.autograd.grad(want, inputs, grads)
    g_got = torch.autograd.grad(got, inputs, grads)
    names = ["x", "h0"] + (["c0"] if cell == "lstm" else []) + [n for n, _ in m.named_parameters()]
    for name, g, w in zip(names, g_got, g_want, strict=True):
        assert_close(g, w, dtype, f"grad {name}")


@pytest.mark.parametrize("cell", TORCH)
def test_packed_op_gradcheck(cell):
    m, bs, data, h0, c0 = packed_case(cell, [4, 3, 1], torch.float64, I=3, H=5)
    weights = [p.detach().requires_grad_() for p in m.parameters()]
    ins = (data, h0, c0) if cell == "lstm" else (data, h0, c0.detach())
    assert torch.autograd.gradcheck(lambda *a: seq_op_from(cell, bs, *a), (*ins, *weights))


def seq_op_from(cell, bs, data, h0, c0, w_ih, w_hh, b_ih, b_hh):
    class Layer:  # the attributes seq_op reads
        weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0 = w_ih, w_hh, b_ih, b_hh

    return seq_op(cell, Layer, data, h0, c0, bs)


@pytest.mark.parametrize("cell", TORCH)
def test_packed_opcheck(cell):
    m, bs, data, h0, c0 = packed_case(cell, [3, 2, 2], torch.float64, I=3, H=5)
    w_ih, w_hh, b_ih, b_hh = (p.detach().requires_grad_() for p in m.parameters())
    if cell == "lstm":
        op, args = torch.ops.fastchar.lstm_seq, (data, h0, c0, w_ih, b_ih, w_hh, bs)
    elif cell == "gru":
        op, args = torch.ops.fastchar.gru_seq, (data, h0, w_ih, b_ih, w_hh, b_hh[:5], bs)
    else:
        op, args = torch.ops.fastchar.rnn_seq, (data, h0, w_ih, b_ih, w_hh, True, bs)
    torch.library.opcheck(op, args)


def test_packed_op_compiles_fullgraph():
    m, bs, data, h0, c0 = packed_case("lstm", [5, 3, 1], torch.float32)
    args = (m.weight_ih_l0, bias_sum(m.bias_ih_l0, m.bias_hh_l0), m.weight_hh_l0)

    def f(data, h0, c0):
        out, h_n, c_n, _, _ = torch.ops.fastchar.lstm_seq(data, h0, c0, *args, bs)
        return out.sum() + h_n.sum() + c_n.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(data, h0, c0), f(data, h0, c0), torch.float32, "compiled")


BAD_BATCH_SIZES = {  # batch_sizes, the message
    "increasing": (torch.tensor([2, 3]), "positive and non-increasing"),
    "zero": (torch.tensor([3, 0]), "positive and non-increasing"),
    "wrong_sum": (torch.tensor([3, 3]), "sum to 6 rows, but the packed input has 5"),
    "float": (torch.tensor([3.0, 2.0]), "1-D int64 CPU tensor"),
    "2d": (torch.tensor([[3, 2]]), "1-D int64 CPU tensor"),
    "empty": (torch.zeros(0, dtype=torch.long), "non-empty"),
}


@pytest.mark.parametrize(("bs", "match"), BAD_BATCH_SIZES.values(), ids=BAD_BATCH_SIZES.keys())
def test_bad_batch_sizes_are_refused(bs, match):
    x, h0, w_ih, w_hh = torch.randn(5, 4), torch.randn(3, 6), torch.randn(6, 4), torch.randn(6, 6)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastchar.rnn_seq(x, h0, w_ih, None, w_hh, False, bs)


def test_packed_needs_2d_x():
    x, h0, w_ih, w_hh = (
        torch.randn(2, 3, 4),
        torch.randn(3, 6),
        torch.randn(6, 4),
        torch.randn(6, 6),
    )
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.fastchar.rnn_seq(x, h0, w_ih, None, w_hh, False, torch.tensor([3, 3]))
