"""fastchar.nn modules and fastchar.ops layers on PackedSequence input vs torch.nn: packed
outputs, each sequence's final states and every gradient, sorted and unsorted batches,
layers, directions, dropout, gradcheck, the reverse-direction row map and bad batch sizes.

Shape letters: T time, B batch, N packed rows, I input, H hidden, L layers, D directions.
Tolerances come from tests/parity.py, the one place they are set.
"""

from __future__ import annotations

import pytest
import torch
from parity import (
    CELLS,
    assert_close,
    check_packed_parity,
    make_pair,
    run_packed,
    skip_unless_runnable,
)
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastchar.nn
from fastchar import ops
from fastchar.nn import reversed_rows

# The impls checked here ("fused" on the CPU is "cpp"). Triton's packed path is checked by
# tests/triton/test_triton_packed_nn.py and test_triton_packed.py, in the interpreter pass.
PACKED_IMPLS = ["reference", "torch", "cpp"]
# The impls whose packed ops are gradchecked in float64.
GRADCHECK_IMPLS = ["reference", "cpp"]

DTYPES = {"f64": torch.float64, "f32": torch.float32}
_lengths = torch.randint(1, 8, (5,), generator=torch.Generator().manual_seed(11))
_lengths[2] = 1
RANDOM_LENGTHS = _lengths.tolist()  # fixed random lengths in 1..7, one of them 1

