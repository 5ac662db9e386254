"""CharRNN: embedding -> fastchar recurrent stack -> dropout -> linear head.

Shape letters: B batch, T time, E embedding, H hidden, V vocabulary, L layers.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastchar.nn import MODULES
from fastchar.ops._common import linear

MODEL_KINDS = tuple(MODULES)
NONLINEARITIES = ("tanh", "relu")
PRIME_WINDOW = 4096  # characters per forward when priming (CharRNN.prime)


class CharRNN(nn.Module):
    """A character language model over a fastchar LSTM, GRU or RNN stack.

    ``forward(idx [B, T], state=None) -> (logits [B, T, V], state)`` trains and
    primes; ``step(idx [B], state) -> (logits [B, V], state)`` advances one
    character with the single-step cell ops, for sampling.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        model: str = "lstm",
        emb_dim: int = 64,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
        impl: str = "fused",
        nonlinearity: str = "tanh",
    ):
        super().__init__()
        if model not in MODULES:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {model!r}")
        for name, value in (("vocab_size", vocab_size), ("emb_dim", emb_dim), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        self.kind = model
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        kwargs = {"nonlinearity": nonlinearity} if model == "rnn" else {}
        self.rnn = MODULES[model](
            emb_dim,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
            impl=impl,
            **kwargs,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    @property
    def impl(self) -> str:
        return self.rnn.impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.rnn.impl = value

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, idx: Tensor, state=None):
        x = self.embedding(idx)  # [B, T, E]
        out, state = self.rnn(x, state)  # [B, T, H]
        logits = self._head(self.drop(out))  # [B, T, V]
        return logits, state

    def prime(self, idx: Tensor, state=None, window: int = PRIME_WINDOW):
        """(logits [B, V] after the last of idx [B, T], the state then), ``window`` steps
        at a time with the state carried over: a long prime holds one window's activations
        and logits at a time, not all T's."""
        for i in range(0, idx.shape[1], window):
            logits, state = self(idx[:, i : i + window], state)
        return logits[:, -1], state

    def step(self, idx: Tensor, state=None):
        x = self.embedding(idx)  # [B, E]
        out, state = self.rnn.step(x, state)  # [B, H]
        return self._head(out), state  # [B, V]

    def _head(self, h: Tensor) -> Tensor:
        # fastchar's linear: float32 where this CPU's bfloat16 GEMM is the slower one.
        return linear(h, self.head.weight, self.head.bias)

    @torch.no_grad()
    def generate(
        self,
        prime: Tensor,
        length: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``length`` ids after ``prime`` [P] (P >= 1); returns the new ids [length].
        ``temperature=0`` is greedy (the argmax), as in ``draw`` and the Generator.

        The prime runs through ``forward`` (``prime``: a window at a time); every new
        character is one ``step``, carrying the recurrent state, never re-running the prefix.
        """
        if prime.dim() != 1 or prime.numel() < 1:
            raise ValueError("prime must be a non-empty 1-D tensor of ids")
        length, top_k = check_sampling(length, temperature, top_k)
        was_training = self.training
        self.eval()
        try:
            device = self.head.weight.device
            logits, state = self.prime(prime.to(device)[None])  # [1, V]
            out = torch.empty(length, dtype=torch.long)
            for t in range(length):
                nxt = draw(logits, temperature, top_k, generator=generator)  # [1]
                out[t] = nxt[0]
                if t + 1 < length:
                    logits, state = self.step(nxt.to(device), state)
            return out
        finally:
            self.train(was_training)


def count_arg(name: str, value: object, least: int) -> int:
    """An int argument (a Python or numpy integer, not a bool or a float) >= ``least``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if n < least:
        raise ValueError(f"{name} must be >= {least}, got {n}")
    return n


def real_arg(name: str, value: object) -> float:
    """A real-number argument (a Python or numpy int or float, or a one-number real tensor;
    not a bool) as a float."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_sampling(length: object, temperature: object, top_k: object) -> tuple[int, int | None]:
    """The samplers' arguments checked (ValueError naming the bad one): ``length`` an integer
    >= 0, ``temperature`` finite and >= 0 (0: greedy), ``top_k`` None or an integer >= 1.
    Returns (length, top_k) as ints."""
    length = count_arg("length", length, 0)
    temperature = real_arg("temperature", temperature)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    return length, None if top_k is None else count_arg("top_k", top_k, 1)


def _probs(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None = None
) -> Tensor:
    """Next-character probabilities [B, V] from logits [B, V]: temperature, then the top-k
    likeliest, then the smallest set whose probability reaches top_p (nucleus). Both rank by
    logit (not by probability, which a large temperature rounds to equal values), ties by
    id, lowest first (a stable sort), as the C++ sampling loop ranks them: top_k keeps
    exactly k ids, so top_k=1 is the argmax, and top_p keeps at least the likeliest. The
    logits less their row's largest go through the temperature in float64, as in the C++
    loop: a tiny temperature gives 0 and -inf (the argmax), never an overflow to inf and a
    NaN."""
    top = logits.max(-1, keepdim=True).values
    scaled = ((logits.double() - top.double()) / temperature).to(logits.dtype)
    cut_k = top_k is not None and top_k < logits.shape[-1]
    cut_p = top_p is not None and top_p < 1.0
    if cut_k or cut_p:
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    if cut_k:
        drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order[..., :top_k], False)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = F.softmax(scaled, dim=-1)
    if cut_p:
        sorted_p = probs.gather(-1, order)
        before = sorted_p.cumsum(-1) - sorted_p  # probability of the likelier ones
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # never the likeliest (a top_p that is 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One id per row of logits [B, V] -> [B] (on the CPU): the argmax when temperature is
    0, else a draw from ``generator``. NaN or +inf logits (a diverged model) have no
    distribution: a RuntimeError, as the C++ loop raises."""
    logits = logits.float().cpu()
    if logits.isnan().any() or logits.isposinf().any():
        raise RuntimeError(
            "the model's logits are NaN or +inf, so there is no distribution to draw the "
            "next character from (a diverged model?)"
        )
    if temperature == 0:
        return logits.argmax(-1)
    probs = _probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
