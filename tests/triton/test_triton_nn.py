"""fastchar.nn modules with ``impl="triton"``: a two-layer bidirectional stack vs
torch.nn (outputs, states, every gradient), and ``step()`` vs the reference cells."""

from __future__ import annotations

import pytest
import torch
from _cases import DEVICE
from parity import CELLS, assert_close, check_module_parity, make_pair


@pytest.mark.parametrize("cell", CELLS)
def test_two_layer_bidirectional_stack(cell):
    check_module_parity(
        cell,
        "triton",
        6,
        3,
        4,
        17,
        dtype=torch.float64,
        device=DEVICE,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
    )


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_reference(cell):
    ours, _ = make_pair(cell, "triton", 5, 33, num_layers=2)
    ours.to(DEVICE)
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    n_states = 2 if cell == "lstm" else 1
    states = [torch.randn(2, 3, 33, dtype=torch.float64, device=DEVICE) for _ in range(n_states)]
    hx = tuple(states) if n_states == 2 else states[0]
    got_y, got_s = ours.step(x, hx)
    ours.impl = "reference"
    want_y, want_s = ours.step(x, hx)
    assert_close(got_y, want_y, torch.float64, "step output")
    got_s, want_s = (got_s, want_s) if n_states == 2 else ((got_s,), (want_s,))
    for a, b in zip(got_s, want_s, strict=True):
        assert_close(a, b, torch.float64, "step state")
