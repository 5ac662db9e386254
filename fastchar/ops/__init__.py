"""Sequence-level LSTM, GRU and RNN ops and their single-step cells.

``fastchar.ops.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, impl="fused")`` runs one
layer in one direction over a whole sequence with any implementation
(``fused``, ``cpp``, ``triton``, ``reference``, ``torch``); see each function's
docstring for shapes. Importing this package loads the C++ extension when it is
built, which registers the ``torch.ops.fastchar.*`` kernels, and seeds the CPU
step-GEMM plan from its cache file (``fastchar.plan``).
"""

from fastchar import plan as _plan
from fastchar.ops.gru import gru, gru_cell
from fastchar.ops.lstm import lstm, lstm_cell
from fastchar.ops.rnn import rnn, rnn_cell

_plan._install()

__all__ = ["lstm", "lstm_cell", "gru", "gru_cell", "rnn", "rnn_cell"]
