"""fastchar.data: vocabulary, default corpus, file loading, splits and batches."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import numpy as np
import pytest
import torch

from fastchar import data
from fastchar.data import DataError, Vocab


def test_vocab_round_trip():
    text = "hello, wörld!\n\tπ"
    v = Vocab.from_text(text)
    assert v.chars == sorted(set(text))
    ids = v.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert v.decode(ids) == text
    assert v.decode(ids.tolist()) == text
    v2 = Vocab.from_dict(v.to_dict())
    assert v2 == v and torch.equal(v2.encode(text), ids)
    assert isinstance(v.to_dict()["chars"], str)


def test_vocab_ids_follow_sorted_order():
    v = Vocab.from_text("cab")
    assert v.encode("abc").tolist() == [0, 1, 2]
    assert v.encode("").tolist() == []


def test_vocab_unknown_characters_are_named():
    v = Vocab.from_text("abc")
    with pytest.raises(ValueError, match="'z'.*'é'|'é'.*'z'") as info:
        v.encode("abzcé")
    assert "'a'" not in str(info.value)
    assert v.unknown("abzcé") == ["z", "é"]


def test_vocab_rejects_bad_input():
    with pytest.raises(DataError):
        Vocab.from_text("")
    with pytest.raises(DataError):
        Vocab.from_dict({"chars": ["a", "b"]})
    with pytest.raises(DataError, match="duplicate"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="out of range"):
        Vocab.from_text("ab").decode([0, 2])


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path


def test_load_text_reads_utf8(tmp_path):
    p = _write(tmp_path / "ok.txt", "naïve café\n".encode())
    assert data.load_text(p) == "naïve café\n"


@pytest.mark.parametrize(
    "raw",
    [b"one\r\ntwo\r\n", b"one\rtwo\r", b"\xef\xbb\xbfone\ntwo\n", b"\xef\xbb\xbfone\r\ntwo\r"],
    ids=["crlf", "cr", "bom", "bom_crlf_cr"],
)
def test_load_text_reads_line_ends_and_a_bom_as_text_mode_does(tmp_path, raw):
    p = _write(tmp_path / "t.txt", raw)
    assert data.load_text(p) == "one\ntwo\n"


@pytest.mark.parametrize(
    "case, match",
    [
        ("bom_only", "empty"),
        ("missing", "not found"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("binary", "binary"),
        ("latin1", "not UTF-8"),
        ("utf16", "UTF-16 .*; save it as UTF-8"),  # not "binary" for its NUL bytes
        ("utf32be", "UTF-16 .*; save it as UTF-8"),
        ("under_a_file", "cannot read data file .*Not a directory"),  # not "not found"
    ],
)
def test_load_text_errors(tmp_path, case, match):
    path = tmp_path / "f.txt"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        _write(path, b"")
    elif case == "bom_only":
        _write(path, b"\xef\xbb\xbf")
    elif case == "binary":
        _write(path, b"abc\x00\x01\x02def")
    elif case == "latin1":
        _write(path, "caf\xe9 au lait".encode("latin-1"))
    elif case == "utf16":
        _write(path, "hello world\n".encode("utf-16"))
    elif case == "utf32be":
        _write(path, "hello world\n".encode("utf-32-be").join([b"\x00\x00\xfe\xff", b""]))
    elif case == "under_a_file":
        _write(path, b"text")
        path = path / "child.txt"
    with pytest.raises(DataError, match=match) as info:
        data.load_text(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_split_is_positional():
    ids = torch.arange(100)
    train, val = data.split(ids)
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))
    train, val = data.split(ids, val_frac=0.25)
    assert len(train) == 75 and val[0].item() == 75
    with pytest.raises(ValueError):
        data.split(ids, val_frac=0.0)
    with pytest.raises(DataError):
        data.split(torch.arange(3))


def test_get_batch_windows_are_contiguous_and_shifted():
    d = torch.arange(1000) * 3  # distinct values reveal each id's position
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch(d, 16, 8, g)
    assert x.shape == y.shape == (16, 8)
    starts = x[:, 0] // 3
    expected = starts[:, None] + torch.arange(9)  # [B, T+1]
    assert torch.equal(x, d[expected[:, :-1]])
    assert torch.equal(y, d[expected[:, 1:]])
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert starts.max().item() <= 1000 - 9


def test_get_batch_is_seeded_and_covers_the_ends():
    d = torch.arange(10)
    a = data.get_batch(d, 64, 4, torch.Generator().manual_seed(1))
    b = data.get_batch(d, 64, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    starts = set(a[0][:, 0].tolist())
    assert starts == set(range(6))  # every valid start, and none past the last window


def test_encode_in_chunks_is_exact_and_small(monkeypatch):
    """Vocab.encode a chunk at a time: the same ids, an unknown character in any chunk named,
    and a peak of the ids' 8 bytes a character and a chunk's buffers (it was ~36 bytes)."""
    monkeypatch.setattr(data, "ENCODE_CHUNK", 7)
    text = "the quick brown fox \U0001f98a jumps\n" * 5
    vocab = Vocab.from_text(text)
    assert vocab.encode(text).tolist() == [vocab.chars.index(c) for c in text]
    with pytest.raises(ValueError, match="not in the vocabulary: '!'"):
        vocab.encode(text + "!")  # in the last chunk
    monkeypatch.setattr(data, "ENCODE_CHUNK", 1 << 16)
    text = "abcdefgh" * (1 << 18)  # 2M characters
    tracemalloc.start()
    try:
        ids = Vocab.from_text(text).encode(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(ids[:9], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0]))
    assert peak < 10 * len(text), peak / len(text)


def test_bad_ids_are_a_value_error_naming_them():
    vocab = Vocab.from_text("abc")
    with pytest.raises(ValueError, match="ids must be integers, got a tensor of torch.float32"):
        vocab.decode(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="ids must be integers, got float"):
        vocab.decode([0, 1.5])
    assert vocab.decode(np.array([2, 0])) == "ca"
    for bad in (torch.arange(200).view(2, 100), torch.rand(200)):
        with pytest.raises(ValueError, match=r"data must be a 1-D tensor of ids \[N\]"):
            data.get_batch(bad, 2, 8)
        with pytest.raises(ValueError, match=r"train data must be a 1-D tensor of ids"):
            data.Streams(bad, 2, 8, "train data")


def test_get_batch_exact_and_too_short():
    d = torch.arange(9)
    x, y = data.get_batch(d, 2, 8, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 2 and y.tolist() == [list(range(1, 9))] * 2
    with pytest.raises(DataError, match="block_size"):
        data.get_batch(d, 2, 9)
    with pytest.raises(ValueError):
        data.get_batch(d, 0, 4)


def test_default_corpus_is_deterministic_and_traced():
    text, manifest = data.default_corpus()
    text2, manifest2 = data.default_corpus()
    assert text == text2 and manifest == manifest2
    assert 200_000 < len(text) < 5_000_000
    assert manifest["chars"] == len(text)
    assert manifest["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(paths) and len(paths) >= 10
    assert set(paths) | set(manifest["missing"]) == set(data.DEFAULT_CORPUS_FILES)
    for f in manifest["files"][:5]:
        with open(os.path.join(manifest["root"], f["path"]), "rb") as fh:
            raw = fh.read()
        assert f["sha256"] == hashlib.sha256(raw).hexdigest() and f["bytes"] == len(raw)
        assert raw.decode() in text
    Vocab.from_text(text).encode(text[:1000])
