"""fastchar.train: a few-step CLI run, resume equivalence, the schedule and every bad-input path."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from fastchar import data as fdata
from fastchar.model import CharRNN
from fastchar.training import checkpoint, cli, config, errors, progress, schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {
    "step", "train_loss", "val_loss", "train_bpc", "val_bpc", "tokens_per_sec", "elapsed_sec", "lr",
}  # fmt: skip


def make_text(n_chars: int = 6000, seed: int = 0) -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards box".split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def tiny_args(data, out, *extra):
    return [
        "--impl", "reference", "--data", str(data), "--out", str(out),
        "--emb-dim", "8", "--hidden", "16", "--layers", "1",
        "--batch-size", "4", "--block-size", "16", "--steps", "6", "--warmup", "2",
        "--eval-interval", "3", "--eval-iters", "2", "--sample-length", "20", "--seed", "3",
        *extra,
    ]  # fmt: skip


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_line_error(err: str, prog: str = "fastchar.train"):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err


def test_few_step_run_writes_metrics_and_checkpoints(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "eval step 6" in captured.err and "bpc" in captured.err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert METRIC_KEYS <= r.keys()
        assert r["train_bpc"] == pytest.approx(r["train_loss"] / math.log(2))
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
        assert r["tokens_per_sec"] > 0 and r["elapsed_sec"] > 0
    assert records[0]["val_loss"] < math.log(len(set(make_text()))) + 0.5
    for name in ("ckpt.pt", "best.pt", "data_manifest.json", "config.json"):
        assert (out / name).is_file(), name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert {"model", "optimizer", "schedule", "rng", "config", "vocab", "data_manifest"} <= set(
        ckpt
    )
    assert {"torch", "python", "batch"} <= set(ckpt["rng"])
    assert ckpt["config"]["hidden"] == 16 and ckpt["config"]["data"] == str(text_file)
    assert ckpt["data_manifest"]["sha256"] == fdata.sha256_text(make_text())
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["best_val_loss"] == min(r["val_loss"] for r in records)

    model, vocab, cfg = checkpoint.model_from_checkpoint(ckpt)
    assert isinstance(model, CharRNN) and cfg.model == "lstm"
    sample = captured.out.rstrip("\n")
    assert len(sample) == 1 + 20 and not vocab.unknown(sample)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_resume_continues_exactly(text_file, tmp_path, capsys, impl):
    """8 steps straight == 4 steps, stop, --resume, 4 more: same loss and weights bit for bit."""
    extra = ["--steps", "8", "--eval-interval", "2", "--layers", "2", "--dropout", "0.2"]
    extra += ["--impl", impl]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(tiny_args(text_file, straight, *extra)) == 0
    assert cli.main(tiny_args(text_file, split, *extra, "--stop-at", "4")) == 0
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 4
    assert cli.main(["--resume", "--out", str(split)]) == 0
    assert "resumed" in capsys.readouterr().err

    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "train_loss", "val_loss", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)
    ca = torch.load(straight / "ckpt.pt", weights_only=True)
    cb = torch.load(split / "ckpt.pt", weights_only=True)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    states = ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()
    for pa, pb in zip(*states, strict=True):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert torch.equal(ca["rng"]["batch"], cb["rng"]["batch"])
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])


def test_resume_drops_metrics_past_the_checkpoint(text_file, tmp_path):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--stop-at", "3")) == 0
    with open(out / "metrics.jsonl", "a") as f:  # as if killed after logging step 4
        f.write(json.dumps({"step": 4, "val_loss": 0.0}) + "\n")
    assert cli.main(["--resume", "--out", str(out)]) == 0
    assert [r["step"] for r in read_metrics(out)] == [3, 6]


def test_resume_takes_threads_from_its_own_command_line(text_file, tmp_path, capsys):
    """--threads, like --device, is the machine's, not the run's: a resume on another machine
    does not inherit the first one's core count."""
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert cli.main(tiny_args(text_file, out, "--stop-at", "3", "--threads", "1")) == 0
        assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["config"]["threads"] == 1
        torch.set_num_threads(threads)
        assert cli.main(["--resume", "--out", str(out), "--stop-at", "4"]) == 0
        assert f" {threads} threads" in capsys.readouterr().err
        assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["config"]["threads"] is None
        assert cli.main(["--resume", "--out", str(out), "--threads", "1"]) == 0
        assert " 1 threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_a_fresh_run_over_a_previous_one_says_it_replaces_it(text_file, tmp_path, capsys):
    """No file of the previous run is left beside the new run's: a best.pt of another model
    would be sampled as this run's."""
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--steps", "3")) == 0
    assert "previous run" not in capsys.readouterr().err
    assert (out / "best.pt").exists()
    args = tiny_args(text_file, out, "--steps", "3", "--hidden", "12", "--stop-at", "1")
    removed = []
    real_unlink = os.unlink
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "unlink", lambda p: (removed.append(os.path.basename(p)), real_unlink(p)))
        assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"note: {out} held a previous run; this fresh run replaces it (removed ckpt.pt, " in err
    assert {"ckpt.pt", "best.pt"} <= set(removed)
    for name in ("ckpt.pt", "best.pt"):  # the new model's, or none
        path = out / name
        assert not path.exists() or checkpoint.load_checkpoint(str(path))["config"]["hidden"] == 12


