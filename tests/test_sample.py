"""fastchar.sample and CharRNN.step: stepping matches the full forward, seeded sampling,
the prime comes first, and bad checkpoints or primes fail with one clear line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch

from fastchar import sample, train
from fastchar.model import CharRNN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "".join(f"line {i}: the cat sat on the mat, and the dog ate the log.\n" for i in range(120))


def assert_one_line_error(err: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastchar.sample: error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    data = root / "text.txt"
    data.write_text(TEXT)
    out = root / "run"
    args = [
        "--impl", "reference", "--data", str(data), "--out", str(out),
        "--emb-dim", "8", "--hidden", "24", "--layers", "2",
        "--batch-size", "8", "--block-size", "16", "--steps", "4",
        "--eval-interval", "4", "--eval-iters", "1", "--sample-length", "0",
    ]  # fmt: skip
    assert train.main(args) == 0
    return out


def run_sample(capsys, *args):
    code = sample.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("impl", ["reference", "torch", "fused"])
def test_step_matches_forward(kind, impl):
    torch.manual_seed(0)
    model = CharRNN(11, model=kind, emb_dim=5, hidden=7, layers=2, impl=impl).eval()
    idx = torch.randint(0, 11, (3, 6))  # [B, T]
    with torch.no_grad():
        full, final = model(idx)  # [B, T, V]
        prefix, state = model(idx[:, :2])
        steps = [prefix[:, -1]]
        for t in range(2, 6):
            logits, state = model.step(idx[:, t], state)  # [B, V]
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_prime_a_window_at_a_time_is_one_forward(kind):
    torch.manual_seed(0)
    model = CharRNN(11, model=kind, emb_dim=5, hidden=7, layers=2, impl="fused").eval()
    idx = torch.randint(0, 11, (3, 10))  # [B, T]
    with torch.no_grad():
        full, final = model(idx)
        last, state = model.prime(idx, window=3)  # windows of 3, 3, 3, 1
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)


def test_generate_uses_step_not_the_prefix(monkeypatch):
    model = CharRNN(5, hidden=8, layers=1, impl="reference")
    calls = {"forward": 0, "step": 0}
    real_forward, real_step = model.forward, model.step

    def forward(*a, **k):
        calls["forward"] += 1
        return real_forward(*a, **k)

    def step(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "step", step)
    ids = model.generate(torch.tensor([1, 2, 3]), 10, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (10,) and int(ids.min()) >= 0 and int(ids.max()) < 5
    assert calls == {"forward": 1, "step": 9}


def test_model_generate_at_temperature_zero_is_greedy():
    torch.manual_seed(0)
    model = CharRNN(5, hidden=8, layers=1, impl="reference")
    prime = torch.tensor([1, 2, 3])
    greedy = model.generate(prime, 12, temperature=0)
    assert torch.equal(model.generate(prime, 12, top_k=1, generator=torch.Generator()), greedy)
    assert model.generate(prime, 0).shape == (0,)
    for bad in (dict(length=-1), dict(temperature=-0.5), dict(temperature=float("nan"))):
        with pytest.raises(ValueError, match="length|temperature"):
            model.generate(prime, **{"length": 3, **bad})


def test_same_seed_same_text(run_dir, capsys):
    ckpt = str(run_dir / "ckpt.pt")
    args = ["--ckpt", ckpt, "--prime", "the ", "--length", "120", "--seed", "7"]
    code1, out1, err1 = run_sample(capsys, *args)
    code2, out2, _ = run_sample(capsys, *args)
    assert code1 == code2 == 0 and "Traceback" not in err1
    assert out1 == out2
    code3, out3, _ = run_sample(capsys, *args[:-1], "8")
    assert code3 == 0 and out3 != out1


def test_prints_prime_then_length_chars(run_dir, capsys):
    code, out, _ = run_sample(
        capsys, "--ckpt", str(run_dir), "--prime", "line 3", "--length", "50", "--seed", "1"
    )
    assert code == 0
    assert out.startswith("line 3")
    assert len(out) == len("line 3") + 50 + 1 and out.endswith("\n")
    assert set(out) <= set(TEXT)


def test_top_k_one_is_greedy(run_dir, capsys):
    base = ["--ckpt", str(run_dir), "--prime", "cat", "--length", "30", "--top-k", "1"]
    _, a, _ = run_sample(capsys, *base, "--seed", "1")
    _, b, _ = run_sample(capsys, *base, "--seed", "2", "--temperature", "2.0")
    assert a == b


def test_impl_may_be_chosen(run_dir, capsys):
    base = ["--ckpt", str(run_dir), "--prime", "dog", "--length", "20", "--top-k", "1"]
    _, ref, _ = run_sample(capsys, *base, "--impl", "reference")
    _, tor, _ = run_sample(capsys, *base, "--impl", "torch")
    assert ref == tor


def test_unknown_prime_characters_are_named(run_dir, capsys):
    code, out, err = run_sample(capsys, "--ckpt", str(run_dir), "--prime", "cat€Z")
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert "'€'" in err and "'Z'" in err and "'c'" not in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--length", "-1"], ["--temperature", "-0.5"], ["--top-k", "0"], ["--top-p", "0"],
        ["--top-p", "1.5"], ["--num-samples", "0"], ["--weights", "int8"],
        ["--seed", str(10**23)], ["--seed", str(2**64)],
    ],
)  # fmt: skip
def test_bad_sampling_flags(run_dir, capsys, flags):
    code, _, err = run_sample(capsys, "--ckpt", str(run_dir), *flags)
    assert code == 2
    assert_one_line_error(err)


def test_more_samples_than_memory_is_one_line(run_dir, capsys):
    code, _, err = run_sample(capsys, "--ckpt", str(run_dir), "--num-samples", str(10**13))
    assert code == 1
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "fastchar.sample: error: out of memory: use a smaller --num-samples or --length"
    )


class _RunsCode:
    """A pickle payload that would create a file if unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoint(tmp_path, run_dir, case):
    path = tmp_path / "ckpt.pt"
    if case == "truncated":
        path.write_bytes((run_dir / "ckpt.pt").read_bytes()[:1000])
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 20)
    elif case == "other_data":
        torch.save({"weights": torch.zeros(3)}, path)
    elif case == "bad_model":
        ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
        ckpt["config"]["hidden"] = 99
        torch.save(ckpt, path)
    elif case == "diverged":
        ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
        ckpt["model"]["head.bias"][1] = float("nan")
        torch.save(ckpt, path)
    elif case == "code":
        torch.save({"format": _RunsCode(str(tmp_path / "pwned"))}, path)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "not found"),
        ("truncated", "cannot read checkpoint"),
        ("garbage", "cannot read checkpoint"),
        ("other_data", "not a fastchar checkpoint"),
        ("bad_model", "usable model"),
        ("diverged", "weights are not finite (NaN or inf in head.bias)"),
        ("code", "holds code or objects (io.open)"),
    ],
)
def test_bad_checkpoints(run_dir, tmp_path, capsys, case, match):
    path = _bad_checkpoint(tmp_path, run_dir, case)
    code, out, err = run_sample(capsys, "--ckpt", str(path), "--prime", "the")
    assert code == 1 and out == ""
    assert_one_line_error(err)
    assert match in err
    assert not (tmp_path / "pwned").exists()


