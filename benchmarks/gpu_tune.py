"""Time every Triton launch variant against cuDNN on one GPU, to set the thresholds in
``fastchar/triton/_common.py`` (LOOP_MAX_BYTES, LOOP_ACC_MAX, RESIDENT_MAX) from one run.

    python benchmarks/gpu_tune.py [--dtype bfloat16|float32|float16]
        [--cells lstm,gru,rnn_tanh] [--shapes "B,T,I,H;..."]
        [--variants loop,step,persistent] [--resident 0,8192,16384]
        [--jobs N] [--quick] [--json FILE]

For each cell and shape it times forward and forward + backward of
``fastchar.ops.<cell>(..., impl="triton")`` with each variant forced (and each
RESIDENT_MAX value; settings that give the same launch plan are timed once), next
to ``impl="torch"`` (cuDNN), interleaved in rounds with CUDA synchronised inside each
timed call (benchmarks/_harness.py). The ``loop`` variant is only tried where the
padded H is at most 128: beyond that its resident weights do not fit. ``--jobs N``
first compiles every kernel in N child processes (Triton's disk cache then serves
the timing process). A failed variant is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("loop", "step", "persistent")
LOOP_LIMIT_H = 128
# DESIGN section 5's grid, the long-sequence case, and small H to place LOOP_MAX_BYTES
DEFAULT_SHAPES = "32,128,64,256;64,128,128,512;1,256,64,256;8,256,64,512;16,1024,768,768"
DEFAULT_SHAPES += ";32,128,64,32;32,128,64,64;32,128,64,128;128,128,64,1024"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_tune.py", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--cells", default="lstm,gru,rnn_tanh")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, metavar="B,T,I,H;...")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--resident", default="8192", help="RESIDENT_MAX values to try")
    p.add_argument("--jobs", type=int, default=1, help="compile in N processes first")
    p.add_argument("--quick", action="store_true", help="T/4 and few repeats")
    p.add_argument("--json", metavar="FILE")
    p.add_argument(
        "--compile-only", action="store_true", help="compile in --jobs processes, time nothing"
    )
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    return p


def _call(tc, case, impl: str, variant: str | None, resident: int | None, mode: str):
    saved = tc.RESIDENT_MAX
    tc.RESIDENT_MAX = saved if resident is None else resident
    try:
        with tc.use_variant(variant):
            return (case.forward if mode == "fwd" else case.forward_backward)(impl)
    finally:
        tc.RESIDENT_MAX = saved


def _ms(v) -> str:
    return f"{v:9.3f}" if isinstance(v, float) else f"{'FAIL':>9}"


def _entries(tc, H, s, n_gates: int, x, variants, residents) -> dict[str, tuple]:
    """name -> (impl, variant, resident, plan text); one entry per distinct launch plan."""
    import triton

    entries = {"torch": ("torch", None, None, "cuDNN")}
    seen = set()
    saved = tc.RESIDENT_MAX
    for v in variants:
        if v == "loop" and triton.next_power_of_2(s.H) > LOOP_LIMIT_H:
            continue
        for r in residents:
            tc.RESIDENT_MAX = r
            try:
                with tc.use_variant(v):
                    p = tc.plan(s.B, s.H, n_gates, x, s.T)
            except RuntimeError as e:
                entries[f"triton:{v}"] = ("triton", v, r, H.error_line(e)[:40])
                continue
            finally:
                tc.RESIDENT_MAX = saved
            key = (p, p.w_resident(s.H))
            if key in seen:
                continue
            seen.add(key)
            text = (
                f"{p.variant} BB{p.BLOCK_B} BH{p.BLOCK_H} BK{p.BLOCK_K} {p.n_htiles}x{p.n_btiles}"
            )
            entries[f"triton:{v}:R{r}"] = ("triton", v, r, text)
    return entries


def _warm_in_children(args, cells, shapes, jobs: int) -> None:
    def child(cell, s):
        cmd = [sys.executable, os.path.abspath(__file__), "--warm-only", "--dtype", args.dtype]
        cmd += ["--cells", cell, "--shapes", f"{s.B},{s.T},{s.I},{s.H}"]
        cmd += ["--variants", args.variants, "--resident", args.resident]
        return subprocess.run(cmd, capture_output=True, text=True).returncode

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda cs: child(*cs), [(c, s) for c in cells for s in shapes]))
    print(f"# compiled in {jobs} processes; {sum(c != 0 for c in codes)} of them failed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "gpu_tune.py: unset TRITON_INTERPRET; interpreter timings mean nothing", file=sys.stderr
        )
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_tune.py: needs a CUDA device", file=sys.stderr)
        return 2
    import _harness as H

    import fastchar.triton._common as tc

    try:
        shapes = H.parse_shapes(args.shapes)
        residents = [int(v) for v in args.resident.split(",")]
    except ValueError as e:
        print(f"gpu_tune.py: {e}", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    cells = [c for c in args.cells.split(",") if c]
    bad = [v for v in variants if v not in VARIANTS] + [c for c in cells if c not in H.GATES]
    if bad:
        print(f"gpu_tune.py: unknown variants or cells {bad}", file=sys.stderr)
        return 2
    if args.quick:
        shapes = [H.Shape(s.B, max(1, s.T // 4), s.I, s.H) for s in shapes]
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")

    if args.warm_only:
        for cell in cells:
            for s in shapes:
                case = H.make_layer_case(cell, s, dtype, device)
                for impl, v, r, _ in _entries(
                    tc, H, s, H.GATES[cell], case.args[0], variants, residents
                ).values():
                    if impl == "triton":
                        try:
                            _call(tc, case, impl, v, r, "fwd_bwd")
                        except Exception:  # noqa: BLE001 - the timing run reports it
                            pass
        torch.cuda.synchronize()
        return 0
    if args.jobs > 1 or args.compile_only:
        _warm_in_children(args, cells, shapes, args.jobs)
    if args.compile_only:
        return 0

    cfg = dict(warmup=2, min_repeats=3, max_repeats=10 if args.quick else 30, budget_s=0.5)
    env = H.environment(device, dtype)
    print(
        f"# {env['gpu']}, {args.dtype}, torch {env['torch']}, triton {env['triton']}, "
        f"cuDNN {env['cudnn']}"
    )
    print(
        f"{'cell':<9}{'B,T,I,H':<20}{'impl':<24}{'plan':<36}{'fwd ms':>9}{'f+b ms':>9}"
        f"{'x cuDNN':>9}"
    )
    rows = []
    for cell in cells:
        for s in shapes:
            case = H.make_layer_case(cell, s, dtype, device)
            entries = _entries(tc, H, s, H.GATES[cell], case.args[0], variants, residents)
            result = {n: {} for n in entries}
            for mode in ("fwd", "fwd_bwd"):
                fns = {n: partial(_call, tc, case, *e[:3], mode) for n, e in entries.items()}
                with torch.enable_grad():
                    timings, errors = H.time_interleaved(fns, device, **cfg)
                for n in entries:
                    if n in timings:
                        result[n][mode] = timings[n].median_ms
                    else:
                        result[n][f"error_{mode}"] = errors.get(n, "not run")
            base = result["torch"].get("fwd_bwd")
            for n, (impl, variant, resident, plan_text) in entries.items():
                r = result[n]
                fb = r.get("fwd_bwd")
                row = {
                    "cell": cell,
                    **vars(s),
                    "dtype": args.dtype,
                    "impl": impl,
                    "variant": variant,
                    "resident_max": resident,
                    "plan": plan_text,
                    **r,
                    "vs_torch_fwd_bwd": base / fb if base and fb else None,
                }
                rows.append(row)
                ratio = row["vs_torch_fwd_bwd"]
                print(
                    f"{cell:<9}{f'{s.B},{s.T},{s.I},{s.H}':<20}{n:<24}{plan_text:<36}"
                    f"{_ms(r.get('fwd'))}{_ms(r.get('fwd_bwd'))}"
                    + (f"{ratio:9.2f}" if ratio else f"{'-':>9}"),
                    flush=True,
                )
                for k in ("error_fwd", "error_fwd_bwd"):
                    if k in r:
                        print(f"    {k}: {r[k]}", flush=True)

    best = {}
    for row in rows:
        if row["impl"] != "triton" or row.get("fwd_bwd") is None:
            continue
        key = (row["cell"], row["B"], row["T"], row["I"], row["H"])
        if key not in best or row["fwd_bwd"] < best[key]["fwd_bwd"]:
            best[key] = row
    print("\nfastest variant per case (fwd+bwd):")
    for (cell, B, T, I, Hh), row in best.items():
        ratio = row["vs_torch_fwd_bwd"]
        vs = f"{ratio:.2f}x cuDNN" if ratio else "cuDNN failed"
        print(
            f"  {cell:<9}B{B} T{T} I{I} H{Hh}: {row['plan']} (R{row['resident_max']}) "
            f"{row['fwd_bwd']:.3f} ms ({vs})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
