"""Loss plots (fastchar.plot, and the one a training run writes) and the ``fastchar``
command with its subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import make_text, tiny_args

import fastchar
from fastchar import command, plot
from fastchar.training import cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def _fake_run(path: Path, losses):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            rec = {"step": 10 * i, "train_loss": loss, "val_loss": loss + 0.1, "wall_sec": 2.0 * i}
            f.write(json.dumps(rec) + "\n")
        f.write("not json\n")


def test_a_training_run_writes_its_loss_plot(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out)) == 0
    assert (out / "loss.png").read_bytes().startswith(PNG)
    assert f"loss plot: {out / 'loss.png'}" in capsys.readouterr().err


def test_no_matplotlib_still_trains_with_one_line(text_file, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert cli.main(tiny_args(text_file, out)) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "loss plot" in ln]
    assert notes == ["no loss plot: matplotlib is not installed; pip install matplotlib "
                     "for loss plots"]  # fmt: skip
    assert not (out / "loss.png").exists() and (out / "ckpt.pt").exists()


def test_plot_compares_runs_on_one_figure(tmp_path, capsys):
    _fake_run(tmp_path / "a", [2.0, 1.5, 1.2])
    _fake_run(tmp_path / "b", [2.1, 1.7])
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "loss.png")
    assert (tmp_path / "a" / "loss.png").read_bytes().startswith(PNG)
    assert [r["step"] for r in plot.read_metrics(tmp_path / "a")] == [10, 20, 30]
    target = tmp_path / "both.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(target)]) == 0
    assert target.read_bytes().startswith(PNG)


def test_run_names_are_drawn_as_they_are(tmp_path, capsys, monkeypatch):
    """A "$" in a run's name would start matplotlib's mathtext (a parse error after the
    whole training run), bytes that are not UTF-8 could not be drawn, "." has no name."""
    names = ["m$\\bad$x", "cost $5", os.fsdecode(b"out\xe9"), "_run"]
    for i, name in enumerate(names):
        _fake_run(tmp_path / name, [2.0 - i / 10, 1.5])
    monkeypatch.chdir(tmp_path / names[0])
    target = tmp_path / "all.png"
    assert plot.main([*(str(tmp_path / n) for n in names), ".", "--out", str(target)]) == 0
    assert target.read_bytes().startswith(PNG)
    got = [plot.label(Path(p)) for p in (*(tmp_path / n for n in names), ".")]
    assert got == ["m\\$\\bad\\$x", "cost \\$5", "out\ufffd", " _run", "m\\$\\bad\\$x"]


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_plot_of_no_run_is_one_line_and_exit_1(tmp_path, capsys, what):
    run = tmp_path / "run"
    if what == "empty":
        _fake_run(run, [])
    assert plot.main([str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastchar.plot: error: ")


def test_bytes_that_are_not_utf8_spoil_only_their_line(tmp_path, capsys):
    _fake_run(tmp_path / "a", [2.0, 1.5])
    with open(tmp_path / "a" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    assert [r["step"] for r in plot.read_metrics(tmp_path / "a")] == [10, 20]
    assert plot.main([str(tmp_path / "a")]) == 0


@pytest.mark.parametrize("out", ["", "dir"])
def test_an_out_that_is_no_file_is_one_line_and_leaves_nothing(tmp_path, capsys, out):
    _fake_run(tmp_path / "a", [2.0, 1.5])
    if out:
        (tmp_path / out).mkdir()
        out = str(tmp_path / out)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert plot.main([str(tmp_path / "a"), "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastchar.plot: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file left


def test_the_command_lists_its_subcommands(capsys):
    assert command.main(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in ("train", "sample", "info", "plot", "bench"):
        assert f"\n  {name} " in shown
    assert command.main([]) == 2
    assert command.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    for flag in ("--version", "-V"):
        assert command.main([flag]) == 0
        assert capsys.readouterr().out == f"fastchar {fastchar.__version__}\n"


@pytest.mark.parametrize("name", ["train", "sample", "info", "plot", "bench"])
def test_each_subcommand_is_its_python_m_form(name):
    """``fastchar NAME --help`` prints what ``python -m fastchar.NAME --help`` prints."""
    script = Path(sys.executable).with_name("fastchar")
    assert script.is_file(), "the fastchar console script is not installed (pyproject.toml)"
    env_run = dict(capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([sys.executable, "-m", f"fastchar.{name}", "--help"], **env_run)
    ours = subprocess.run([str(script), name, "--help"], **env_run)
    assert theirs.returncode == ours.returncode == 0, (theirs.stderr, ours.stderr)
    assert ours.stdout == theirs.stdout and "usage:" in ours.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "prog, args",
    [
        ("fastchar", ["--version"]),
        ("fastchar", ["--help"]),
        ("fastchar.info", ["info"]),
        ("fastchar.plot", ["plot", "RUN"]),
        ("fastchar.train", ["train"]),  # its stdout is the sample at the end
    ],
)
def test_stdout_on_a_full_disk_is_one_line_and_exit_1(text_file, tmp_path, prog, args):
    """(fastchar.sample's: test_sample.py.)"""
    if args[0] == "plot":
        _fake_run(tmp_path / "a", [2.0, 1.5])
        args = ["plot", str(tmp_path / "a")]
    if args[0] == "train":
        args = ["train", *tiny_args(text_file, tmp_path / "run")]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "fastchar", *args],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"{prog}: error: cannot write the output: No space left on device"
