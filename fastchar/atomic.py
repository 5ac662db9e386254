"""Replacing a file atomically: its path holds either the old or the new complete file.

    with atomic_write(path, "w") as f:
        json.dump(obj, f)

The data goes to a temp file beside ``path`` (``.<name><random>.tmp``), reaches the disk,
and is renamed over ``path`` when the block ends without an exception; if it raises (a
full disk, a directory in the way, Ctrl-C), the temp file is removed and the old file
stays. Checkpoints, run files, the GEMM plan cache, fetched corpora and plots are written
through it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

TEMP_SUFFIX = ".tmp"


def temp_prefix(name: str) -> str:
    """The start of the temp files' names for a file called ``name``."""
    return "." + name


def _mode_for(path: str) -> int:
    """The permissions the new file gets: the old file's, else what open() would give
    (0666 less the umask), so that a run directory shared between users or nodes stays
    readable as the user set it up."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _is_special(path: str) -> bool:
    """Whether ``path`` is something other than a regular file or a directory."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # none yet (or unreadable: the write will say)
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised in the block without a file name (a full disk's, a file-size
    limit's) gets ``path`` as its file name, so that the message says which file failed."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is None:
            e.filename = os.fspath(path)
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", *, before_replace: Callable[[], None] | None = None
) -> Iterator[IO]:
    """A file object (text, UTF-8, unless ``mode`` has "b") that replaces ``path`` on exit.

    A ``path`` that is a device, a FIFO or a socket (``--out /dev/null``) is written in
    place, as open() writes it: the rename would replace the device with a file (as root).

    ``before_replace`` runs with the temp file complete and closed, just before the rename
    (a test hook: a kill there must leave the old file).
    """
    path = os.fspath(path)
    if _is_special(path):
        with naming(path), open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=temp_prefix(os.path.basename(path)), suffix=TEMP_SUFFIX
    )
    try:
        with naming(path):
            os.fchmod(fd, _mode_for(path))  # mkstemp's is 0600
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
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
