"""``python -m fastchar.info``: versions, and which impls can run on which device (and why not)."""

from __future__ import annotations

import platform
import sys
import warnings

import torch

from fastchar import __version__
from fastchar.backends import IMPLS, interpreter_on, resolve, triton_version, why_not


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def report() -> str:
    lines = [
        f"fastchar {__version__}",
        f"python   {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch    {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton   {triton_version() or 'not installed'}"
        + (" (TRITON_INTERPRET=1: interpreter)" if interpreter_on() else ""),
        "cuda     "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    for device in _devices():
        lines.append("")
        lines.append(f"[{device}]")
        for impl in IMPLS:
            if impl == "fused":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    target = resolve("fused", device)
                note = " (fallback, see below)" if target == "reference" else ""
                lines.append(f"  fused      -> {target}{note}")
                continue
            reason = why_not(impl, device)
            lines.append(f"  {impl:<10} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
