"""Triton kernels, one module per cell (lstm, gru, rnn): @triton.jit kernels and
host launchers. Importing a cell module needs Triton; the ops in ``fastchar.ops``
import them lazily so that fastchar works without it.
"""
