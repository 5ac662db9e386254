"""The Trainer: one training run's state, split into batching, one optimisation step,
evaluation and checkpoint save/load, so each can be replaced on its own (the
learning-rate schedule is schedule.lr_at).

Under torchrun the model is wrapped in DistributedDataParallel. ``--batch-size`` is the
global batch: every rank draws the same global batch (the batch generator is seeded alike
on all ranks) and trains on its own B / N rows, so N ranks take the same steps as one
process with the same flags, up to float summation order (dropout masks differ per
rank). Rank 0 logs and writes checkpoints; evaluation losses are averaged over ranks;
``--stateful`` gives each rank its B / N streams.

A non-finite loss or gradient stops the run before the update, keeping the last good
checkpoint (or skips the step, with ``--skip-nonfinite``).

Shape letters: B batch, T block (time) length, V vocabulary, L layers, H hidden.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from fastchar import data as fdata
from fastchar import distributed
from fastchar.atomic import naming
from fastchar.training.checkpoint import (
    CKPT_FORMAT,
    CKPT_VERSION,
    atomic_torch_save,
    build_model,
    rng_state,
    set_rng_state,
)
from fastchar.training.config import AUTOCAST_DTYPES, FP16_NEEDS_CUDA, TrainConfig
from fastchar.training.device import (
    DtypeTrial,
    check_impl,
    check_torch_bf16,
    pick_device,
    pick_dtype,
)
from fastchar.training.errors import CheckpointError, ConfigError, TrainError, first_line
from fastchar.training.progress import Progress
from fastchar.training.schedule import lr_at


def _map_state(state, fn):
    """``fn`` applied to each tensor of a carried state (a tensor, a tuple of them, None)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(fn(s) for s in state)
    return fn(state)


