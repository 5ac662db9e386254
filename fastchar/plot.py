"""Loss curves of training runs: ``python -m fastchar.plot RUN_DIR [RUN_DIR ...]``.

Reads each run's ``metrics.jsonl`` and draws train and validation loss against steps
and against wall time, every run on the same two panels for comparison. The PNG goes to
the first run's directory as ``loss.png`` (or ``--out FILE.png``). A training run writes
its own at the end. matplotlib is an optional extra: ``pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastchar.atomic import atomic_write
from fastchar.training.errors import drop_closed_stderr, print_stdout

PROG = "fastchar.plot"
FILENAME = "loss.png"


class PlotError(Exception):
    """Why no plot was written, as one line."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The evaluation records of a run (lines that do not parse are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    records = []
    try:  # bytes that are not UTF-8 spoil their line only (replaced; json skips it)
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and {"step", "train_loss", "val_loss"} <= set(record):
            records.append(record)
    return records


def label(run: Path) -> str:
    """A run directory's name as matplotlib shows it literally: a "$" would start mathtext
    (an error for most names), bytes that are not UTF-8 become replacement characters (an
    error to draw as they come), "." is named, and a leading "_" (which hides a legend entry)
    gets a space before it."""
    name = run.name or run.resolve().name or str(run)
    name = os.fsencode(name).decode("utf-8", "replace").replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Write the loss curves of ``run_dirs`` to one PNG; returns its path."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(
            "matplotlib is not installed; pip install matplotlib for loss plots"
        ) from None
    runs = {Path(d): read_metrics(d) for d in run_dirs}
    if not any(runs.values()):
        raise PlotError("no evaluation records yet in " + ", ".join(map(str, run_dirs)))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for i, (run, records) in enumerate(runs.items()):
        color, name = f"C{i % 10}", label(run)
        steps = [r["step"] for r in records]
        wall = [r.get("wall_sec", r.get("elapsed_sec", 0.0)) for r in records]
        for axis, xs in ((by_step, steps), (by_time, wall)):
            axis.plot(xs, [r["val_loss"] for r in records], color=color, label=f"{name} val")
            axis.plot(
                xs, [r["train_loss"] for r in records], color=color, linestyle="--",
                label=f"{name} train",
            )  # fmt: skip
    by_step.set(xlabel="step", ylabel="loss (nats/char)", title="against steps")
    by_time.set(xlabel="wall time (s)", title="against wall time")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
    by_time.legend(fontsize="small")
    path = Path(out) if out is not None else Path(run_dirs[0]) / FILENAME
    if not path.name:
        raise PlotError(f"--out must name a file, got {str(out)!r}")
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def main(argv: list[str] | None = None) -> int:
    about = "Loss curves (train and validation, against steps and wall time) of runs as a PNG."
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=about)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", metavar="FILE.png", help=f"default: RUN_DIR/{FILENAME} of the first")
    args = p.parse_args(argv)
    drop_closed_stderr()
    try:
        path = plot_runs(args.runs, args.out)
    except PlotError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return print_stdout(PROG, path)


if __name__ == "__main__":
    sys.exit(main())
