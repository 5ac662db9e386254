"""fastchar.sample.Generator: batched, seeded generation (greedy, top-k, top-p), weight
formats, streaming, the score of a text, and the CLI flags built on them."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sample import TEXT, assert_one_line_error, run_dir, run_sample  # noqa: F401

from fastchar import generator, sample
from fastchar.model import _probs, draw
from fastchar.sample import Generator


@pytest.fixture(scope="module")
def gen(run_dir):  # noqa: F811
    return Generator.from_checkpoint(str(run_dir), impl="reference")


def test_same_seed_same_texts_and_the_rows_differ(gen):
    a = gen.generate("the ", 60, num_samples=4, temperature=1.0, seed=5)
    b = gen.generate("the ", 60, num_samples=4, temperature=1.0, seed=5)
    assert a == b and len(a) == 4 and len(set(a)) == 4
    assert all(t.startswith("the ") and len(t) == 64 and set(t) <= set(TEXT) for t in a)
    assert gen.generate("the ", 60, num_samples=4, temperature=1.0, seed=6) != a


def test_a_batch_runs_each_row_as_alone(gen):
    """Greedy rows of a batch equal a greedy sample of one."""
    one = gen.generate("cat", 40, temperature=0)
    assert gen.generate("cat", 40, num_samples=3, temperature=0) == one * 3
    assert gen.generate("cat", 40, temperature=0.7, top_k=1, seed=1) == one
    assert gen.generate("cat", 40, temperature=1.0, top_p=1e-6, seed=2) == one


def test_stream_chunks_are_the_generated_text(gen):
    chunks = list(gen.stream("dog", 50, num_samples=2, seed=3, chunk=16))
    assert [c.shape[1] for c in chunks] == [16, 16, 16, 2] and chunks[0].shape[0] == 2
    ids = torch.cat(chunks, 1)
    texts = gen.generate("dog", 50, num_samples=2, seed=3)
    assert texts == ["dog" + gen.vocab.decode(row) for row in ids]
    assert gen.generate("dog", 0, num_samples=2) == ["dog", "dog"]


def test_a_top_p_below_float32_keeps_the_likeliest():
    """A top_p of 1e-50 is 0 in float32: every id was dropped and the row became NaN."""
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    assert torch.equal(_probs(logits, 1.0, None, 1e-50), torch.tensor([[0.0, 1.0, 0.0]]))
    assert draw(logits, 1.0, None, 1e-300).tolist() == [1]


def test_a_long_prime_runs_a_window_at_a_time(gen, monkeypatch):
    """Its state carries over from window to window: the same text as one forward (which
    held the whole prime's activations and logits at once)."""
    prime = TEXT[:1000]
    want = gen.generate(prime, 30, num_samples=2, temperature=1.0, seed=4)
    monkeypatch.setattr(generator, "SCORE_WINDOW", 300)
    calls = []
    forward = gen.model.forward
    monkeypatch.setattr(
        gen.model, "forward", lambda x, s=None: calls.append(x.shape) or forward(x, s)
    )
    assert gen.generate(prime, 30, num_samples=2, temperature=1.0, seed=4) == want
    assert [c[1] for c in calls] == [300, 300, 300, 100]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.1, 0.4, 0.2, 0.3]]))
    probs = _probs(logits, 1.0, None, 0.8)
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.0, 0.3, 0.0]) / 0.8)
    torch.testing.assert_close(probs[1], torch.tensor([0.0, 0.4, 0.2, 0.3]) / 0.9)
    assert torch.equal(_probs(logits, 1.0, None, 1.0), F.softmax(logits, -1))
    assert draw(logits, 0).tolist() == [0, 1]


def test_score_is_the_mean_cross_entropy(gen, monkeypatch):
    text = TEXT[:3000]
    ids = gen.vocab.encode(text)
    with torch.no_grad():
        logits, _ = gen.model(ids[None, :-1])
    want = F.cross_entropy(logits[0], ids[1:]).item()
    assert gen.score(text) == pytest.approx(want, rel=1e-5)
    monkeypatch.setattr(generator, "SCORE_WINDOW", 700)  # windows carry the state over
    assert gen.score(text) == pytest.approx(want, rel=1e-5)
    assert want < math.log(len(gen.vocab))


