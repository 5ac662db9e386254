"""fastchar::generate, the sampling loop in C++: the same greedy text as the Python step
loop for every cell, seeded and chunk-independent draws, the distribution it draws from
(temperature, top-k, top-p), and its argument errors."""

from __future__ import annotations

import pytest
import torch

from fastchar.backends import cpp_loaded
from fastchar.data import Vocab
from fastchar.generator import WEIGHTS, Generator, quantize_rows
from fastchar.model import CharRNN, _probs, draw

pytestmark = pytest.mark.skipif(not cpp_loaded(), reason="fastchar._C is not built")
VOCAB = Vocab([chr(40 + i) for i in range(30)])
CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]


def _pair(kind, nonlinearity, weights="float32", layers=2):
    torch.manual_seed(1)
    model = CharRNN(30, model=kind, emb_dim=6, hidden=20, layers=layers, impl="cpp",
                    nonlinearity=nonlinearity)  # fmt: skip
    cpp = Generator(model, VOCAB, weights)
    python = Generator(model, VOCAB, weights)
    python.in_cpp = False
    assert cpp.in_cpp
    return cpp, python


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS)
def test_greedy_text_is_the_python_loops(kind, nonlinearity, weights):
    cpp, python = _pair(kind, nonlinearity, weights)
    want = python.generate("+-", 40, num_samples=3, temperature=0)
    assert cpp.generate("+-", 40, num_samples=3, temperature=0) == want
    assert cpp.generate("+-", 40, temperature=0, top_k=1, seed=3) == want[:1]


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_seeded_draws_do_not_depend_on_the_chunks(weights):
    # bfloat16: the loop rounds c to bfloat16 every step, as the state between chunks is
    cpp, _ = _pair("lstm", "tanh", weights)
    a = torch.cat(list(cpp.stream("+", 50, num_samples=4, temperature=1.0, seed=9, chunk=7)), 1)
    b = torch.cat(list(cpp.stream("+", 50, num_samples=4, temperature=1.0, seed=9, chunk=64)), 1)
    assert torch.equal(a, b) and a.shape == (4, 50)
    assert len({tuple(r.tolist()) for r in a}) == 4  # the samples differ
    c = torch.cat(list(cpp.stream("+", 50, num_samples=4, temperature=1.0, seed=10)), 1)
    assert not torch.equal(a, c)


def _draws(logits, n, temperature=1.0, top_k=0, top_p=1.0):
    """n draws from one row of logits through the op (one step each, a 1-layer RNN)."""
    V = logits.shape[-1]
    zeros = torch.zeros
    ids, _, _ = torch.ops.fastchar.generate(
        logits.expand(n, V).contiguous(), [zeros(1, n, 4)], zeros(V, 3),
        [zeros(4, 3), zeros(4, 4)], [None, None], [None, None], zeros(V, 4), None, "rnn_tanh", 1,
        temperature, top_k, top_p, torch.Generator().manual_seed(0),
    )  # fmt: skip
    return torch.bincount(ids[:, 0], minlength=V).float() / n


