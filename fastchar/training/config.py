"""TrainConfig, the single config surface of a training run, with its presets, TOML
recipes and command-line parser (flags map 1:1 to its fields; it is saved as a plain dict
in every checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastchar.backends import IMPLS
from fastchar.model import MODEL_KINDS, NONLINEARITIES
from fastchar.training.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_SIZE = 2**31 - 1  # the largest --hidden, --batch-size, ... (sizes, not memory: see OOM)
DTYPES = ("float32", "bfloat16", "float16", "auto")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")
_PRESET_DIR = Path(__file__).with_name("presets")
PRESET_NAMES = tuple(sorted(p.stem for p in _PRESET_DIR.glob("*.toml")))


def _meta(help: str, **kw) -> dict:
    return {"help": help, **kw}


@dataclass
class TrainConfig:
    """Every setting of a training run. Field ``x_y`` is the flag ``--x-y``."""

    impl: str = field(default="fused", metadata=_meta("kernel implementation", choices=IMPLS))
    model: str = field(default="lstm", metadata=_meta("recurrent cell", choices=MODEL_KINDS))
    data: str | None = field(
        default=None,
        metadata=_meta(
            "corpus: shakespeare (fetched once into the cache), stdlib (Python's stdlib "
            "sources) or a UTF-8 text file (default: stdlib)"
        ),
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
            "(float16: CUDA only, with a grad scaler); auto: bfloat16 where this CPU's "
            "bf16 step GEMMs measure >= 1.5x its float32 ones (under --time-limit with "
            ">= 128 --steps: and its first 16 steps, 8 float32 then 8 bfloat16, timed, "
            "project >= 1.5x float32's steps by the limit), else float32",
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
            "the decay then ends at the limit or at --steps, whichever comes first"
        ),
    )
    preset: str | None = field(
        default=None,
        metadata=_meta(
            "start from a tuned recipe; explicit flags override its settings",
            choices=PRESET_NAMES,
        ),
    )

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the flag of the first nonsensical setting."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(
                    f"{flag_name(f.name)} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name in (
            "steps", "batch_size", "block_size", "emb_dim", "hidden", "layers",
            "eval_interval", "eval_iters", "log_interval",
        ):  # fmt: skip
            _at_least(name, getattr(self, name), 1)
        _at_least("warmup", self.warmup, 0)
        _at_least("sample_length", self.sample_length, 0)
        for name in ("batch_size", "block_size", "emb_dim", "hidden", "layers", "sample_length"):
            if getattr(self, name) > MAX_SIZE:  # a tensor's size: beyond it torch overflows
                raise ConfigError(
                    f"{flag_name(name)} must be <= {MAX_SIZE}, got {getattr(self, name)}"
                )
        _at_least("skip_nonfinite", self.skip_nonfinite, 0)
        if self.stop_at is not None:
            _at_least("stop_at", self.stop_at, 1)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
            if self.threads > MAX_THREADS:  # torch's OpenMP pool crashed at 100000
                raise ConfigError(f"--threads must be <= {MAX_THREADS}, got {self.threads}")
        if not -(2**63) <= self.seed < 2**63:
            raise ConfigError(f"--seed must fit in a signed 64-bit integer, got {self.seed}")
        if self.time_limit is not None and not (
            math.isfinite(self.time_limit) and self.time_limit > 0
        ):
            raise ConfigError(f"--time-limit must be seconds > 0, got {self.time_limit}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "dropout"):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{flag_name(name)} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise ConfigError("--lr must be > 0")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if self.model != "rnn" and self.nonlinearity != "tanh":
            raise ConfigError(
                f"--nonlinearity {self.nonlinearity} is for --model rnn; --model {self.model} "
                "has its own gate nonlinearities"
            )
        if self.dropout >= 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.impl == "cpp" and self.device not in ("auto", "cpu"):
            raise ConfigError(
                f"--impl cpp runs on CPU tensors only, not --device {self.device}; use "
                "--device cpu, or --impl fused to pick the kernel for the device"
            )
        if self.dtype == "float16" and self.device in ("cpu", "mps"):
            raise ConfigError(FP16_NEEDS_CUDA.format(device=self.device))
        return self

    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a checkpoint recorded; ConfigError for a field it does not have or a
        value of the wrong type (a checkpoint edited by hand or by another program)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        values = {}
        for key, value in d.items():
            optional = "None" in str(fields[key].type)
            values[key] = value if value is None and optional else _typed(fields[key], value)
        return cls(**values)


def _kinds(f: dataclasses.Field) -> tuple[type, ...]:
    """The Python types a TOML value of field ``f`` may have (an int is a float too)."""
    base = str(f.type).split(" ")[0]
    return {"int": (int,), "float": (int, float), "bool": (bool,)}.get(base, (str,))


def _typed(f: dataclasses.Field, value: object, where: str = "") -> object:
    """``value`` as field ``f`` holds it (an int for a float field becomes a float); a
    ConfigError, prefixed by ``where``, for a value of another type."""
    kinds = _kinds(f)
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise ConfigError(f"{where}{f.name} must be {want[kinds[-1]]}, got {value!r}")
    return float(value) if float in kinds else value


def load_recipe(path: str | os.PathLike) -> dict:
    """TrainConfig fields from a TOML file (``--config FILE`` or a preset). ConfigError,
    naming the file, for a file that cannot be read or parsed, a key that is not a
    TrainConfig field, or a value of the wrong type."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # a byte-order mark (Windows editors write one) is not TOML: read the text after it
        values = tomllib.loads(raw.decode("utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"--config {path}: unknown key {key!r} (keys are the flags' names with "
                "underscores, e.g. batch_size)"
            )
        out[key] = _typed(fields[key], value, f"--config {path}: ")
    return out


# Recipes for --preset: TrainConfig fields from presets/NAME.toml; flags given on the
# command line win.
PRESETS: dict[str, dict] = {n: load_recipe(_PRESET_DIR / f"{n}.toml") for n in PRESET_NAMES}

FP16_NEEDS_CUDA = (
    "--dtype float16 needs a CUDA device (it trains with a grad scaler); on {device} "
    "use --dtype bfloat16"
)

# Settings that may change when resuming: how long and how to run, not what is trained.
RESUME_OVERRIDES = frozenset(
    {"impl", "steps", "eval_interval", "eval_iters", "log_interval", "device", "out",
     "sample_length", "stop_at", "data", "skip_nonfinite", "threads", "time_limit"}
)  # fmt: skip
# Run control: on resume these come from the command line, never from the checkpoint.
# (--threads too: the machine a run resumes on may have another number of cores.)
RUN_CONTROL = frozenset({"stop_at", "out", "device", "threads"})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# More threads than any CPU has: torch's OpenMP pool crashes (SIGSEGV) at a huge count.
MAX_THREADS = 1024


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{flag_name(name)} must be >= {low}, got {value}")


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
            other = {"data": "NAME|FILE"}.get(f.name, "DIR")
            kw["metavar"] = {int: "N", float: "X"}.get(kind, other)
        p.add_argument(flag_name(f.name), dest=f.name, **kw)
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TrainConfig fields from a TOML file (keys as the flags, with underscores); "
        "flags given here win over the file, the file over --preset and the defaults",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its ckpt.pt (model, optimizer, schedule, RNG)",
    )
    return p


def parse_args(argv: list[str] | None) -> tuple[dict, bool]:
    """The settings given explicitly (as TrainConfig fields: the flags over a --config
    file's) and whether to resume."""
    ns = vars(build_parser().parse_args(argv))
    resume = ns.pop("resume", False)
    path = ns.pop("config", None)
    return ({**load_recipe(path), **ns} if path is not None else ns), resume
