"""Train a character language model: ``python -m fastchar.train [flags]``.

``TrainConfig`` is the single config surface (flags map 1:1 to its fields and
it is saved as a plain dict in every checkpoint). ``Trainer`` holds the run
state and splits the loop into batching, one optimisation step, evaluation and
checkpoint save/load, so each can be replaced on its own.

Under ``torchrun --nproc_per_node N -m fastchar.train ...`` the model is wrapped
in DistributedDataParallel. ``--batch-size`` is the global batch: every rank
draws the same global batch (the batch generator is seeded alike on all ranks)
and trains on its own B / N rows, so N ranks take the same steps as one process
with the same flags, up to float summation order (dropout masks differ per
rank). Rank 0 logs and writes checkpoints; evaluation losses are averaged over
ranks; ``--stateful`` gives each rank its B / N streams.

Faults: checkpoints are written to a temp file and renamed, so a kill at any
moment leaves the previous complete ``ckpt.pt``; SIGINT or SIGTERM finishes the
current step, writes ``ckpt.pt`` and exits 0 (a second signal stops at once); a
non-finite loss or gradient stops the run before the update, keeping the last
good checkpoint (or skips the step, with ``--skip-nonfinite``).

Resuming with a different ``--steps`` recomputes the decay for the new total:
the learning rate continues from the new schedule's value at the saved step.

Shape letters: B batch, T block (time) length, V vocabulary, L layers, H hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastchar import data as fdata
from fastchar import distributed
from fastchar.backends import IMPLS, resolve, why_not
from fastchar.model import MODEL_KINDS, NONLINEARITIES, CharRNN

PROG = "fastchar.train"
CKPT_FORMAT = "fastchar-charrnn"
CKPT_VERSION = 1
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")


class TrainError(Exception):
    """An error the CLI reports as one line (bad flag, bad file, bad checkpoint)."""


class ConfigError(TrainError, ValueError):
    pass


class CheckpointError(TrainError):
    pass


def _meta(help: str, **kw) -> dict:
    return {"help": help, **kw}


@dataclass
class TrainConfig:
    """Every setting of a training run. Field ``x_y`` is the flag ``--x-y``."""

    impl: str = field(default="fused", metadata=_meta("kernel implementation", choices=IMPLS))
    model: str = field(default="lstm", metadata=_meta("recurrent cell", choices=MODEL_KINDS))
    data: str | None = field(
        default=None, metadata=_meta("UTF-8 text file (default: Python stdlib sources)")
    )
    steps: int = field(default=400, metadata=_meta("optimisation steps"))
    batch_size: int = field(default=32, metadata=_meta("sequences per batch"))
    block_size: int = field(default=128, metadata=_meta("characters per sequence (BPTT length)"))
    lr: float = field(default=3e-3, metadata=_meta("peak learning rate (AdamW)"))
    min_lr: float | None = field(
        default=None, metadata=_meta("learning rate at the end of the decay (default: lr / 10)")
    )
    warmup: int = field(default=20, metadata=_meta("linear warm-up steps"))
    schedule: str = field(
        default="cosine", metadata=_meta("decay after warm-up", choices=SCHEDULES)
    )
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW weight decay"))
    emb_dim: int = field(default=64, metadata=_meta("character embedding size"))
    hidden: int = field(default=256, metadata=_meta("hidden units per layer"))
    layers: int = field(default=2, metadata=_meta("recurrent layers"))
    dropout: float = field(
        default=0.0, metadata=_meta("dropout between layers and before the head")
    )
    nonlinearity: str = field(
        default="tanh", metadata=_meta("RNN nonlinearity (--model rnn)", choices=NONLINEARITIES)
    )
    grad_clip: float = field(default=1.0, metadata=_meta("gradient norm clip (0 disables)"))
    eval_interval: int = field(default=100, metadata=_meta("steps between evaluations"))
    eval_iters: int = field(default=10, metadata=_meta("batches per evaluation and split"))
    log_interval: int = field(default=10, metadata=_meta("steps between log lines (no terminal)"))
    seed: int = field(default=1337, metadata=_meta("random seed"))
    device: str = field(default="auto", metadata=_meta("device", choices=DEVICES))
    dtype: str = field(
        default="float32",
        metadata=_meta(
            "compute dtype; bfloat16/float16 keep float32 weights and autocast "
            "(float16: CUDA only, with a grad scaler)",
            choices=DTYPES,
        ),
    )
    stateful: bool = field(
        default=False,
        metadata=_meta(
            "truncated BPTT as char-rnn: B parallel streams read in consecutive windows, "
            "hidden state carried across windows and reset each epoch"
        ),
    )
    skip_nonfinite: int = field(
        default=0,
        metadata=_meta(
            "skip the update of a step whose loss or gradients are not finite, up to N "
            "steps in a row (0: stop the run)"
        ),
    )
    threads: int | None = field(
        default=None, metadata=_meta("CPU threads for torch (default: torch's choice)")
    )
    out: str | None = field(default=None, metadata=_meta("run directory (default: runs/<model>)"))
    sample_length: int = field(default=200, metadata=_meta("characters sampled at the end"))
    stop_at: int | None = field(
        default=None,
        metadata=_meta("stop after this step with a checkpoint, as if interrupted (see --resume)"),
    )
    time_limit: float | None = field(
        default=None,
        metadata=_meta(
            "stop after this many seconds in the training loop (evaluations included); "
            "the decay then follows time instead of --steps"
        ),
    )
    preset: str | None = field(
        default=None,
        metadata=_meta(
            "start from a tuned recipe; explicit flags override its settings",
            choices=("shakespeare",),
        ),
    )

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the flag of the first nonsensical setting."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(
                    f"{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name in (
            "steps", "batch_size", "block_size", "emb_dim", "hidden", "layers",
            "eval_interval", "eval_iters", "log_interval",
        ):  # fmt: skip
            _at_least(name, getattr(self, name), 1)
        _at_least("warmup", self.warmup, 0)
        _at_least("sample_length", self.sample_length, 0)
        _at_least("skip_nonfinite", self.skip_nonfinite, 0)
        if self.stop_at is not None:
            _at_least("stop_at", self.stop_at, 1)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        if self.time_limit is not None and not (
            math.isfinite(self.time_limit) and self.time_limit > 0
        ):
            raise ConfigError(f"--time-limit must be seconds > 0, got {self.time_limit}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout"):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("--lr must be > 0")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.dropout >= 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.impl == "cpp" and self.device not in ("auto", "cpu"):
            raise ConfigError(
                f"--impl cpp runs on CPU tensors only, not --device {self.device}; use "
                "--device cpu, or --impl fused to pick the kernel for the device"
            )
        if self.dtype == "float16" and self.device in ("cpu", "mps"):
            raise ConfigError(_FP16_NEEDS_CUDA.format(device=self.device))
        return self

    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)


# Recipes for --preset (TrainConfig fields); flags given on the command line win.
PRESETS: dict[str, dict] = {
    # tinyshakespeare (last 10% validation) in 10 minutes of wall time on a 2-core CPU:
    # a 2 x 512 LSTM trained char-rnn style (32 streams, state carried across
    # 64-char windows: twice the updates of 128-char windows at the same tokens/s,
    # val 1.422 vs 1.454), float32 (the C++ kernels ran bf16 1.4x slower than fp32 on
    # this CPU, which has avx512_bf16 but no AMX), light dropout (0.1 beat 0.25: the
    # budget is about 5 epochs), a short warm-up and a cosine decay to lr/100 timed
    # to end at the limit. Evaluation reads the validation streams from the start
    # (54 windows cover all of it).
    "shakespeare": {
        "data": os.path.join("..", "shared", "data", "tinyshakespeare.txt"),
        "model": "lstm",
        "emb_dim": 64,
        "hidden": 512,
        "layers": 2,
        "dropout": 0.1,
        "batch_size": 32,
        "block_size": 64,
        "stateful": True,
        "dtype": "float32",
        "lr": 2e-3,
        "min_lr": 2e-5,
        "warmup": 50,
        "schedule": "cosine",
        "grad_clip": 1.0,
        "steps": 1_000_000,
        "time_limit": 575.0,
        "eval_interval": 500,
        "eval_iters": 54,
        "sample_length": 500,
        "out": os.path.join("runs", "shakespeare"),
    },
}

_FP16_NEEDS_CUDA = (
    "--dtype float16 needs a CUDA device (it trains with a grad scaler); on {device} "
    "use --dtype bfloat16"
)

# Settings that may change when resuming: how long and how to run, not what is trained.
RESUME_OVERRIDES = frozenset(
    {"impl", "steps", "eval_interval", "eval_iters", "log_interval", "device", "out",
     "sample_length", "stop_at", "data", "skip_nonfinite", "threads", "time_limit"}
)  # fmt: skip
# Run control: on resume these come from the command line, never from the checkpoint.
RUN_CONTROL = frozenset({"stop_at", "out", "device"})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{_flag(name)} must be >= {low}, got {value}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fastchar.train",
        description="Train a character-level LSTM/GRU/RNN language model with fastchar kernels.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" ")[0], str)
        text = f.metadata["help"]
        if "(default" not in text:
            text += f" (default: {f.default})"
        kw = {"type": kind, "help": text}
        if kind is bool:
            kw = {"action": argparse.BooleanOptionalAction, "help": f.metadata["help"]}
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = {int: "N", float: "X"}.get(kind, {"data": "FILE"}.get(f.name, "DIR"))
        p.add_argument(_flag(f.name), dest=f.name, **kw)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its ckpt.pt (model, optimizer, schedule, RNG)",
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[dict, bool]:
    """The flags given explicitly (as TrainConfig fields) and whether to resume."""
    ns = vars(build_parser().parse_args(argv))
    resume = ns.pop("resume", False)
    return ns, resume


def _rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Test hook: a path; a save that would replace an existing file creates it, then
# sleeps with the new file complete but not yet renamed, so a kill lands inside the write.
SAVE_PAUSE_ENV = "FASTCHAR_TEST_SAVE_PAUSE"


def atomic_torch_save(obj: dict, path: str) -> None:
    """Write ``obj`` so that ``path`` always holds either the old or the new complete file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        marker = os.environ.get(SAVE_PAUSE_ENV)
        if marker and os.path.exists(path):
            open(marker, "w").close()
            time.sleep(600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk before the old file counts as replaced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temps(out: str) -> list[str]:
    """Delete temp files a killed run left in ``out`` (the completed files are untouched)."""
    removed = []
    for name in os.listdir(out):
        stale = name.endswith(".tmp") and (
            name.startswith((".ckpt.pt", ".best.pt"))
            or name in ("metrics.jsonl.tmp", "config.json.tmp", "data_manifest.json.tmp")
        )
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
                removed.append(name)
    return removed


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip() or type(e).__name__
    return text.splitlines()[0]


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a fastchar checkpoint (a run directory means its ckpt.pt) as data only."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = (
            f"it holds code or objects ({refused.group(1)}), and checkpoints are loaded as "
            "data only (weights_only=True)"
            if refused
            else _first_line(e)
        )
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): "
            f"{_first_line(e)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a fastchar checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')!r}; this fastchar reads "
            f"version {CKPT_VERSION}"
        )
    missing = [k for k in ("model", "config", "vocab", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(
    ckpt: dict, *, impl: str | None = None, device: str | torch.device = "cpu"
) -> tuple[CharRNN, fdata.Vocab, TrainConfig]:
    """Rebuild the trained CharRNN (eval mode), its vocabulary and config."""
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        vocab = fdata.Vocab.from_dict(ckpt["vocab"])
        model = build_model(cfg, len(vocab), impl=impl or cfg.impl)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint does not describe a usable model: {_first_line(e)}"
        ) from None
    return model.to(device).eval(), vocab, cfg


def build_model(cfg: TrainConfig, vocab_size: int, impl: str | None = None) -> CharRNN:
    return CharRNN(
        vocab_size,
        model=cfg.model,
        emb_dim=cfg.emb_dim,
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
        impl=impl or cfg.impl,
        nonlinearity=cfg.nonlinearity,
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available")
    return torch.device(name)


def check_impl(impl: str, device: torch.device) -> tuple[str, str | None]:
    """The impl that will run and, for a fused fallback, the note that says why."""
    if impl not in ("fused", "reference", "torch"):
        reason = why_not(impl, device.type)
        if reason is not None:
            raise ConfigError(f"--impl {impl} cannot run on {device.type}: {reason}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind = resolve(impl, device)
    note = str(caught[0].message) if caught else None
    return kind, note


def load_corpus(data: str | None) -> tuple[str, dict]:
    if data is None:
        return fdata.default_corpus()
    text = fdata.load_text(data)
    return text, fdata.file_manifest(data, text)


def describe_data(manifest: dict) -> str:
    digest = manifest["sha256"][:12]
    if manifest["source"] == "file":
        return f"{manifest['path']}: {manifest['chars']:,} chars, sha256 {digest}"
    return (
        f"Python {manifest['python']} stdlib sources: {len(manifest['files'])} files, "
        f"{manifest['chars']:,} chars, sha256 {digest}"
    )


def lr_at(cfg: TrainConfig, step: int, wall: float = 0.0) -> float:
    """Learning rate for optimisation step ``step`` (0-based): warm-up, then decay.

    With ``time_limit`` the decay follows ``wall`` (seconds in the training loop)
    towards the limit, or the steps towards ``steps``, whichever is further on.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    if cfg.time_limit is not None:
        progress = max(progress, min(wall / cfg.time_limit, 1.0))
    if cfg.schedule == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        scale = 1.0 - progress
    return cfg.lr - (cfg.lr - cfg.final_lr()) * (1.0 - scale)


class Progress:
    """One self-updating line on a terminal; plain log lines every ``interval`` steps otherwise.

    A disabled Progress (the ranks other than 0) prints nothing.
    """

    def __init__(self, total: int, interval: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total = total
        self.interval = interval
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._open = False

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        if not self.enabled:
            return
        text = (
            f"step {step}/{self.total} | loss {loss:.4f} ({loss / math.log(2):.3f} bpc) | "
            f"{tok_s:,.0f} tok/s | lr {lr:.2e}"
        )
        if self.tty:
            width = 30
            done = int(width * step / self.total)
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            self.stream.flush()
            self._open = True
        elif step % self.interval == 0:
            self.log(text)

    def log(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        print(text, file=self.stream, flush=True)


def _detach(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


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
        if cfg.dtype != "float32" and self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--dtype {cfg.dtype} needs a cpu or cuda device, not {self.device}")
        if cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError(_FP16_NEEDS_CUDA.format(device=self.device.type))
        if cfg.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                f"number of processes, {self.world.size}"
            )
        self.kind, self.impl_note = check_impl(cfg.impl, self.device)
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
        self.lr = lr_at(cfg, self.step, self.wall)
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
            self.state = _detach(state) if cfg.stateful else None
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
        rng = {**_rng_state(self.device), "batch": self.batch_gen.get_state()}
        if self.world.size > 1:
            rng["ranks"] = self.world.gather(_rng_state(self.device))
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
                "next_lr": lr_at(self.cfg, self.step, self.wall),
            },
            "step": self.step,
            "best_val_loss": self.best_val,
            "elapsed_sec": self.elapsed,
            "wall_sec": self.wall,
            "rng": rng,
            "stream_state": stream_state,  # [L, B, H] per state tensor, all ranks' rows
            "world_size": self.world.size,
            "config": self.cfg.to_dict(),
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
            rng = ckpt["rng"]
            ranks = rng.get("ranks")
            if self.world.size > 1 and ranks is not None and len(ranks) == self.world.size:
                _set_rng_state(ranks[self.world.rank])
            else:
                _set_rng_state(rng)
            self.batch_gen.set_state(rng["batch"])
            self.state = self._restore_stream_state(ckpt.get("stream_state"))
            if self.scaler.is_enabled() and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot restore the run from its checkpoint: {_first_line(e)}"
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
        if self.is_main:
            atomic_torch_save(ckpt, path)
        self.world.barrier()

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
        if self.is_main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        ckpt = self.state_dict()
        self.save(os.path.join(out, "ckpt.pt"), ckpt)
        if best:
            self.save(os.path.join(out, "best.pt"), ckpt)
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
        while self.step < last and not self.out_of_time:
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
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
            if self.stop_requested:
                self.save(os.path.join(out, "ckpt.pt"))
                return
            if self.step % cfg.eval_interval and self.step != last and not self.out_of_time:
                continue
            record, best = self.eval_and_checkpoint(
                out,
                {
                    "loss": loss,
                    "tokens_per_sec": window_tokens / window_time,
                    "elapsed_sec": self.elapsed,
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


def _resume_config(given: dict, ckpt: dict) -> TrainConfig:
    try:
        saved = TrainConfig.from_dict(ckpt["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint config is unusable: {_first_line(e)}") from None
    for name, value in given.items():
        if name not in RESUME_OVERRIDES and value != getattr(saved, name):
            raise ConfigError(
                f"{_flag(name)} {value} differs from the checkpoint's {getattr(saved, name)}; "
                "a resumed run keeps its model, optimiser and data settings"
            )
    values = saved.to_dict()
    for name in RUN_CONTROL:
        values[name] = TrainConfig.__dataclass_fields__[name].default
    values.update(given)
    return TrainConfig(**values)


def _trim_metrics(path: str, step: int) -> None:
    """Drop records past the checkpoint's step: they belong to steps that will be redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run(given: dict, resume: bool = False) -> Trainer:
    """Train with the explicitly given settings (TrainConfig field -> value).

    Under torchrun this joins the process group first and leaves it on return.
    """
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
    else:
        preset = given.get("preset")
        cfg = TrainConfig(**{**PRESETS.get(preset, {}), **given})
        cfg.out = out
    cfg.validate()
    try:
        world = distributed.world_from_env()
    except distributed.DistError as e:
        raise ConfigError(str(e)) from None
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = distributed.init(world, pick_device(cfg.device))
    trainer = None
    try:
        trainer = _train(cfg, ckpt, world, device)
        return trainer
    finally:
        if trainer is not None:
            # DDP's reducer must go while the process group it holds still exists.
            trainer.net = trainer.model
        distributed.shutdown()


def _train(cfg: TrainConfig, ckpt: dict | None, world: distributed.World, device) -> Trainer:
    out = cfg.out
    ckpt_path = os.path.join(out, "ckpt.pt")
    progress = Progress(cfg.steps, cfg.log_interval, enabled=world.is_main)
    log = progress.log

    text, manifest = load_corpus(cfg.data)
    vocab = None
    if ckpt is not None:
        if manifest["sha256"] != ckpt.get("data_manifest", {}).get("sha256"):
            raise CheckpointError(
                "--resume: the training data changed since the checkpoint (SHA-256 differs)"
            )
        try:
            vocab = fdata.Vocab.from_dict(ckpt["vocab"])
        except fdata.DataError as e:
            raise CheckpointError(f"checkpoint vocabulary is unusable: {e}") from None
    trainer = Trainer(cfg, text, manifest, vocab, world=world, device=device)
    if world.is_main:
        os.makedirs(out, exist_ok=True)
        removed = remove_stale_temps(out)
        if removed:
            log(f"removed temp files of an interrupted write: {', '.join(sorted(removed))}")
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        if world.is_main:
            _trim_metrics(os.path.join(out, "metrics.jsonl"), trainer.step)
        log(f"resumed {ckpt_path} at step {trainer.step}")
    elif world.is_main:
        open(os.path.join(out, "metrics.jsonl"), "w").close()
        _write_json(os.path.join(out, "data_manifest.json"), manifest)
    if world.is_main:
        _write_json(os.path.join(out, "config.json"), cfg.to_dict())

    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"data: {describe_data(manifest)} (manifest: {os.path.join(out, 'data_manifest.json')})")
    ranks = f", {world.size} processes (DDP)" if world.size > 1 else ""
    log(
        f"model: {cfg.model} {cfg.layers}x{cfg.hidden}, {n_params:,} parameters, vocab "
        f"{len(trainer.vocab)} | impl {cfg.impl} -> {trainer.kind} on {trainer.device} "
        f"({cfg.dtype}, {torch.get_num_threads()} threads{ranks})"
    )
    if trainer.impl_note:
        log(trainer.impl_note)

    with stop_on_signals(trainer):
        trainer.fit(out, progress)
    if trainer.stop_requested:
        log(
            f"stopped by a signal at step {trainer.step} of {cfg.steps}; checkpoint written; "
            f"continue with --resume --out {out}"
        )
    elif trainer.step < cfg.steps and not trainer.out_of_time:
        log(f"stopped at step {trainer.step} of {cfg.steps}; continue with --resume --out {out}")
    else:
        if trainer.out_of_time:
            log(f"time limit of {cfg.time_limit:g} s reached at step {trainer.step}")
        if cfg.sample_length > 0 and world.is_main:
            text = trainer.sample(cfg.sample_length)
            log(f"sample ({cfg.sample_length} chars, temperature 0.8):")
            print(text, flush=True)
    return trainer


def main(argv: list[str] | None = None) -> int:
    try:
        given, resume = parse_args(argv)
        run(given, resume)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (TrainError, fdata.DataError, OSError) as e:
        print(f"{PROG}: error: {_rank_tag()}{e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _rank_tag() -> str:
    """``[rank R] `` under torchrun with several processes, so each rank's line is told apart."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and "RANK" in os.environ:
        return f"[rank {os.environ['RANK']}] "
    return ""


def exit_process(code: int) -> None:
    """Exit with ``code``; under torchrun, skip the interpreter's teardown.

    With gloo, a rank that has finished (checkpoint written, process group
    destroyed) can still abort in torch's C++ teardown ("terminate called without
    an active exception", about 1 run in 15 here), which fails the whole torchrun
    job. Nothing is left to do at that point, so leave without the teardown.
    """
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
