"""fastchar.train at scale: DDP under torchrun, --stateful truncated BPTT, mixed precision."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_train import assert_one_line_error, make_text, read_metrics, tiny_args

from fastchar import data
from fastchar.distributed import World
from fastchar.training import checkpoint, cli, config, loop, schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DDP averages the ranks' gradients of their half-batch means; one process takes the
# mean over the whole batch. Same math, different float summation order.
DDP_ATOL, DDP_RTOL = 1e-5, 1e-4
# Largest |val loss (bf16) - val loss (fp32)| allowed at any evaluation, in nats.
# Measured on this test's shapes: <= 3e-4 over 120 steps while the loss falls ~1.6 nats.
BF16_LOSS_TOL = 0.02

# Runs fastchar.train's own run() under torchrun, then saves this rank's weights,
# so the test can compare what every rank holds; it exits as `-m fastchar.train` does.
RANK_SCRIPT = """
import os, sys
import torch
from fastchar.training import checkpoint, cli, config, loop
given, resume = config.parse_args(sys.argv[1:])
trainer = cli.run(given, resume)
path = os.path.join(trainer.cfg.out, f"rank{os.environ['RANK']}.pt")
torch.save(trainer.model.state_dict(), path)
cli.exit_process(0)
"""


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, timeout=120, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
    return proc


def assert_weights_close(a: dict, b: dict, exact: bool = False):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=DDP_ATOL, rtol=DDP_RTOL, msg=k)


@pytest.mark.parametrize("mode", ["random", "stateful_resumed"])
def test_ddp_two_ranks_match_one_process(text_file, tmp_path, mode):
    """2 CPU ranks: identical weights on both, equal to one process with the same global batch.

    ``stateful_resumed`` also stops the 2-rank run halfway and resumes it under
    torchrun, so the carried stream state goes through a checkpoint.
    """
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_SCRIPT)
    extra = ["--steps", "6", "--layers", "2", "--batch-size", "6", "--sample-length", "0"]
    if mode != "random":
        extra.append("--stateful")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert cli.main(tiny_args(text_file, single, *extra)) == 0
    if mode == "random":
        proc = torchrun(script, tiny_args(text_file, ddp, *extra))
    else:
        torchrun(script, tiny_args(text_file, ddp, *extra, "--stop-at", "3"))
        assert torch.load(ddp / "ckpt.pt", weights_only=True)["stream_state"] is not None
        proc = torchrun(script, ["--resume", "--out", str(ddp)])
        assert proc.stderr.count("resumed") == 1  # rank 0 only
    assert "2 processes (DDP)" in proc.stderr
    assert proc.stderr.count("eval step 6") == 1

    rank0 = torch.load(ddp / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp / "rank1.pt", weights_only=True)
    assert_weights_close(rank0, rank1, exact=True)
    ckpt = torch.load(ddp / "ckpt.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 6
    assert_weights_close(ckpt["model"], rank0, exact=True)
    one = torch.load(single / "ckpt.pt", weights_only=True)
    assert_weights_close(ckpt["model"], one["model"])
    a, b = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "train_loss", "val_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=DDP_RTOL, abs=DDP_ATOL), key
    assert not [p for p in os.listdir(ddp) if p.endswith(".tmp")]


# fastchar.train's main under torchrun, with one rank made to fail (argv[1]): "save" (rank
# 0's second checkpoint write finds the disk full), "data" (rank 1 reads another copy of
# --data), "step" (rank 1's third training step raises: an error no rank shares).
FAULT_SCRIPT = """
import errno, os, sys
from fastchar.training import cli, corpora, loop
rank, fault = int(os.environ["RANK"]), sys.argv[1]
if fault == "save" and rank == 0:
    real_save, saves = loop.atomic_torch_save, []
    def save(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(obj, path)
    loop.atomic_torch_save = save
if fault == "data" and rank == 1:
    real_load = corpora.load_corpus
    def load(data, log=None):
        text, manifest = real_load(data, log)
        return text, dict(manifest, sha256="0" * 64)  # another node's copy
    cli.load_corpus = load
if fault == "step" and rank == 1:
    real_step = loop.Trainer.train_step
    def step(self):
        if self.step == 2:
            raise RuntimeError("boom on rank 1")
        return real_step(self)
    loop.Trainer.train_step = step
cli.exit_process(cli.main(sys.argv[2:]))
"""


def ranks_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("fastchar.train: error: [rank")]


@pytest.mark.parametrize("fault", ["out_is_a_file", "save", "data", "step"])
def test_ddp_a_rank_that_fails_ends_every_rank(text_file, tmp_path, fault):
    """Where one rank fails (rank 0's files, its disk, one rank's data, any error of one
    rank) every rank stops at once with one line, instead of waiting out the process
    group's 10-minute timeout in a collective that the failed rank never reaches."""
    script = tmp_path / "fault_run.py"
    script.write_text(FAULT_SCRIPT)
    out = tmp_path / "ddp"
    if fault == "out_is_a_file":
        out.write_text("not a directory")
    args = [fault, *tiny_args(text_file, out, "--batch-size", "6", "--sample-length", "0")]
    proc = torchrun(script, args, check=False, timeout=90)
    assert proc.returncode != 0
    err = proc.stderr
    if fault in ("out_is_a_file", "save"):
        why = (
            f"[Errno 17] File exists: '{out}'"
            if fault == "out_is_a_file"
            else f"[Errno 28] No space left on device: '{out / 'ckpt.pt'}'"
        )
        assert sorted(ranks_lines(err)) == [
            f"fastchar.train: error: [rank 0] {why}",
            f"fastchar.train: error: [rank 1] rank 0 failed: {why}",
        ], err
    elif fault == "data":
        lines = ranks_lines(err)
        assert [ln[:31] for ln in sorted(lines)] == [
            f"fastchar.train: error: [rank {r}]" for r in (0, 1)
        ]
        for line in lines:
            assert "the ranks read different training data" in line, err
            assert "every rank must read the same --data" in line
    else:  # the failed rank's own error is a traceback; the other says why it stops
        assert "RuntimeError: boom on rank 1" in err
        assert ranks_lines(err) == [
            "fastchar.train: error: [rank 0] lost contact with another rank, which failed "
            "or was stopped (see its error)"
        ], err


def test_world_rows_split_the_global_batch():
    worlds = [World(rank=r, size=3) for r in range(3)]
    rows = [list(range(12))[w.rows(12)] for w in worlds]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert World().rows(5) == slice(0, 5) and World().mean([1.0, 2.0]) == [1.0, 2.0]


def test_ddp_environment_errors(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(tiny_args(text_file, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastchar.train: error: ") and len(err.strip().splitlines()) == 1
    assert "RANK" in err and "torchrun" in err
    # torchrun's variables without its rendezvous (MASTER_ADDR): one line, not a traceback
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert cli.main(tiny_args(text_file, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "cannot join the process group" in err and "MASTER_ADDR" in err
    monkeypatch.setenv("WORLD_SIZE", "")  # empty: one process, as exit_process reads it
    assert cli.main(tiny_args(text_file, tmp_path / "r", "--sample-length", "0")) == 0


def test_streams_are_consecutive_per_stream_and_wrap():
    d = torch.arange(103)
    s = data.Streams(d, batch_size=4, block_size=5)
    assert s.streams.shape == (4, 25) and s.epoch == 4  # (25 - 1) // 5
    xs, ys = zip(*(s.window(k) for k in range(s.epoch)), strict=True)
    x, y = torch.cat(xs, 1), torch.cat(ys, 1)  # [B, epoch * T]
    for b in range(4):
        assert x[b].tolist() == list(range(25 * b, 25 * b + 20))
        assert y[b].tolist() == list(range(25 * b + 1, 25 * b + 21))
    assert [s.starts_epoch(k) for k in range(9)] == [True, False, False, False] * 2 + [True]
    for k in range(4):
        assert torch.equal(s.window(k + s.epoch)[0], s.window(k)[0])
    with pytest.raises(data.DataError, match="streams of 5"):
        data.Streams(torch.arange(20), batch_size=4, block_size=5)


def _stateful_trainer(text_file, *flags):
    given, _ = config.parse_args(
        tiny_args(text_file, "unused", "--stateful", "--batch-size", "3", *flags)
    )
    cfg = config.TrainConfig(**given).validate()
    return loop.Trainer(cfg, text_file.read_text(), {"sha256": "", "source": "test"})


def test_stateful_carries_the_state_and_resets_each_epoch(text_file):
    """Each step's loss equals a manual forward of the next window from the carried state."""
    trainer = _stateful_trainer(text_file, "--block-size", "150")
    streams = trainer.streams["train"]
    assert streams.epoch == 11  # 5400 train chars / 3 streams = 1800 per stream

    carried = None
    for step in range(streams.epoch + 2):
        before = copy.deepcopy(trainer.model)
        loss = trainer.train_step()
        x, y = streams.window(step)
        if step % streams.epoch == 0:
            carried = None
        with torch.no_grad():
            logits, new_state = before(x, carried)
            fresh, _ = before(x)
        want = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        stateless = F.cross_entropy(fresh.flatten(0, 1), y.flatten()).item()
        # Same ops in the same order: the trainer's loss is the manual one bit for bit,
        # and the state's effect (>= 4e-5 nats here) is far above that.
        assert loss == want, step
        if carried is not None:
            assert abs(stateless - want) > 1e-5, step
        else:
            assert stateless == want, step
        for got, ref in zip(trainer.state, new_state, strict=True):
            assert not got.requires_grad
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        carried = new_state


def test_stateful_validation_reads_consecutive_windows(text_file):
    trainer = _stateful_trainer(text_file, "--block-size", "40", "--eval-iters", "3")
    val = trainer.streams["val"]
    assert val.epoch == 4  # 600 val chars / 3 streams = 200 per stream
    losses = trainer.evaluate()
    state, total = None, 0.0
    with torch.no_grad():
        for k in range(3):
            x, y = val.window(k)
            logits, state = trainer.model.eval()(x, state)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert losses["val"] == pytest.approx(total / 3, rel=1e-6)


def test_stateful_resume_is_exact_across_an_epoch_boundary(text_file, tmp_path, capsys):
    extra = ["--stateful", "--block-size", "150", "--batch-size", "3", "--steps", "14"]
    extra += ["--eval-interval", "7", "--dropout", "0.1", "--layers", "2", "--sample-length", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(tiny_args(text_file, straight, *extra)) == 0
    assert cli.main(tiny_args(text_file, split, *extra, "--stop-at", "9")) == 0
    saved = torch.load(split / "ckpt.pt", weights_only=True)["stream_state"]
    assert [tuple(s.shape) for s in saved] == [(2, 3, 16)] * 2  # LSTM (h, c) [L, B, H]
    assert cli.main(["--resume", "--out", str(split)]) == 0
    capsys.readouterr()
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["stream_state"], b["stream_state"], strict=True):
        assert torch.equal(sa, sb)
    resumed = {r["step"]: r["val_loss"] for r in read_metrics(split)}
    for r in read_metrics(straight):
        assert resumed[r["step"]] == r["val_loss"], r["step"]


def test_stateful_too_short_for_the_streams(text_file, tmp_path, capsys):
    code = cli.main(tiny_args(text_file, tmp_path / "r", "--stateful", "--batch-size", "64"))
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "streams of" in err and "--batch-size" in err


def test_bfloat16_tracks_float32_on_the_fused_kernels(text_file, tmp_path):
    """bf16 autocast with fp32 master weights follows the fp32 loss curve."""
    args = [
        "--impl", "fused", "--emb-dim", "16", "--hidden", "32", "--batch-size", "8",
        "--block-size", "32", "--steps", "80", "--warmup", "5", "--eval-interval", "20",
        "--eval-iters", "4", "--lr", "1e-2",
    ]  # fmt: skip
    curves = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli.main(tiny_args(text_file, out, *args, "--dtype", dtype)) == 0
        curves[dtype] = [r["val_loss"] for r in read_metrics(out)]
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
        assert ckpt["config"]["impl"] == "fused"
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert fp32[0] - fp32[-1] > 1.0  # it learned, so tracking means something
    diffs = [abs(a - b) for a, b in zip(fp32, bf16, strict=True)]
    assert max(diffs) <= BF16_LOSS_TOL, diffs
    assert max(diffs) > 0  # bf16 really ran: the curves are not bit-identical


def test_float16_is_refused_on_cpu(text_file, tmp_path, capsys):
    for flags in (["--dtype", "float16"], ["--dtype", "float16", "--device", "cpu"]):
        assert cli.main(tiny_args(text_file, tmp_path / "r", *flags)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "--dtype float16 needs a CUDA device" in err and "bfloat16" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_float16_trains_with_a_grad_scaler_on_cuda(text_file, tmp_path):
    out = tmp_path / "fp16"
    args = ["--device", "cuda", "--dtype", "float16", "--impl", "torch", "--sample-length", "0"]
    assert cli.main(tiny_args(text_file, out, *args)) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "scale" in ckpt["scaler"]
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())


def test_time_limit_decays_with_time_and_stops(text_file, tmp_path, capsys):
    cfg = config.TrainConfig(lr=1e-2, min_lr=1e-3, warmup=2, steps=1000, time_limit=10.0)
    assert schedule.lr_at(cfg, 5, wall=0.0) == pytest.approx(schedule.lr_at(cfg, 5))
    assert schedule.lr_at(cfg, 5, wall=5.0) == pytest.approx(5.5e-3)  # cosine midpoint
    assert schedule.lr_at(cfg, 5, wall=10.0) == pytest.approx(1e-3)

    out = tmp_path / "run"
    flags = ["--steps", "100000", "--time-limit", "1.5", "--eval-interval", "100000"]
    assert cli.main(tiny_args(text_file, out, *flags)) == 0
    err = capsys.readouterr().err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert f"time limit of 1.5 s reached at step {ckpt['step']}" in err
    assert 1.5 <= ckpt["wall_sec"] < 30 and 1 <= ckpt["step"] < 100000
    assert [r["step"] for r in read_metrics(out)] == [ckpt["step"]]
    assert read_metrics(out)[-1]["lr"] < 2e-3  # decayed most of the way to lr / 10
    # more --steps for a run that stopped at its limit: trained, without the limit
    more = ckpt["step"] + 3
    assert cli.main(["--resume", "--out", str(out), "--steps", str(more)]) == 0
    err = capsys.readouterr().err
    assert "note: the run reached its --time-limit of 1.5 s; this resume trains to" in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == more and ckpt["schedule"]["decay_floor"] == 1.0
    # at the end of the decay, where the limit left it: not back up the steps' schedule
    assert read_metrics(out)[-1]["lr"] == pytest.approx(3e-4)  # tiny_args' lr / 10
    assert cli.main(["--resume", "--out", str(out), "--steps", str(more + 3)]) == 0
    assert read_metrics(out)[-1]["lr"] == pytest.approx(3e-4)  # a second resume, too
    cfg = config.TrainConfig(lr=1e-2, min_lr=1e-3, warmup=2, steps=1000)
    assert schedule.lr_at(cfg, 0, floor=1.0) == schedule.lr_at(cfg, 500, floor=1.0)
    assert schedule.lr_at(cfg, 500, floor=1.0) == pytest.approx(1e-3)
    assert schedule.lr_at(cfg, 999, floor=0.25) == schedule.lr_at(cfg, 999)


def test_preset_sets_the_recipe_and_flags_win(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--hidden", "16", "--batch-size", "4", "--block-size", "16", "--steps", "2"]
    code = cli.main(
        ["--preset", "shakespeare", "--data", str(text_file), "--out", str(out), *flags,
         "--impl", "reference", "--eval-iters", "2", "--sample-length", "0"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    cfg = checkpoint.load_checkpoint(str(out / "ckpt.pt"))["config"]
    recipe = config.PRESETS["shakespeare"]
    assert cfg["preset"] == "shakespeare" and cfg["hidden"] == 16 and cfg["data"] == str(text_file)
    for name in ("dropout", "stateful", "layers", "lr", "time_limit", "emb_dim"):
        assert cfg[name] == recipe[name], name
    # The recipe's dtype "auto" is resolved; the checkpoint records what ran (float32 off
    # the C++ kernels).
    assert recipe["dtype"] == "auto" and cfg["dtype"] == "float32"


# Each rank's --dtype auto pick is forced to its own (argv[1]: rank 0's,rank 1's), as when
# two machines' plans measure differently; then the rank saves the dtype it trained in.
DTYPE_RANK_SCRIPT = """
import json, os, sys
import torch
from fastchar.training import cli, config, loop
rank = int(os.environ["RANK"])
own = sys.argv[1].split(",")[rank]
loop.pick_dtype = lambda *args: (own, f"--dtype auto: {own} (rank {rank}'s own pick)")
given, resume = config.parse_args(sys.argv[2:])
trainer = cli.run(given, resume)
with open(os.path.join(trainer.cfg.out, f"rank{rank}.json"), "w") as f:
    json.dump({"dtype": trainer.cfg.dtype, "note": trainer.dtype_note}, f)
torch.save(trainer.model.state_dict(), os.path.join(trainer.cfg.out, f"rank{rank}.pt"))
cli.exit_process(0)
"""


@pytest.mark.parametrize("picks", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_ddp_ranks_whose_auto_dtype_picks_differ_train_in_rank_0s(text_file, tmp_path, picks):
    """--dtype auto measures on each rank; where the ranks' picks differ, every rank trains
    in rank 0's dtype, so the replicas stay identical."""
    script = tmp_path / "dtype_rank_run.py"
    script.write_text(DTYPE_RANK_SCRIPT)
    out = tmp_path / "ddp"
    extra = ["--dtype", "auto", "--batch-size", "6", "--sample-length", "0"]
    proc = torchrun(script, [",".join(picks), *tiny_args(text_file, out, *extra)])
    ranks = []
    for r in (0, 1):
        with open(out / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    assert [r["dtype"] for r in ranks] == [picks[0], picks[0]]
    assert ranks[1]["note"] == f"--dtype auto: {picks[0]} (rank 0's own pick)"
    assert "rank 1's own pick" not in proc.stderr
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    assert_weights_close(w0, w1, exact=True)
