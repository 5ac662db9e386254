"""The CPU step-GEMM plan: which engine runs each recurrent GEMM shape, and its disk cache.

The C++ kernels pick an engine (``mkl``, ``onednn``, ``fma``; for bfloat16 also
``bf16dot`` and ``bf16fma``) for every (dtype, op, M, N, K) of a time loop's per-thread
step GEMM by timing the engines this CPU runs at first use, and keep the choice for the
process (csrc/gemm.h). This module reads
that plan, seeds it from a cache file and writes the file back at exit, so a new process
skips the measurements:

    $FASTCHAR_CACHE_DIR/gemm-plan.json     (default: $XDG_CACHE_HOME/fastchar or
                                            ~/.cache/fastchar)

The file is keyed by the CPU model and flags, the torch version, the fastchar version and
the compiled extension (its size and modification time: a rebuilt kernel may change which
engine wins, so its timings are taken again);
a file that does not parse, belongs to another CPU or version, or names engines this CPU
cannot run is ignored (row by row, where only some rows are bad) and rewritten at exit.
An unwritable cache directory only means that the next process measures again.
``FASTCHAR_GEMM=auto|mkl|onednn|fma|bf16dot|bf16fma`` forces one engine (the kernels raise
RuntimeError when this CPU cannot run it). Under ``torch.use_deterministic_algorithms(True)``
nothing is timed: each GEMM runs a fixed engine for this CPU (bf16dot for bfloat16 where it
runs, else fma, else mkl; bfloat16 matmuls widened), so every process gives the same bits.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

from fastchar import __version__
from fastchar.atomic import atomic_write
from fastchar.backends import cpp_loaded
from fastchar.cache import cache_dir

ENGINES = ("mkl", "onednn", "fma", "bf16dot", "bf16fma")  # csrc/gemm.h, Engine
# The GEMMs the plan covers (csrc/gemm.h, Op): a time loop's dgates @ W ("nn") and h @ W^T
# ("nt"), a *_cell op's x @ W^T with a W used once ("cell"), and a backward pass's wide
# GEMMs over all T * B rows (torch.ops.fastchar.mm_sum): dgates @ W_ih ("wide_nn", A [M, K])
# and the weight gradients dgates^T @ h ("wide_tn", A stored [K, M]).
OPS = ("nn", "nt", "cell", "wide_nn", "wide_tn")
DTYPES = (torch.float32, torch.bfloat16)
CACHE_FORMAT = 6  # 5: the wide ops; bf16_matmul measured with warm-up and a margin; 6: build
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
_DTYPE_CODES = {torch.float32: 6, torch.bfloat16: 15}  # c10::ScalarType values
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo, read once per process ({} where there
    is none): the plan cache's identity asks for them at every read and save."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():  # the first processor's block ends
                break
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo with its family and model numbers, which a
    VM's generic name ("AMD EPYC": a Zen 3 and a Zen 4 alike) leaves out; elsewhere
    platform.processor()."""
    fields = _cpuinfo()
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide which engines run, as /proc/cpuinfo lists them."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in _FLAGS if f in have]


