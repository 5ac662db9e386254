"""Benchmark table for fastchar: every cell x every impl that can run, side by side.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--json FILE] [--plot FILE.png]
        [--cells lstm,gru,rnn_tanh] [--impls cpp,reference,torch] [--dtype float32|bfloat16]
        [--shapes "B,T,I,H;..."] [--threads N]
        [--parts layers,gemm,sample,train,memory,packed,proj] [--sample-model CELL,L,H]

Parts, all measured in this one process (memory: one fresh child process per case):
  layers  one layer through ``fastchar.ops.<cell>(..., impl=...)`` with grad enabled as in
          training: forward alone, then forward + backward (``torch.autograd.grad`` of
          every input); tokens/s, GFLOP/s and the ratios are for forward + backward.
  sample  time per character of ``CharRNN.step`` (2 x 512 LSTM, or ``--sample-model``; no
          grad) at batch 1 and, as "<impl> x16", 16 samples at once; with cpp, also
          ``Generator.generate`` (the C++ loop, fastchar::generate) at 1 and 16 samples, in
          float32 also with int8 weights; with torch, also "torch.nn T=1", the module's
          forward one character at a time.
  train   CharRNN training tokens/s (2 x 256, batch 32, AdamW, cross-entropy).
  memory  peak training memory of one CharRNN step above the state after a warm-up step.
  gemm    (CPU, with layers) each cpp layer's GFLOP/s as a fraction of the best step-GEMM
          engine's rate at its own step shapes and of a 1024^3 torch.mm (benchmarks/_gemm.py).
  packed  an LSTM layer (I=128, H=512) over 64 sequences of lengths uniform in [16, 256],
          forward + backward through ``fastchar.nn.LSTM(impl=...)`` on the PackedSequence,
          and the first kernel impl on the same batch padded to 256 steps.
  proj    an LSTM layer with proj_size (LSTMP) at three shapes, forward + backward
          through ``fastchar.nn.LSTM(proj_size=P, impl=...)``, each impl against torch's.

Ratios are speed-ups: ``x torch`` = torch time / impl time, so above 1 is faster than torch.
Exits 1 when any case failed (its error is in the table and the JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("fastchar") is None:
    # Run from a checkout that is not pip-installed: use the checkout's package.
    sys.path.insert(0, ROOT)

import _gemm  # noqa: E402
import _harness as bench  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastchar.atomic import atomic_write  # noqa: E402
from fastchar.training.config import MAX_THREADS  # noqa: E402
from fastchar.training.errors import out_of_memory  # noqa: E402

DEFAULT_CELLS = ("lstm", "gru", "rnn_tanh")
PARTS = ("layers", "gemm", "sample", "train", "memory", "packed", "proj")
IMPL_CHOICES = ("fused", "cpp", "triton", "reference", "torch")

QUICK = {
    "layer": dict(warmup=1, min_repeats=3, max_repeats=10, budget_s=0.3),
    "sample_steps": 50,
    "train": dict(batch=16, block=64, hidden=256, steps=3),
}
FULL = {
    "layer": dict(warmup=2, min_repeats=3, max_repeats=50, budget_s=2.0),
    "sample_steps": 200,
    "train": dict(batch=32, block=128, hidden=256, steps=8),
}
VOCAB = 96
SAMPLE_MODEL = dict(model="lstm", emb_dim=64, hidden=512, layers=2)
SAMPLE_BATCH = 16  # samples at once in the sampling part's batched rows
TRAIN_MODEL = dict(emb_dim=64, layers=2)
PACKED = dict(B=64, I=128, H=512, min_len=16, max_len=256)
PROJ = [  # LSTM layers with proj_size, as speech models use them
    dict(B=32, T=128, I=128, H=512, P=128),
    dict(B=64, T=64, I=256, H=1024, P=256),
    dict(B=1, T=256, I=64, H=512, P=128),
]


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {','.join(choices)}")
        return items

    return parse


def _sample_model(text: str) -> dict:
    cell, _, rest = text.partition(",")
    layers, _, hidden = rest.partition(",")
    sizes = (layers, hidden)
    if cell not in ("lstm", "gru", "rnn") or not all(n.isdigit() and int(n) > 0 for n in sizes):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected CELL,LAYERS,HIDDEN with LAYERS and HIDDEN >= 1, e.g. lstm,1,128"
        )
    return {**SAMPLE_MODEL, "model": cell, "layers": int(layers), "hidden": int(hidden)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Time fastchar's kernels against torch and the reference, side by side.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="T/4 on the standard grid, few repeats")
    p.add_argument("--json", metavar="FILE", help="write every number and the environment")
    p.add_argument("--plot", metavar="FILE.png", help="fwd+bwd speed-up vs torch per shape")
    p.add_argument(
        "--cells",
        type=_csv(bench.CELLS),
        default=list(DEFAULT_CELLS),
        metavar="CELL,...",
        help=f"from {','.join(bench.CELLS)} (default: {','.join(DEFAULT_CELLS)})",
    )
    p.add_argument(
        "--impls",
        type=_csv(IMPL_CHOICES),
        default=None,
        metavar="IMPL,...",
        help="default: cpp, triton, reference, torch (those that can run on --device)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--shapes", metavar="B,T,I,H;...", help="default: DESIGN section 5 grid")
    p.add_argument(
        "--threads", type=int, metavar="N", help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--parts",
        type=_csv(PARTS),
        default=list(PARTS),
        metavar="PART,...",
        help=f"from {','.join(PARTS)} (default: all)",
    )
    p.add_argument(
        "--train-config",
        metavar="B,T,H",
        help="batch, block size and hidden size of the train and memory parts "
        "(default 32,128,256; quick 16,64,256)",
    )
    p.add_argument(
        "--sample-model",
        metavar="CELL,LAYERS,HIDDEN",
        type=_sample_model,
        help="the sample part's CharRNN: lstm|gru|rnn, layers, hidden (default lstm,2,512)",
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        metavar="N",
        help="characters per timed block (default 200; quick 50)",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p


def _fmt_ms(t: dict) -> str:
    return f"{t['median_ms']:.3g}±{100 * t['spread']:.0f}%"


# In a bfloat16 run, torch in float32 is timed alongside as a further baseline ("torch
# fp32": the same case in float32, impl torch), for the targets set against it.
FP32_BASE = "torch fp32"
BASES = ("torch", "reference", FP32_BASE)


def _key(base: str) -> str:
    return base.replace(" ", "_")


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print()


def _print_results(headers: list[str], rows: list[dict], lead, values) -> None:
    """One table line per result: ``lead(r)`` then ``values(r)``, or, for a failed case,
    FAILED and the start of its error in place of the values."""
    table = []
    for r in rows:
        head = lead(r)
        if "error" in r:
            table.append(
                head + ["FAILED " + r["error"][:60]] + [""] * (len(headers) - len(head) - 1)
            )
        else:
            table.append(head + values(r))
    _print_table(headers, table)


def bench_layers(cells, shapes, impls, dtype, device, cfg) -> list[dict]:
    rows = []
    for cell in cells:
        for s in shapes:
            print(f"timing {cell} {s.label()} ...", file=sys.stderr, flush=True)
            group = {
                impl: {"cell": cell, **vars(s), "dtype": str(dtype)[6:], "impl": impl}
                for impl in impls
            }
            try:
                case = bench.make_layer_case(cell, s, dtype, device)
            except (RuntimeError, MemoryError) as e:
                why = out_of_memory(e)
                if why is None:  # a bug, not a shape too large for this machine
                    raise
                why = f"inputs: {why}"
                print(f"  {cell} {s.label()}: FAILED {why}", file=sys.stderr)
                rows += [g | {"error": why} for g in group.values()]
                continue
            # fwd and fwd+bwd of every impl share the rounds, so load hits all columns alike.
            calls = {
                (impl, mode): partial(call, impl)
                for impl in impls
                for mode, call in (("fwd", case.forward), ("fwd_bwd", case.forward_backward))
            }
            if _fp32_base(impls, dtype):
                case32 = bench.make_layer_case(cell, s, torch.float32, device)
                group[FP32_BASE] = {"cell": cell, **vars(s), "dtype": "float32", "impl": FP32_BASE}
                calls[(FP32_BASE, "fwd")] = partial(case32.forward, "torch")
                calls[(FP32_BASE, "fwd_bwd")] = partial(case32.forward_backward, "torch")
            with torch.enable_grad():
                timings, errors = bench.time_interleaved(calls, device, **cfg)
            for (impl, mode), err in errors.items():
                group[impl].setdefault("error", f"{mode}: {err}")
                print(f"  {cell} {s.label()} {impl} {mode}: FAILED {err}", file=sys.stderr)
            for (impl, mode), t in timings.items():
                if "error" in group[impl]:
                    continue
                seconds = t.median_ms / 1e3
                flops = (
                    bench.layer_flops(cell, s) if mode == "fwd" else bench.fwd_bwd_flops(cell, s)
                )
                group[impl][mode] = vars(t) | {"spread": t.spread()}
                group[impl][f"tokens_per_s_{mode}"] = s.B * s.T / seconds
                group[impl][f"gflops_{mode}"] = flops / seconds / 1e9
                for base in BASES:
                    ref = timings.get((base, mode))
                    ratio = _ratio(ref.median_ms if ref else None, t.median_ms)
                    group[impl][f"vs_{_key(base)}_{mode}"] = ratio
            for impl, row in group.items():
                if "error" in row:
                    group[impl] = {k: v for k, v in row.items() if k in _LAYER_KEYS + ("error",)}
                else:  # a line per impl as it lands, so a run cut short keeps what it timed
                    ms = [row.get(m, {}).get("median_ms", float("nan")) for m in ("fwd", "fwd_bwd")]
                    print(f"  {impl}: fwd {ms[0]:.3f} ms, fwd+bwd {ms[1]:.3f} ms", file=sys.stderr)
            rows.extend(group.values())
    return rows


_LAYER_KEYS = ("cell", "B", "T", "I", "H", "dtype", "impl")


def _fp32_base(impls: list[str], dtype) -> bool:
    return "torch" in impls and dtype != torch.float32


def print_layers(rows: list[dict]) -> None:
    print("Layers: one layer, one direction, grad enabled; tok/s, GFLOP/s and ratios are fwd+bwd")
    headers = ["cell", "B", "T", "I", "H", "dtype", "impl", "fwd ms", "fwd+bwd ms", "tok/s"]
    headers += ["GFLOP/s", "x torch", "x reference"]
    fp32 = any(r["impl"] == FP32_BASE for r in rows)
    headers += ["x torch fp32"] if fp32 else []
    _print_results(
        headers,
        rows,
        lambda r: [r["cell"], *(str(r[k]) for k in "BTIH"), r["dtype"], r["impl"]],
        lambda r: (
            [
                _fmt_ms(r["fwd"]),
                _fmt_ms(r["fwd_bwd"]),
                f"{r['tokens_per_s_fwd_bwd']:.3g}",
                f"{r['gflops_fwd_bwd']:.3g}",
                _fmt_ratio(r["vs_torch_fwd_bwd"]),
                _fmt_ratio(r["vs_reference_fwd_bwd"]),
            ]
            + ([_fmt_ratio(r.get(f"vs_{_key(FP32_BASE)}_fwd_bwd"))] if fp32 else [])
        ),
    )


def print_limits(rows: list[dict]) -> None:
    print(
        "GEMM limit: cpp layer fwd+bwd GFLOP/s vs the best engine at its per-thread step "
        "shapes (fwd h@W^T, bwd d@W; all threads) and vs a 1024^3 torch.mm, same run"
    )
    headers = ["cell", "B", "T", "I", "H", "dtype", "layer GF/s", "fwd step", "bwd step"]
    headers += ["step GF/s", "of step", "square GF/s", "of square"]
    _print_results(
        headers,
        rows,
        lambda r: [r["cell"], *(str(r[k]) for k in "BTIH"), r["dtype"]],
        lambda r: [
            f"{r['layer_gflops']:.3g}",
            f"{r['fwd_step_gflops']:.3g} {r['fwd_engine']}",
            f"{r['bwd_step_gflops']:.3g} {r['bwd_engine']}",
            f"{r['step_gflops']:.3g}",
            f"{100 * r['of_step']:.0f}%",
            f"{r['square_gflops']:.3g}",
            f"{100 * r['of_square']:.0f}%",
        ],
    )


def _char_model(impl: str, dtype, device, **kw):
    from fastchar.model import CharRNN

    return CharRNN(VOCAB, impl=impl, **kw).to(device=device, dtype=dtype)


def _generate_rows(model, dtype, steps: int, rows: dict, runs: dict, model_cfg: dict) -> None:
    """ "generate" rows: fastchar.sample.Generator on the cpp model, temperature 1, drawing
    every character (the C++ loop, fastchar::generate), batch 1 and SAMPLE_BATCH; in a
    float32 run also with int8 weights ("generate int8")."""
    from fastchar.data import Vocab
    from fastchar.generator import Generator

    vocab = Vocab([chr(48 + i) for i in range(VOCAB)])
    formats = {"": "bfloat16"} if dtype == torch.bfloat16 else {"": "float32", " int8": "int8"}
    for tag, weights in formats.items():
        g = Generator(model, vocab, weights)  # on a copy of the model
        for batch in (1, SAMPLE_BATCH):
            name = f"generate{tag}" + ("" if batch == 1 else f" x{batch}")
            rows[name] = {"impl": name, "dtype": str(dtype)[6:], **model_cfg,
                          "steps": steps, "batch": batch, "weights": weights}  # fmt: skip
            runs[name] = partial(g.generate, vocab.chars[0], steps, batch, temperature=1.0, seed=0)


def bench_sampling(impls, dtype, device, steps: int, model_cfg: dict = SAMPLE_MODEL) -> list[dict]:
    """Blocks of ``steps`` characters from a fresh state; time per character. Each impl runs
    batch 1 and, as "<impl> x16", SAMPLE_BATCH samples at once (time per character of one
    sample / SAMPLE_BATCH: characters per second of all of them)."""
    print("timing sampling ...", file=sys.stderr, flush=True)
    rows, runs = {}, {}
    for impl in impls:
        for batch in (1, SAMPLE_BATCH):
            name = impl if batch == 1 else f"{impl} x{batch}"
            rows[name] = {
                "impl": name, "dtype": str(dtype)[6:], **model_cfg, "steps": steps,
                "batch": batch,
            }  # fmt: skip
        try:
            torch.manual_seed(0)
            model = _char_model(impl, dtype, device, **model_cfg).eval()
        except Exception as e:
            rows[impl]["error"] = rows[f"{impl} x{SAMPLE_BATCH}"]["error"] = bench.error_line(e)
            continue
        for batch in (1, SAMPLE_BATCH):
            idx = torch.zeros(batch, dtype=torch.long, device=device)  # [B]

            def run(idx=idx, model=model) -> None:
                state = None
                for _ in range(steps):
                    _, state = model.step(idx, state)

            runs[impl if batch == 1 else f"{impl} x{batch}"] = run
        if impl == "cpp":
            _generate_rows(model, dtype, steps, rows, runs, model_cfg)
        idx = torch.zeros(1, dtype=torch.long, device=device)  # [B]
        if impl == "torch":
            # What a torch.nn.LSTM user runs: the module's forward on one character at a
            # time (torch.nn has no single-step API); `torch` above is torch.lstm_cell.
            name = "torch.nn T=1"
            rows[name] = {**rows[impl], "impl": name}
            rows[name].pop("error", None)

            def run_forward(idx_seq=idx[:, None], model=model) -> None:  # idx_seq [B, 1]
                state = None
                for _ in range(steps):
                    _, state = model(idx_seq, state)

            runs[name] = run_forward
    with torch.no_grad():
        timings, errors = bench.time_interleaved(
            runs, device, warmup=1, min_repeats=3, max_repeats=5, budget_s=0.5
        )
    for impl, err in errors.items():
        rows[impl]["error"] = err
    for name, t in timings.items():
        rows[name]["ms_per_char"] = t.median_ms / steps / rows[name]["batch"]
        rows[name]["chars_per_s"] = 1e3 / rows[name]["ms_per_char"]
        rows[name]["spread"] = t.spread()
    for name, row in rows.items():  # batched against the same impl's batch 1
        one = rows.get(name.removesuffix(f" x{SAMPLE_BATCH}"), {})
        if row["batch"] > 1 and "chars_per_s" in row and "chars_per_s" in one:
            row["vs_batch1"] = row["chars_per_s"] / one["chars_per_s"]
    rows = list(rows.values())
    _add_speedups(rows, "ms_per_char", lower_is_better=True)
    return rows


def _train_setup(cell: str, impl: str, dtype, device, batch: int, block: int, hidden: int):
    kind, _, nonlin = cell.partition("_")
    torch.manual_seed(0)
    model = _char_model(
        impl, dtype, device, model=kind, nonlinearity=nonlin or "tanh", hidden=hidden, **TRAIN_MODEL
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (batch, block + 1), device=device)  # [B, T+1]

    def step() -> None:
        logits, _ = model(data[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(cells, impls, dtype, device, cfg) -> list[dict]:
    """Median training-step time, the impls' steps interleaved (the first is a warm-up)."""
    rows = []
    for cell in cells:
        print(f"timing training {cell} ...", file=sys.stderr, flush=True)
        group = {
            impl: {"cell": cell, "impl": impl, "dtype": str(dtype)[6:], **TRAIN_MODEL, **cfg}
            for impl in impls
        }
        runs = [(impl, impl, dtype) for impl in impls]
        if _fp32_base(impls, dtype):
            runs.append((FP32_BASE, "torch", torch.float32))
            group[FP32_BASE] = group["torch"] | {"impl": FP32_BASE, "dtype": "float32"}
        steps = {}
        for name, impl, dt in runs:
            try:
                steps[name] = _train_setup(
                    cell, impl, dt, device, cfg["batch"], cfg["block"], cfg["hidden"]
                )
            except Exception as e:
                group[name]["error"] = bench.error_line(e)
        n = cfg["steps"]
        timings, errors = bench.time_interleaved(
            steps, device, warmup=1, min_repeats=n, max_repeats=n, budget_s=0.0
        )
        for impl, err in errors.items():
            group[impl]["error"] = err
        for impl, t in timings.items():
            group[impl]["step_ms"] = t.median_ms
            group[impl]["spread"] = t.spread()
            group[impl]["tokens_per_s"] = cfg["batch"] * cfg["block"] / (t.median_ms / 1e3)
        rows.extend(group.values())
    _add_speedups(rows, "tokens_per_s", lower_is_better=False)
    return rows


