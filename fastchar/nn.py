"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU`` and ``RNN``.

Each class subclasses its torch.nn twin, so constructor arguments, parameter
names, shapes, initialisation and ``state_dict`` are torch's own; only
``forward`` changes: layers, directions and dropout run here, and each layer in
each direction is one sequence-level op from ``fastchar.ops`` with the chosen
``impl`` (see ``fastchar.backends``). ``impl="torch"`` runs torch's forward.

An LSTM's ``proj_size`` P runs as torch.nn.LSTM runs it: each layer's op takes
``weight_hr`` [P, H], h states and outputs are P wide and c states H wide.

A ``PackedSequence`` runs as torch.nn runs it: every layer op takes the packed data
and its batch sizes, the reverse direction reads each sequence reversed within its own
length, and initial and final states are permuted between the caller's order and the
packed (longest first) order.

Shape letters: L layers, D directions, T time, B batch, N packed rows, I input, H hidden,
P an LSTM's proj_size (P = H without one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from fastchar import ops
from fastchar.backends import IMPLS, autocast_dtype, autocast_on, resolve
from fastchar.ops._common import check_batch_sizes


def reversed_rows(batch_sizes: Tensor) -> Tensor:
    """The packed-row permutation that reverses every sequence within its own length.

    For PackedSequence.batch_sizes [T] (B = batch_sizes[0] sequences, N rows): row r
    (step t of sequence b) maps to the row of step len_b - 1 - t of sequence b, so that
    ``x.index_select(0, rows)`` is the packed batch of reversed sequences. The map is
    its own inverse. Returns int64 [N] on batch_sizes' device (the CPU).
    """
    T, B = len(batch_sizes), int(batch_sizes[0])
    off = torch.cumsum(batch_sizes, 0) - batch_sizes  # [T], first row of each step
    lengths = (batch_sizes[None, :] > torch.arange(B)[:, None]).sum(1)  # [B]
    step = torch.repeat_interleave(torch.arange(T), batch_sizes)  # [N]
    seq = torch.arange(len(step)) - off[step]  # [N]
    return off[lengths[seq] - 1 - step] + seq