def test_a_relative_data_path_resumes_from_another_directory(
    text_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(text_file.parent)
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file.name, out, "--steps", "3")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == str(text_file)  # recorded absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["--resume", "--out", str(out), "--steps", "4"]) == 0
    # a checkpoint of an earlier version holds the relative path: the manifest's is used
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["data"] = text_file.name
    torch.save(ckpt, out / "ckpt.pt")
    assert cli.main(["--resume", "--out", str(out), "--steps", "5"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    # a relative --data given on resume is recorded absolute too
    monkeypatch.chdir(text_file.parent)
    assert cli.main(["--resume", "--data", text_file.name, "--out", str(out), "--steps", "6"]) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(text_file)


def test_resume_with_nothing_left_to_train_says_so(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--steps", "3")) == 0
    capsys.readouterr()
    for more in ([], ["--steps", "2"]):
        assert cli.main(["--resume", "--out", str(out), *more]) == 2
        err = capsys.readouterr().err
        assert_one_line_error(err)
        assert "is at step 3 of --steps" in err and "give --steps above 3" in err


def test_schedule_warms_up_then_decays():
    cfg = config.TrainConfig(lr=1e-2, min_lr=1e-3, warmup=4, steps=20)
    lrs = [schedule.lr_at(cfg, s) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert schedule.lr_at(cfg, 20) == pytest.approx(1e-3)
    linear = config.TrainConfig(lr=1e-2, min_lr=0.0, warmup=0, steps=10, schedule="linear")
    assert schedule.lr_at(linear, 5) == pytest.approx(5e-3)


def test_config_round_trip():
    cfg = config.TrainConfig(hidden=7, data="x.txt")
    assert config.TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(errors.ConfigError, match="unknown"):
        config.TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch-size", "-2"], "--batch-size must be >= 1"),
        (["--block-size", "0"], "--block-size must be >= 1"),
        (["--hidden", "0"], "--hidden must be >= 1"),
        (["--layers", "-1"], "--layers must be >= 1"),
        (["--eval-iters", "0"], "--eval-iters must be >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be a finite"),
        (["--dropout", "1.0"], "--dropout must be in"),
        (["--grad-clip", "-1"], "--grad-clip must be"),
        (["--model", "transformer"], "invalid choice"),
        (["--steps", "many"], "invalid int"),
        (["--no-such-flag"], "unrecognized"),
        (["--threads", "100000"], "--threads must be <= 1024"),
        (["--seed", str(2**64)], "--seed must fit in a signed 64-bit integer"),
        (["--hidden", str(2**63)], f"--hidden must be <= {2**31 - 1}"),
        (["--batch-size", str(2**62)], f"--batch-size must be <= {2**31 - 1}"),
        (["--sample-length", str(2**62)], f"--sample-length must be <= {2**31 - 1}"),
        (["--nonlinearity", "relu"], "--nonlinearity relu is for --model rnn"),
    ],
)
def test_bad_flags(text_file, tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, *flags)) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert match in err
    assert not out.exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "not found"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("binary", "binary"),
        ("latin1", "not UTF-8"),
        ("short", "fewer than one window"),
    ],
)
def test_bad_data_is_an_error_not_a_fallback(tmp_path, capsys, case, match):
    path = tmp_path / "data.txt"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif case == "latin1":
        path.write_bytes(("d\xe9j\xe0 vu " * 100).encode("latin-1"))
    elif case == "short":
        path.write_text(make_text(100))  # the 10% validation split is shorter than 17 chars
    out = tmp_path / "run"
    assert cli.main(tiny_args(path, out)) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert match in err
    assert not (out / "ckpt.pt").exists()


