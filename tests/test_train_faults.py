"""fastchar.train under faults: killed runs, signals, non-finite losses and bad checkpoints.

The kill tests run real training subprocesses and SIGKILL them; resuming then
happens in-process, which is faster and runs the same code.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import assert_one_line_error, make_text, read_metrics, tiny_args

from fastchar import sample
from fastchar.training import checkpoint, cli, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def start_run(text_file, out, log, *extra, env=None):
    """A training subprocess that would run for a long time, logging every step."""
    args = tiny_args(
        text_file, out, "--steps", "100000", "--eval-interval", "2", "--eval-iters", "1",
        "--log-interval", "1", "--sample-length", "0", *extra,
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fastchar.train", *args], cwd=REPO, env=env, stderr=f
        )


def wait_for(proc, condition, what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_logged(log) -> int:
    with open(log) as f:
        return sum(line.startswith("step ") for line in f)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temp_files(out):
    return sorted(p for p in os.listdir(out) if p.endswith(".tmp"))


def resume_and_finish(out, capsys, more=2) -> dict:
    """Resume the run in ``out`` for ``more`` steps; the finished checkpoint."""
    start = checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert cli.main(["--resume", "--out", str(out), "--steps", str(start + more)]) == 0
    err = capsys.readouterr().err
    assert f"resumed {out / 'ckpt.pt'} at step {start}" in err and "Traceback" not in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == start + more
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == start + more
    assert not temp_files(out)
    return ckpt


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_writes_a_checkpoint_and_exits_0(
    text_file, tmp_path, capsys, signum
):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start_run(text_file, out, log, "--eval-interval", "1000")
    wait_for(proc, lambda: steps_logged(log) >= 3, "three steps")
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 0
    err = log.read_text()
    assert "Traceback" not in err and "error" not in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 3
    assert f"stopped by a signal at step {ckpt['step']} " in err
    assert steps_logged(log) == ckpt["step"]  # no step started after the signal was seen
    resume_and_finish(out, capsys)


def signal_at(monkeypatch, where: str, step: int) -> None:
    """Deliver a stop signal, as the CLI's handler does, during training step ``step``
    (``where="step"``) or during the evaluation after it (``"eval"``)."""
    name = "train_step" if where == "step" else "evaluate"
    real = getattr(loop.Trainer, name)

    def wrapper(self, *args, **kwargs):
        if self.step + (where == "step") == step:
            self.stop_signal = signal.SIGINT
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, name, wrapper)


@pytest.mark.parametrize("where", ["step", "eval"])
def test_a_stop_at_an_evaluation_step_keeps_the_evaluation(
    text_file, tmp_path, capsys, monkeypatch, where
):
    """Stopped during a step that evaluates, or during its evaluation, the run evaluates,
    checkpoints and stops there; resumed, its metrics and best.pt are an uninterrupted
    run's."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    flags = ["--eval-interval", "2", "--log-interval", "1"]
    assert cli.main(tiny_args(text_file, whole, *flags)) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        signal_at(m, where, 4)
        assert cli.main(tiny_args(text_file, cut, *flags)) == 0
    err = capsys.readouterr().err
    assert "stopped by a signal at step 4 of 6; checkpoint written" in err
    assert "step 5" not in err  # a signal during the evaluation stops before the next step
    assert checkpoint.load_checkpoint(str(cut / "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in read_metrics(cut)] == [2, 4]
    assert cli.main(["--resume", "--out", str(cut)]) == 0
    capsys.readouterr()
    for a, b in zip(read_metrics(cut), read_metrics(whole), strict=True):
        assert (a["step"], a["val_loss"]) == (b["step"], b["val_loss"])
    best = {name: checkpoint.load_checkpoint(str(run / "best.pt")) for name, run in
            (("cut", cut), ("whole", whole))}  # fmt: skip
    assert best["cut"]["step"] == best["whole"]["step"]


def test_a_stop_at_between_evaluations_adds_no_evaluation(text_file, tmp_path, capsys):
    """--stop-at stops as a signal would: a step that does not evaluate is checkpointed
    without an evaluation, so the resumed run's metrics and best.pt are the whole run's."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli.main(tiny_args(text_file, whole)) == 0
    assert cli.main(tiny_args(text_file, cut, "--stop-at", "4")) == 0
    assert checkpoint.load_checkpoint(str(cut / "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in read_metrics(cut)] == [3]
    assert cli.main(["--resume", "--out", str(cut)]) == 0
    capsys.readouterr()
    assert read_metrics(cut) == [
        dict(a, tokens_per_sec=b["tokens_per_sec"], elapsed_sec=b["elapsed_sec"],
             wall_sec=b["wall_sec"])
        for a, b in zip(read_metrics(whole), read_metrics(cut), strict=True)
    ]  # fmt: skip
    for name in ("best.pt", "ckpt.pt"):
        a, b = (checkpoint.load_checkpoint(str(run / name)) for run in (whole, cut))
        assert a["step"] == b["step"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)


def test_a_stop_at_the_last_step_completes_the_run(text_file, tmp_path, capsys, monkeypatch):
    """A signal during the last step: that step's evaluation and checkpoint are written, and
    no --resume is advised (it would have nothing to train)."""
    out = tmp_path / "run"
    signal_at(monkeypatch, "step", 6)
    assert cli.main(tiny_args(text_file, out)) == 0
    err = capsys.readouterr().err
    assert "stopped by a signal at step 6, the last; checkpoint written, no sample" in err
    assert "--resume" not in err
    assert [r["step"] for r in read_metrics(out)] == [3, 6]
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 6


def test_a_failed_checkpoint_write_keeps_best_pt_and_ckpt_pt_agreed(
    text_file, tmp_path, capsys, monkeypatch
):
    """best.pt is never worse than the best validation loss ckpt.pt records, even when the
    run dies between the two writes (here the disk fills): a resumed run would otherwise
    keep a stale best.pt until it beat a loss no saved model has. Resumed, it ends with
    best.pt at the best evaluation."""
    out = tmp_path / "run"
    real = loop.atomic_torch_save
    writes = []

    def save(obj, path):
        writes.append(os.path.basename(path))
        if obj["step"] == 6 and len([w for w in writes if w in ("ckpt.pt", "best.pt")]) == 4:
            raise OSError(28, "No space left on device")  # the second write at step 6
        real(obj, path)

    monkeypatch.setattr(loop, "atomic_torch_save", save)
    assert cli.main(tiny_args(text_file, out)) == 1
    capsys.readouterr()
    assert writes[-2:] in (["best.pt", "ckpt.pt"], ["ckpt.pt", "best.pt"])  # val improved
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    best = checkpoint.load_checkpoint(str(out / "best.pt"))
    val = {r["step"]: r["val_loss"] for r in read_metrics(out)}
    assert val[best["step"]] <= ckpt["best_val_loss"]
    assert cli.main(["--resume", "--out", str(out)]) == 0
    capsys.readouterr()
    val = {r["step"]: r["val_loss"] for r in read_metrics(out)}
    best = checkpoint.load_checkpoint(str(out / "best.pt"))
    assert val[best["step"]] == min(val.values())


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_metrics_on_a_full_disk_is_one_line_naming_the_file(
    text_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    metrics = str(out / "metrics.jsonl")

    def full_open(path, *args, **kwargs):  # metrics.jsonl's appends go to a full disk
        return open("/dev/full" if path == metrics else path, *args, **kwargs)

    monkeypatch.setattr(loop, "open", full_open, raising=False)
    assert cli.main(tiny_args(text_file, out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"fastchar.train: error: [Errno 28] No space left on device: '{metrics}'"
    )


def test_torch_impl_failing_in_bfloat16_is_refused_before_the_run(
    text_file, tmp_path, capsys, monkeypatch
):
    """torch.nn's LSTM under CPU bf16 autocast fails on some CPUs (oneDNN, AMD EPYC Zen 3):
    --impl torch --dtype bfloat16 then stops before its first step with one line, and a
    fresh run into an old run's directory leaves the old run's files alone."""
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--sample-length", "0")) == 0
    before = digest(out / "ckpt.pt")
    capsys.readouterr()

    def fails(self, *args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward")

    monkeypatch.setattr(torch.nn.LSTM, "forward", fails)
    assert cli.main(tiny_args(text_file, out, "--impl", "torch", "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "torch's own LSTM fails under bfloat16 autocast on this CPU (could not create" in err
    assert digest(out / "ckpt.pt") == before and (out / "best.pt").exists()
    flags = ("--model", "gru", "--impl", "torch", "--dtype", "bfloat16", "--sample-length", "0")
    try:  # where torch's own GRU runs under bf16 autocast (all CPUs seen so far), so does this
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.GRU(2, 2)(torch.zeros(1, 1, 2))
        runs = True
    except RuntimeError:
        runs = False
    assert cli.main(tiny_args(text_file, tmp_path / "gru", *flags)) == (0 if runs else 2)


def test_sigkill_during_training_resumes_from_the_last_checkpoint(text_file, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "log"
    proc = start_run(text_file, out, log)
    wait_for(proc, lambda: (out / "ckpt.pt").exists(), "the first checkpoint")
    seen = steps_logged(log)
    wait_for(proc, lambda: steps_logged(log) >= seen + 5, "five more steps")
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] >= 2 and ckpt["step"] % 2 == 0
    resume_and_finish(out, capsys)


def test_sigkill_inside_a_checkpoint_write_keeps_the_old_checkpoint(text_file, tmp_path, capsys):
    out, log, marker = tmp_path / "run", tmp_path / "log", tmp_path / "in_save"
    proc = start_run(text_file, out, log, env={checkpoint.SAVE_PAUSE_ENV: str(marker)})
    wait_for(proc, marker.exists, "a checkpoint write over an existing checkpoint")
    before = digest(out / "ckpt.pt")
    pending = temp_files(out)
    assert len(pending) == 1 and pending[0].startswith(".ckpt.pt")
    assert checkpoint.load_checkpoint(str(out / pending[0]))["step"] == 4  # complete, not renamed
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert digest(out / "ckpt.pt") == before
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    capsys.readouterr()
    resume_and_finish(out, capsys)


class Poison:
    """1-based training steps whose loss is NaN, or whose loss is finite with an inf gradient."""

    def __init__(self):
        self.loss: set[int] = set()
        self.grad: set[int] = set()


@pytest.fixture
def poison(monkeypatch):
    """Poison chosen training steps of ``Trainer.loss`` (evaluation is untouched)."""
    bad = Poison()
    real = loop.Trainer.loss

    def loss(self, x, y, state=None, net=None):
        value, state = real(self, x, y, state, net)
        step = self.step + 1
        if self.model.training and step in bad.loss:
            value = value * float("nan")
        if self.model.training and step in bad.grad:
            w = self.model.head.bias
            value = value + torch.sqrt(w - w.detach()).sum()  # adds 0; d sqrt(0) = inf
        return value, state

    monkeypatch.setattr(loop.Trainer, "loss", loss)
    return bad


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(text_file, tmp_path, capsys, poison):
    out = tmp_path / "run"
    poison.loss.add(5)
    assert cli.main(tiny_args(text_file, out)) == 1  # evaluates and saves at step 3
    err = capsys.readouterr().err
    assert_one_line_error(err.splitlines()[-1])
    assert "non-finite loss nan at step 5" in err and "the last checkpoint is kept" in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [r["step"] for r in read_metrics(out)] == [3]


def test_nonfinite_gradient_stops_before_the_update(text_file, tmp_path, capsys, poison):
    out = tmp_path / "run"
    poison.grad.add(4)
    assert cli.main(tiny_args(text_file, out)) == 1
    err = capsys.readouterr().err
    assert "non-finite gradient norm inf at step 4" in err
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 3


def test_skip_nonfinite_skips_the_update(text_file, tmp_path, capsys, poison):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out, "--stop-at", "3")) == 0
    at3 = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    poison.loss.add(4)
    resume = ["--resume", "--out", str(out), "--skip-nonfinite", "1", "--stop-at", "4"]
    assert cli.main(resume) == 0
    assert "step 4: loss nan, update skipped (1 of at most 1 in a row)" in capsys.readouterr().err
    at4 = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert at4["step"] == 4
    for k in at3["model"]:
        assert torch.equal(at3["model"][k], at4["model"][k]), k
    assert at3["optimizer"]["state"][0]["step"] == at4["optimizer"]["state"][0]["step"]

    poison.loss.update({5, 6})  # two in a row is one more than allowed
    assert cli.main(["--resume", "--out", str(out), "--skip-nonfinite", "1"]) == 1
    assert "non-finite loss nan at step 6" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 4


class RunsCode:
    """Unpickling this runs ``open(marker, "w")``: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_runs_code_is_refused_and_the_code_never_runs(
    text_file, tmp_path, capsys
):
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save({"format": RunsCode(str(marker))}, payload)
    torch.load(payload, weights_only=False).get("format").close()
    assert marker.exists()  # the payload is live: an unsafe load runs it
    marker.unlink()

    out = tmp_path / "run"
    out.mkdir()
    os.replace(payload, out / "ckpt.pt")
    assert cli.main(["--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "holds code or objects" in err and "weights_only=True" in err
    assert sample.main(["--ckpt", str(out / "ckpt.pt")]) == 1
    assert_one_line_error(capsys.readouterr().err, "fastchar.sample")
    assert not marker.exists()


@pytest.fixture
def gru_run(text_file, tmp_path):
    out = tmp_path / "gru"
    assert cli.main(tiny_args(text_file, out, "--model", "gru", "--steps", "3")) == 0
    return out


def test_a_checkpoint_of_another_model_kind(gru_run, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(gru_run), "--model", "lstm"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--model lstm differs from the checkpoint's gru" in err

    ckpt = torch.load(gru_run / "ckpt.pt", weights_only=True)
    ckpt["config"]["model"] = "lstm"  # GRU weights under an LSTM config
    torch.save(ckpt, gru_run / "ckpt.pt")
    more = str(ckpt["step"] + 2)
    assert cli.main(["--resume", "--out", str(gru_run), "--steps", more]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "cannot restore the run from its checkpoint" in err
    assert sample.main(["--ckpt", str(gru_run / "ckpt.pt"), "--prime", "the"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "fastchar.sample")
    assert "does not describe a usable model" in err


@pytest.mark.parametrize(
    "case, match",
    [
        ("truncated", "cannot read checkpoint"),
        ("garbage", "cannot read checkpoint"),
        ("empty", "cannot read checkpoint"),
        ("other_data", "not a fastchar checkpoint"),
        ("hidden_str", "checkpoint config is unusable: hidden must be an integer, got '16'"),
        ("step_str", "has an unusable step: '3'"),
        ("manifest_none", "data_manifest must be a dictionary"),
        ("wall_str", "wall_sec must be a number, got 'x'"),
        ("rng_list", "rng must be a dictionary"),
    ],
)
def test_resume_from_a_bad_checkpoint(gru_run, capsys, case, match):
    """Hand-edited fields too (a checkpoint only has to be a dict of the right names)."""
    path = gru_run / "ckpt.pt"
    edits = {
        "hidden_str": lambda c: c["config"].update(hidden=str(c["config"]["hidden"])),
        "step_str": lambda c: c.update(step=str(c["step"])),
        "manifest_none": lambda c: c.update(data_manifest=None),
        "wall_str": lambda c: c.update(wall_sec="x"),
        "rng_list": lambda c: c.update(rng=[]),
    }
    if case in edits:
        ckpt = torch.load(path, weights_only=True)
        edits[case](ckpt)
        torch.save(ckpt, path)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "garbage":
        path.write_bytes(os.urandom(4096))
    elif case == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(gru_run)]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert match in err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--impl", "cpp", "--device", "cuda"], "--impl cpp runs on CPU tensors only"),
        (["--skip-nonfinite", "-1"], "--skip-nonfinite must be >= 0"),
        (["--emb-dim", "0"], "--emb-dim must be >= 1"),
        (["--warmup", "-3"], "--warmup must be >= 0"),
        (["--stateful", "--block-size", "5000"], "shorter than one window"),
        (["--out", ""], "--out must name a directory, got ''"),
        (["--data", ""], "--data must name a corpus or a file, got ''"),
    ],
)
def test_more_bad_flags(text_file, tmp_path, capsys, flags, match):
    code = cli.main(tiny_args(text_file, tmp_path / "r", *flags))
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert match in err
    assert not (tmp_path / "r" / "ckpt.pt").exists()
