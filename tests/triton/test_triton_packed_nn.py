"""fastchar.nn on a PackedSequence with impl="triton" against torch.nn: the packed Triton
sequence ops wired through fastchar.ops (outputs, final states and every gradient)."""

from __future__ import annotations

import pytest
import torch
from _cases import DEVICE
from parity import CELLS, assert_close, make_pair
from torch.nn.utils.rnn import pack_padded_sequence

LAYOUTS = {
    "1layer": dict(),
    "2layers_bidir": dict(num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_packed_module_matches_torch(cell, layout):
    dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    torch.manual_seed(3)
    ours, theirs = make_pair(cell, "triton", 3, 5, dtype=dtype, **layout)
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    lengths = torch.tensor([2, 4, 1])  # unsorted; torch sorts and restores the order
    x = torch.randn(4, 3, 3, dtype=dtype, device=DEVICE, requires_grad=True)
    D = 2 if layout.get("bidirectional") else 1
    n_states = 2 if cell == "lstm" else 1
    states = [
        torch.randn(layout.get("num_layers", 1) * D, 3, 5, dtype=dtype, device=DEVICE)
        for _ in range(n_states)
    ]
    for s in states:
        s.requires_grad_()
    hx = tuple(states) if n_states == 2 else states[0]
    results = []
    for m in (ours, theirs):
        out, h = m(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        finals = list(h) if n_states == 2 else [h]
        wanted = [out.data, *finals]
        grads = torch.autograd.grad(
            wanted, [x, *states, *m.parameters()], [torch.ones_like(t) for t in wanted]
        )
        results.append(([out.data, *finals], grads))
    (got, g_got), (want, g_want) = results
    for name, a, b in zip(("out", "h_n", "c_n"), got, want, strict=False):
        assert_close(a, b, dtype, name)
    for i, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
        assert_close(a, b, dtype, f"grad {i}")


def test_proj_size_is_not_a_triton_kernel(monkeypatch):
    # The Triton kernels have no LSTM projection: impl="triton" refuses a proj_size
    # module; "fused" on CUDA runs the reference with one warning and matches torch.nn.
    from fastchar import backends

    ours, theirs = make_pair("lstm", "triton", 3, 6, dtype=torch.float32, proj_size=2)
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    x = pack_padded_sequence(torch.randn(4, 3, 3, device=DEVICE), torch.tensor([4, 2, 1]))
    with pytest.raises(RuntimeError, match="Triton kernels have no LSTM projection"):
        ours(x)
    if DEVICE != "cuda":
        return  # "fused" on CPU tensors is the C++ kernel (tests/test_proj.py)
    ours.impl = "fused"
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="falls back to 'reference'.*no LSTM projection"):
        got = ours(x)
    want = theirs(x)
    assert_close(got[0].data, want[0].data, torch.float32, "out")
    for name, a, b in zip(("h_n", "c_n"), got[1], want[1], strict=True):
        assert_close(a, b, torch.float32, name)