def test_block_size_longer_than_corpus(text_file, tmp_path, capsys):
    assert cli.main(tiny_args(text_file, tmp_path / "r", "--block-size", "100000")) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--block-size" in err


def test_a_model_too_large_for_memory_is_one_line(text_file, tmp_path, capsys):
    assert cli.main(tiny_args(text_file, tmp_path / "r", "--hidden", "2000000")) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "error: out of memory (tried to allocate " in err and "TiB): use a smaller" in err


@pytest.mark.parametrize(
    "value, match",
    [
        ("bogus", "FASTCHAR_GEMM: unknown GEMM engine 'bogus'"),
        ("bf16dot", "FASTCHAR_GEMM=bf16dot cannot run this Float GEMM"),
    ],
)
def test_a_fastchar_gemm_the_kernels_refuse_is_one_line(
    text_file, tmp_path, capsys, monkeypatch, value, match
):
    monkeypatch.setenv("FASTCHAR_GEMM", value)
    assert cli.main(tiny_args(text_file, tmp_path / "r", "--impl", "cpp")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and match in err.strip().splitlines()[-1]


def test_out_of_memory_names_the_size_and_leaves_other_errors_alone():
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 16000000000000 bytes. Error code 12"
    )
    assert errors.out_of_memory(cpu) == "out of memory (tried to allocate 14.6 TiB)"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 ...")
    assert errors.out_of_memory(cuda) == "out of memory (tried to allocate 20.00 GiB)"
    assert errors.out_of_memory(MemoryError()) == "out of memory"
    small = RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 900 bytes."
    )
    assert errors.out_of_memory(small) == "out of memory (tried to allocate 900 bytes)"
    assert errors.out_of_memory(RuntimeError("shape mismatch")) is None
    assert errors.out_of_memory(ValueError("can't")) is None


