"""Where fastchar keeps files between processes: the GEMM plan (fastchar.plan) and the
corpora it downloads (fastchar.training.corpora).

    $FASTCHAR_CACHE_DIR, else $XDG_CACHE_HOME/fastchar, else ~/.cache/fastchar

(a leading ~ expanded; a relative XDG_CACHE_HOME ignored, as the XDG spec says; a
relative FASTCHAR_CACHE_DIR taken from the working directory at the call). None where no
home directory is known (HOME unset and no passwd entry, as in some containers, or a ~user
that does not exist) and neither variable names one: no cache is kept.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    root = os.environ.get("FASTCHAR_CACHE_DIR")
    if not root:
        base = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastchar")
    root = os.path.expanduser(root)
    if root.startswith("~"):  # expanduser leaves a home it cannot find as it is
        return None
    return Path(os.path.abspath(root))