DISTINCT = [2.0, 1.0, 0.5, 0.0, -1.0, 1.5]
TIED = [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # four ids tied at the top


@pytest.mark.parametrize(
    ("row", "temperature", "top_k", "top_p"),
    [
        (DISTINCT, 1.0, 0, 1.0),
        (DISTINCT, 0.5, 0, 1.0),
        (DISTINCT, 1.0, 3, 1.0),
        (DISTINCT, 1.0, 0, 0.7),
        (TIED, 1.0, 2, 1.0),  # exactly k of the tied ids, the lowest: 1 and 2
        (TIED, 1.0, 5, 1.0),  # the four tied and the lower of the two after them
        (TIED, 1.0, 0, 0.3),
        (TIED, 1.0, 2, 0.9),
    ],
)
def test_the_op_draws_from_the_python_distribution(row, temperature, top_k, top_p):
    logits = torch.tensor([row])
    want = _probs(logits, temperature, top_k or None, top_p if top_p < 1 else None)[0]
    got = _draws(logits, 40_000, temperature, top_k, top_p)
    torch.testing.assert_close(got, want, atol=0.01, rtol=0)
    assert torch.equal(got == 0, want == 0)  # what top-k / top-p cut is never drawn
    if top_k:
        assert int((want > 0).sum()) == min(top_k, len(row))  # ties ranked, not all kept


def test_a_tiny_temperature_draws_the_argmax():
    """At a temperature below float range (1e-300, which a float32 quotient would turn into
    0 / 0) the logit gaps over it are -inf, a -inf logit's too: the op still draws the
    largest logit every time, never the id that a NaN weight would give."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -float("inf"), 1.5]])
    assert torch.equal(_draws(logits, 2_000, 1e-300), torch.eye(6)[3])


@pytest.mark.parametrize("temperature", [1e7, 1e30, 1e300])
def test_a_huge_temperature_still_ranks_by_logit(temperature):
    """top_k and top_p rank by logit: at a huge temperature every weight rounds to one
    value, and ranking by weight kept the lowest ids instead of the likeliest."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 4.0, 3.0]])
    assert torch.equal(_draws(logits, 200, temperature, top_k=1), torch.eye(6)[2])
    assert torch.equal(_probs(logits, temperature, 1)[0], torch.eye(6)[2])
    kept = (_draws(logits, 2_000, temperature, top_k=2) > 0).tolist()
    assert kept == [False, False, True, False, True, False]
    assert (_probs(logits, temperature, 2)[0] > 0).tolist() == kept
    assert torch.equal(_draws(logits, 200, temperature, top_p=1e-9), torch.eye(6)[2])
    assert torch.equal(_probs(logits, temperature, None, 1e-9)[0], torch.eye(6)[2])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_diverged_model_is_an_error_not_a_text(bad, temperature):
    """NaN or +inf logits have no distribution: the C++ loop (which drew id 0 or the last
    candidate from them) and the Python loop both raise, at any temperature."""
    logits = torch.tensor([[2.0, bad, 0.5]])
    with pytest.raises(RuntimeError, match="NaN or \\+inf"):
        _draws(logits, 3, temperature)
    with pytest.raises(RuntimeError, match="NaN or \\+inf"):
        draw(logits, temperature)
    for generator in _pair("gru", "tanh"):
        with torch.no_grad():
            generator.model.head.bias[2] = bad
        with pytest.raises(RuntimeError, match="NaN or \\+inf"):
            generator.generate("+-", 20, num_samples=3, temperature=temperature, seed=0)


def test_bad_arguments_name_themselves():
    cpp, _ = _pair("lstm", "tanh", layers=1)
    m = cpp.model
    w = list(m.rnn._layer_params(m.rnn._weights(), 0, 0))
    state = [torch.zeros(1, 2, 20), torch.zeros(1, 2, 20)]
    args = [torch.zeros(2, 30), state, m.embedding.weight, w[:2], w[2:], [None, None],
            m.head.weight, m.head.bias, "lstm", 3, 1.0, 0, 1.0, None]  # fmt: skip
    torch.ops.fastchar.generate(*args)
    for i, value, match in [
        (8, "lstmp", "cell must be"), (1, state[:1], "state must be"),
        (10, -1.0, "temperature"), (12, 0.0, "top_p"), (9, -2, "length"),
        (10, float("inf"), "temperature must be finite"), (11, -1, "top_k must be >= 0"),
        (5, [torch.ones(80)], "scales"),
        (0, torch.zeros(3, 30), "logits"), (2, m.embedding.weight.double(), "dtype"),
        (3, [w[0], w[1][:, :10]], r"w_hh must have shape \[80, 20\]"),
        (3, [w[0][:, :5], w[1]], r"w_ih must have shape \[80, 6\]"),
        (4, [w[2][:7], w[3]], r"bias must have shape \[80\]"),
    ]:  # fmt: skip
        bad = list(args)
        bad[i] = value
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.fastchar.generate(*bad)


def test_quantize_rows_zero_constant_and_random_rows():
    w = torch.randn(5, 37)
    w[1] = 0.0
    w[2] = -0.75
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (5,)
    assert s[1] == 0 and torch.equal(q[1], torch.zeros(37, dtype=torch.int8))
    torch.testing.assert_close(s[2] * q[2].float(), w[2], rtol=0, atol=1e-7)  # exact
    err = (s[:, None] * q.float() - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-7) and int(q.abs().max()) == 127


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS)
def test_int8_cells_equal_float_cells_on_the_dequantised_weights(kind, nonlinearity):
    torch.manual_seed(2)
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * 24
    x, h, c = torch.randn(3, 33), torch.randn(3, 24), torch.randn(3, 24)
    w_ih, w_hh, b_ih, b_hh = (
        torch.randn(G, 33),
        torch.randn(G, 24) / 5,
        torch.randn(G),
        torch.randn(G),
    )
    (q_ih, s_ih), (q_hh, s_hh) = quantize_rows(w_ih), quantize_rows(w_hh)
    d_ih, d_hh = s_ih[:, None] * q_ih, s_hh[:, None] * q_hh
    op = getattr(torch.ops.fastchar, f"{kind}_cell")
    extra = [nonlinearity == "relu"] if kind == "rnn" else []
    lead = [x, h, c] if kind == "lstm" else [x, h]
    got = op(*lead, q_ih, q_hh, b_ih, b_hh, *extra, s_ih, s_hh)
    want = op(*lead, d_ih, d_hh, b_ih, b_hh, *extra)
    for a, b in zip(
        got if kind == "lstm" else [got], want if kind == "lstm" else [want], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="int8 weights take a float32 x"):
        op(*[t.double() for t in lead], q_ih, q_hh, None, None, *extra, s_ih, s_hh)
    with pytest.raises(ValueError, match="both s_ih and s_hh"):
        op(*lead, q_ih, q_hh, None, None, *extra, s_ih, None)


