"""The training corpus, by name or by path, wherever the user runs from.

    --data stdlib        Python's standard-library sources (the default; fastchar.data)
    --data shakespeare   tinyshakespeare, fetched once from its public source into
                         $FASTCHAR_DATA_DIR (default: the fastchar cache directory) and
                         verified against its SHA-256, then used offline
    --data PATH          any UTF-8 text file (a name above wins over a file of that name;
                         write ./shakespeare for the file)

A cached file that matches its digest is used as it is; one that does not is fetched
again. A download that does not match is refused and never cached; the file appears only
complete (written to a temp file and renamed).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastchar import data as fdata
from fastchar.atomic import atomic_write
from fastchar.cache import cache_dir

DATA_DIR_ENV = "FASTCHAR_DATA_DIR"
DEFAULT = "stdlib"


@dataclass(frozen=True)
class Corpus:
    """A named text fetched from ``url`` into the data directory as ``filename``."""

    name: str
    filename: str
    url: str
    sha256: str  # of the file's bytes


FETCHED = {
    "shakespeare": Corpus(
        name="shakespeare",
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        # tinyshakespeare: 1,115,394 characters
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}
NAMES = (DEFAULT, *FETCHED)


def data_dir() -> Path:
    """Where fetched corpora live: $FASTCHAR_DATA_DIR, else the fastchar cache directory."""
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser()
    cache = cache_dir()
    if cache is None:
        raise fdata.DataError(
            f"no directory for fetched corpora: no home directory is known; set {DATA_DIR_ENV} "
            "(or FASTCHAR_CACHE_DIR), or pass --data PATH"
        )
    return cache


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def fetch(corpus: Corpus, log=None) -> Path:
    """The corpus's file in the data directory, downloaded and verified first if needed.

    DataError (one line: what failed, and where to put the file instead) when it is
    neither cached nor downloadable, or the download does not match the digest.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    path = data_dir() / corpus.filename
    if path.is_file():
        try:
            if _digest(path.read_bytes()) == corpus.sha256:
                return path
            log(f"{path} does not match the {corpus.name} corpus's SHA-256; fetching it again")
        except OSError as e:
            log(f"cannot read {path} ({e.strerror or e}); fetching it again")
    instead = (
        f"put {corpus.filename} (SHA-256 {corpus.sha256}) into {path.parent} "
        f"(or set {DATA_DIR_ENV}), or pass --data PATH"
    )
    log(f"fetching the {corpus.name} corpus from {corpus.url} into {path}")
    try:
        with urllib.request.urlopen(corpus.url, timeout=60) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # HTTPException: a connection closed early (IncompleteRead), a malformed reply
        why = getattr(e, "reason", None) or e
        raise fdata.DataError(
            f"cannot fetch the {corpus.name} corpus from {corpus.url} ({why}); {instead}"
        ) from None
    if _digest(raw) != corpus.sha256:
        raise fdata.DataError(
            f"the {corpus.name} corpus from {corpus.url} does not match its SHA-256 "
            f"({len(raw):,} bytes, sha256 {_digest(raw)[:12]}...); not cached; {instead}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(raw)
    except OSError as e:
        raise fdata.DataError(
            f"cannot write the {corpus.name} corpus to {path}: {e.strerror or e}; {instead}"
        ) from None
    return path


def is_file(data: str | None) -> bool:
    """Whether ``--data`` names a file (not a corpus, not the default)."""
    return data is not None and data != DEFAULT and data not in FETCHED


def data_path(data: str | None) -> str | None:
    """``--data`` as the run records it: a file path made absolute (a resume from another
    working directory finds it), a corpus name or None as given."""
    return os.path.abspath(data) if is_file(data) else data


def load_corpus(data: str | None, log=None) -> tuple[str, dict]:
    """(text, manifest) of ``--data``: a corpus name, a file path, or None (the default)."""
    if data is None or data == DEFAULT:
        text, manifest = fdata.default_corpus()
        return text, {**manifest, "corpus": DEFAULT}
    corpus = FETCHED.get(data)
    path = fetch(corpus, log) if corpus else data
    text = fdata.load_text(path)
    manifest = fdata.file_manifest(path, text)
    return text, ({**manifest, "corpus": corpus.name} if corpus else manifest)


def describe_data(manifest: dict) -> str:
    digest = manifest["sha256"][:12]
    if manifest["source"] == "file":
        name = manifest["path"]
        if "corpus" in manifest:
            name = f"corpus {manifest['corpus']} ({name})"
        return f"{name}: {manifest['chars']:,} chars, sha256 {digest}"
    return (
        f"Python {manifest['python']} stdlib sources: {len(manifest['files'])} files, "
        f"{manifest['chars']:,} chars, sha256 {digest}"
    )
