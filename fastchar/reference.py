"""Step-by-step PyTorch LSTM, GRU and RNN layers: the oracle, fallback and baseline.

Plain autograd-friendly ops on any device and dtype, with torch.nn's gate order
(LSTM i, f, g, o; GRU r, z, n with ``b_hn`` inside ``r * (W_hn h + b_hn)``).

Shape letters: T time, B batch, N packed rows, I input, H hidden, G gates (4H / 3H / H),
P an LSTM's projection (torch.nn.LSTM's proj_size; without one P = H).
Every layer function runs one layer in one direction over time-major input x [T, B, I],
or, with ``batch_sizes`` (PackedSequence.batch_sizes [T], non-increasing), over packed
input x [N, I]: step t runs on its first b_t rows, sequences that have ended keep
their state, and h_n [B, H] is each sequence's state after its own last step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _zeros_state(x: Tensor, width: int, batch_sizes: Tensor | None = None) -> Tensor:
    B = x.shape[1] if batch_sizes is None else int(batch_sizes[0])
    return x.new_zeros(B, width)


def _packed_steps(xp: Tensor, states: list[Tensor], batch_sizes: Tensor, step) -> list[Tensor]:
    """Run ``step(xp_t, *states) -> new states`` over packed rows xp [N, G].

    At step t only the first b_t rows of each state [B, H] (or [B, P]) advance; the rows that drop
    out are each sequence's final state, since batch sizes never grow again. Returns
    [out [N, H] (the first state at every packed row), final states [B, H]...].
    """
    outs, finals = [], [[] for _ in states]
    off = 0
    for b in batch_sizes.tolist():
        if b < states[0].shape[0]:  # sequences b.. ended at the previous step
            for acc, s in zip(finals, states, strict=True):
                acc.append(s[b:])
            states = [s[:b] for s in states]
        states = list(step(xp[off : off + b], *states))
        outs.append(states[0])
        off += b
    for acc, s in zip(finals, states, strict=True):
        acc.append(s)
    # rows split off later have lower indices: reversed, the pieces run 0..B-1
    return [torch.cat(outs), *(torch.cat(acc[::-1]) for acc in finals)]


def bias_sum(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """b_ih + b_hh where both exist, for cells whose two biases add up."""
    if b_ih is None:
        return b_hh
    if b_hh is None:
        return b_ih
    return b_ih + b_hh


def lstm_step(
    xp_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_hr: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the projected input ``xp_t`` [B, 4H] (biases included).

    With ``w_hr`` [P, H] (an LSTM with proj_size P) h is [B, P] and w_hh [4H, P]:
    h' = (o * tanh(c')) @ w_hr^T, as torch.nn.LSTM projects.
    """
    g = xp_t + F.linear(h, w_hh)  # [B, 4H]
    i, f, gg, o = g.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def gru_step(xp_t: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    """One GRU step from ``xp_t`` = x W_ih^T + b_ih [B, 3H]; ``b_hh`` stays with the hidden side."""
    gh = F.linear(h, w_hh, b_hh)  # [B, 3H]
    xr, xz, xn = xp_t.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def rnn_step(xp_t: Tensor, h: Tensor, w_hh: Tensor, nonlinearity: str = "tanh") -> Tensor:
    """One Elman RNN step from ``xp_t`` [B, H] (biases included)."""
    pre = xp_t + F.linear(h, w_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def lstm(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    batch_sizes: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM layer. x [T, B, I], h0/c0 [B, H] or None (zeros) -> out [T, B, H], h_n, c_n [B, H].

    With ``batch_sizes``: x [N, I] packed -> out [N, H], h_n, c_n [B, H]. With ``w_hr``
    [P, H] (proj_size P; w_hh [4H, P]) h0, out and h_n are P wide, c0 and c_n H wide.
    """
    h = _zeros_state(x, w_hh.shape[1], batch_sizes) if h0 is None else h0
    c = _zeros_state(x, w_hh.shape[0] // 4, batch_sizes) if c0 is None else c0
    xp = F.linear(x, w_ih, bias_sum(b_ih, b_hh))  # [T, B, 4H], one GEMM for all steps
    if batch_sizes is not None:  # xp [N, 4H]
        out, h, c = _packed_steps(
            xp, [h, c], batch_sizes, lambda g, h, c: lstm_step(g, h, c, w_hh, w_hr)
        )
        return out, h, c
    outs = []
    for t in range(x.shape[0]):
        h, c = lstm_step(xp[t], h, c, w_hh, w_hr)
        outs.append(h)
    return torch.stack(outs), h, c


def gru(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GRU layer. x [T, B, I], h0 [B, H] or None (zeros) -> out [T, B, H], h_n [B, H].

    With ``batch_sizes``: x [N, I] packed -> out [N, H], h_n [B, H].
    """
    h = _zeros_state(x, w_hh.shape[1], batch_sizes) if h0 is None else h0
    xp = F.linear(x, w_ih, b_ih)  # [T, B, 3H]
    if batch_sizes is not None:  # xp [N, 3H]
        out, h = _packed_steps(xp, [h], batch_sizes, lambda g, h: [gru_step(g, h, w_hh, b_hh)])
        return out, h
    outs = []
    for t in range(x.shape[0]):
        h = gru_step(xp[t], h, w_hh, b_hh)
        outs.append(h)
    return torch.stack(outs), h


def rnn(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
    *,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Elman RNN layer (tanh or relu). x [T, B, I], h0 [B, H] or None -> out [T, B, H], h_n.

    With ``batch_sizes``: x [N, I] packed -> out [N, H], h_n [B, H].
    """
    h = _zeros_state(x, w_hh.shape[1], batch_sizes) if h0 is None else h0
    xp = F.linear(x, w_ih, bias_sum(b_ih, b_hh))  # [T, B, H]
    if batch_sizes is not None:  # xp [N, H]
        out, h = _packed_steps(
            xp, [h], batch_sizes, lambda g, h: [rnn_step(g, h, w_hh, nonlinearity)]
        )
        return out, h
    outs = []
    for t in range(x.shape[0]):
        h = rnn_step(xp[t], h, w_hh, nonlinearity)
        outs.append(h)
    return torch.stack(outs), h


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None) -> tuple[Tensor, Tensor]:
    """Single LSTM step from raw input x [B, I] -> (h', c') [B, H] (h' [B, P] with w_hr)."""
    return lstm_step(F.linear(x, w_ih, bias_sum(b_ih, b_hh)), h, c, w_hh, w_hr)


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    """Single GRU step from raw input x [B, I] -> h' [B, H]."""
    return gru_step(F.linear(x, w_ih, b_ih), h, w_hh, b_hh)


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh") -> Tensor:
    """Single RNN step from raw input x [B, I] -> h' [B, H]."""
    return rnn_step(F.linear(x, w_ih, bias_sum(b_ih, b_hh)), h, w_hh, nonlinearity)
