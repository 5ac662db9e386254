"""The ``fastchar`` command: ``fastchar COMMAND [ARGS]``, each command the same as its
``python -m`` form (``fastchar train ...`` is ``python -m fastchar.train ...``)."""

from __future__ import annotations

import importlib
import sys

from fastchar.training.errors import drop_closed_stderr, print_stdout

# name -> (module whose main(argv) runs it, what it does)
COMMANDS = {
    "train": ("fastchar.training.cli", "train a character language model"),
    "sample": ("fastchar.sample", "sample text from a checkpoint"),
    "info": ("fastchar.info", "versions, devices, kernels and the CPU GEMM plan"),
    "plot": ("fastchar.plot", "loss curves of one or more runs as a PNG"),
    "bench": ("fastchar.bench", "the benchmark suite (benchmarks/run.py of a checkout)"),
}


def usage() -> str:
    lines = ["usage: fastchar COMMAND [ARGS]   (fastchar COMMAND --help for its flags)"]
    lines += ["       fastchar --version", ""]
    lines += ["commands:"] + [f"  {n:<8} {about}" for n, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    drop_closed_stderr()
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "-V", "--version"):
        from fastchar import __version__

        return print_stdout(
            "fastchar", usage() if argv[0] in ("-h", "--help") else f"fastchar {__version__}"
        )
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"fastchar: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    if name == "train":
        module.exit_process(code)  # as python -m fastchar.train leaves under torchrun
    return code


if __name__ == "__main__":
    sys.exit(main())
