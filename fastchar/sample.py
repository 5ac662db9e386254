"""Sample text from a trained CharRNN: ``python -m fastchar.sample --ckpt DIR/ckpt.pt``.

Prints the prime followed by the generated characters, streamed as they are drawn; with
``--num-samples K`` the K samples run as one batch and stream together, each line of
sample i printed as ``[i] <line>`` as soon as it is complete (``grep '^\\[2\\] '``
gives sample 2). ``--score FILE`` prints the mean nats/char and bits/char of a text under the model
instead. The weight format and the impl in use go to stderr. The generation API is
``fastchar.sample.Generator`` (fastchar/generator.py).
"""

from __future__ import annotations

import argparse
import math
import sys

from fastchar.backends import IMPLS, why_not
from fastchar.data import DataError, load_text
from fastchar.generator import WEIGHTS, Generator
from fastchar.training.checkpoint import load_checkpoint, model_from_checkpoint
from fastchar.training.config import DEVICES
from fastchar.training.device import check_impl, pick_device
from fastchar.training.errors import (
    CheckpointError,
    ConfigError,
    TrainError,
    drop_closed_stderr,
    environment_error,
    first_line,
    stdout_failed,
)

__all__ = ["Generator", "main"]

PROG = "fastchar.sample"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    about = __doc__.splitlines()[0].replace("``", "")
    p = _Parser(prog="python -m fastchar.sample", description=about)
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run directory")
    p.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=int, default=500, help="characters to generate (default: 500)")
    p.add_argument(
        "--num-samples", type=int, default=1, help="samples drawn as one batch (default: 1)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.8,
        help="softmax temperature, 0: greedy (default: 0.8)",
    )  # fmt: skip
    p.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest only")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the likeliest set of mass P"
    )
    p.add_argument(
        "--seed", type=int, default=None,
        help="random seed (same seed, same text; default: a fresh one)",
    )  # fmt: skip
    p.add_argument(
        "--weights", default="float32", choices=WEIGHTS, help="weight format (default: float32)"
    )
    p.add_argument("--score", metavar="FILE", help="print the nats/char of FILE and exit")
    p.add_argument(
        "--device", default="cpu", choices=DEVICES,
        help="where to run (default: cpu; auto: CUDA, else MPS, else the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--impl", default=None, choices=IMPLS,
        help="kernels (default: the training impl, or fused where it cannot run on --device)",
    )  # fmt: skip
    return p


def _check(args: argparse.Namespace) -> None:
    if args.length < 0:
        raise ConfigError(f"--length must be >= 0, got {args.length}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise ConfigError(f"--seed must fit in 64 bits, got {args.seed}")


def _generator(args: argparse.Namespace) -> tuple[Generator, str]:
    """The Generator, and the line that says which format and kernels it runs."""
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    impl = args.impl
    trained = ckpt["config"].get("impl")
    reason = why_not(trained, device.type) if trained in ("cpp", "triton") else None
    if impl is None and reason:
        # a model trained with --impl triton samples on the CPU, cpp on CUDA
        impl = "fused"
        print(
            f"{PROG}: note: the training impl {trained} cannot run on {device.type} "
            f"({reason}): impl fused",
            file=sys.stderr,
        )
    model, vocab, _ = model_from_checkpoint(ckpt, impl=impl, device=device)
    kind, note = check_impl(model.impl, device)
    if note:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    try:
        g = Generator(model, vocab, args.weights, _own=True)
    except ValueError as e:
        raise ConfigError(f"--weights {args.weights}: {e}") from None
    return g, f"{PROG}: weights {args.weights}, impl {model.impl} -> {kind} on {device}"


def run(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    if out is None:  # started with stdout closed (`>&-`)
        raise TrainError("stdout is closed: there is nowhere to write the output")
    _check(args)
    g, in_use = _generator(args)
    if args.score is not None:
        text = load_text(args.score)  # DataError: a bad file (exit 1)
        try:
            nats = g.score(text)
        except ValueError as e:
            raise ConfigError(f"--score {args.score}: {e}") from None
        print(in_use, file=sys.stderr)
        out.write(f"{nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char ({args.score})\n")
        return
    prime = args.prime
    if prime is None:
        prime = "\n" if "\n" in g.vocab else g.vocab.chars[0]
    if not prime:
        raise ConfigError("--prime must not be empty")
    unknown = g.vocab.unknown(prime)
    if unknown:
        raise ConfigError(
            "--prime has characters not in the model's vocabulary: "
            + ", ".join(repr(c) for c in unknown)
        )
    print(in_use, file=sys.stderr)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    k = args.num_samples
    if k == 1:  # streamed as drawn
        out.write(prime)
        for ids in g.stream(prime, args.length, **options):
            out.write(g.vocab.decode(ids[0]))
            out.flush()
        out.write("\n")
        out.flush()
        return
    # K samples grow together: each line of sample i is printed, tagged "[i] ", as soon
    # as it is complete (a chunk at a time), the unfinished last lines at the end.
    pending = [prime] * k
    for ids in g.stream(prime, args.length, k, **options):
        for i in range(k):
            pending[i] = _write_lines(out, i, pending[i] + g.vocab.decode(ids[i]))
        out.flush()
    for i in range(k):
        rest = _write_lines(out, i, pending[i])  # lines of the prime, with --length 0
        if rest:
            out.write(f"[{i + 1}] {rest}\n")
    out.flush()


def _write_lines(out, i: int, text: str) -> str:
    """Writes the complete lines of sample i's ``text``, each tagged "[i+1] "; returns the
    unfinished last line."""
    *done, rest = text.split("\n")
    out.writelines(f"[{i + 1}] {line}\n" for line in done)
    return rest


def main(argv: list[str] | None = None) -> int:
    drop_closed_stderr()
    try:
        run(build_parser().parse_args(argv))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (TrainError, DataError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        why = environment_error(e, "use a smaller --num-samples or --length")
        if why is None and "(a diverged model?)" in str(e):  # a checkpoint's weights
            why = first_line(e).removeprefix("fastchar::generate: ")
        if why is None:
            raise
        print(f"{PROG}: error: {why}", file=sys.stderr)
        return 1
    except UnicodeEncodeError as e:
        char = e.object[e.start : e.end]
        print(
            f"{PROG}: error: the output's encoding ({e.encoding}) cannot write {char!r} of "
            "the sample; set PYTHONIOENCODING=utf-8",
            file=sys.stderr,
        )
        return 1
    except OSError as e:  # writing stdout: `... | head`, a full disk, a file-size limit
        return stdout_failed(PROG, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
