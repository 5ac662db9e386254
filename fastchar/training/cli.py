"""``python -m fastchar.train [flags]``: a training run from the command line.

Faults: checkpoints are written to a temp file and renamed, so a kill at any moment
leaves the previous complete ``ckpt.pt``; SIGINT or SIGTERM finishes the current step
(and its evaluation), writes ``ckpt.pt`` and exits 0 (a second signal stops at once). Bad
flags and --config files exit 2, bad data files or checkpoints 1, each with one line on
stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading

import torch

from fastchar import data as fdata
from fastchar import distributed, plot
from fastchar.atomic import atomic_write
from fastchar.training.checkpoint import load_checkpoint, remove_stale_temps
from fastchar.training.config import (
    PRESETS,
    RESUME_OVERRIDES,
    RUN_CONTROL,
    TrainConfig,
    flag_name,
    parse_args,
)
from fastchar.training.corpora import data_path, describe_data, is_file, load_corpus
from fastchar.training.device import pick_device
from fastchar.training.errors import (
    CheckpointError,
    ConfigError,
    TrainError,
    drop_closed_stderr,
    environment_error,
    first_line,
    print_stdout,
)
from fastchar.training.loop import Trainer
from fastchar.training.progress import Progress

PROG = "fastchar.train"


def _resume_config(given: dict, ckpt: dict) -> TrainConfig:
    try:
        saved = TrainConfig.from_dict(ckpt["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint config is unusable: {first_line(e)}") from None
    if given.get("dtype") == "auto":  # the checkpoint holds what auto chose: keep it
        given = {k: v for k, v in given.items() if k != "dtype"}
    for name, value in given.items():
        if name not in RESUME_OVERRIDES and value != getattr(saved, name):
            raise ConfigError(
                f"{flag_name(name)} {value} differs from the checkpoint's {getattr(saved, name)}; "
                "a resumed run keeps its model, optimiser and data settings"
            )
    values = saved.to_dict()
    for name in RUN_CONTROL:
        values[name] = TrainConfig.__dataclass_fields__[name].default
    values.update(given)
    return TrainConfig(**values)


# What a run leaves in its --out besides the files every start rewrites (metrics.jsonl,
# config.json, data_manifest.json): a fresh run removes a previous run's, so that no
# best.pt or plot of another model is left beside the new run's files.
RUN_OUTPUTS = ("ckpt.pt", "best.pt", plot.FILENAME)


def _trim_metrics(path: str, step: int) -> None:
    """Drop records past the checkpoint's step: they belong to steps that will be redone."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad line is dropped below
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        with atomic_write(path) as f:
            f.writelines(keep)


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def run(given: dict, resume: bool = False) -> Trainer:
    """Train with the explicitly given settings (TrainConfig field -> value).

    Under torchrun this joins the process group first and leaves it on return.
    """
    for flag, what in (("out", "a directory"), ("data", "a corpus or a file")):
        if given.get(flag) == "":  # not the default, nor the working directory, silently
            raise ConfigError(f"--{flag} must name {what}, got ''")
    out = (
        given.get("out")
        or PRESETS.get(given.get("preset"), {}).get("out")
        or TrainConfig(model=given.get("model", "lstm")).run_dir()
    )
    ckpt_path = os.path.join(out, "ckpt.pt")
    ckpt = None
    if resume:
        if not os.path.exists(ckpt_path):
            raise CheckpointError(f"--resume: no checkpoint to resume at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        cfg = _resume_config({**given, "out": out}, ckpt)
        recorded = ckpt.get("data_manifest", {}).get("path")
        if "data" not in given and is_file(cfg.data) and not os.path.exists(cfg.data) and recorded:
            cfg.data = recorded  # a relative --data of a run from another directory
        cfg.data = data_path(cfg.data)
        if ckpt["step"] >= cfg.steps:
            raise ConfigError(
                f"--resume: {ckpt_path} is at step {ckpt['step']} of --steps {cfg.steps}, so "
                f"there is nothing to train; give --steps above {ckpt['step']} to continue"
            )
    else:
        preset = given.get("preset")
        cfg = TrainConfig(**{**PRESETS.get(preset, {}), **given})
        cfg.out = out
        cfg.data = data_path(cfg.data)
    cfg.validate()
    try:
        world = distributed.world_from_env()
    except distributed.DistError as e:
        raise ConfigError(str(e)) from None
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        device = distributed.init(world, pick_device(cfg.device))
    except distributed.DistError as e:
        raise ConfigError(str(e)) from None
    trainer, done = None, False
    try:
        trainer = _train(cfg, ckpt, world, device)
        done = True
        return trainer
    finally:
        if trainer is not None:
            # DDP's reducer must go while the process group it holds still exists.
            trainer.net = trainer.model
        distributed.shutdown(wait=done)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask ``trainer`` to stop after its current step; a second one acts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer.stop_signal = signum
        signal.signal(
            signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _load_data(cfg: TrainConfig, ckpt: dict | None, log) -> tuple[str, dict, fdata.Vocab | None]:
    """The corpus, its manifest and, on a resume, the checkpoint's vocabulary (the data
    checked against the checkpoint's). A resume of a run that reached its time limit
    trains on without one (``cfg.time_limit`` dropped)."""
    text, manifest = load_corpus(cfg.data, log)
    if ckpt is None:
        return text, manifest, None
    if manifest["sha256"] != ckpt.get("data_manifest", {}).get("sha256"):
        raise CheckpointError(
            "--resume: the training data changed since the checkpoint (SHA-256 differs)"
        )
    try:
        vocab = fdata.Vocab.from_dict(ckpt["vocab"])
    except fdata.DataError as e:
        raise CheckpointError(f"checkpoint vocabulary is unusable: {e}") from None
    limit, wall = cfg.time_limit, float(ckpt.get("wall_sec", 0.0))
    if limit is not None and wall >= limit and limit == ckpt["config"].get("time_limit"):
        # the run stopped at its limit and more --steps are asked: train them
        log(
            f"note: the run reached its --time-limit of {limit:g} s; this resume trains "
            "to --steps without one, at the learning rate its decay ended on "
            "(--time-limit sets a new one)"
        )
        cfg.time_limit = None
    return text, manifest, vocab


def _prepare_out(trainer: Trainer, cfg: TrainConfig, ckpt: dict | None, is_main: bool, log):
    """Restores the checkpoint (on every rank); on rank 0, readies the run directory: a
    resumed run's metrics past its checkpoint dropped, a fresh run's predecessor's files
    removed, and config.json (``cfg``, the settings given) written."""
    out = cfg.out
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
    if not is_main:
        return
    os.makedirs(out, exist_ok=True)
    removed = remove_stale_temps(out)
    if removed:
        log(f"removed temp files of an interrupted write: {', '.join(sorted(removed))}")
    if ckpt is not None:
        _trim_metrics(os.path.join(out, "metrics.jsonl"), trainer.step)
    else:
        previous = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
        if "ckpt.pt" in previous or "best.pt" in previous:
            log(
                f"note: {out} held a previous run; this fresh run replaces it (removed "
                f"{', '.join(previous)}; --resume continues a run)"
            )
            for name in previous:
                os.unlink(os.path.join(out, name))
        open(os.path.join(out, "metrics.jsonl"), "w").close()
        _write_json(os.path.join(out, "data_manifest.json"), trainer.manifest)
    _write_json(os.path.join(out, "config.json"), cfg.to_dict())


def _train(cfg: TrainConfig, ckpt: dict | None, world: distributed.World, device) -> Trainer:
    out = cfg.out
    ckpt_path = os.path.join(out, "ckpt.pt")
    progress = Progress(cfg.steps, cfg.log_interval, enabled=world.is_main)
    log = progress.log

    with world.together():  # one rank's missing or unreadable copy fails every rank
        text, manifest, vocab = _load_data(cfg, ckpt, log)
    trainer = Trainer(cfg, text, manifest, vocab, world=world, device=device)
    with world.together():  # rank 0's files: a failure there stops every rank
        _prepare_out(trainer, cfg, ckpt, world.is_main, log)
    if ckpt is not None:
        log(f"resumed {ckpt_path} at step {trainer.step}")

    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"data: {describe_data(manifest)} (manifest: {os.path.join(out, 'data_manifest.json')})")
    ranks = f", {world.size} processes (DDP)" if world.size > 1 else ""
    log(
        f"model: {cfg.model} {cfg.layers}x{cfg.hidden}, {n_params:,} parameters, vocab "
        f"{len(trainer.vocab)} | impl {cfg.impl} -> {trainer.kind} on {trainer.device} "
        f"({'auto: on trial' if trainer.dtype_trial else trainer.cfg.dtype}, "
        f"{torch.get_num_threads()} threads{ranks})"
    )
    if trainer.impl_note:
        log(trainer.impl_note)
    if trainer.dtype_note:
        log(trainer.dtype_note)

    with stop_on_signals(trainer):
        try:
            trainer.fit(out, progress)
        finally:
            progress.close()
    if world.is_main:
        _plot(out, log)
    if trainer.stop_requested and trainer.step < cfg.steps:
        log(
            f"stopped by a signal at step {trainer.step} of {cfg.steps}; checkpoint written; "
            f"continue with --resume --out {out}"
        )
    elif trainer.stop_requested:  # at the last step, evaluated: the run is complete
        log(f"stopped by a signal at step {trainer.step}, the last; checkpoint written, no sample")
    elif trainer.step < cfg.steps and not trainer.out_of_time:
        log(f"stopped at step {trainer.step} of {cfg.steps}; continue with --resume --out {out}")
    else:
        if trainer.out_of_time:
            log(f"time limit of {cfg.time_limit:g} s reached at step {trainer.step}")
        if cfg.sample_length > 0 and world.is_main:
            text = trainer.sample(cfg.sample_length)
            log(f"sample ({cfg.sample_length} chars, temperature 0.8):")
            code = print_stdout(PROG, text)
            if code:
                raise SystemExit(code)
    return trainer


def _plot(out: str, log) -> None:
    """The run's loss curves as out/loss.png; a missing matplotlib is one line, not an error."""
    try:
        log(f"loss plot: {plot.plot_runs([out])}")
    except plot.PlotError as e:
        log(f"no loss plot: {e}")


def main(argv: list[str] | None = None) -> int:
    drop_closed_stderr()
    try:
        given, resume = parse_args(argv)
        run(given, resume)
    except SystemExit as e:  # --help, stdout_failed
        return e.code if isinstance(e.code, int) else 0
    except (TrainError, fdata.DataError, OSError, distributed.PeerFailed) as e:
        _error_line(e)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        why = environment_error(
            e, "use a smaller --hidden, --layers, --emb-dim, --batch-size or --block-size"
        )
        if why is None:
            raise
        _error_line(why)
        return 1
    return 0


def _error_line(why: object) -> None:
    """The CLI's error line, written at once: under torchrun every rank writes one to the
    same stderr, and lines written in two parts would interleave."""
    sys.stderr.write(f"{PROG}: error: {_rank_tag()}{why}\n")
    sys.stderr.flush()


def _rank_tag() -> str:
    """``[rank R] `` under torchrun with several processes, so each rank's line is told apart."""
    if distributed.launched() and "RANK" in os.environ:
        return f"[rank {os.environ['RANK']}] "
    return ""


def exit_process(code: int) -> None:
    """Exit with ``code``; under torchrun, skip the interpreter's teardown.

    With gloo, a rank that has finished (checkpoint written, process group
    destroyed) can still abort in torch's C++ teardown ("terminate called without
    an active exception", about 1 run in 15 here), which fails the whole torchrun
    job. Nothing is left to do at that point, so leave without the teardown.
    """
    if not distributed.launched():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
