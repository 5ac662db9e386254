"""Sample text from a trained CharRNN: ``python -m fastchar.sample --ckpt DIR/ckpt.pt``.

Prints the prime followed by the generated characters. The prime runs through
the model once; each new character is one ``CharRNN.step`` carrying the state.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastchar.backends import IMPLS
from fastchar.data import DataError
from fastchar.training.checkpoint import load_checkpoint, model_from_checkpoint
from fastchar.training.config import DEVICES
from fastchar.training.device import check_impl, pick_device
from fastchar.training.errors import CheckpointError, ConfigError, TrainError

PROG = "fastchar.sample"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastchar.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run directory")
    p.add_argument("--prime", default=None, help="text to start from (default: a newline)")
    p.add_argument("--length", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest only")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text)")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--impl", default=None, choices=IMPLS, help="default: the training impl")
    return p


def sample(args: argparse.Namespace) -> str:
    if args.length < 0:
        raise ConfigError(f"--length must be >= 0, got {args.length}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    model, vocab, cfg = model_from_checkpoint(ckpt, impl=args.impl, device=device)
    _, note = check_impl(model.impl, device)
    if note:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    prime = args.prime
    if prime is None:
        prime = "\n" if "\n" in vocab else vocab.chars[0]
    if not prime:
        raise ConfigError("--prime must not be empty")
    unknown = vocab.unknown(prime)
    if unknown:
        raise ConfigError(
            "--prime has characters not in the model's vocabulary: "
            + ", ".join(repr(c) for c in unknown)
        )
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    ids = model.generate(
        vocab.encode(prime), args.length,
        temperature=args.temperature, top_k=args.top_k, generator=generator,
    )  # fmt: skip
    return prime + vocab.decode(ids)


def main(argv: list[str] | None = None) -> int:
    try:
        text = sample(build_parser().parse_args(argv))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (TrainError, DataError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