def test_unrunnable_impl_is_refused(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(tiny_args(text_file, tmp_path / "r", "--impl", "triton")) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--impl triton cannot run on cpu" in err


def test_resume_errors(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--resume", "--out", str(out)]) == 1
    assert "no checkpoint" in capsys.readouterr().err

    assert cli.main(tiny_args(text_file, out, "--stop-at", "3")) == 0
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(out), "--hidden", "32"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--hidden 32 differs" in err

    text_file.write_text(make_text(seed=1))
    assert cli.main(["--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "data changed" in err

    (out / "ckpt.pt").write_bytes((out / "best.pt").read_bytes()[:500])
    assert cli.main(["--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "cannot read checkpoint" in err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.atomic_torch_save({"a": torch.ones(2)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_torch_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_cli_fused_smoke(text_file, tmp_path):
    """`python -m fastchar.train --impl fused` runs end to end (kernels or the fallback)."""
    out = tmp_path / "run"
    args = tiny_args(text_file, out, "--impl", "fused", "--steps", "3")
    proc = subprocess.run(
        [sys.executable, "-m", "fastchar.train", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "impl fused -> " in proc.stderr
    assert [r["step"] for r in read_metrics(out)] == [3]
    assert (out / "ckpt.pt").is_file()


def test_cli_error_via_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastchar.train", "--data", str(tmp_path / "nope.txt")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr)
    assert "not found" in proc.stderr


def test_progress_bar_on_a_terminal_and_lines_otherwise():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    tty, pipe = Stream(True), Stream(False)
    for stream in (tty, pipe):
        bar = progress.Progress(total=4, interval=2, stream=stream)
        for step in range(1, 5):
            bar.update(step, 2.0, 1000.0, 1e-3)
        bar.log("eval")
        bar.close()
    shown = tty.getvalue()  # tqdm: one bar redrawn in place, the log line above it
    assert "4/4" in shown and "100%" in shown and "loss 2.0000 (2.885 bpc)" in shown
    assert "\reval\n" in shown and shown.endswith("\n") and shown.count("\n") == 2
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 3
    assert lines[0].startswith("step 2/4 | loss 2.0000 (2.885 bpc) | 1,000 tok/s")


def test_bfloat16_autocast_run(text_file, tmp_path):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--dtype", "bfloat16", "--sample-length", "0")) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    assert all(math.isfinite(r["val_loss"]) for r in read_metrics(out))


@pytest.mark.parametrize("speedup, want", [(2.0, "bfloat16"), (1.2, "float32")])
def test_dtype_auto_picks_by_the_measured_bf16_speedup(
    text_file, tmp_path, capsys, monkeypatch, speedup, want
):
    """--dtype auto: bfloat16 where the plan measures the bf16 step GEMMs >= 1.5x float32's
    at the model's step shapes, float32 otherwise; the log says which and why."""
    from fastchar import plan
    from fastchar.backends import cpp_loaded

    if not cpp_loaded():
        pytest.skip("--dtype auto measures the C++ step GEMMs")
    asked = []

    def fake(n_gates, B, H):
        asked.append((n_gates, B, H))
        return speedup

    monkeypatch.setattr(plan, "bf16_step_speedup", fake)
    out = tmp_path / "run"
    args = tiny_args(text_file, out, "--dtype", "auto", "--impl", "cpp", "--sample-length", "0")
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"--dtype auto: {want}" in err and f"({want}," in err
    assert asked and asked[0][0] == 4  # an LSTM's step shapes


@pytest.mark.parametrize(
    "fp32, bf16, last, want",
    [
        (0.2, 0.1, 3000, "float32"),  # both reach the 3000 steps: float32's precision wins
        (0.35, 0.1, 3000, "bfloat16"),  # float32 reaches 1721 of them, bfloat16 3000
        (0.2, 0.1, 10**6, "bfloat16"),  # no cap in reach: 2x the steps
        (0.14, 0.1, 10**6, "float32"),  # 1.4x the steps: not enough
    ],
)
def test_dtype_trial_decides_by_the_steps_each_reaches(fp32, bf16, last, want):
    from fastchar.training.device import DtypeTrial

    trial = DtypeTrial(time_limit=600.0, last_step=last)
    dtype, note = trial.decide(16, 3.0, {"float32": fp32, "bfloat16": bf16})
    assert dtype == want and note.startswith(f"--dtype auto: {want} (")
    reach_fp32 = min(last, 16 + int(597.0 / fp32))
    assert f"float32 {reach_fp32}:" in note


def test_dtype_trial_times_each_dtype_after_its_warmup():
    from fastchar.training.device import DtypeTrial

    trial = DtypeTrial(time_limit=60.0, last_step=1000)
    half = DtypeTrial.WARMUP + DtypeTrial.TIMED
    dtypes = [trial.dtype_at(step) for step in range(2 * half)]
    assert dtypes == ["float32"] * half + ["bfloat16"] * half
    for step in range(2 * half):
        assert not trial.done(step)
        trial.record(step, float(step))
    assert trial.done(2 * half)
    timed = list(range(DtypeTrial.WARMUP, half))
    assert trial.times["float32"] == [float(s) for s in timed]
    assert trial.times["bfloat16"] == [float(s + half) for s in timed]
    assert trial.medians() == {
        "float32": timed[len(timed) // 2],
        "bfloat16": timed[len(timed) // 2] + half,
    }


@pytest.fixture
def trial_dtypes(monkeypatch):
    """For --dtype auto's trial: the plan says bf16 step GEMMs run 2x float32's, and the
    returned list gets the dtype of every training step the Trainer takes."""
    from fastchar import plan
    from fastchar.backends import cpp_loaded
    from fastchar.training.loop import Trainer

    if not cpp_loaded():
        pytest.skip("--dtype auto measures the C++ step GEMMs")
    monkeypatch.setattr(plan, "bf16_step_speedup", lambda n_gates, B, H: 2.0)
    used = []
    train_step = Trainer.train_step

    def spy(self):
        used.append(self.cfg.dtype)
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", spy)
    return used


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize(
    "medians, want", [(None, "float32"), ({"float32": 10.0, "bfloat16": 0.1}, "bfloat16")]
)
def test_dtype_auto_under_a_time_limit_times_both_then_keeps_one(
    text_file, tmp_path, capsys, monkeypatch, trial_dtypes, medians, want, stateful
):
    """--dtype auto with a time limit, where the bf16 step GEMMs are the faster: the first
    steps train in float32, then in bfloat16, and the rest in the dtype whose steps reach
    further. With a limit both reach the last step by, float32 (the real timings); with
    float32 steps too slow to reach it, bfloat16. --stateful carries its state across
    both switches (a bfloat16 step's state into a float32 step)."""
    from fastchar.training.device import DtypeTrial

    used = trial_dtypes
    if medians is not None:
        monkeypatch.setattr(DtypeTrial, "medians", lambda self: medians)
    steps = 8 * DtypeTrial.span()
    limit = "100000" if medians is None else "100"
    out = tmp_path / "run"
    args = tiny_args(text_file, out, "--dtype", "auto", "--impl", "cpp", "--sample-length", "0")
    args += ["--steps", str(steps), "--eval-interval", str(steps), "--time-limit", limit]
    args += ["--stateful"] if stateful else []
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    half = DtypeTrial.span() // 2
    assert used == ["float32"] * half + ["bfloat16"] * half + [want] * (steps - 2 * half)
    assert "the first 16 steps time float32 and bfloat16" in err
    assert f"--dtype auto: {want} (a step timed:" in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == steps and ckpt["config"]["dtype"] == want


@pytest.mark.parametrize("stop_at", [5, 12])  # in the float32 steps; in the bfloat16 ones
def test_a_run_stopped_in_the_dtype_trial_runs_it_again_on_resume(
    text_file, tmp_path, capsys, trial_dtypes, stop_at
):
    """A checkpoint written during --dtype auto's trial says auto, not the trial's current
    dtype: the resumed run times both again from its own step (its --stateful state, a
    bfloat16 one when stopped in the bfloat16 steps, going into float32 steps)."""
    from fastchar.training.device import DtypeTrial

    used = trial_dtypes
    steps = 8 * DtypeTrial.span()
    out = tmp_path / "run"
    args = tiny_args(text_file, out, "--dtype", "auto", "--impl", "cpp", "--sample-length", "0")
    args += ["--steps", str(steps), "--time-limit", "100000", "--stateful"]
    assert cli.main([*args, "--stop-at", str(stop_at)]) == 0
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == stop_at and ckpt["config"]["dtype"] == "auto"
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    half = DtypeTrial.span() // 2
    assert used[stop_at:] == (
        ["float32"] * half + ["bfloat16"] * half + ["float32"] * (steps - stop_at - 2 * half)
    )
    assert "--dtype auto: float32 (a step timed:" in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == steps and ckpt["config"]["dtype"] == "float32"


def test_dtype_auto_is_float32_off_the_cpp_kernels():
    from fastchar.training.device import pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("bfloat16", "cpp", cpu, "lstm", 8, 32) == ("bfloat16", None)
    dtype, note = pick_dtype("auto", "reference", cpu, "lstm", 8, 32)
    assert dtype == "float32" and "impl reference" in note


def test_bf16_step_speedup_is_measured():
    from fastchar import plan
    from fastchar.backends import cpp_loaded

    if not cpp_loaded():
        pytest.skip("needs the C++ step GEMMs")
    s = plan.bf16_step_speedup(4, 8, 64)
    assert math.isfinite(s) and s > 0


def test_resume_with_dtype_auto_keeps_what_auto_chose(text_file, tmp_path, monkeypatch):
    from fastchar import plan
    from fastchar.backends import cpp_loaded

    if not cpp_loaded():
        pytest.skip("--dtype auto measures the C++ step GEMMs")
    monkeypatch.setattr(plan, "bf16_step_speedup", lambda n_gates, B, H: 2.0)
    out = tmp_path / "run"
    args = tiny_args(text_file, out, "--dtype", "auto", "--impl", "cpp", "--sample-length", "0")
    assert cli.main(args) == 0
    monkeypatch.setattr(plan, "bf16_step_speedup", lambda n_gates, B, H: 1.0)
    assert cli.main([*args, "--steps", "8", "--resume"]) == 0
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 8 and ckpt["config"]["dtype"] == "bfloat16"


def test_resume_trims_metrics_that_are_not_utf8(tmp_path):
    """--resume drops records past the checkpoint's step; a line that is not UTF-8 is
    dropped with them, not a UnicodeDecodeError traceback."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": 5}\n')
    cli._trim_metrics(str(path), 3)
    assert path.read_text() == '{"step": 1}\n'