def bench_packed(impls, dtype, device, cfg, spec: dict = PACKED) -> list[dict]:
    """fwd+bwd of one LSTM layer on a PackedSequence of random lengths, every impl, and the
    first kernel impl on the batch padded to the longest length, interleaved."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from fastchar import nn

    print("timing packed lstm ...", file=sys.stderr, flush=True)
    B, I, H, T = spec["B"], spec["I"], spec["H"], spec["max_len"]
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(spec["min_len"], T + 1, (B,), generator=gen)
    lengths[0] = T  # the padded batch is exactly T steps long
    x = torch.randn(T, B, I, generator=gen).to(device, dtype)  # [T, B, I]
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    base = nn.LSTM(I, H).to(device, dtype)
    tokens = int(lengths.sum())

    kernel = next((i for i in impls if i in ("fused", "cpp", "triton")), None)
    calls, rows = {}, {}
    for impl in impls:
        m = nn.LSTM(I, H, impl=impl).to(device, dtype)
        m.load_state_dict(base.state_dict())
        calls[impl] = partial(_module_fwd_bwd, m, packed)
        rows[impl] = {"impl": impl, "input": "packed"}
        if impl == kernel:
            calls[PADDED] = partial(_module_fwd_bwd, m, x)
            rows[PADDED] = {"impl": impl, "input": f"padded to {T}"}
    with torch.enable_grad():
        timings, errors = bench.time_interleaved(calls, device, **cfg)
    for name, err in errors.items():
        rows[name]["error"] = err
    ref = {k: timings.get(k) for k in ("torch", PADDED)}
    for name, t in timings.items():
        rows[name] |= {"fwd_bwd_ms": t.median_ms, "spread": t.spread()}
        rows[name]["tokens_per_s"] = tokens / (t.median_ms / 1e3)
        for k, r in ref.items():
            rows[name][f"vs_{_key(k)}"] = _ratio(r.median_ms if r else None, t.median_ms)
    common = {"cell": "lstm", "dtype": str(dtype)[6:], **spec, "tokens": tokens}
    return [common | r for r in rows.values()]


def _module_fwd_bwd(m, inp) -> None:
    """One forward and backward of module m on a tensor or PackedSequence: the gradients
    of its input and every parameter."""
    from torch.nn.utils.rnn import PackedSequence

    if isinstance(inp, PackedSequence):
        data = inp.data.detach().requires_grad_()
        out = m(PackedSequence(data, inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices))
        out = out[0].data
    else:
        data = inp.detach().requires_grad_()
        out = m(data)[0]
    torch.autograd.grad(out, [data, *m.parameters()], torch.ones_like(out))


PADDED = "padded"


def bench_proj(impls, dtype, device, cfg, shapes: list[dict] = PROJ) -> list[dict]:
    """fwd+bwd of one LSTM layer with proj_size (LSTMP) at each shape, every impl
    interleaved; ratios against torch.nn.LSTM's own."""
    from fastchar import nn

    rows = []
    for spec in shapes:
        B, T, I, H, P = (spec[k] for k in "BTIHP")
        print(f"timing lstm proj_size {spec} ...", file=sys.stderr, flush=True)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(T, B, I, generator=gen).to(device, dtype)
        base = nn.LSTM(I, H, proj_size=P).to(device, dtype)
        calls, shape_rows = {}, {}
        for impl in impls:
            m = nn.LSTM(I, H, proj_size=P, impl=impl).to(device, dtype)
            m.load_state_dict(base.state_dict())
            calls[impl] = partial(_module_fwd_bwd, m, x)
            shape_rows[impl] = {"cell": "lstm", "dtype": str(dtype)[6:], **spec, "impl": impl}
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LSTM with projections is not supported")
            timings, errors = bench.time_interleaved(calls, device, **cfg)
        for name, err in errors.items():
            shape_rows[name]["error"] = err
        ref = timings.get("torch")
        for name, t in timings.items():
            shape_rows[name] |= {"fwd_bwd_ms": t.median_ms, "spread": t.spread()}
            shape_rows[name]["vs_torch"] = _ratio(ref.median_ms if ref else None, t.median_ms)
        rows += shape_rows.values()
    return rows