def step_shapes(n_gates: int, B: int, H: int, threads: int | None = None) -> dict:
    """A time loop's per-thread step GEMMs, as the C++ loops split H (csrc/common.h,
    UnitSlices): {"fwd": (op, M, N, K), "bwd": ..., "threads": slices at once}.
    The first slice is the widest; the last may be narrower."""
    threads = torch.get_num_threads() if threads is None else threads
    threads = 1 if H < 32 else threads
    per_thread = -(-H // threads)  # ceil
    chunk = -(-per_thread // 16) * 16
    n = min(chunk, H)
    return {
        "fwd": ("nt", B, n_gates * n, H),
        "bwd": ("nn", B, n, n_gates * H),
        "threads": -(-H // chunk),
    }


def why_not(engine: str, dtype: torch.dtype) -> str | None:
    """None when ``engine`` runs ``dtype`` step GEMMs on this CPU, else the reason."""
    if not cpp_loaded():
        return "the C++ extension is not built"
    reason = torch.ops.fastchar.gemm_why_not(engine, dtype)
    return reason or None


def forced_report() -> list[str]:
    """What FASTCHAR_GEMM forces, per dtype, and where it cannot run (its GEMMs raise
    there): lines for ``fastchar.info``; empty when it is unset or "auto"."""
    forced = os.environ.get("FASTCHAR_GEMM", "").strip().lower()  # as the kernels read it
    if forced in ("", "auto"):
        return []
    if forced not in ENGINES:
        return [
            f"FASTCHAR_GEMM={forced} is not an engine (auto, {', '.join(ENGINES)}): every "
            f"{' and '.join(str(d).removeprefix('torch.') for d in DTYPES)} CPU kernel call "
            "will raise until it is unset or fixed (float64 runs torch's BLAS)"
        ]
    lines = []
    for dtype in DTYPES:
        reason = why_not(forced, dtype)
        name = str(dtype).removeprefix("torch.")
        lines.append(
            f"FASTCHAR_GEMM={forced} forces every {name} step GEMM onto {forced}"
            if reason is None
            else f"FASTCHAR_GEMM={forced} cannot run {name} here ({reason}): its GEMMs raise"
        )
    return lines


def row_blocks(mode: str = "") -> str:
    """The FMA kernels' row blocks where full blocks (12 rows with AVX-512, 6 with AVX2)
    would leave 1-3 rows over (13 rows: 12 + 1, or "balanced" 6 + 7; AVX2, 8 rows: 6 + 2 or
    4 + 4), as measured on this CPU at first use, and why;
    ``mode`` "auto", "equal" or "balanced" sets them first (tests, A/B). The result of a
    product does not depend on them."""
    return torch.ops.fastchar.gemm_row_blocks(mode)


def row_block_starts(M: int) -> list[int]:
    """Where the widest FMA kernels' row blocks start for M rows, as now in force (and M
    last); empty where this build has no FMA kernels."""
    return torch.ops.fastchar.gemm_row_block_starts(M)


def choose(dtype: torch.dtype, op: str, M: int, N: int, K: int, threads: int = 1) -> str:
    """The engine for one GEMM C[M, N] = A[M, K] @ op(W) (measured now if new)."""
    return torch.ops.fastchar.gemm_choose(dtype, OPS.index(op), M, N, K, threads)


def rate(engine: str, dtype, op: str, M: int, N: int, K: int, threads: int = 1) -> float:
    """GFLOP/s of one engine at one GEMM shape, ``threads`` copies running at once."""
    return torch.ops.fastchar.gemm_rate(engine, dtype, OPS.index(op), M, N, K, threads)


def run(engine: str, a, w, op: str, c=None):
    """a [M, K] @ op(w) (+ c) through one engine, float32: the engines' direct test."""
    return torch.ops.fastchar.gemm_run(engine, a, w, OPS.index(op), c)


def entries() -> list[dict]:
    """The plan so far: one dict per measured (or cached) shape."""
    if not cpp_loaded():
        return []
    rows = torch.ops.fastchar.gemm_plan_entries().tolist()
    return [
        dict(dtype=_CODE_DTYPES[d], op=OPS[o], M=M, N=N, K=K, engine=ENGINES[e])
        for d, o, M, N, K, e in rows
        if d in _CODE_DTYPES
    ]


def bf16_step_speedup(n_gates: int, B: int, H: int) -> float:
    """How much faster this CPU runs a time loop's step GEMMs (forward and backward, the
    plan's engine for each) in bfloat16 than in float32: the float32 time over the
    bfloat16 time, measured now (or taken from the plan) at the loop's per-thread shapes."""
    shapes = step_shapes(n_gates, B, H)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        total = 0.0
        for part in ("fwd", "bwd"):
            op, M, N, K = shapes[part]
            engine = choose(dtype, op, M, N, K, shapes["threads"])
            total += 2 * M * N * K / rate(engine, dtype, op, M, N, K, shapes["threads"])
        seconds[dtype] = total
    return seconds[torch.float32] / seconds[torch.bfloat16]


_bf16_widen: bool | None = None  # measured (or read from the cache) once per process
_BF16_SHAPE = (64, 256, 256)  # M, K, N: a step-sized matmul, quick even at 0.3 GFLOP/s
# Widening only where bf16 is clearly the slower: without bf16 instructions it is 10-100x
# slower; with them the two are close at this small shape (an AMD EPYC Zen 5 ran bf16 in
# half the time of fp32 here, but one noisy timing had it slower and that choice, kept in
# the cache, ran every bf16 weight gradient widened at half the speed).
_BF16_WIDEN_IF_SLOWER = 1.5


def _time_mm(a, b, dtype) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a.to(dtype), b.to(dtype)).to(a.dtype)
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_matmul_widens() -> bool:
    """True where torch's bfloat16 CPU matmul is clearly slower (1.5x) than widening to float32.

    Without bf16 instructions (or AMX) ATen's bf16 GEMM can be 10-100x slower than its
    float32 one, so the ops run their input projection and weight gradients in float32 on
    such CPUs (bf16 results, fp32 accumulation either way). Timed once per process on a
    step-sized matmul, both ways including the casts; kept in the cache file. A graph that
    torch.compile traces reads the answer as a global, which it guards on (a new answer,
    after ``clear``, traces again).
    """
    if torch.are_deterministic_algorithms_enabled():
        return True  # no timing decides (as for the step GEMMs): the same bits every process
    if _bf16_widen is None:
        _measure_bf16_once()
    return _bf16_widen


@torch.compiler.assume_constant_result  # torch.compile runs it as it traces, in one graph
def _measure_bf16_once() -> bool:
    """Sets _bf16_widen. Times real tensors even when first asked while torch.compile traces
    a graph (fake tensors, proxies), and the dtypes asked for, not autocast's."""
    global _bf16_widen
    if _bf16_widen is None:
        with torch.autocast("cpu", enabled=False), _disable_current_modes():
            _bf16_widen = _measure_bf16_widens()
    return _bf16_widen


def _measure_bf16_widens() -> bool:
    M, K, N = _BF16_SHAPE
    gen = torch.Generator().manual_seed(0)  # the user's random stream stays put
    a = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(K, N, generator=gen).bfloat16()
    _time_mm(a, b, torch.float32)  # warm-up: first calls, oneDNN's kernel generation
    _time_mm(a, b, torch.bfloat16)
    return _time_mm(a, b, torch.float32) * _BF16_WIDEN_IF_SLOWER < _time_mm(a, b, torch.bfloat16)


def cache_path() -> Path | None:
    """The plan's cache file, or None where there is no cache directory (fastchar.cache)."""
    root = cache_dir()
    return root / "gemm-plan.json" if root else None


def extension_build() -> str:
    """The compiled extension's identity: "<size>-<mtime in ns>" of its library file, which
    every build rewrites ("none" without one)."""
    if not cpp_loaded():
        return "none"
    from fastchar import _C

    try:
        st = os.stat(_C.__file__)
    except (OSError, TypeError):
        return "unknown"
    return f"{st.st_size}-{st.st_mtime_ns}"


def _identity() -> dict:
    return {
        "format": CACHE_FORMAT,
        "cpu": cpu_model(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "fastchar": __version__,
        "build": extension_build(),
    }


def _row(entry) -> list[int] | None:
    """A cache file's entry as a gemm_plan_load row, or None if it is not a valid one."""
    try:
        row = [_DTYPE_CODES[getattr(torch, entry["dtype"])], OPS.index(entry["op"])]
        dims = [entry[k] for k in ("M", "N", "K")]
        if not all(type(d) is int and 0 < d < 2**31 for d in dims):
            return None  # not a shape (a float, a bool, inf, 1e30, 2**70)
        return [*row, *dims, ENGINES.index(entry["engine"])]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _read(path: Path) -> dict | None:
    """The cache file's contents if it is one with this process's identity, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[..."
        return None
    if not isinstance(data, dict) or {k: data.get(k) for k in _identity()} != _identity():
        return None  # another CPU, torch or fastchar: its timings say nothing here
    entries = data.get("entries")
    entries = entries if isinstance(entries, list) else []
    data["entries"] = [e for e in entries if _row(e) is not None]  # a bad one is dropped
    return data


_loaded: set[tuple] = set()


def _key(e: dict) -> tuple:
    return (e["dtype"], e["op"], e["M"], e["N"], e["K"], e["engine"])


def load_cache(path: Path | None) -> int:
    """Seeds the plan from the cache file; returns how many entries were taken (0 if none)."""
    data = _read(path) if path else None
    if data is None:
        return 0
    global _bf16_widen
    if data.get("bf16_matmul") in ("widen", "native") and _bf16_widen is None:
        _bf16_widen = data["bf16_matmul"] == "widen"
        _loaded.add(("bf16_matmul", _bf16_widen))
    rows = [_row(e) for e in data["entries"]]
    if not rows or not cpp_loaded():
        return 0
    try:
        taken = torch.ops.fastchar.gemm_plan_load(torch.tensor(rows, dtype=torch.int64))
    except (RuntimeError, ValueError):
        return 0  # rows the plan refuses: ignored, measured again and rewritten
    _loaded.update(_key(e) for e in entries())
    return int(taken)


def save_cache(path: Path | None) -> bool:
    """Writes the plan to the cache file (atomically) when it holds anything new.

    What the file holds from another process that ran since this one read it is kept
    (for the shapes this process did not choose), so processes that finish together do
    not drop each other's measurements."""
    plan = entries()
    known = {_key(e) for e in plan}
    if _bf16_widen is not None:
        known.add(("bf16_matmul", _bf16_widen))
    if not known or known <= _loaded or path is None:
        return False
    data = dict(_identity())
    theirs = _read(path) or {"entries": []}
    if _bf16_widen is not None:
        data["bf16_matmul"] = "widen" if _bf16_widen else "native"
    elif theirs.get("bf16_matmul") in ("widen", "native"):
        data["bf16_matmul"] = theirs["bf16_matmul"]
    ours = [dict(e, dtype=str(e["dtype"]).removeprefix("torch.")) for e in plan]
    shapes = {_key(e)[:5] for e in ours}
    data["entries"] = ours + [e for e in theirs["entries"] if _key(e)[:5] not in shapes]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            json.dump(data, f, indent=1)
    except OSError:
        return False  # read-only or full: the next process measures again
    _loaded.update(known)
    return True


def clear() -> None:
    """Forgets every choice in this process (the next GEMM of each shape measures again)."""
    global _bf16_widen
    if cpp_loaded():
        torch.ops.fastchar.gemm_plan_clear()
    _loaded.clear()
    _bf16_widen = None


def _install() -> None:
    if cpp_loaded():
        path = cache_path()  # once: a chdir or a changed environment later moves nothing
        load_cache(path)
        atexit.register(save_cache, path)
