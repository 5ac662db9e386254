"""fastchar.atomic: a file is replaced whole or not at all, and a failed write leaves no
temp file; a run directory's leftover temps are recognised by their names."""

import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from fastchar.atomic import atomic_write
from fastchar.training.checkpoint import remove_stale_temps


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with atomic_write(path) as f:
        f.write("new é")
        assert path.read_text() == "old"  # not visible before the block ends
    assert path.read_text(encoding="utf-8") == "new é"
    with atomic_write(str(path), "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_fifo_or_device_is_written_in_place_not_replaced(tmp_path):
    """`--out /dev/null`: a special file is written as open() writes it; the rename put a
    regular file in its place (as root, over /dev/null itself). A FIFO stands in for it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with atomic_write(fifo, "wb") as f:
        f.write(b"results")
    reader.join(timeout=30)
    assert got == [b"results"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["fifo"]  # no temp file either


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(type(error)), atomic_write(path) as f:
        f.write("partial")
        raise error
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_failing_hook_keeps_the_old_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")

    def hook():
        raise OSError("killed")

    with pytest.raises(OSError), atomic_write(path, before_replace=hook) as f:
        f.write("new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_a_directory_in_the_way_raises_and_leaves_no_temp(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError), atomic_write(tmp_path / "d") as f:
        f.write("x")
    assert os.listdir(tmp_path) == ["d"]


def test_remove_stale_temps_removes_only_the_run_files_temps(tmp_path):
    names = ["ckpt.pt", "best.pt", "metrics.jsonl", "config.json", "data_manifest.json", "loss.png"]
    for name in names:
        with atomic_write(tmp_path / name) as f:
            f.write("complete")
        # what a kill between atomic_write's write and its rename leaves
        fd, _ = tempfile.mkstemp(dir=tmp_path, prefix="." + name, suffix=".tmp")
        os.close(fd)
    (tmp_path / "notes.tmp").write_text("the user's")
    (tmp_path / ".other.tmp").write_text("the user's")
    removed = remove_stale_temps(str(tmp_path))
    assert len(removed) == len(names)
    assert sorted(os.listdir(tmp_path)) == sorted([*names, "notes.tmp", ".other.tmp"])


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    """mkstemp makes 0600 files; a checkpoint in a shared run directory must stay readable."""
    path = tmp_path / "ckpt.pt"
    old = os.umask(0o027)
    try:
        with atomic_write(path, "wb") as f:
            f.write(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)
    with atomic_write(path, "wb") as f:
        f.write(b"2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    """A full disk fails f.write with an OSError that names no file: the CLIs' one line
    must say which file could not be written."""
    path = tmp_path / "ckpt.pt"
    path.write_text("old")
    with pytest.raises(OSError) as caught, atomic_write(path) as f:
        f.write("new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"[Errno 28] No space left on device: '{path}'"
    with pytest.raises(FileNotFoundError) as caught, atomic_write(path) as f:
        open(tmp_path / "missing")  # an error about another file keeps its name
    assert caught.value.filename == str(tmp_path / "missing")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_checkpoint_too_large_for_the_disk_is_an_oserror_naming_it(tmp_path):
    """torch.save reports a failed write (here a file-size limit, as a full disk) as a
    RuntimeError about its archive; a checkpoint save raises the OSError, naming the file,
    which the CLIs print as one line, and keeps the old checkpoint."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    script = (
        "import resource, sys, torch\n"
        "from fastchar.training.checkpoint import atomic_torch_save\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        "    atomic_torch_save({'w': torch.zeros(1 << 20)}, sys.argv[1])\n"
        "except OSError as e:\n"
        "    print(e)\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"[Errno {errno.EFBIG}] File too large: '{path}'"
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]