def print_proj(rows: list[dict]) -> None:
    print(f"LSTM with proj_size: one layer, {rows[0]['dtype']}, fwd+bwd")
    _print_results(
        ["shape", "impl", "fwd+bwd ms", "x torch"],
        rows,
        lambda r: [f"B{r['B']} T{r['T']} I{r['I']} H{r['H']} P{r['P']}", r["impl"]],
        lambda r: [
            _fmt_ms({"median_ms": r["fwd_bwd_ms"], "spread": r["spread"]}),
            _fmt_ratio(r["vs_torch"]),
        ],
    )


def print_packed(rows: list[dict]) -> None:
    r0 = rows[0]
    print(
        f"Packed: one LSTM layer I={r0['I']} H={r0['H']}, {r0['B']} sequences of lengths "
        f"uniform in [{r0['min_len']}, {r0['max_len']}] ({r0['tokens']} tokens), "
        f"{r0['dtype']}, fwd+bwd"
    )
    _print_results(
        ["impl", "input", "fwd+bwd ms", "tok/s", "x torch", "x padded"],
        rows,
        lambda r: [r["impl"], r["input"]],
        lambda r: [
            _fmt_ms({"median_ms": r["fwd_bwd_ms"], "spread": r["spread"]}),
            f"{r['tokens_per_s']:.3g}",
            _fmt_ratio(r["vs_torch"]),
            _fmt_ratio(r["vs_padded"]),
        ],
    )


