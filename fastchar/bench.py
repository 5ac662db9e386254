"""``python -m fastchar.bench [flags]``: the benchmark suite, ``benchmarks/run.py``.

The benchmarks live in the source checkout beside the package (they are not installed
with it); this runs that script with the same flags (``--help`` lists them).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

PROG = "fastchar.bench"
RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not RUNNER.is_file():
        print(
            f"{PROG}: error: the benchmarks are not installed with the package; run them "
            "from a clone of the fastchar repository (benchmarks/run.py)",
            file=sys.stderr,
        )
        return 1
    runner = subprocess.Popen([sys.executable, str(RUNNER), *argv])
    interrupted = False
    while True:
        try:
            code = runner.wait(timeout=2 if interrupted else None)
            break
        except KeyboardInterrupt:  # a terminal's Ctrl-C reaches run.py too: it says so
            interrupted = True
        except subprocess.TimeoutExpired:  # a SIGINT sent to this process alone: pass it on
            runner.send_signal(signal.SIGINT)
            interrupted = False
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main())
