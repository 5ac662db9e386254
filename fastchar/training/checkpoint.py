"""Checkpoints: atomic save, data-only (``weights_only``) load with validation, the RNG
state they carry, and the model rebuilt from one."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import time

import torch

from fastchar import data as fdata
from fastchar import plot
from fastchar.atomic import TEMP_SUFFIX, atomic_write, temp_prefix
from fastchar.model import CharRNN
from fastchar.training.config import TrainConfig
from fastchar.training.errors import CheckpointError, first_line

CKPT_FORMAT = "fastchar-charrnn"
CKPT_VERSION = 1


def rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Test hook: a path; a save that would replace an existing ckpt.pt creates it, then
# sleeps with the new file complete but not yet renamed, so a kill lands inside the write.
SAVE_PAUSE_ENV = "FASTCHAR_TEST_SAVE_PAUSE"


def atomic_torch_save(obj: dict, path: str) -> None:
    """Write ``obj`` so that ``path`` always holds either the old or the new complete file."""

    def pause() -> None:
        marker = os.environ.get(SAVE_PAUSE_ENV)
        if marker and os.path.basename(path) == "ckpt.pt" and os.path.exists(path):
            open(marker, "w").close()
            time.sleep(600)

    with atomic_write(path, "wb", before_replace=pause) as f:
        sink = _WriteErrors(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None  # atomic_write names the file in it


class _WriteErrors:
    """A file's write, keeping the first OSError: torch.save turns a failed write (a full
    disk, a file-size limit) into a RuntimeError about its archive's position."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


# The files a run writes with atomic_write, and what their temp files start with.
_RUN_FILES = (
    "ckpt.pt", "best.pt", "metrics.jsonl", "config.json", "data_manifest.json", plot.FILENAME
)  # fmt: skip
_RUN_TEMPS = tuple(temp_prefix(name) for name in _RUN_FILES)


def remove_stale_temps(out: str) -> list[str]:
    """Delete temp files a killed run left in ``out`` (the completed files are untouched)."""
    removed = []
    for name in os.listdir(out):
        if name.endswith(TEMP_SUFFIX) and name.startswith(_RUN_TEMPS):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
                removed.append(name)
    return removed


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
            else first_line(e)
        )
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): "
            f"{first_line(e)}"
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
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path} has an unusable step: {step!r}")
    dicts = ("model", "config", "data_manifest", "rng")
    wrong = [k for k in dicts if not isinstance(ckpt.get(k, {}), dict)]
    if wrong:
        raise CheckpointError(f"{path}: {', '.join(wrong)} must be a dictionary")
    for key in ("best_val_loss", "elapsed_sec", "wall_sec"):
        value = ckpt.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{path}: {key} must be a number, got {value!r}")
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
            f"checkpoint does not describe a usable model: {first_line(e)}"
        ) from None
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a diverged run's weights: no distribution to sample or score with
        raise CheckpointError(
            f"checkpoint's weights are not finite (NaN or inf in {', '.join(bad)}): "
            "the run that saved it diverged"
        )
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