@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS)
def test_int8_generation_is_the_float_model_on_dequantised_weights(kind, nonlinearity):
    torch.manual_seed(1)
    model = CharRNN(30, model=kind, emb_dim=6, hidden=20, layers=2, impl="cpp",
                    nonlinearity=nonlinearity)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q8 = Generator(model, VOCAB, "int8")  # its copy's float weights become the int8 values
    f32 = Generator(q8.model, VOCAB, "float32")
    assert q8.weights == "int8" and q8.in_cpp
    assert q8.generate("+-", 40, num_samples=2, temperature=0) == f32.generate(
        "+-", 40, num_samples=2, temperature=0
    )
    changed = [k for k, v in q8.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("weight_ih" in k or "weight_hh" in k for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's


def test_a_generator_leaves_the_callers_model_as_it_was():
    """Sampling in the middle of training: the model keeps its weights, dtype and mode."""
    torch.manual_seed(1)
    model = CharRNN(30, model="lstm", emb_dim=6, hidden=20, layers=2, impl="cpp").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for weights in WEIGHTS:
        Generator(model, VOCAB, weights).generate("+-", 5, seed=0)
    assert model.training
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS)
def test_many_samples_are_each_sample_alone(kind, nonlinearity, weights):
    """float32 and bfloat16 run generate's one-region loop on the step engines, whose rows
    do not interact; int8 weights, for more samples than the int8 kernels' 4-row block, are
    dequantised for it. Each of 6 samples, started from states of its own, draws the same
    greedy ids as that sample alone (int8: on the int8 row kernel), to its final state."""
    cpp, _ = _pair(kind, nonlinearity, weights)
    m = cpp.model
    weights = m.rnn._weights()
    params = [m.rnn._layer_params(weights, layer, 0) for layer in range(m.rnn.num_layers)]
    weights_ = [w for w_ih, w_hh, _, _ in params for w in (w_ih, w_hh)]
    biases = [b for _, _, b_ih, b_hh in params for b in (b_ih, b_hh)]
    scales = [None] * len(weights_)
    if weights == "int8":
        weights_ = [q for q_ih, _, q_hh, _ in cpp._int8 for q in (q_ih, q_hh)]
        scales = [s for _, s_ih, _, s_hh in cpp._int8 for s in (s_ih, s_hh)]
    cell = m.kind if m.kind != "rnn" else f"rnn_{nonlinearity}"
    dtype = m.embedding.weight.dtype
    gen = torch.Generator().manual_seed(4)
    K, L, H, V = 6, m.rnn.num_layers, 20, 30
    n_states = 2 if kind == "lstm" else 1
    states = [torch.randn(L, K, H, generator=gen).to(dtype) for _ in range(n_states)]
    logits = torch.randn(K, V, generator=gen)

    def run(rows):
        return torch.ops.fastchar.generate(
            logits[rows], [s[:, rows] for s in states], m.embedding.weight, weights_, biases,
            scales, m.head.weight, m.head.bias, cell, 30, 0.0, 0, 1.0, None,
        )  # fmt: skip

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        ids, state, last = run(slice(None))
        for k in range(K):
            ids_k, state_k, last_k = run(slice(k, k + 1))
            assert torch.equal(ids[k : k + 1], ids_k), k
            torch.testing.assert_close(last[k : k + 1], last_k, **tol)
            for s, s_k in zip(state, state_k, strict=True):
                torch.testing.assert_close(s[:, k : k + 1], s_k, **tol)


def _texts_by_threads(generator, **kw) -> dict[int, list[str]]:
    """generator.generate("+-", 40, **kw) with 2 threads, then 1, by thread count."""
    threads = torch.get_num_threads()
    texts = {}
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            texts[n] = generator.generate("+-", 40, **kw)
    finally:
        torch.set_num_threads(threads)
    return texts


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize(("kind", "nonlinearity"), CELLS)
def test_threads_split_units_as_one_thread_does(kind, nonlinearity, weights):
    """H = 70: the one-region loop splits every layer's units and the head's rows over two
    threads (slices of 48 and 22 units); the greedy texts equal one thread's, and in
    float32 the Python step loop's."""
    torch.manual_seed(2)
    model = CharRNN(30, model=kind, emb_dim=6, hidden=70, layers=2, impl="cpp",
                    nonlinearity=nonlinearity)  # fmt: skip
    texts = _texts_by_threads(Generator(model, VOCAB, weights), num_samples=3, temperature=0)
    assert texts[2] == texts[1]
    if weights == "float32":
        python = Generator(model, VOCAB, weights)
        python.in_cpp = False
        assert texts[2] == python.generate("+-", 40, num_samples=3, temperature=0)


@pytest.mark.parametrize("num_samples", [1, 5])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_threads_draw_their_rows_as_one_thread_draws_them(weights, num_samples):
    """Each thread of the one-region loop draws its own rows of a step (none, for one
    sample on the second thread), from uniforms drawn beforehand in row order: sampled
    texts (temperature 1, top-p) from two threads equal one thread's."""
    torch.manual_seed(2)
    model = CharRNN(30, model="lstm", emb_dim=6, hidden=70, layers=2, impl="cpp")
    cpp = Generator(model, VOCAB, weights)
    texts = _texts_by_threads(cpp, num_samples=num_samples, temperature=1.0, top_p=0.9, seed=4)
    assert texts[2] == texts[1]
    assert len(set(texts[1])) == num_samples


def test_changed_weights_are_not_served_from_the_engine_cache():
    """generate keeps the packed engines of its last call while the same weight tensors come
    back unchanged; a tensor changed in place (its version moves) rebuilds them: each
    weight, bias and the head in turn is changed, and the op's ids, state and logits equal
    those of a call on fresh copies of the tensors (which cannot hit the cache)."""
    torch.manual_seed(3)
    H, V, E, K = 40, 30, 6, 2
    tensors = {
        "emb": torch.randn(V, E),
        "w_ih0": 0.3 * torch.randn(4 * H, E),
        "w_hh0": 0.3 * torch.randn(4 * H, H),
        "w_ih1": 0.3 * torch.randn(4 * H, H),
        "w_hh1": 0.3 * torch.randn(4 * H, H),
        "b_ih0": torch.randn(4 * H),
        "b_hh0": torch.randn(4 * H),
        "b_ih1": torch.randn(4 * H),
        "b_hh1": torch.randn(4 * H),
        "head_w": torch.randn(V, H),
        "head_b": torch.randn(V),
    }
    state = [torch.randn(2, K, H), torch.randn(2, K, H)]
    logits = torch.randn(K, V)

    def run(t):
        weights = [t["w_ih0"], t["w_hh0"], t["w_ih1"], t["w_hh1"]]
        biases = [t["b_ih0"], t["b_hh0"], t["b_ih1"], t["b_hh1"]]
        return torch.ops.fastchar.generate(
            logits, state, t["emb"], weights, biases, [None] * 4, t["head_w"], t["head_b"],
            "lstm", 12, 0.0, 0, 1.0, None,
        )  # fmt: skip

    def check(what):
        got = run(tensors)
        want = run({k: v.clone() for k, v in tensors.items()})
        assert torch.equal(got[0], want[0]), what
        torch.testing.assert_close(got[2], want[2], msg=what)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, msg=what)
        return got[2]

    before = check("first call")
    assert torch.equal(run(tensors)[2], before)  # the cached engines, unchanged weights
    run(tensors)
    tensors["w_hh1"].data = tensors["w_hh1"].data * 0.5  # new storage, same version
    after = check("w_hh1.data assigned")
    assert not torch.allclose(after, before), "assigning w_hh1.data changed nothing"
    before = after
    for name, t in tensors.items():
        run(tensors)  # these very tensors' engines are the cached ones
        with torch.no_grad():
            t.add_(torch.randn_like(t))
        after = check(name)
        assert not torch.allclose(after, before), f"changing {name} changed nothing"
        before = after


