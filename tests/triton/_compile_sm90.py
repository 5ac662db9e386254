"""Compile the Triton kernels for an H100 (sm_90) without a GPU, with Triton's bundled
ptxas: the persistent variant cannot run under the interpreter, so this is how CPU-only
CI sees that it still lowers. Run without TRITON_INTERPRET (the interpreter replaces
the kernels). Prints one line per kernel; exits 1 if any fails to compile."""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastchar.triton import gru, lstm, rnn

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {"bf16": "*bf16", "fp32": "*fp32"}
DOT = {"bf16": tl.bfloat16, "fp32": tl.float32}
# accumulation-dtype buffers, whatever the input dtype
FP32_BUFFERS = ("dc_ptr", "carry_ptr", "cs_ptr")
VARIANTS = {
    "persistent": dict(
        BLOCK_B=16, BLOCK_H=16, BLOCK_K=64, H_IN_REGS=False, W_RESIDENT=False, SYNC=True, CM=".cg"
    ),
    "loop": dict(
        BLOCK_B=16, BLOCK_H=64, BLOCK_K=64, H_IN_REGS=True, W_RESIDENT=True, SYNC=False, CM=""
    ),
    "step": dict(
        BLOCK_B=16, BLOCK_H=16, BLOCK_K=64, H_IN_REGS=False, W_RESIDENT=True, SYNC=False, CM=""
    ),
}


def signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "sync_ptr":
            sig[name] = "*i32"
        elif name == "steps_ptr":
            sig[name] = "*i64"
        elif name in FP32_BUFFERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = POINTER[dtype]
        else:
            sig[name] = "i32"
    return sig


def main() -> int:
    failed = 0
    cells = {
        "lstm": (lstm, {"STORE_GATES": True}, {}),
        "gru": (gru, {"STORE_GATES": True}, {}),
        "rnn": (rnn, {"RELU": True}, {"RELU": False}),
    }
    jobs = [(cell, "persistent", "bf16", False) for cell in cells]
    jobs += [("lstm", "persistent", "fp32", False), ("lstm", "loop", "bf16", False)]
    jobs += [("lstm", "step", "bf16", False)]
    # packed input (batch_sizes): the per-step table loads and the batch-tile skip
    jobs += [(cell, "persistent", "bf16", True) for cell in cells]
    jobs += [("lstm", "loop", "bf16", True), ("gru", "step", "bf16", True)]
    for cell, variant, dtype, packed in jobs:
        module, fwd_extra, bwd_extra = cells[cell]
        for kernel, extra in (
            (module._fwd_kernel, fwd_extra),
            (module._bwd_kernel, {**bwd_extra, "FINAL": True}),
        ):
            consts = {**VARIANTS[variant], **extra, "ACC": tl.float32, "PREC": "ieee"}
            # dense launches pass steps_ptr=None, which Triton specialises as a constexpr
            consts |= {"PACKED": packed} | ({} if packed else {"steps_ptr": None})
            consts["DOT"] = DOT[dtype]
            src = ASTSource(
                kernel,
                signature(kernel, dtype, consts),
                constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
            )
            what = f"{cell} {kernel.fn.__name__} {variant} {dtype}{' packed' * packed}"
            try:
                compiled = triton.compile(src, target=TARGET, options={"num_warps": 8})
                assert compiled.asm["cubin"], "no cubin"
                print(f"ok   {what}")
            except Exception as e:  # noqa: BLE001 - every failure is listed, then exit 1
                failed = 1
                print(f"FAIL {what}: {type(e).__name__}: {str(e)[:2000]}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