def test_cli_subprocess(run_dir, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "fastchar.sample", "--ckpt", str(run_dir / "best.pt"),
         "--prime", "the", "--length", "40", "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("the") and len(ok.stdout) == 3 + 40 + 1
    bad = subprocess.run(
        [sys.executable, "-m", "fastchar.sample", "--ckpt", str(tmp_path / "none.pt")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert_one_line_error(bad.stderr)


def test_a_top_k_beyond_the_vocabulary_keeps_every_id(run_dir, capsys):
    """Any k >= the vocabulary is no truncation (a k past int64 overflowed the C++ op)."""
    texts = []
    for k in (str(10**20), "1000"):
        code, out, err = run_sample(
            capsys, "--ckpt", str(run_dir), "--prime", "the", "--length", "30",
            "--seed", "4", "--top-k", k,
        )  # fmt: skip
        assert code == 0, err
        texts.append(out)
    code, out, _ = run_sample(
        capsys, "--ckpt", str(run_dir), "--prime", "the", "--length", "30", "--seed", "4"
    )
    assert texts == [out, out]


def test_a_closed_pipe_ends_the_stream_quietly(run_dir):
    """`fastchar.sample ... | head -c 10`: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastchar.sample", "--ckpt", str(run_dir), "--prime", "the",
         "--length", "200000", "--seed", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("what", ["sample", "samples", "score", "closed"])
def test_an_unwritable_stdout_is_one_line(run_dir, what):
    """stdout on a full disk (/dev/full) or closed (`>&-`): one line and exit 1."""
    flags = {
        "sample": ["--length", "20"],
        "samples": ["--length", "20", "--num-samples", "2"],
        "score": ["--score", str(run_dir.parent / "text.txt")],
        "closed": ["--length", "20"],
    }[what]
    command = shlex.join([sys.executable, "-m", "fastchar.sample", "--ckpt", str(run_dir), *flags])
    redirect = ">&-" if what == "closed" else ">/dev/full"
    proc = subprocess.run(
        ["sh", "-c", f"exec {command} {redirect}"],
        cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    why = (
        "stdout is closed: there is nowhere to write the output"
        if what == "closed"
        else "cannot write the output: No space left on device"
    )
    assert proc.stderr.strip().splitlines()[-1] == f"fastchar.sample: error: {why}"


def test_a_closed_stderr_keeps_its_lines_out_of_the_sample(run_dir):
    """`2>&-`: Python's sys.stderr is None and print(file=None) wrote to stdout, so the
    impl line landed in the sample; the output is the same as with stderr open."""
    command = shlex.join([sys.executable, "-m", "fastchar.sample", "--ckpt", str(run_dir),
                          "--prime", "the", "--length", "30", "--seed", "2"])  # fmt: skip
    outs = [
        subprocess.run(
            ["sh", "-c", f"exec {command} {redirect}"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        for redirect in ("", "2>&-")
    ]
    assert outs[0].returncode == outs[1].returncode == 0, outs[1].stdout
    assert outs[1].stdout == outs[0].stdout and outs[0].stdout.startswith("the")


def test_a_training_impl_that_cannot_run_here_samples_with_fused(
    run_dir, tmp_path, capsys, monkeypatch
):
    """A model trained with --impl triton (on a GPU) samples on the CPU with the default
    flags: fused, with a note, not an error."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # it would run triton on the CPU
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ckpt["config"]["impl"] = "triton"
    path = tmp_path / "triton.pt"
    torch.save(ckpt, path)
    code, out, err = run_sample(capsys, "--ckpt", str(path), "--length", "10", "--seed", "1")
    assert code == 0, err
    assert "note: the training impl triton cannot run on cpu (" in err
    assert "impl fused ->" in err
    code, want, _ = run_sample(
        capsys, "--ckpt", str(run_dir), "--length", "10", "--seed", "1", "--impl", "fused"
    )
    assert out == want