def test_bfloat16_weights_score_close_to_float32(run_dir):  # noqa: F811
    f32 = Generator.from_checkpoint(str(run_dir), impl="fused")
    bf16 = Generator.from_checkpoint(str(run_dir), weights="bfloat16", impl="fused")
    assert bf16.model.head.weight.dtype == torch.bfloat16 and bf16.weights == "bfloat16"
    text = TEXT[:2000]
    assert abs(bf16.score(text) - f32.score(text)) < 0.02
    out = bf16.generate("the ", 30, num_samples=2, seed=1)
    assert all(len(t) == 34 for t in out)


def test_bad_arguments_are_clear_errors(gen, run_dir):  # noqa: F811
    for kwargs, match in [
        (dict(num_samples=0), "num_samples"), (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            gen.generate("the", 5, **kwargs)
    with pytest.raises(ValueError, match="'Z'"):
        gen.generate("Zoo", 5)
    with pytest.raises(ValueError, match="int8.*C\\+\\+ kernels only"):
        Generator.from_checkpoint(str(run_dir), weights="int8", impl="reference")
    with pytest.raises(ValueError, match="weights must be one of"):
        Generator.from_checkpoint(str(run_dir), weights="fp8")
    for kwargs, match in [
        (dict(top_k=2.0), "top_k must be an integer"), (dict(top_k=True), "top_k must be an"),
        (dict(num_samples=1.5), "num_samples must be an integer"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            gen.generate("the", 5, **kwargs)
    with pytest.raises(ValueError, match="length must be an integer"):
        gen.generate("the", 5.0)
    for kwargs, match in [
        (dict(temperature=None), "temperature must be a number, got None"),
        (dict(temperature="1"), "temperature must be a number, got '1'"),
        (dict(top_p="0.5"), "top_p must be a number"),
        (dict(seed=1.5), "seed must be an integer"), (dict(seed=True), "seed must be an"),
        (dict(seed="1"), "seed must be an integer"), (dict(seed=2**64), "seed must fit"),
        (dict(seed=-(2**63) - 1), "seed must be >="),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            gen.generate("the", 5, **kwargs)
    with pytest.raises(ValueError, match="prime must be a str, got bytes"):
        gen.generate(b"the", 5)
    for chunk in (0, -1, 1.5):
        with pytest.raises(ValueError, match="chunk must be"):
            list(gen.stream("the", 5, chunk=chunk))
    assert gen.generate("the", 3, temperature=np.float32(0.5), top_p=np.float64(0.9), seed=1)
    assert gen.generate("the", 3, temperature=torch.tensor(0.5), top_p=torch.tensor(0.9))
    assert gen.generate("the", np.int64(3), num_samples=np.int32(2), top_k=np.int64(2), seed=1)
    with pytest.raises(ValueError, match="impl must be one of"):  # not the checkpoint's fault
        Generator.from_checkpoint(str(run_dir), impl="bogus")
    for device, match in [
        ("cuda:0", "CUDA is not available"), (torch.device("cuda"), "CUDA is not available"),
        ("meta", "fastchar runs on cpu, cuda or mps"), ("gpu", "not a device"),
    ]:  # fmt: skip
        if torch.cuda.is_available() and "cuda" in str(device):
            continue
        with pytest.raises(ValueError, match=match):
            Generator.from_checkpoint(str(run_dir), device=device)
    assert Generator.from_checkpoint(str(run_dir), device=torch.device("cpu")).device.type == "cpu"


def test_a_tiny_temperature_is_greedy(gen):
    """The temperature divides the logits less their largest in float64, as in the C++ loop:
    a float32 quotient overflowed to inf (or the temperature to 0) and gave NaN."""
    greedy = gen.generate("the ", 30, num_samples=2, temperature=0)
    for t in (1e-30, 1e-39, 5e-324):
        assert gen.generate("the ", 30, num_samples=2, temperature=t, seed=1) == greedy


def test_cli_num_samples_and_greedy(run_dir, capsys, gen):  # noqa: F811
    """K samples stream together as tagged lines; each sample's lines are its text."""
    code, out, err = run_sample(capsys, "--ckpt", str(run_dir), "--prime", "the ",
                                "--length", "150", "--num-samples", "3", "--seed", "4",
                                "--impl", "reference")  # fmt: skip
    assert code == 0 and "weights float32" in err
    lines = out.splitlines()
    assert lines and all(ln[:4] in ("[1] ", "[2] ", "[3] ") for ln in lines), out
    texts = gen.generate("the ", 150, 3, temperature=0.8, seed=4)
    assert len(set(texts)) == 3
    for i, text in enumerate(texts, 1):
        mine = [ln[4:] for ln in lines if ln.startswith(f"[{i}] ")]
        assert "\n".join(mine) == text.removesuffix("\n")  # a last empty line is not printed
    _, g1, _ = run_sample(capsys, "--ckpt", str(run_dir), "--prime", "a", "--temperature", "0")
    _, g2, _ = run_sample(capsys, "--ckpt", str(run_dir), "--prime", "a", "--top-k", "1")
    assert g1 == g2


def test_cli_tags_every_line_of_a_multi_line_prime(run_dir, capsys):  # noqa: F811
    code, out, _ = run_sample(capsys, "--ckpt", str(run_dir), "--prime", "cat\ndog\n",
                              "--length", "0", "--num-samples", "2")  # fmt: skip
    assert code == 0 and out == "[1] cat\n[1] dog\n[2] cat\n[2] dog\n"


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_cli_a_model_whose_logits_overflow_is_one_line(run_dir, tmp_path, capsys, impl):  # noqa: F811
    """Finite weights (the checkpoint loads) whose logits overflow to +-inf: sampling and
    --score are the diverged-model line and exit 1, not a traceback or a score of nan."""
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ckpt["model"]["rnn.bias_ih_l1"][:] = 50.0  # every gate open: each top-layer h >= tanh(1)
    ckpt["model"]["head.weight"][0] = 3e38  # so logit 0 overflows to +inf
    torch.save(ckpt, tmp_path / "overflow.pt")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:200])
    for flags in (["--prime", "the"], ["--score", str(text)]):
        code, out, err = run_sample(capsys, "--ckpt", str(tmp_path / "overflow.pt"),
                                    "--impl", impl, *flags)  # fmt: skip
        assert code == 1 and "nan" not in out and "Traceback" not in err, (out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("fastchar.sample: error: the model's logits are NaN or")
        assert last.endswith("(a diverged model?)")


class _NoT(io.StringIO):
    """A stdout whose encoding ("no-t") cannot write the letter t."""

    def write(self, text):
        if "t" in text:
            i = text.index("t")
            raise UnicodeEncodeError("no-t", text, i, i + 1, "character maps to <undefined>")
        return super().write(text)


def test_cli_output_that_cannot_be_encoded_is_one_line(run_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sys, "stdout", _NoT())
    code = sample.main(["--ckpt", str(run_dir), "--prime", "the", "--length", "5"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "fastchar.sample: error: the output's encoding (no-t) cannot write 't' of the "
        "sample; set PYTHONIOENCODING=utf-8"
    )


def test_cli_score(run_dir, tmp_path, capsys, gen):  # noqa: F811
    good = tmp_path / "val.txt"
    good.write_text(TEXT[:1500])
    code, out, err = run_sample(capsys, "--ckpt", str(run_dir), "--score", str(good))
    assert code == 0, err
    nats = gen.score(TEXT[:1500])
    assert out == f"{nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char ({good})\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("the cat€")
    code, out, err = run_sample(capsys, "--ckpt", str(run_dir), "--score", str(bad))
    assert code == 2 and out == "" and "'€'" in err
    assert_one_line_error(err)
    code, _, err = run_sample(capsys, "--ckpt", str(run_dir), "--score", str(tmp_path / "no"))
    assert code == 1 and "not found" in err
    assert_one_line_error(err)
