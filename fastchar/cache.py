"""Where fastchar keeps files between processes: the GEMM plan (fastchar.plan) and the
corpora it downloads (fastchar.training.corpora).

    $FASTCHAR_CACHE_DIR, else $XDG_CACHE_HOME/fastchar, else ~/.cache/fastchar

(a leading ~ expanded; a relative XDG_CACHE_HOME ignored, as the XDG spec says).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("FASTCHAR_CACHE_DIR")
    if not root:
        base = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastchar")
    return Path(root).expanduser()