class _FastRNNMixin:
    """Forward pass shared by the three modules; ``_layer`` runs one layer, one direction."""

    _n_states = 1

    def _setup(self, impl: str) -> None:
        self.impl = impl

    @property
    def _feature(self) -> str | None:
        """What this module needs that not every kernel has (fastchar.backends.resolve)."""
        return "proj_size" if getattr(self, "proj_size", 0) else None

    def _state_widths(self) -> list[int]:
        """Each state's width: h is proj_size wide where there is one, c hidden_size."""
        h = getattr(self, "proj_size", 0) or self.hidden_size
        return [h] + [self.hidden_size] * (self._n_states - 1)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"

    def _weights(self) -> dict[str, Tensor]:
        """The weights by name, as torch.nn's forward takes them: its list refreshed once, so
        a parametrized weight is computed as many times as torch.nn's forward computes it
        (a random one, weight dropout, draws what torch.nn draws); torch.func.functional_call's
        tensors are taken."""
        self._update_flat_weights()
        return dict(zip(self._flat_weights_names, self._flat_weights, strict=True))

    def _layer_params(
        self, weights: dict[str, Tensor], layer: int, direction: int
    ) -> list[Tensor | None]:
        """[w_ih, w_hh, b_ih, b_hh] of one layer and direction from ``_weights()`` (biases
        None without), and the LSTM's w_hr where it has proj_size."""
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        params = [weights[name + sfx] for name in names]
        if not self.bias:
            params += [None, None]
        if getattr(self, "proj_size", 0):
            params.append(weights["weight_hr" + sfx])
        return params

    # The errors raise the exception types torch.nn's RNNs raise for the same input
    # (ValueError for a wrong dtype or number of dimensions, RuntimeError for a wrong size),
    # so that code catching torch's keeps working.
    def _check_input(self, input: object) -> None:
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            data = input.data
            if data.dim() != 2 or data.shape[-1] != self.input_size:
                raise RuntimeError(
                    f"{name}: a PackedSequence's data must be [N, input_size="
                    f"{self.input_size}], got shape {list(data.shape)}"
                )
            self._check_dtype(data, "input")
            return
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{name}: expected input to be 2D (unbatched) or 3D, got {input.dim()}D "
                f"with shape {list(input.shape)}"
            )
        self._check_dtype(input, "input")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"{name}: input.size(-1) must be input_size={self.input_size}, "
                f"got {input.shape[-1]}"
            )
        if input.shape[1 if input.dim() == 3 and self.batch_first else 0] == 0:
            raise RuntimeError(
                f"{name}: input must have at least one time step, got shape "
                f"{list(input.shape)}{' (batch_first)' if self.batch_first else ''}"
            )

    def _check_dtype(self, t: Tensor, what: str) -> None:
        """Outside autocast, ``t`` (the input) must have the weights' dtype, as in torch.nn."""
        dtype = self._weight_dtype()
        if t.dtype != dtype and not autocast_on(t.device):
            raise ValueError(
                f"{type(self).__name__}: {what} dtype ({t.dtype}) does not match weight dtype "
                f"({dtype}); convert the {what}: .to({dtype}), or the module: .to({t.dtype})"
            )

    def _weight_dtype(self) -> torch.dtype:
        """The first weight's dtype, read without computing a parametrization (that is
        left to _weights() or torch.nn's forward): the attribute itself, which
        torch.func.functional_call swaps, or a parametrized weight's (first) original:
        weight_norm has two, original0 and original1."""
        name = self._flat_weights_names[0]
        if parametrize.is_parametrized(self, name):
            chain = self.parametrizations[name]
            return (chain.original if chain.is_tensor else chain.original0).dtype
        return getattr(self, name).dtype

    def _states_in(self, hx, batched: bool, B: int) -> list[Tensor | None]:
        if hx is None:
            return [None] * self._n_states
        states = list(hx) if self._n_states > 1 else [hx]
        if len(states) != self._n_states:
            raise RuntimeError(
                f"{type(self).__name__}: hx must be a tuple (h0, c0), got {len(states)} tensors"
            )
        LD = self.num_layers * (2 if self.bidirectional else 1)
        names = ("h0", "c0")
        for name, s, width in zip(names, states, self._state_widths(), strict=False):
            if not isinstance(s, Tensor):
                raise TypeError(f"{type(self).__name__}: {name} must be a Tensor")
            want = (LD, B, width) if batched else (LD, width)
            if tuple(s.shape) != want:
                raise RuntimeError(
                    f"{type(self).__name__}: expected {name} of shape {list(want)}, "
                    f"got {list(s.shape)}"
                )
        return [s if batched else s.unsqueeze(1) for s in states]  # [L*D, B, P or H]

    def forward(self, input, hx=None):
        self._check_input(input)
        packed = isinstance(input, PackedSequence)
        device = input.data.device if packed else input.device
        dtype = autocast_dtype(device, (input.data if packed else input).dtype)
        kind = resolve(self.impl, device, self._feature, dtype)
        if kind == "torch":
            return super().forward(input, hx)
        if packed:
            return self._forward_packed(input, hx, kind)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)  # [T, B, I]
        states = self._states_in(hx, batched, x.shape[1])
        x, h = self._stack(x, states, kind)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        if not batched:
            x = x.squeeze(1)
            h = [s.squeeze(1) for s in h]
        return x, (tuple(h) if self._n_states > 1 else h[0])

    def _forward_packed(self, input: PackedSequence, hx, kind: str):
        """forward() on a PackedSequence: states in and out in the caller's order, as
        torch.nn's permute_hidden does; the output keeps the input's batch sizes and
        indices. batch_first does not apply to packed data."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        B = check_batch_sizes(type(self).__name__, batch_sizes, data)
        states = self._states_in(hx, True, B)
        if sorted_indices is not None:
            states = [None if s is None else s.index_select(1, sorted_indices) for s in states]
        x, h = self._stack(data, states, kind, batch_sizes)
        if unsorted_indices is not None:
            h = [s.index_select(1, unsorted_indices) for s in h]
        out = PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices)
        return out, (tuple(h) if self._n_states > 1 else h[0])

    def _stack(self, x: Tensor, states, kind: str, batch_sizes: Tensor | None = None):
        """Every layer and direction over x [T, B, I], or packed x [N, I] with
        ``batch_sizes``; states [L*D, B, P or H] or None each. Returns (the top layer's
        output [T, B, D*P] or [N, D*P], the final states [L*D, B, P or H] each)."""
        D = 2 if self.bidirectional else 1
        rows = None
        if D == 2 and batch_sizes is not None:
            rows = reversed_rows(batch_sizes).to(x.device)  # once for every layer

        def reverse(t: Tensor) -> Tensor:
            return t.flip(0) if rows is None else t.index_select(0, rows)

        weights = self._weights()
        finals: list[list[Tensor]] = [[] for _ in range(self._n_states)]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                s0 = [None if s is None else s[idx] for s in states]
                xin = reverse(x) if d else x
                params = self._layer_params(weights, layer, d)
                out, *s_n = self._layer(xin, s0, params, kind, batch_sizes)
                outs.append(reverse(out) if d else out)
                for acc, s in zip(finals, s_n, strict=True):
                    acc.append(s)
            x = outs[0] if D == 1 else torch.cat(outs, -1)  # [T, B, D*H] or [N, D*H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(acc) for acc in finals]  # [L*D, B, H]

    def step(self, x: Tensor, hx=None):
        """Advance one time step with the single-step ``*_cell`` ops (for sampling).

        x [B, I]; hx as for ``forward`` (batched) or None. Returns the top layer's
        output [B, H] and the new state. Unidirectional modules only; no dropout.
        Differentiable: with grad mode on (the parameters require grad) the fused and cpp
        impls run the reference's step, as the kernels' step has no backward; sample under
        ``torch.no_grad()`` to run the kernels.
        """
        if self.bidirectional:
            raise RuntimeError(f"{type(self).__name__}.step needs a unidirectional module")
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.input_size:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}.step: x must be [B, {self.input_size}], got {got}"
            )
        self._check_dtype(x, "x")
        kind = resolve(self.impl, x.device, self._feature, autocast_dtype(x.device, x.dtype))
        B = x.shape[0]
        states = self._states_in(hx, True, B)
        widths = self._state_widths()
        weights = self._weights()
        finals: list[list[Tensor]] = [[] for _ in range(self._n_states)]
        for layer in range(self.num_layers):
            s0 = [
                x.new_zeros(B, w) if s is None else s[layer]
                for s, w in zip(states, widths, strict=True)
            ]
            s_n = self._cell(x, s0, self._layer_params(weights, layer, 0), kind)
            x = s_n[0]
            for acc, s in zip(finals, s_n, strict=True):
                acc.append(s)
        h = [torch.stack(acc) for acc in finals]  # [L, B, H]
        return x, (tuple(h) if self._n_states > 1 else h[0])


class LSTM(_FastRNNMixin, torch.nn.LSTM):
    """``torch.nn.LSTM`` with fastchar kernels: ``out, (h_n, c_n) = m(x, (h0, c0))``.

    Arguments are torch.nn.LSTM's plus ``impl`` (fused, cpp, triton, reference,
    torch), which may be changed after construction. ``input`` may be a
    ``PackedSequence``. With ``proj_size`` the C++ kernels project inside their time loop;
    the Triton kernels have no projection, so ``fused`` on CUDA runs the reference (with
    a warning) and ``impl="triton"`` raises RuntimeError.
    """

    _n_states = 2

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    def _layer(self, x, s0, params, kind, batch_sizes=None):
        w_hr = params[4] if len(params) > 4 else None
        return ops.lstm(x, s0[0], s0[1], *params[:4], impl=kind, batch_sizes=batch_sizes, w_hr=w_hr)

    def _cell(self, x, s0, params, kind):
        w_hr = params[4] if len(params) > 4 else None
        return ops.lstm_cell(x, s0[0], s0[1], *params[:4], impl=kind, w_hr=w_hr)


class GRU(_FastRNNMixin, torch.nn.GRU):
    """``torch.nn.GRU`` with fastchar kernels: ``out, h_n = m(x, h0)``.

    Arguments are torch.nn.GRU's plus ``impl``; ``input`` may be a ``PackedSequence``.
    """

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    def _layer(self, x, s0, params, kind, batch_sizes=None):
        return ops.gru(x, s0[0], *params, impl=kind, batch_sizes=batch_sizes)

    def _cell(self, x, s0, params, kind):
        return [ops.gru_cell(x, s0[0], *params, impl=kind)]


class RNN(_FastRNNMixin, torch.nn.RNN):
    """``torch.nn.RNN`` (``nonlinearity="tanh"|"relu"``) with fastchar kernels:
    ``out, h_n = m(x, h0)``.

    Arguments are torch.nn.RNN's plus ``impl``; ``input`` may be a ``PackedSequence``.
    """

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    @property
    def _nonlinearity(self) -> str:
        """What torch.nn.RNN computes: its mode, set at construction (a later change of
        ``nonlinearity`` changes nothing there, nor here)."""
        return "relu" if self.mode == "RNN_RELU" else "tanh"

    def _layer(self, x, s0, params, kind, batch_sizes=None):
        return ops.rnn(x, s0[0], *params, self._nonlinearity, impl=kind, batch_sizes=batch_sizes)

    def _cell(self, x, s0, params, kind):
        return [ops.rnn_cell(x, s0[0], *params, self._nonlinearity, impl=kind)]


MODULES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
