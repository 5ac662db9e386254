"""Character data: vocabulary, the default corpus, file loading, splits and batches.

Shape letters: N corpus length, B batch, T block (time) length.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Well-known, mostly pure-Python standard-library modules: about 2 MB of varied
# code, comments and docstrings. Sorted, so the corpus order is fixed.
DEFAULT_CORPUS_FILES = (
    "argparse.py",
    "ast.py",
    "asyncio/base_events.py",
    "asyncio/tasks.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "email/message.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "gzip.py",
    "heapq.py",
    "http/client.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "optparse.py",
    "os.py",
    "pathlib.py",
    "pickle.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tarfile.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "traceback.py",
    "typing.py",
    "unittest/case.py",
    "urllib/parse.py",
    "warnings.py",
    "weakref.py",
    "zipfile.py",
)


class DataError(ValueError):
    """A data file or corpus that cannot be used for training; the message says why."""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Vocab.encode's characters per chunk (its buffers: 4 bytes a character for the code
# points, 8 for the search's result).
ENCODE_CHUNK = 1 << 20


class Vocab:
    """Sorted set of characters; ids are positions in that order."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise DataError("a vocabulary needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise DataError("vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise DataError("vocabulary has duplicate characters")
        self.chars = sorted(chars)
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        if not text:
            raise DataError("cannot build a vocabulary from empty text")
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"Vocab({len(self)} characters)"

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` outside the vocabulary, sorted."""
        return sorted(set(text) - self._stoi.keys())

    def encode(self, text: str) -> Tensor:
        """``text`` as a LongTensor [N] of ids; ValueError naming any unknown characters.

        A chunk of ``ENCODE_CHUNK`` characters at a time, so that the peak memory is the ids'
        8 bytes a character and a chunk's buffers, not several text-sized arrays."""
        ids = np.empty(len(text), dtype=np.int64)
        last = len(self._codes) - 1
        for start in range(0, len(text), ENCODE_CHUNK):
            part = text[start : start + ENCODE_CHUNK]
            codes = np.frombuffer(part.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            found = ids[start : start + len(part)]
            found[:] = np.searchsorted(self._codes, codes)
            if not np.array_equal(self._codes[np.minimum(found, last)], codes):
                missing = ", ".join(repr(c) for c in self.unknown(text))
                raise ValueError(f"characters not in the vocabulary: {missing}")
        return torch.from_numpy(ids)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        if isinstance(ids, Tensor):
            if ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids must be integers, got a tensor of {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        else:
            odd = sorted({type(i).__name__ for i in ids if not isinstance(i, (int, np.integer))})
            if odd:
                raise ValueError(f"ids must be integers, got {', '.join(odd)}")
        n = len(self.chars)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"ids out of range for a vocabulary of {n}: {bad[:5]}")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        if not isinstance(d, dict) or not isinstance(d.get("chars"), str):
            raise DataError("vocabulary data must be a dict with a 'chars' string")
        return cls(d["chars"])


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def default_corpus() -> tuple[str, dict]:
    """The standard-library sources in ``DEFAULT_CORPUS_FILES`` joined into one text.

    Returns (text, manifest); the manifest names every file used with its
    SHA-256, so a run can be traced to its exact data. Missing files are skipped
    (and listed), so the corpus is fixed for a given Python installation.
    """
    root = stdlib_dir()
    parts, files, missing = [], [], []
    for rel in DEFAULT_CORPUS_FILES:
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            part = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            missing.append(rel)
            continue
        parts.append(part)
        files.append({"path": rel, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)})
    text = "\n".join(parts)
    if len(text) < 10_000:
        raise DataError(
            f"the default corpus is missing from {root} ({len(missing)} of "
            f"{len(DEFAULT_CORPUS_FILES)} files not found); pass --data FILE"
        )
    manifest = {
        "source": "python-stdlib",
        "python": sys.version.split()[0],
        "root": root,
        "files": files,
        "missing": missing,
        "chars": len(text),
        "sha256": sha256_text(text),
    }
    return text, manifest


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file as Python's text mode reads it with ``utf-8-sig``: a leading
    byte-order mark dropped, Windows (CRLF) and old Mac (CR) line ends read as "\\n", so that
    a text saved on Windows trains (and samples) no "\\r". DataError saying what is wrong
    when it cannot be used."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            raise DataError(f"data path is a directory, not a file: {path}")
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as e:  # a permission denied on the file or a directory above it
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"data file is empty: {path}")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # Windows' "Unicode"
        raise DataError(f"data file is UTF-16 (or UTF-32) text; save it as UTF-8: {path}")
    if b"\x00" in raw:
        raise DataError(f"data file looks binary (it has NUL bytes), not text: {path}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file is not UTF-8 text (bad byte at offset {e.start}): {path}"
        ) from None
    if not text:
        raise DataError(f"data file is empty (a byte-order mark only): {path}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def file_manifest(path: str | os.PathLike, text: str) -> dict:
    return {
        "source": "file",
        "path": os.path.abspath(path),
        "chars": len(text),
        "sha256": sha256_text(text),
    }


def split(ids: Tensor, val_frac: float = 0.1) -> tuple[Tensor, Tensor]:
    """Positional split: the first (1 - val_frac) of ``ids`` trains, the rest validates."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    n_val = int(round(len(ids) * val_frac))
    if n_val < 1 or n_val >= len(ids):
        raise DataError(f"{len(ids)} characters are too few to split off {val_frac:.0%} validation")
    cut = len(ids) - n_val
    return ids[:cut], ids[cut:]


def check_ids(data: Tensor, what: str = "data") -> None:
    """ValueError unless ``data`` is a 1-D tensor of integer ids (what Vocab.encode returns)."""
    if not isinstance(data, Tensor) or data.dim() != 1 or data.is_floating_point():
        got = f"shape {list(data.shape)} {data.dtype}" if isinstance(data, Tensor) else type(data)
        raise ValueError(f"{what} must be a 1-D tensor of ids [N], got {got}")


def check_length(data: Tensor, block_size: int, what: str = "data") -> None:
    if len(data) < block_size + 1:
        raise DataError(
            f"{what} has {len(data)} characters, fewer than one window of "
            f"block_size + 1 = {block_size + 1}; use more text or a smaller --block-size"
        )


def get_batch(
    data: Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random contiguous windows of ``block_size + 1`` ids from ``data`` [N].

    Returns inputs x [B, T] and targets y [B, T] = x shifted left by one.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    check_ids(data)
    check_length(data, block_size)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # [B]
    idx = starts[:, None] + torch.arange(block_size + 1)  # [B, T+1]
    windows = data[idx]  # [B, T+1]
    return windows[:, :-1], windows[:, 1:]


class Streams:
    """``data`` [N] cut into B parallel streams read in consecutive windows (char-rnn BPTT).

    Stream b is ``data[b * L : (b + 1) * L]`` with L = N // B (the tail is
    dropped). Window k of an epoch starts at ``k * T`` in every stream, so the
    state a model ends window k with is the right start for window k + 1. An
    epoch has ``(L - 1) // T`` windows; window index ``n`` wraps to ``n % epoch``,
    and index 0 of each epoch is where a carried state must be reset.
    """

    def __init__(self, data: Tensor, batch_size: int, block_size: int, what: str = "data"):
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}"
            )
        check_ids(data, what)
        L = len(data) // batch_size
        if L < block_size + 1:
            raise DataError(
                f"{what} has {len(data)} characters: {batch_size} streams of {L} are shorter "
                f"than one window of block_size + 1 = {block_size + 1}; use more text or a "
                "smaller --batch-size or --block-size"
            )
        self.streams = data[: batch_size * L].view(batch_size, L)  # [B, L]
        self.block_size = block_size
        self.epoch = (L - 1) // block_size

    def starts_epoch(self, index: int) -> bool:
        return index % self.epoch == 0

    def window(self, index: int) -> tuple[Tensor, Tensor]:
        """Inputs x [B, T] and targets y [B, T] of window ``index`` (counted from 0, wrapping)."""
        pos = (index % self.epoch) * self.block_size
        chunk = self.streams[:, pos : pos + self.block_size + 1]  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]