# lengths, packing and module layout; H odd and small to keep the suite fast
CASES = {
    "sorted_mixed_h0": dict(lengths=[5, 3, 3, 1], enforce_sorted=True, H=5),
    "unsorted_2layers_bidir_batchfirst_h0": dict(
        lengths=[2, 6, 1, 6, 3],
        enforce_sorted=False,
        H=7,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
    ),
    "all_equal_bidir_zeros": dict(
        lengths=[4, 4, 4], enforce_sorted=True, H=33, bidirectional=True, with_state=False
    ),
    "all_length_one_unsorted_2layers_h0": dict(
        lengths=[1, 1, 1], enforce_sorted=False, H=5, num_layers=2, batch_first=True
    ),
    "one_sequence_2layers_bidir_zeros": dict(
        lengths=[7], enforce_sorted=True, H=6, num_layers=2, bidirectional=True, with_state=False
    ),
    "random_unsorted_2layers_bidir_nobias_h0": dict(
        lengths=RANDOM_LENGTHS,
        enforce_sorted=False,
        H=9,
        num_layers=2,
        bidirectional=True,
        bias=False,
    ),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_packed_module_matches_torch_nn(cell, impl, case, dtype):
    skip_unless_runnable(impl)
    check_packed_parity(cell, impl, dtype=dtype, **case)


@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_packed_train_mode_dropout_between_layers(cell, impl):
    # Seeded alike, fastchar's F.dropout on the packed data [N, D*H] draws torch.nn's masks;
    # a mask drawn in another shape or place would not match.
    skip_unless_runnable(impl)
    kw = dict(lengths=[2, 5, 1, 4], enforce_sorted=False, H=6, num_layers=3, bidirectional=True)
    check_packed_parity(cell, impl, dtype=torch.float64, dropout=0.5, **kw)
    (_, train, _), _ = run_packed(cell, impl, dtype=torch.float64, dropout=0.5, **kw)
    (_, plain, _), _ = run_packed(cell, impl, dtype=torch.float64, dropout=0.0, **kw)
    assert not torch.allclose(train[0], plain[0]), "dropout had no effect"


def _reversed_rows_loop(lengths: list[int]) -> list[int]:
    """The expected map, one sequence at a time (sorted lengths, longest first)."""
    bs = [sum(n > t for n in lengths) for t in range(lengths[0])]
    off = [sum(bs[:t]) for t in range(len(bs))]
    rows = [0] * sum(bs)
    for b, n in enumerate(lengths):
        for t in range(n):
            rows[off[t] + b] = off[n - 1 - t] + b
    return rows


@pytest.mark.parametrize("lengths", [[1], [3], [2, 2], [5, 3, 3, 1], [7, 6, 2, 1, 1]])
def test_reversed_rows_reverses_each_sequence(lengths):
    bs = torch.tensor([sum(n > t for n in lengths) for t in range(lengths[0])])
    rows = reversed_rows(bs)
    assert rows.tolist() == _reversed_rows_loop(lengths)
    assert torch.equal(rows[rows], torch.arange(len(rows))), "not its own inverse"


def _packed_op_inputs(cell: str, lengths: list[int], I: int = 3, H: int = 4):
    torch.manual_seed(5)
    T, B = max(lengths), len(lengths)
    p = pack_padded_sequence(torch.randn(T, B, I, dtype=torch.float64), torch.tensor(lengths))
    G = {"lstm": 4, "gru": 3}.get(cell, 1) * H

    def leaf(*shape):
        return (0.5 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    states = [leaf(B, H) for _ in range(2 if cell == "lstm" else 1)]
    weights = [leaf(G, I), leaf(G, H), leaf(G), leaf(G)]
    return p.data.clone().requires_grad_(), states, weights, p.batch_sizes


def _packed_op(cell: str, impl: str, batch_sizes):
    if cell == "lstm":
        return lambda x, h0, c0, *w: ops.lstm(x, h0, c0, *w, impl=impl, batch_sizes=batch_sizes)
    if cell == "gru":
        return lambda x, h0, *w: ops.gru(x, h0, *w, impl=impl, batch_sizes=batch_sizes)
    nl = cell.removeprefix("rnn_")
    return lambda x, h0, *w: ops.rnn(x, h0, *w, nl, impl=impl, batch_sizes=batch_sizes)


@pytest.mark.parametrize("impl", GRADCHECK_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_packed_op_gradcheck(cell, impl):
    skip_unless_runnable(impl)
    x, states, weights, bs = _packed_op_inputs(cell, [4, 3, 3, 1])
    assert torch.autograd.gradcheck(_packed_op(cell, impl, bs), (x, *states, *weights))


@pytest.mark.parametrize("impl", PACKED_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_packed_op_zero_states_and_shapes(cell, impl):
    # h0 (c0) None: zeros for the B = batch_sizes[0] sequences, as torch's packed ops do
    skip_unless_runnable(impl)
    x, states, weights, bs = _packed_op_inputs(cell, [5, 2, 2])
    got = _packed_op(cell, impl, bs)(x, *[None] * len(states), *weights)
    want = _packed_op(cell, "torch", bs)(x, *[torch.zeros_like(s) for s in states], *weights)
    assert [tuple(t.shape) for t in got] == [(9, 4)] + [(3, 4)] * len(states)
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=False):
        assert_close(a, b, torch.float64, name)


# batch sizes that no packing of valid lengths makes, and the message that names them
BAD_BATCH_SIZES = {
    "zero": (torch.tensor([3, 0]), 3, "batch_sizes must be positive and non-increasing"),
    "increasing": (torch.tensor([2, 3]), 5, "batch_sizes must be positive and non-increasing"),
    "float": (torch.tensor([3.0, 2.0]), 5, "batch_sizes must be a non-empty 1-D int64 CPU"),
    "2d": (torch.tensor([[3, 2]]), 5, "batch_sizes must be a non-empty 1-D int64 CPU"),
    "empty": (torch.zeros(0, dtype=torch.long), 5, "batch_sizes must be a non-empty 1-D"),
    "meta": (torch.tensor([3, 2], device="meta"), 5, r"batch_sizes .* CPU .* \[2\] on meta"),
    "wrong_sum": (torch.tensor([3, 3]), 5, "batch_sizes sum to 6 rows, but the packed input"),
}
# PackedSequence itself refuses batch_sizes off the CPU
MODULE_BAD_BATCH_SIZES = {k: v for k, v in BAD_BATCH_SIZES.items() if k != "meta"}


@pytest.mark.parametrize(
    ("bs", "N", "match"), MODULE_BAD_BATCH_SIZES.values(), ids=MODULE_BAD_BATCH_SIZES
)
@pytest.mark.parametrize("cell", CELLS)
def test_module_refuses_bad_batch_sizes(cell, bs, N, match):
    # torch.nn runs a zero batch size silently and fails on the others with messages about
    # its internals (zeros(): argument 'size' ..., start + length exceeds ...)
    ours, _ = make_pair(cell, "reference", 3, 5)
    with pytest.raises(ValueError, match=match):
        ours(PackedSequence(torch.randn(N, 3, dtype=torch.float64), bs))


@pytest.mark.parametrize(("bs", "N", "match"), BAD_BATCH_SIZES.values(), ids=BAD_BATCH_SIZES)
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_op_refuses_bad_batch_sizes(impl, bs, N, match):
    x, h0, w_ih, w_hh = torch.randn(N, 4), None, torch.randn(6, 4), torch.randn(6, 6)
    with pytest.raises(ValueError, match=f"rnn: {match}"):
        ops.rnn(x, h0, w_ih, w_hh, impl=impl, batch_sizes=bs)


@pytest.mark.parametrize("cell", CELLS)
def test_length_longer_than_t_is_refused(cell):
    # pack_padded_sequence does not check a length against T: it packs batch sizes for
    # the longer length over the rows that exist, and torch.nn then fails on an index.
    ours, theirs = make_pair(cell, "reference", 3, 5)
    try:
        packed = pack_padded_sequence(torch.randn(4, 3, 3, dtype=torch.float64), [5, 2, 1])
    except RuntimeError:
        pytest.skip("this torch's pack_padded_sequence refuses it itself")
    with pytest.raises(RuntimeError):
        theirs(packed)
    with pytest.raises(ValueError, match="batch_sizes sum to 8 rows, but the packed input has 7"):
        ours(packed)


def test_zero_or_non_1d_lengths_are_torchs_to_refuse():
    # lengths never reach fastchar: pack_padded_sequence turns them into batch sizes
    # and refuses these itself; what it cannot catch, the batch sizes check does (above)
    x = torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match="greater than 0"):
        pack_padded_sequence(x, torch.tensor([3, 0, 2]), enforce_sorted=False)
    with pytest.raises(RuntimeError, match="1D CPU int64 tensor"):
        pack_padded_sequence(x, torch.tensor([[3, 2, 1]]))


def test_op_packed_argument_errors():
    x, w_ih, w_hh = torch.randn(5, 3), torch.randn(16, 3), torch.randn(16, 4)
    bs = torch.tensor([3, 2])
    with pytest.raises(ValueError, match=r"lstm: x must be 2-D \[N, I\]"):
        ops.lstm(x.view(5, 1, 3), None, None, w_ih, w_hh, impl="reference", batch_sizes=bs)
    with pytest.raises(ValueError, match=r"lstm: h0 must have shape \[3, 4\]"):
        ops.lstm(x, torch.zeros(5, 4), None, w_ih, w_hh, impl="reference", batch_sizes=bs)
    with pytest.raises(ValueError, match=r"lstm: w_ih must have shape \[16, 3\]"):
        ops.lstm(x, None, None, w_ih[:, :2], w_hh, impl="torch", batch_sizes=bs)
    with pytest.raises(TypeError, match="gru: batch_sizes must be a Tensor, got list"):
        ops.gru(x, None, w_ih[:12], w_hh[:12, :4], impl="reference", batch_sizes=[3, 2])


def test_module_packed_input_and_state_errors():
    m = fastchar.nn.LSTM(3, 5, num_layers=2, impl="reference")
    packed = pack_padded_sequence(torch.randn(4, 3, 3), [4, 2, 1])
    with pytest.raises(RuntimeError, match=r"data must be \[N, input_size=4\]"):
        fastchar.nn.GRU(4, 5, impl="reference")(packed)
    bad = torch.zeros(2, 4, 5)  # B = 3 sequences
    with pytest.raises(RuntimeError, match=r"expected h0 of shape \[2, 3, 5\]"):
        m(packed, (bad, bad))