def _add_speedups(rows: list[dict], key: str, lower_is_better: bool, prefix: str = "vs") -> None:
    """``vs_torch`` / ``vs_reference`` (``prefix``) within each cell: above 1 means better
    than the base."""
    for row in rows:
        for base in BASES:
            ref = next(
                (
                    r
                    for r in rows
                    if r["impl"] == base and r.get("cell") == row.get("cell") and key in r
                ),
                None,
            )
            name = f"{prefix}_{_key(base)}"
            if key not in row or ref is None or min(row[key], ref[key]) <= 0:
                row[name] = None
            elif lower_is_better:
                row[name] = ref[key] / row[key]
            else:
                row[name] = row[key] / ref[key]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_tensor_bytes(fn) -> int:
    """Peak bytes of live CPU tensors during ``fn()`` above those alive before it: the
    profiler's record of every allocation and free, summed in time order. Frees of
    tensors allocated before profiling are not sized by the profiler, so ``fn`` should
    not free older tensors before its peak (a training step after a warm-up step with
    ``zero_grad(set_to_none=True)`` frees none)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def memory_child(spec: dict) -> dict:
    """One CharRNN training step's peak memory above the state after a warm-up step.

    The warm-up step allocates AdamW's state and any lazy buffers, which are the
    same for every impl, and ends with the gradients freed; what the timed step
    adds is activations, saved tensors, gradients and the kernels' scratch.
    CPU reports three measures: ``peak_mb``, the tensor bytes live at the step's peak
    (as ``torch.cuda.max_memory_allocated`` counts on CUDA), ``rss_mb``, the
    resident memory's high-water mark above the warm-up state, which also counts memory
    outside tensors and leaves out allocated pages never touched, and ``rss_peak_mb``,
    that high-water mark for the whole process.
    """
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    step = _train_setup(
        spec["cell"], spec["impl"], dtype, device, spec["batch"], spec["block"], spec["hidden"]
    )
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {
            "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "method": "torch.cuda.max_memory_allocated above the allocated bytes after warm-up",
        }
    base_kb = _status_kb("VmRSS")
    try:
        # "5" resets VmHWM to the current RSS, so the peak below belongs to the timed step.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_method = "VmHWM of one step, reset after a warm-up step; minus VmRSS then"
    except OSError:
        rss_method = "VmHWM since process start minus VmRSS after a warm-up step"
    step()
    peak_kb = _status_kb("VmHWM")
    if base_kb is None or peak_kb is None:
        import resource

        raise RuntimeError(
            "no /proc/self/status; ru_maxrss alone "
            f"({resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} kB) cannot isolate one step"
        )
    return {
        "peak_mb": _peak_tensor_bytes(step) / 2**20,
        "rss_mb": (peak_kb - base_kb) / 1024,
        "baseline_mb": base_kb / 1024,
        # the process's whole resident high-water mark in the step: a warm-up that leaves
        # more resident (and re-used by the step) shows a smaller rss_mb, not a smaller peak
        "rss_peak_mb": peak_kb / 1024,
        "method": "tensor bytes: profiler allocation records of a third step; RSS: " + rss_method,
    }


def bench_memory(cells, impls, dtype, device, cfg, threads) -> list[dict]:
    # Every allocation of a page or more gets its own mapping, returned when freed: with
    # glibc's default (or any threshold above a tensor's size), tensors freed in the
    # warm-up stay resident in the heap and the timed step's re-allocations of them are
    # invisible to VmHWM (200 live 32 KiB tensors read as 0 MB with a 64 KiB threshold).
    # fastchar's cache of sequence buffers (csrc/seq_buffers.cpp) is off in the child for
    # the same reason: blocks it keeps from the warm-up would be resident before the step.
    env = os.environ | {
        "MALLOC_MMAP_THRESHOLD_": "4096",
        "MALLOC_TRIM_THRESHOLD_": "4096",
        "FASTCHAR_SEQ_CACHE_MB": "0",
    }
    rows = []
    for cell in cells:
        for impl in impls:
            spec = {"cell": cell, "impl": impl, "device": str(device), "dtype": str(dtype)[6:]}
            spec |= {k: cfg[k] for k in ("batch", "block", "hidden")}
            print(f"measuring memory {cell} {impl} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)]
            if threads:
                cmd += ["--threads", str(threads)]
            row = {k: spec[k] for k in ("cell", "impl", "batch", "block", "hidden")}
            row |= TRAIN_MODEL
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row["error"] = f"child exited {proc.returncode}: {err}"
            else:
                row |= json.loads(lines[-1])
            rows.append(row)
    _add_speedups(rows, "peak_mb", lower_is_better=True)
    _add_speedups(rows, "rss_mb", lower_is_better=True, prefix="rss_vs")
    _add_speedups(rows, "rss_peak_mb", lower_is_better=True, prefix="rss_peak_vs")
    return rows


def print_extras(result: dict) -> None:
    if result.get("sampling"):
        m = result["sampling"][0]
        print(
            f"Sampling: CharRNN.step, {m['layers']}x{m['hidden']} {m['model']}, batch 1 and "
            f"{SAMPLE_BATCH} (x{SAMPLE_BATCH}: a step's time / {SAMPLE_BATCH}, per character "
            "generated; x torch: against torch at batch 1), no grad"
        )
        _print_results(
            ["impl", "ms/char", "char/s", "x torch", "x reference", "x batch 1"],
            result["sampling"],
            lambda r: [r["impl"]],
            lambda r: [
                f"{r['ms_per_char']:.3g}",
                f"{r['chars_per_s']:.3g}",
                _fmt_ratio(r["vs_torch"]),
                _fmt_ratio(r["vs_reference"]),
                _fmt_ratio(r["vs_batch1"]) if "vs_batch1" in r else "-",
            ],
        )
    if result.get("training"):
        r0 = result["training"][0]
        print(
            f"Training: CharRNN {TRAIN_MODEL['layers']}x{r0['hidden']} {r0['dtype']}, "
            f"batch {r0['batch']}, block {r0['block']}, AdamW, median of {r0['steps']} steps"
        )
        fp32 = any(r["impl"] == FP32_BASE for r in result["training"])
        _print_results(
            ["cell", "impl", "step ms", "tok/s", "x torch", "x reference"]
            + (["x torch fp32"] if fp32 else []),
            result["training"],
            lambda r: [r["cell"], r["impl"]],
            lambda r: (
                [
                    f"{r['step_ms']:.3g}",
                    f"{r['tokens_per_s']:.3g}",
                    _fmt_ratio(r["vs_torch"]),
                    _fmt_ratio(r["vs_reference"]),
                ]
                + ([_fmt_ratio(r.get(f"vs_{_key(FP32_BASE)}"))] if fp32 else [])
            ),
        )
    if result.get("memory"):
        r0 = result["memory"][0]
        print(
            f"Peak training memory: one step of the training model (batch {r0['batch']}, block "
            f"{r0['block']}) above the state after a warm-up step, a fresh process each; peak RSS:"
            " the whole process's resident high-water mark in that step"
        )

        def mb(r: dict, key: str, ratio: str) -> list[str]:
            if key not in r:
                return ["-", "-"]
            return [f"{r[key]:.1f}", "-" if r[ratio] is None else f"{1 / r[ratio]:.2f}x"]

        _print_results(
            ["cell", "impl", "tensor MB", "/ torch", "RSS MB", "/ torch", "peak RSS MB", "/ torch"],
            result["memory"],
            lambda r: [r["cell"], r["impl"]],
            lambda r: (
                mb(r, "peak_mb", "vs_torch")
                + mb(r, "rss_mb", "rss_vs_torch")
                + mb(r, "rss_peak_mb", "rss_peak_vs_torch")
            ),
        )


def write_plot(path: str, rows: list[dict], env: dict) -> None:
    """Grouped bars per cell: fwd+bwd speed-up vs torch for each impl and shape, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cells = list(dict.fromkeys(r["cell"] for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "torch"]
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4.2), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        ratios = {
            ((r["B"], r["T"], r["I"], r["H"]), r["impl"]): r.get("vs_torch_fwd_bwd")
            for r in rows
            if r["cell"] == cell
        }
        shapes = list(dict.fromkeys(shape for shape, _ in ratios))
        for k, impl in enumerate(impls):
            ys = [ratios.get((shape, impl)) or float("nan") for shape in shapes]
            bars = ax.bar([i + k * width for i in range(len(shapes))], ys, width, label=impl)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels([f"B{b} T{t}\nI{i} H{h}" for b, t, i, h in shapes], fontsize=8)
        ax.set_title(f"{cell}: fwd+bwd, torch time / impl time")
        ax.legend(fontsize=8)
    dev = env["gpu"] if env["device"] == "cuda" else env["cpu"]
    fig.suptitle(
        f"{dev}, {env['dtype']}, {env['threads']} threads, torch {env['torch']}, "
        f"fastchar {env['fastchar_commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a PNG at exactly ``path`` (savefig adds ".png")
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _header(env: dict, args) -> str:
    dev = env["gpu"] if env["device"] == "cuda" else f"{env['cpu']} ({env['cpu_count']} cpus)"
    return (
        f"fastchar benchmarks  commit {env['fastchar_commit']}  {env['date_utc']}\n"
        f"device {env['device']}: {dev}  flags {','.join(env['cpu_flags']) or '-'}\n"
        f"dtype {env['dtype']}  threads {env['threads']}  torch {env['torch']}  "
        f"triton {env['triton'] or '-'}  python {env['python']}  "
        f"cpp extension {'built' if env['cpp_extension'] else 'not built'}  "
        f"{'quick' if args.quick else 'full'} run\n"
        f"load average at start {env['loadavg_start']} on {env['cpu_count']} cpus "
        "(ratios are measured in one process, impls interleaved)\n"
    )


def _unwritable(path: str | None) -> str | None:
    """Why a results file cannot be written at ``path`` (None: it can, or none is asked)."""
    if path is None:
        return None
    if not path:
        return "is empty, not a file name"
    if path.endswith(os.sep) or os.path.isdir(path):
        return "is a directory, not a file"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    if not os.access(parent, os.W_OK):
        return f"directory {parent} is not writable"
    return None


def _unplottable(path: str | None) -> str | None:
    """Why the plot cannot be written at ``path``: ``_unwritable``'s reasons, a name that is
    not a .png one, no matplotlib (None: it can, or none is asked)."""
    why = _unwritable(path)
    if why or path is None:
        return why
    if not path.lower().endswith(".png"):
        return "the plot is a PNG: name a .png file"
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # Ctrl-C: no results file was written (atomic_write)
        print("benchmarks/run.py: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "benchmarks/run.py: TRITON_INTERPRET=1 is set; the Triton interpreter is a test "
            "tool and its timings mean nothing. Unset it and run again.",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:  # torch's OpenMP pool crashed at 100000
            print(f"benchmarks/run.py: --threads must be in 1..{MAX_THREADS}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    for flag, path, check in (
        ("--json", args.json, _unwritable),
        ("--plot", args.plot, _unplottable),
    ):
        why = check(path)
        if why:  # said before the run, not after it, when its results would be lost
            print(f"benchmarks/run.py: {flag} {path}: {why}", file=sys.stderr)
            return 2
    if "gemm" in args.parts and "layers" not in args.parts:
        print("benchmarks/run.py: --parts gemm relates the layers part's cpp rows to the "
              "GEMM engines: add layers", file=sys.stderr)  # fmt: skip
        return 2
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/run.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2

    try:
        if args.shapes is not None:  # "" is no shape, not the default grid
            shapes = bench.parse_shapes(args.shapes)
        elif args.quick:
            shapes = [bench.Shape(s.B, max(1, s.T // 4), s.I, s.H) for s in bench.STANDARD_GRID]
        else:
            shapes = list(bench.STANDARD_GRID)
    except ValueError as e:
        print(f"benchmarks/run.py: --shapes: {e}", file=sys.stderr)
        return 2

    cfg = dict(QUICK if args.quick else FULL)
    if args.train_config:
        try:
            batch, block, hidden = bench.parse_ints(args.train_config, 3, "B,T,H")
        except ValueError as e:
            print(f"benchmarks/run.py: --train-config: {e}", file=sys.stderr)
            return 2
        cfg["train"] = cfg["train"] | dict(batch=batch, block=block, hidden=hidden)
    if args.sample_steps is not None:
        if args.sample_steps < 1:
            print("benchmarks/run.py: --sample-steps must be >= 1", file=sys.stderr)
            return 2
        cfg["sample_steps"] = args.sample_steps
    device = torch.device(args.device)
    dtype = bench.DTYPES[args.dtype]
    env = bench.environment(device, dtype)
    print(_header(env, args))

    skipped = {}
    impls = []
    for impl in dict.fromkeys(args.impls or bench.KERNEL_IMPLS):  # each once, in order
        reason = bench.runnable(impl, device.type)
        if reason is None:
            impls.append(impl)
        else:
            skipped[impl] = reason
            print(f"skipping impl {impl}: {reason}")
    if skipped:
        print()
    if not impls:
        print("benchmarks/run.py: no impl left to run on this machine", file=sys.stderr)
        return 2

    result = {"env": env, "settings": {"quick": args.quick, "cells": args.cells}}
    result["settings"] |= {"impls": impls, "parts": args.parts, "timing": cfg["layer"]}
    result["settings"] |= {"train": cfg["train"], "sample_steps": cfg["sample_steps"]}
    result["settings"]["shapes"] = [vars(s) for s in shapes]
    result["skipped"] = skipped
    if "layers" in args.parts:
        result["layers"] = bench_layers(args.cells, shapes, impls, dtype, device, cfg["layer"])
        print_layers(result["layers"])
        if "gemm" in args.parts and device.type == "cpu" and "cpp" in impls:
            result["gemm_limit"] = _gemm.bench_limits(result["layers"], bench.GATES, bench.DTYPES)
            print_limits(result["gemm_limit"])
    if "sample" in args.parts:
        model_cfg = args.sample_model or SAMPLE_MODEL
        result["sampling"] = bench_sampling(impls, dtype, device, cfg["sample_steps"], model_cfg)
    if "train" in args.parts:
        result["training"] = bench_training(args.cells, impls, dtype, device, cfg["train"])
    if "memory" in args.parts:
        result["memory"] = bench_memory(
            args.cells, impls, dtype, device, cfg["train"], args.threads
        )
    print_extras(result)
    if "packed" in args.parts:
        result["packed"] = bench_packed(impls, dtype, device, cfg["layer"], PACKED)
        if result["packed"]:
            print_packed(result["packed"])
    if "proj" in args.parts:
        result["proj"] = bench_proj(impls, dtype, device, cfg["layer"], PROJ)
        if result["proj"]:
            print_proj(result["proj"])

    env["loadavg_end"] = bench.load_average()
    print(f"load average at end {env['loadavg_end']}")
    try:
        if args.json:
            with atomic_write(args.json) as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
        if args.plot and result.get("layers"):
            write_plot(args.plot, result["layers"], env)
            print(f"wrote {args.plot}")
        elif args.plot:
            print(f"not writing {args.plot}: the plot shows the layers part, which did not run")
    except OSError as e:  # the results are above, on stdout
        print(f"benchmarks/run.py: cannot write {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    failed = [r for part in PARTS for r in result.get(_KEYS[part], []) if "error" in r]
    return 1 if failed else 0


_KEYS = {
    "layers": "layers",
    "gemm": "gemm_limit",
    "sample": "sampling",
    "train": "training",
    "memory": "memory",
    "packed": "packed",
    "proj": "proj",
}

if __name__ == "__main__":
    sys.exit(main())