def test_generator_after_a_round_trip_through_bfloat16():
    """Module.to assigns every parameter's .data: a Generator whose model went to bfloat16
    and back samples with the model's weights as they are then, not with the engines its
    first call packed (the greedy texts of the C++ and Python loops)."""
    torch.manual_seed(4)
    model = CharRNN(30, model="lstm", emb_dim=6, hidden=70, layers=2, impl="cpp")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # livelier greedy texts than a fresh model's
    cpp = Generator(model, VOCAB, "float32")
    first = cpp.generate("+-", 30, num_samples=2, temperature=0)
    cpp.model.to(torch.bfloat16).to(torch.float32)
    python = Generator(cpp.model, VOCAB, "float32")
    python.in_cpp = False
    want = python.generate("+-", 30, num_samples=2, temperature=0)
    assert len(set(want[0])) > 4, want  # not a fixed point: the texts can tell weights apart
    assert want != first, "the round trip through bfloat16 changed no greedy character"
    assert cpp.generate("+-", 30, num_samples=2, temperature=0) == want


@pytest.mark.parametrize("empty", ["vocabulary", "hidden", "embedding"])
def test_an_empty_size_is_an_error_not_a_crash(empty):
    """V, H or the embedding width 0 crashed the op (SIGFPE, SIGSEGV) or failed inside it."""
    V, H, E = {"vocabulary": (0, 4, 3), "hidden": (3, 0, 2), "embedding": (3, 4, 0)}[empty]
    z = torch.zeros
    with pytest.raises(ValueError, match="must be >= 1, got "):
        torch.ops.fastchar.generate(
            z(1, V), [z(1, 1, H)], z(V, E), [z(H, E), z(H, H)], [None, None], [None, None],
            z(V, H), None, "rnn_tanh", 1, 1.0, 0, 1.0,
        )  # fmt: skip


def test_logits_all_minus_infinity_are_an_error():
    """No character can be drawn: it returned the last id at every step."""
    logits = torch.full((1, 3), -float("inf"))
    with pytest.raises(RuntimeError, match="or all -inf"):
        _draws(logits, 3, 1.0)


@pytest.mark.parametrize("threads", [2**32, 100_000, 0])
def test_gemm_timing_threads_are_bounded(threads):
    """2**32 threads became 0 in an int and crashed the timing (SIGSEGV)."""
    from fastchar import plan

    engine = next(e for e in plan.ENGINES if plan.why_not(e, torch.float32) is None)
    with pytest.raises(ValueError, match=r"threads in \[1, 1024\]"):
        torch.ops.fastchar.gemm_rate(engine, torch.float32, 1, 8, 8, 8, threads)
    with pytest.raises(ValueError, match=r"threads in \[1, 1024\]"):
        torch.ops.fastchar.gemm_choose(torch.float32, 1, 8, 8, 8, threads)
