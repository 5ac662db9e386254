"""Text generation from a trained CharRNN: many samples at once, seeded, in a chosen
weight format, and the score of a text under the model.

    g = Generator.from_checkpoint("runs/x/ckpt.pt", weights="float32", impl="fused")
    texts = g.generate("ROMEO:", 200, num_samples=4, temperature=0.8, top_p=0.95, seed=1)
    nats = g.score(text)  # mean cross-entropy of text[1:] given the characters before

The prime runs through the sequence ops once (batch 1; its state is then copied to every
sample). With the C++ kernels (impl cpp, or fused on the CPU) the rest runs in one op per
chunk of characters, ``fastchar::generate`` (csrc/generate.cpp): no Python per character;
elsewhere each new character is one ``CharRNN.step`` for all samples together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fastchar import data as fdata
from fastchar.backends import IMPLS, cpp_loaded, resolve
from fastchar.model import PRIME_WINDOW, CharRNN, check_sampling, count_arg, draw, real_arg
from fastchar.training.checkpoint import load_checkpoint, model_from_checkpoint
from fastchar.training.device import pick_device

WEIGHTS = ("float32", "bfloat16", "int8")
SCORE_WINDOW = PRIME_WINDOW  # characters per forward scoring or priming (the state carries over)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows q and float32 scales s [N] with w ~ s[:, None] * q, s = max |row| / 127
    (a row of zeros gets scale 0 and zeros: nothing is divided by zero; a constant row is
    exact)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _repeat_state(state, k: int):
    """A batch-1 recurrent state ([L, 1, H], or a tuple of them) for k samples."""
    if isinstance(state, tuple):
        return tuple(s.expand(-1, k, -1).contiguous() for s in state)
    return state.expand(-1, k, -1).contiguous()


class Generator:
    """A CharRNN, its vocabulary and the weight format it runs in (eval mode, no grad).

    The generator works on its own copy of ``model``: the caller's model keeps its
    weights, dtype and train/eval mode (sampling in the middle of training changes
    nothing).
    """

    def __init__(
        self, model: CharRNN, vocab: fdata.Vocab, weights: str = "float32", *, _own: bool = False
    ):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        if len(vocab) != model.vocab_size:
            raise ValueError(f"vocabulary of {len(vocab)} for a model of {model.vocab_size}")
        dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
        if not _own:  # from_checkpoint's model is its own; a caller's is copied
            model = copy.deepcopy(model)
        self.model = model.to(dtype).eval()
        self.vocab = vocab
        self.weights = weights
        # The whole loop in C++ where the layers run the C++ kernels.
        self.in_cpp = cpp_loaded() and resolve(model.impl, self.device) == "cpp"
        self._int8: list[tuple] | None = None  # per layer (q_ih, s_ih, q_hh, s_hh)
        if weights == "int8":
            self._quantize()

    def _quantize(self) -> None:
        """Weight-only int8 for the recurrent layers (a scale per row; the embedding and the
        head stay float32). The float weights become the dequantised ones, so the prime and
        ``score`` run the same values as the C++ loop's int8 kernels."""
        if not self.in_cpp:
            raise ValueError(
                "weights='int8' runs on the C++ kernels only: impl cpp (or fused) on a CPU "
                "with the extension built"
            )
        self._int8 = []
        with torch.no_grad():
            rnn = self.model.rnn
            weights = rnn._weights()
            for layer in range(rnn.num_layers):
                w_ih, w_hh, _, _ = rnn._layer_params(weights, layer, 0)
                (q_ih, s_ih), (q_hh, s_hh) = quantize_rows(w_ih), quantize_rows(w_hh)
                w_ih.copy_(s_ih[:, None] * q_ih)
                w_hh.copy_(s_hh[:, None] * q_hh)
                self._int8.append((q_ih, s_ih, q_hh, s_hh))

    @classmethod
    def from_checkpoint(
        cls, path: str, weights: str = "float32", impl: str = "fused", device="cpu"
    ) -> Generator:
        """Load a checkpoint file or run directory (CheckpointError when unusable)."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        device = pick_device(device)
        model, vocab, _ = model_from_checkpoint(load_checkpoint(path), impl=impl, device=device)
        return cls(model, vocab, weights, _own=True)

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def _encode(self, text: str, what: str) -> torch.Tensor:
        unknown = self.vocab.unknown(text)
        if unknown:
            raise ValueError(
                f"{what} has characters not in the model's vocabulary: "
                + ", ".join(repr(c) for c in unknown)
            )
        return self.vocab.encode(text)

    @torch.no_grad()
    def stream(
        self,
        prime: str,
        length: int,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        chunk: int = 64,
    ) -> Iterator[torch.Tensor]:
        """The generated ids in chunks [num_samples, <= chunk] as they are drawn."""
        if not isinstance(prime, str):
            raise ValueError(f"prime must be a str, got {type(prime).__name__}")
        if not prime:
            raise ValueError("prime must not be empty")
        length, top_k = check_sampling(length, temperature, top_k)
        num_samples = count_arg("num_samples", num_samples, 1)
        chunk = count_arg("chunk", chunk, 1)
        if top_p is not None and not 0 < real_arg("top_p", top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None and count_arg("seed", seed, -(2**63)) >= 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {seed}")
        if top_k is not None:  # k >= the vocabulary keeps every id (and fits the C++ op)
            top_k = min(top_k, len(self.vocab))
        ids = self._encode(prime, "the prime").to(self.device)
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        logits, state = self.model.prime(ids[None], window=SCORE_WINDOW)  # [1, V]
        logits = logits.expand(num_samples, -1)  # [K, V]
        state = _repeat_state(state, num_samples)
        if self.in_cpp:
            yield from self._stream_cpp(
                logits, state, length, temperature, top_k, top_p, gen, chunk
            )
            return
        out = []
        for t in range(length):
            nxt = draw(logits, temperature, top_k, top_p, gen)  # [K]
            out.append(nxt)
            if len(out) == chunk or t + 1 == length:
                yield torch.stack(out, 1)
                out = []
            if t + 1 < length:
                logits, state = self.model.step(nxt.to(self.device), state)

    def _stream_cpp(self, logits, state, length, temperature, top_k, top_p, gen, chunk):
        m = self.model
        weights, biases, scales = [], [], []
        named = m.rnn._weights()
        for layer in range(m.rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = m.rnn._layer_params(named, layer, 0)
            biases += [b_ih, b_hh]
            if self._int8 is None:
                weights += [w_ih, w_hh]
                scales += [None, None]
            else:
                q_ih, s_ih, q_hh, s_hh = self._int8[layer]
                weights += [q_ih, q_hh]
                scales += [s_ih, s_hh]
        cell = m.kind if m.kind != "rnn" else f"rnn_{m.rnn.nonlinearity}"
        states = list(state) if isinstance(state, tuple) else [state]
        logits = logits.float().contiguous()
        for start in range(0, length, chunk):
            ids, states, logits = torch.ops.fastchar.generate(
                logits, states, m.embedding.weight, weights, biases, scales, m.head.weight,
                m.head.bias,
                cell, min(chunk, length - start), float(temperature), top_k or 0,
                1.0 if top_p is None else float(top_p), gen,
            )  # fmt: skip
            yield ids

    def generate(
        self,
        prime: str,
        length: int,
        num_samples: int = 1,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """``num_samples`` strings, each the prime followed by ``length`` characters, drawn
        as ``stream`` draws them."""
        chunks = list(self.stream(prime, length, num_samples, temperature, top_k, top_p, seed))
        if not chunks:
            return [prime] * num_samples
        ids = torch.cat(chunks, 1)  # [K, length]
        return [prime + self.vocab.decode(row) for row in ids]

    @torch.no_grad()
    def score(self, text: str) -> float:
        """Mean cross-entropy, in nats per character, of text[1:] given what precedes it."""
        if len(text) < 2:
            raise ValueError("text to score must have at least 2 characters")
        ids = self._encode(text, "the text").to(self.device)
        total, state = 0.0, None
        for i in range(0, len(ids) - 1, SCORE_WINDOW):
            x = ids[i : i + SCORE_WINDOW][None]  # [1, W]
            y = ids[i + 1 : i + 1 + SCORE_WINDOW]
            logits, state = self.model(x[:, : len(y)], state)
            total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
        if not math.isfinite(total):
            raise RuntimeError(
                "the model's logits are NaN or inf, so the text has no score (a diverged model?)"
            )
        return total / (len(ids) - 1)
