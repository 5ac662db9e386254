"""Time every Triton launch variant against cuDNN on one GPU, to set the thresholds in
``fastchar/triton/_common.py`` (LOOP_MAX_H, RESIDENT_MAX) from one run.

    python benchmarks/gpu_tune.py [--dtype bfloat16|float32] [--cells lstm,gru,rnn_tanh]
        [--shapes "B,T,I,H;..."] [--variants loop,step,persistent] [--resident 0,16384]
        [--quick] [--json FILE]

For each cell and shape it times forward and forward + backward of
``fastchar.ops.<cell>(..., impl="triton")`` with each variant forced (and each
RESIDENT_MAX value), next to ``impl="torch"`` (cuDNN), interleaved in rounds with
CUDA synchronised inside each timed call (benchmarks/_harness.py). The ``loop``
variant is only tried where the padded H is at most 128: beyond that its resident
weights cannot fit in registers. A failed variant is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("loop", "step", "persistent")
LOOP_LIMIT_H = 128
# DESIGN section 5's grid, the long-sequence case and small H to place LOOP_MAX_H
DEFAULT_SHAPES = "32,128,64,256;64,128,128,512;1,256,64,256;8,256,64,512;16,1024,768,768"
DEFAULT_SHAPES += ";32,128,64,32;32,128,64,64;32,128,64,128;128,128,64,1024"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_tune.py", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--cells", default="lstm,gru,rnn_tanh")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, metavar="B,T,I,H;...")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--resident", default="16384", help="RESIDENT_MAX values to try")
    p.add_argument("--quick", action="store_true", help="T/4 and few repeats")
    p.add_argument("--json", metavar="FILE")
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
    import triton

    import fastchar.triton._common as tc

    try:
        shapes = H.parse_shapes(args.shapes)
        residents = [int(v) for v in args.resident.split(",")]
    except ValueError as e:
        print(f"gpu_tune.py: {e}", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"gpu_tune.py: unknown variants {bad}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    if args.quick:
        shapes = [H.Shape(s.B, max(1, s.T // 4), s.I, s.H) for s in shapes]
    cfg = dict(warmup=2, min_repeats=3, max_repeats=10 if args.quick else 30, budget_s=0.5)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    env = H.environment(device, dtype)
    default_resident = tc.RESIDENT_MAX
    print(
        f"# {env['gpu']}, {args.dtype}, torch {env['torch']}, triton {env['triton']}, "
        f"cuDNN {env['cudnn']}"
    )
    print(
        f"{'cell':<9}{'B,T,I,H':<20}{'impl':<26}{'plan':<34}{'fwd ms':>9}{'f+b ms':>9}"
        f"{'x cuDNN':>9}"
    )

    rows = []
    for cell in args.cells.split(","):
        n_gates = H.GATES[cell]
        for s in shapes:
            case = H.make_layer_case(cell, s, dtype, device)
            entries = {"torch": ("torch", None, None)}
            for v in variants:
                if v == "loop" and triton.next_power_of_2(s.H) > LOOP_LIMIT_H:
                    continue
                for r in residents if v != "loop" else [default_resident]:
                    entries[f"triton:{v}:R{r}"] = ("triton", v, r)

            result = {}
            for mode in ("fwd", "fwd_bwd"):
                with torch.enable_grad():
                    timings, errors = H.time_interleaved(
                        {n: partial(_call, tc, case, *entries[n], mode) for n in entries},
                        device,
                        **cfg,
                    )
                for n in entries:
                    slot = result.setdefault(n, {})
                    if n in timings:
                        slot[mode] = timings[n].median_ms
                    else:
                        slot[f"error_{mode}"] = errors.get(n, "not run")
            base = result["torch"].get("fwd_bwd")
            for n, (impl, variant, resident) in entries.items():
                plan_text = ""
                if impl == "triton":
                    tc.RESIDENT_MAX = resident
                    try:
                        with tc.use_variant(variant):
                            p = tc.plan(s.B, s.H, n_gates, case.args[0])
                        plan_text = (
                            f"{p.variant} BB{p.BLOCK_B} BH{p.BLOCK_H} BK{p.BLOCK_K} "
                            f"{p.n_htiles}x{p.n_btiles}"
                        )
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        plan_text = H.error_line(e)[:32]
                    tc.RESIDENT_MAX = default_resident
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
                ratio = (
                    f"{row['vs_torch_fwd_bwd']:9.2f}" if row["vs_torch_fwd_bwd"] else f"{'-':>9}"
                )
                print(
                    f"{cell:<9}{f'{s.B},{s.T},{s.I},{s.H}':<20}{n:<26}{plan_text:<34}"
                    f"{_ms(r.get('fwd'))}{_ms(r.get('fwd_bwd'))}{ratio}",
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
            f"  {cell:<9}B{B} T{T} I{I} H{Hh}: {row['variant']} R{row['resident_max']} "
            f"{row['fwd_bwd']:.3f} ms ({vs})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