def _state_list(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


class Trainer:
    """One training run: model, optimizer, schedule, data, RNG and step counter.

    ``world`` is this process's data-parallel rank (``distributed.World()`` when
    alone); with more than one rank the process group must already be up.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        text: str,
        manifest: dict,
        vocab: fdata.Vocab | None = None,
        world: distributed.World | None = None,
        device: torch.device | None = None,
    ):
        self.cfg = cfg
        self.world = world or distributed.World()
        self.device = device or pick_device(cfg.device)
        if cfg.dtype not in ("float32", "auto") and self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--dtype {cfg.dtype} needs a cpu or cuda device, not {self.device}")
        if cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError(FP16_NEEDS_CUDA.format(device=self.device.type))
        if cfg.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                f"number of processes, {self.world.size}"
            )
        digests = self.world.gather(manifest["sha256"])
        if len(set(digests)) > 1:  # another node's copy of --data, another Python's stdlib
            raise ConfigError(
                "the ranks read different training data (SHA-256 "
                f"{', '.join(f'rank {r}: {d[:12]}' for r, d in enumerate(digests))}); every "
                "rank must read the same --data"
            )
        self.kind, self.impl_note = check_impl(cfg.impl, self.device)
        dtype, self.dtype_note = pick_dtype(
            cfg.dtype,
            self.kind,
            self.device,
            cfg.model,
            cfg.batch_size // self.world.size,
            cfg.hidden,
        )
        # Every rank trains in rank 0's pick (each rank's own timings could differ).
        dtype, self.dtype_note = self.world.gather((dtype, self.dtype_note))[0]
        self.dtype_trial: DtypeTrial | None = None
        if cfg.dtype == "auto" and DtypeTrial.wanted(dtype, cfg.time_limit, cfg.steps):
            self.dtype_trial = DtypeTrial(cfg.time_limit, cfg.steps)
            dtype = self.dtype_trial.dtype_at(0)
            self.dtype_note += (
                f"; under the time limit the first {DtypeTrial.span()} steps time float32 "
                "and bfloat16 training steps, and the steps each reaches decide"
            )
        if dtype != cfg.dtype:
            self.cfg = cfg = dataclasses.replace(cfg, dtype=dtype)
        check_torch_bf16(self.kind, dtype, self.device, cfg.model)
        self.manifest = manifest
        self.vocab = vocab or fdata.Vocab.from_text(text)
        try:
            ids = self.vocab.encode(text)  # [N]
        except ValueError as e:
            raise fdata.DataError(f"the data does not match the vocabulary: {e}") from None
        self.train_data, self.val_data = fdata.split(ids)
        what = {"train": "the training split", "val": "the validation split (last 10%)"}
        if cfg.stateful:
            self.streams = {
                split: fdata.Streams(data, cfg.batch_size, cfg.block_size, what[split])
                for split, data in (("train", self.train_data), ("val", self.val_data))
            }
        else:
            fdata.check_length(self.train_data, cfg.block_size, what["train"])
            fdata.check_length(self.val_data, cfg.block_size, what["val"])
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = build_model(cfg, len(self.vocab)).to(self.device)
        self.net: torch.nn.Module = self.model
        if self.world.size > 1:
            # Same initial weights on every rank (same seed), different dropout masks.
            torch.manual_seed(cfg.seed + self.world.rank)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr_at(cfg, 0), betas=(0.9, 0.99),
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "float16")
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.best_val = math.inf
        self.elapsed = 0.0  # seconds in training steps
        self.wall = 0.0  # seconds in the training loop, evaluations included (same on all ranks)
        self.decay_floor = 0.0  # lr_at's floor: set where a resume trains past a time limit
        self._clock: tuple[float, float] | None = None  # (perf_counter, wall) when fit started
        self.lr = lr_at(cfg, 0)
        self.state = None  # --stateful: this rank's carried hidden state, detached
        self.skipped = 0  # steps skipped in a row for a non-finite loss
        self.stop_signal: int | None = None  # set by a signal handler
        self.stop_requested = False  # the signal reached every rank: stop after this step

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.cfg.dtype)
        return torch.autocast(
            self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    def next_batch(self, split: str = "train", generator: torch.Generator | None = None):
        """Random windows: this rank's rows of the global batch (x, y [B / ranks, T])."""
        source = self.train_data if split == "train" else self.val_data
        x, y = fdata.get_batch(
            source, self.cfg.batch_size, self.cfg.block_size, generator or self.batch_gen
        )  # [B, T]
        rows = self.world.rows(self.cfg.batch_size)
        return x[rows].to(self.device), y[rows].to(self.device)

    def stream_batch(self, split: str, index: int):
        """Window ``index`` of this rank's streams (x, y [B / ranks, T])."""
        x, y = self.streams[split].window(index)  # [B, T]
        rows = self.world.rows(self.cfg.batch_size)
        return x[rows].to(self.device), y[rows].to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor, state=None, net=None):
        """Mean cross-entropy of predicting y [B, T] from x [B, T]; returns (loss, final state)."""
        with self.autocast():
            logits, state = (net or self.net)(x, state)  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), state

    def train_step(self) -> float:
        """One optimisation step on the next batch; returns its loss (mean over ranks)."""
        cfg = self.cfg
        self.lr = lr_at(cfg, self.step, self.wall, self.decay_floor)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.net.train()
        if cfg.stateful:
            if self.streams["train"].starts_epoch(self.step):
                self.state = None
            x, y = self.stream_batch("train", self.step)
        else:
            x, y = self.next_batch()
        loss, state = self.loss(x, y, self.state)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        # One collective for all three: every rank must take the same branches from here.
        mean_loss, stop, self.wall = self.world.mean(
            [loss.item(), float(self.stop_signal is not None), self._wall_now()]
        )
        self.stop_requested = stop > 0
        # The grad scaler skips float16 overflow steps itself and lowers its scale.
        finite = math.isfinite(mean_loss) and (self.scaler.is_enabled() or math.isfinite(norm))
        self.step += 1
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped = 0
            self.state = _map_state(state, torch.Tensor.detach) if cfg.stateful else None
            return mean_loss
        what = f"loss {mean_loss}" if not math.isfinite(mean_loss) else f"gradient norm {norm}"
        if self.skipped < cfg.skip_nonfinite:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.state = None
            return mean_loss
        raise TrainError(
            f"non-finite {what} at step {self.step}; stopped before updating the weights, "
            "the last checkpoint is kept (try a lower --lr, a --grad-clip, or --skip-nonfinite N)"
        )

    def _wall_now(self) -> float:
        if self._clock is None:
            return self.wall
        start, base = self._clock
        return base + time.perf_counter() - start

    @property
    def out_of_time(self) -> bool:
        return self.cfg.time_limit is not None and self.wall >= self.cfg.time_limit

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` batches per split, the same batches every time.

        Random windows come from a fixed seed; ``--stateful`` reads the first
        ``eval_iters`` windows of each split's streams from a zero state, carrying it.
        Each rank evaluates its rows of every batch and the means are averaged.
        """
        self.model.eval()
        result = []
        for split in ("train", "val"):
            losses = []
            if self.cfg.stateful:
                state = None
                for k in range(self.cfg.eval_iters):
                    if self.streams[split].starts_epoch(k):
                        state = None
                    loss, state = self.loss(*self.stream_batch(split, k), state, net=self.model)
                    losses.append(loss.item())
            else:
                gen = torch.Generator().manual_seed(self.cfg.seed + 1)
                for _ in range(self.cfg.eval_iters):
                    losses.append(self.loss(*self.next_batch(split, gen), net=self.model)[0].item())
            result.append(sum(losses) / len(losses))
        self.model.train()
        train_loss, val_loss = self.world.mean(result)
        return {"train": train_loss, "val": val_loss}

    def state_dict(self) -> dict:
        """The checkpoint. Collective under torchrun: every rank must call it."""
        rng = {**rng_state(self.device), "batch": self.batch_gen.get_state()}
        if self.world.size > 1:
            rng["ranks"] = self.world.gather(rng_state(self.device))
        stream_state = None
        if self.state is not None:
            # float32 for the gather: not every backend reduces bfloat16.
            stream_state = [
                self.world.cat_rows(s.float(), 1).to(s.dtype) for s in _state_list(self.state)
            ]
        ckpt = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {
                "name": self.cfg.schedule,
                "warmup": self.cfg.warmup,
                "steps": self.cfg.steps,
                "next_lr": lr_at(self.cfg, self.step, self.wall, self.decay_floor),
                "decay_floor": self.decay_floor,
            },
            "step": self.step,
            "best_val_loss": self.best_val,
            "elapsed_sec": self.elapsed,
            "wall_sec": self.wall,
            "rng": rng,
            "stream_state": stream_state,  # [L, B, H] per state tensor, all ranks' rows
            "world_size": self.world.size,
            # During the trial the dtype is not chosen yet: a resumed run runs it again.
            "config": self.cfg.to_dict()
            | ({"dtype": "auto"} if self.dtype_trial is not None else {}),
            "vocab": self.vocab.to_dict(),
            "data_manifest": self.manifest,
        }
        if self.scaler.is_enabled():
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt

    def load_state_dict(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step = int(ckpt["step"])
            self.best_val = float(ckpt["best_val_loss"])
            self.elapsed = float(ckpt["elapsed_sec"])
            self.wall = float(ckpt.get("wall_sec", self.elapsed))
            self.decay_floor = float(ckpt.get("schedule", {}).get("decay_floor", 0.0))
            limit = ckpt["config"].get("time_limit")
            if limit is not None and self.cfg.time_limit is None:
                # it reached its time limit and trains on without one: from where its
                # decay got to (the end), not back up the steps' schedule
                self.decay_floor = max(self.decay_floor, min(self.wall / limit, 1.0))
            rng = ckpt["rng"]
            ranks = rng.get("ranks")
            if self.world.size > 1 and ranks is not None and len(ranks) == self.world.size:
                set_rng_state(ranks[self.world.rank])
            else:
                set_rng_state(rng)
            self.batch_gen.set_state(rng["batch"])
            self.state = self._restore_stream_state(ckpt.get("stream_state"))
            if self.cfg.dtype == "float32":  # auto's trial, too, starts in float32
                # A checkpoint written during auto's trial may hold a bfloat16 state, and
                # float32 steps take float32 states only.
                self.state = _map_state(self.state, torch.Tensor.float)
            if self.scaler.is_enabled() and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(
                f"cannot restore the run from its checkpoint: {first_line(e)}"
            ) from None

    def _restore_stream_state(self, saved):
        if not self.cfg.stateful or saved is None:
            return None
        n_states = 2 if self.cfg.model == "lstm" else 1
        want = (self.cfg.layers, self.cfg.batch_size, self.cfg.hidden)
        if len(saved) != n_states or any(tuple(s.shape) != want for s in saved):
            raise ValueError(f"the carried stream state does not fit [L, B, H] = {list(want)}")
        rows = self.world.rows(self.cfg.batch_size)
        parts = [s[:, rows].to(self.device) for s in saved]  # [L, B / ranks, H]
        return tuple(parts) if n_states == 2 else parts[0]

    def save(self, path: str, ckpt: dict | None = None) -> None:
        """Write the checkpoint to ``path`` from rank 0. Collective under torchrun."""
        ckpt = ckpt or self.state_dict()
        with self.world.together():  # a failed write (disk full) stops every rank
            if self.is_main:
                atomic_torch_save(ckpt, path)

    def eval_and_checkpoint(self, out: str, record: dict) -> tuple[dict, bool]:
        """Evaluate, append to metrics.jsonl, write ckpt.pt (and best.pt when val improves)."""
        losses = self.evaluate()
        record = {
            "step": self.step,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "train_bpc": losses["train"] / math.log(2),
            "val_bpc": losses["val"] / math.log(2),
            **record,
        }
        best = losses["val"] < self.best_val
        if best:
            self.best_val = losses["val"]
        with self.world.together():
            if self.is_main:
                path = os.path.join(out, "metrics.jsonl")
                with naming(path), open(path, "a", encoding="utf-8") as f:  # appended in place
                    f.write(json.dumps(record) + "\n")
        ckpt = self.state_dict()
        if best:  # first: a run killed between the two resumes from the older ckpt.pt, whose
            # best_val_loss then lets it write this best.pt again
            self.save(os.path.join(out, "best.pt"), ckpt)
        self.save(os.path.join(out, "ckpt.pt"), ckpt)
        return record, best

    def fit(self, out: str, progress: Progress) -> None:
        """Train up to ``steps`` (or ``stop_at``, or ``time_limit``), evaluating and
        checkpointing on the way.

        Returns early, with ``ckpt.pt`` written, once a stop signal reached every rank.
        """
        cfg = self.cfg
        last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        tokens_per_step = cfg.batch_size * cfg.block_size
        window_tokens, window_time = 0, 0.0
        self._clock = (time.perf_counter(), self.wall)
        trial = self.dtype_trial
        if trial is not None and not any(trial.times.values()):
            trial.start = self.step  # a resumed run's trial starts at its own step
        while self.step < last and not self.out_of_time:
            if self.dtype_trial is not None:
                self._use_dtype(self.dtype_trial.dtype_at(self.step))
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
            if self.dtype_trial is not None:
                self._trial_step(dt, progress)
            self.elapsed += dt
            window_tokens += tokens_per_step
            window_time += dt
            lr = self.lr
            if self.skipped:
                progress.log(
                    f"step {self.step}: loss {loss}, update skipped "
                    f"({self.skipped} of at most {cfg.skip_nonfinite} in a row)"
                )
            progress.update(self.step, loss, tokens_per_step / dt, lr)
            if self.step % cfg.eval_interval and self.step != cfg.steps and not self.out_of_time:
                # --stop-at stops as a signal would: with a checkpoint, no extra evaluation
                if self.stop_requested or self.step == last:
                    self.save(os.path.join(out, "ckpt.pt"))
                    return
                continue
            # An evaluation step evaluates even when a stop was asked during it, so that a
            # resumed run's metrics and best.pt are an uninterrupted run's.
            record, best = self.eval_and_checkpoint(
                out,
                {
                    "loss": loss,
                    "tokens_per_sec": window_tokens / window_time,
                    "elapsed_sec": self.elapsed,
                    "wall_sec": self.wall,
                    "lr": lr,
                    "tokens": self.step * tokens_per_step,
                    "impl": self.kind,
                },
            )
            window_tokens, window_time = 0, 0.0
            progress.log(
                f"eval step {self.step}: train {record['train_loss']:.4f} "
                f"({record['train_bpc']:.3f} bpc) | val {record['val_loss']:.4f} "
                f"({record['val_bpc']:.3f} bpc) | {record['tokens_per_sec']:,.0f} tok/s"
                + (" | best" if best else "")
            )
            if not self.stop_requested:  # a signal during the evaluation: stop now, not a step on
                self.stop_requested = self.world.any(self.stop_signal is not None)
            if self.stop_requested:
                return

    def _use_dtype(self, dtype: str) -> None:
        if dtype != self.cfg.dtype:
            self.cfg = dataclasses.replace(self.cfg, dtype=dtype)
            # --stateful: a state carried from a bfloat16 step is bfloat16; a float32 step
            # takes float32 states only and an autocast one takes them too, so the state
            # is float32 at every switch.
            self.state = _map_state(self.state, torch.Tensor.float)

    def _trial_step(self, seconds: float, progress: Progress) -> None:
        """--dtype auto's trial (DtypeTrial): step ``self.step``'s time, and once the
        trial is over, the dtype for the rest of the run (the same on every rank)."""
        trial = self.dtype_trial
        trial.record(self.step - 1, seconds)
        if not trial.done(self.step):
            return
        medians = trial.medians()
        seconds = dict(zip(medians, self.world.mean(list(medians.values())), strict=True))
        dtype, self.dtype_note = trial.decide(self.step, self.wall, seconds)
        self._use_dtype(dtype)
        self.dtype_trial = None
        progress.log(self.dtype_note)

    def sample(self, length: int, temperature: float = 0.8) -> str:
        """A seeded sample from a newline prime (or the first character), prime included."""
        prime = "\n" if "\n" in self.vocab else self.vocab.chars[0]
        ids = self.model.generate(
            self.vocab.encode(prime),
            length,
            temperature=temperature,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        return prime + self.vocab.decode(ids)
