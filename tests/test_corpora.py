"""Corpora by name (fastchar.training.corpora): the real download path against a local HTTP
server on 127.0.0.1, the cache in FASTCHAR_DATA_DIR, a corrupted download refused and not
cached, no network and no copy, and ``--preset shakespeare`` from any directory."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from test_train import make_text

from fastchar import data as fdata
from fastchar.training import cli, corpora

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


class _Server:
    """Serves {url path: bytes} on 127.0.0.1 and counts the requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        self.cut = set()  # paths whose reply promises 1000 bytes more than it sends
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append(self.path)
                body = served.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                extra = 1000 if self.path in served.cut else 0
                self.send_header("Content-Length", str(len(body or b"") + extra))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "data-cache"
    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(path))
    return path


@pytest.fixture
def served(monkeypatch):
    """A local server with a good and a corrupted copy of a corpus, and the shakespeare
    entry pointed at the good one (with the good copy's digest)."""
    good = make_text(20_000).encode()
    bad = bytearray(good)
    bad[100] ^= 0x20  # one character changed
    server = _Server({"/good.txt": good, "/bad.txt": bytes(bad)})
    corpus = dataclasses.replace(
        corpora.FETCHED["shakespeare"], url=server.url + "/good.txt",
        sha256=hashlib.sha256(good).hexdigest(),
    )  # fmt: skip
    monkeypatch.setitem(corpora.FETCHED, "shakespeare", corpus)
    yield server, corpus, good
    server.close()


def test_fetched_once_verified_and_then_used_offline(served, data_dir):
    server, corpus, good = served
    logged = []
    path = corpora.fetch(corpus, logged.append)
    assert path == data_dir / "tinyshakespeare.txt" and path.read_bytes() == good
    assert server.requests == ["/good.txt"] and "fetching the shakespeare corpus" in logged[0]
    assert [p.name for p in data_dir.iterdir()] == ["tinyshakespeare.txt"]  # no temp left
    server.close()  # offline from here
    assert corpora.fetch(corpus, logged.append) == path and len(logged) == 1
    text, manifest = corpora.load_corpus("shakespeare", logged.append)
    assert text == good.decode() and manifest["corpus"] == "shakespeare"
    assert manifest["sha256"] == fdata.sha256_text(text) and manifest["path"] == str(path)


def test_a_corrupted_download_is_refused_and_not_cached(served, data_dir):
    server, corpus, _ = served
    bad = dataclasses.replace(corpus, url=server.url + "/bad.txt")
    with pytest.raises(fdata.DataError, match="does not match its SHA-256.*not cached") as e:
        corpora.fetch(bad, lambda _: None)
    assert "\n" not in str(e.value) and str(data_dir) in str(e.value)
    assert not (data_dir / "tinyshakespeare.txt").exists()
    assert not data_dir.exists() or not list(data_dir.iterdir())


def test_a_wrong_cached_file_is_fetched_again(served, data_dir):
    server, corpus, good = served
    data_dir.mkdir()
    (data_dir / "tinyshakespeare.txt").write_text("not the corpus")
    logged = []
    assert corpora.fetch(corpus, logged.append).read_bytes() == good
    assert "does not match" in logged[0] and server.requests == ["/good.txt"]


def test_an_unreadable_cached_file_is_fetched_again(served, data_dir, monkeypatch):
    server, corpus, good = served
    data_dir.mkdir()
    cached = data_dir / "tinyshakespeare.txt"
    cached.write_bytes(good)
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == cached:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    logged = []
    assert corpora.fetch(corpus, logged.append) == cached
    assert logged[0] == f"cannot read {cached} (Permission denied); fetching it again"


def test_a_download_cut_short_is_one_line_and_not_cached(served, data_dir, tmp_path, capsys):
    server, _, _ = served
    server.cut.add("/good.txt")  # http.client's IncompleteRead, not an OSError
    code = cli.main(["--data", "shakespeare", "--out", str(tmp_path / "r"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("fastchar.train: error: ")]
    assert len(errors) == 1 and "cannot fetch the shakespeare corpus" in errors[0]
    assert "IncompleteRead" in errors[0] and not (data_dir / "tinyshakespeare.txt").exists()


def test_no_network_and_no_copy_says_where_to_put_the_file(served, data_dir):
    server, corpus, _ = served
    server.close()
    with pytest.raises(fdata.DataError) as e:
        corpora.fetch(corpus, lambda _: None)
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot fetch the shakespeare corpus")
    assert f"put tinyshakespeare.txt (SHA-256 {corpus.sha256}) into {data_dir}" in message
    assert "--data PATH" in message


def test_the_cli_reports_a_failed_fetch_as_one_line(served, data_dir, tmp_path, capsys):
    server, _, _ = served
    server.close()
    code = cli.main(["--data", "shakespeare", "--out", str(tmp_path / "r"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("fastchar.train: error: ")]
    assert len(errors) == 1 and "cannot fetch the shakespeare corpus" in errors[0]
    assert "Traceback" not in err


def test_preset_shakespeare_from_any_directory(served, data_dir, tmp_path, monkeypatch, capsys):
    _, corpus, good = served
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    flags = ["--hidden", "16", "--emb-dim", "8", "--batch-size", "4", "--block-size", "16",
             "--steps", "2", "--time-limit", "60", "--eval-iters", "2", "--sample-length", "0",
             "--impl", "reference", "--eval-interval", "2"]  # fmt: skip
    assert cli.main(["--preset", "shakespeare", *flags]) == 0, capsys.readouterr().err
    out = elsewhere / "runs" / "shakespeare"
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["corpus"] == "shakespeare"
    assert manifest["sha256"] == fdata.sha256_text(good.decode())
    assert "corpus shakespeare" in capsys.readouterr().err


def test_stdlib_is_the_default_corpus_by_name():
    text, manifest = corpora.load_corpus("stdlib")
    assert (text, manifest) == corpora.load_corpus(None)
    assert manifest["corpus"] == "stdlib" and manifest["source"] == "python-stdlib"


@pytest.mark.skipif(not REAL.is_file(), reason=f"the real corpus is not at {REAL}")
def test_the_real_tinyshakespeare_through_the_download_path(data_dir):
    """The real file, served locally, matches the digest fastchar ships."""
    real = corpora.FETCHED["shakespeare"]
    server = _Server({"/input.txt": REAL.read_bytes()})
    try:
        path = corpora.fetch(dataclasses.replace(real, url=server.url + "/input.txt"), print)
    finally:
        server.close()
    text = fdata.load_text(path)
    assert len(text) == 1_115_394 and hashlib.sha256(path.read_bytes()).hexdigest() == real.sha256
    assert os.path.getsize(path) == REAL.stat().st_size
