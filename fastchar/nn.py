"""Drop-in replacements for ``torch.nn.LSTM``, ``GRU`` and ``RNN``.

Each class subclasses its torch.nn twin, so constructor arguments, parameter
names, shapes, initialisation and ``state_dict`` are torch's own; only
``forward`` changes: layers, directions and dropout run here, and each layer in
each direction is one sequence-level op from ``fastchar.ops`` with the chosen
``impl`` (see ``fastchar.backends``). ``impl="torch"`` runs torch's forward.

Shape letters: L layers, D directions, T time, B batch, I input, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastchar import ops
from fastchar.backends import IMPLS, resolve


class _FastRNNMixin:
    """Forward pass shared by the three modules; ``_layer`` runs one layer, one direction."""

    _n_states = 1

    def _setup(self, impl: str) -> None:
        if getattr(self, "proj_size", 0):
            raise ValueError(
                f"fastchar.nn.{type(self).__name__} does not support proj_size yet; "
                "use torch.nn.LSTM for projections"
            )
        self.impl = impl

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

    def _layer_params(self, layer: int, direction: int) -> list[Tensor | None]:
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        weights = [getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx)]
        if self.bias:
            return weights + [getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)]
        return weights + [None, None]

    def _check_input(self, input: object) -> None:
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                f"fastchar.nn.{name} does not support PackedSequence yet; pad the batch "
                "or use torch.nn." + name
            )
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{name}: expected input to be 2D (unbatched) or 3D, got {input.dim()}D "
                f"with shape {list(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be input_size={self.input_size}, "
                f"got {input.shape[-1]}"
            )

    def _states_in(self, hx, batched: bool, B: int) -> list[Tensor | None]:
        if hx is None:
            return [None] * self._n_states
        states = list(hx) if self._n_states > 1 else [hx]
        if len(states) != self._n_states:
            raise ValueError(f"{type(self).__name__}: hx must be a tuple (h0, c0)")
        LD = self.num_layers * (2 if self.bidirectional else 1)
        want = (LD, B, self.hidden_size) if batched else (LD, self.hidden_size)
        names = ("h0", "c0")
        for name, s in zip(names, states, strict=False):  # names has room for both
            if not isinstance(s, Tensor):
                raise TypeError(f"{type(self).__name__}: {name} must be a Tensor")
            if tuple(s.shape) != want:
                raise ValueError(
                    f"{type(self).__name__}: expected {name} of shape {list(want)}, "
                    f"got {list(s.shape)}"
                )
        return [s if batched else s.unsqueeze(1) for s in states]  # [L*D, B, H]

    def forward(self, input, hx=None):
        self._check_input(input)
        kind = resolve(self.impl, input.device)
        if kind == "torch":
            return super().forward(input, hx)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)  # [T, B, I]
        states = self._states_in(hx, batched, x.shape[1])
        D = 2 if self.bidirectional else 1
        finals: list[list[Tensor]] = [[] for _ in range(self._n_states)]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                s0 = [None if s is None else s[idx] for s in states]
                xin = x.flip(0) if d else x
                out, *s_n = self._layer(xin, s0, self._layer_params(layer, d), kind)
                outs.append(out.flip(0) if d else out)
                for acc, s in zip(finals, s_n, strict=True):
                    acc.append(s)
            x = outs[0] if D == 1 else torch.cat(outs, 2)  # [T, B, D*H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        h = [torch.stack(acc) for acc in finals]  # [L*D, B, H]
        if not batched:
            x = x.squeeze(1)
            h = [s.squeeze(1) for s in h]
        return x, (tuple(h) if self._n_states > 1 else h[0])

    def step(self, x: Tensor, hx=None):
        """Advance one time step with the single-step ``*_cell`` ops (for sampling).

        x [B, I]; hx as for ``forward`` (batched) or None. Returns the top layer's
        output [B, H] and the new state. Unidirectional modules only; no dropout.
        """
        if self.bidirectional:
            raise RuntimeError(f"{type(self).__name__}.step needs a unidirectional module")
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.input_size:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__}.step: x must be [B, {self.input_size}], got {got}"
            )
        kind = resolve(self.impl, x.device)
        B = x.shape[0]
        states = self._states_in(hx, True, B)
        finals: list[list[Tensor]] = [[] for _ in range(self._n_states)]
        for layer in range(self.num_layers):
            s0 = [x.new_zeros(B, self.hidden_size) if s is None else s[layer] for s in states]
            s_n = self._cell(x, s0, self._layer_params(layer, 0), kind)
            x = s_n[0]
            for acc, s in zip(finals, s_n, strict=True):
                acc.append(s)
        h = [torch.stack(acc) for acc in finals]  # [L, B, H]
        return x, (tuple(h) if self._n_states > 1 else h[0])


class LSTM(_FastRNNMixin, torch.nn.LSTM):
    """``torch.nn.LSTM`` with fastchar kernels: ``out, (h_n, c_n) = m(x, (h0, c0))``.

    Arguments are torch.nn.LSTM's plus ``impl`` (fused, cpp, triton, reference,
    torch), which may be changed after construction. ``proj_size`` and
    ``PackedSequence`` are not supported yet.
    """

    _n_states = 2

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    def _layer(self, x, s0, params, kind):
        return ops.lstm(x, s0[0], s0[1], *params, impl=kind)

    def _cell(self, x, s0, params, kind):
        return ops.lstm_cell(x, s0[0], s0[1], *params, impl=kind)


class GRU(_FastRNNMixin, torch.nn.GRU):
    """``torch.nn.GRU`` with fastchar kernels: ``out, h_n = m(x, h0)``.

    Arguments are torch.nn.GRU's plus ``impl``; ``PackedSequence`` is not supported yet.
    """

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    def _layer(self, x, s0, params, kind):
        return ops.gru(x, s0[0], *params, impl=kind)

    def _cell(self, x, s0, params, kind):
        return [ops.gru_cell(x, s0[0], *params, impl=kind)]


class RNN(_FastRNNMixin, torch.nn.RNN):
    """``torch.nn.RNN`` (``nonlinearity="tanh"|"relu"``) with fastchar kernels:
    ``out, h_n = m(x, h0)``.

    Arguments are torch.nn.RNN's plus ``impl``; ``PackedSequence`` is not supported yet.
    """

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(impl)

    def _layer(self, x, s0, params, kind):
        return ops.rnn(x, s0[0], *params, self.nonlinearity, impl=kind)

    def _cell(self, x, s0, params, kind):
        return [ops.rnn_cell(x, s0[0], *params, self.nonlinearity, impl=kind)]


MODULES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
