"""What the three cell modules share on the host: launch planning and launching (their
device functions are in ``_tiles``).

Shape letters: T time, B batch, H hidden, G gates (4H / 3H / H), BB/BH/BK block sizes
for batch rows, owned hidden columns and the reduction chunk.

Every sequence kernel is one time loop, ``for t in range(t0, t0 + n_steps)``, whose
body first multiplies the previous step's result (h_{t-1} forward, the gate
gradients of step t+1 backward) by this program's slice of W_hh and then does the
cell's pointwise math. The launch plan decides who owns what:

``loop``        one program per batch tile owns all H columns: W_hh is loaded once,
                the state stays in registers and one launch covers all T steps.
``persistent``  a grid of programs each owns BH columns of one batch tile and loops
                over T itself; after every step the programs of a batch tile meet at a
                barrier (an atomic counter in global memory) before reading what the
                others wrote. CUDA only: the interpreter runs programs one after
                another, so the first program would wait forever.
``step``        the same grid with one launch per step (the launch boundary is the
                barrier); runs everywhere, including the interpreter.

``plan`` picks ``loop`` on CUDA when the padded W_hh fits in LOOP_MAX_BYTES (bf16:
H <= 64 for LSTM and GRU, H <= 128 for RNN; fp32: half that), else ``persistent``
when its grid fits on the SMs at once (BH grows from 16 to 128 to make it fit), else
``step``; under the interpreter ``loop``
up to INTERPRETER_LOOP_MAX weights (LSTM H <= 64), else ``step`` (also for CUDA tensors
under the interpreter). ``use_variant`` or the environment
variable FASTCHAR_TRITON_VARIANT forces one (tests, benchmarks/gpu_tune.py). A ``loop`` or
``persistent`` launch that needs more shared memory than the GPU gives a block runs as
``step`` with the smallest blocks, with a warning (``launch``). The persistent grid's
programs must all be resident at once: on a GPU shared with other processes (MPS with a
thread percentage) set FASTCHAR_TRITON_VARIANT=step.

Packed (variable-length) input: with ``batch_sizes`` the sequence tensors are
PackedSequence-ordered [N, *] instead of [T, B, *]; step t is rows off[t] .. off[t] + b_t - 1,
for sequences 0 .. b_t - 1. The kernels take PACKED=True and a [T + 1, 2] int64 table of
(off[t], b_t), last row (N, 0) (``packing``); they read it each step, mask rows >= b_t and
skip the step's work in batch tiles with no row left (those still arrive at the
persistent barrier, whose target counts steps), and the ``step`` variant launches only
the tiles with rows. All three variants support it; h_n (c_n) is gathered on the host
from each sequence's last row. Dense input is the same kernels with PACKED=False.

Products run in the input dtype with fp32 accumulation (fp64 for fp64): on CUDA
bf16/fp16 operands go to the tensor cores, so h is rounded to the input dtype before
each product, as cuDNN does; under the interpreter, which cannot compute in bf16, the
half types multiply in fp32 (``dot_type``). Gates, cell state and every pointwise
step are fp32; float32 products use TF32 only where cuDNN would (``dot_precision``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fastchar.backends import interpreter_on

VARIANTS = ("loop", "persistent", "step")
_ENV_VARIANT = "FASTCHAR_TRITON_VARIANT"
_forced: list[str] = []

# Register budget (elements) for the slice of W_hh one program keeps resident; above
# it the reduction streams W_hh from L2 in BK chunks every step. Compiled for sm_90
# (no GPU run yet), 4 gates x BH=16 x BK=256 already spills in the LSTM backward, so
# the default stops below that. To be tuned on a GPU with benchmarks/gpu_tune.py.
RESIDENT_MAX = 8192
# The ``loop`` variant is chosen on CUDA while all of W_hh (padded) takes at most this
# many bytes: compiled for sm_90 at 8 warps, LSTM bf16 H=64 and RNN bf16 H=128 show no
# spills, LSTM fp32 H=64 spills heavily.
LOOP_MAX_BYTES = 32768
# Gate accumulator elements per ``loop`` program (BB x G): bounds BB for register room.
LOOP_ACC_MAX = 4096
# Under the interpreter registers cost nothing: ``loop`` up to this many W_hh elements.
INTERPRETER_LOOP_MAX = 32768


@contextlib.contextmanager
def use_variant(name: str | None):
    """Force a launch variant inside the block (tests, tuning); None restores the choice."""
    if name is not None and name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _forced_variant() -> str | None:
    if _forced and _forced[-1] is not None:
        return _forced[-1]
    env = os.environ.get(_ENV_VARIANT) or None
    if env is not None and env not in VARIANTS:
        raise ValueError(f"{_ENV_VARIANT} must be one of {VARIANTS}, got {env!r}")
    return env


@dataclasses.dataclass(frozen=True)
class Plan:
    """A launch: variant, block sizes (batch rows, owned hidden columns, reduction chunk),
    warps per program and the grid (hidden tiles x batch tiles)."""

    variant: str
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    num_warps: int
    n_btiles: int
    n_htiles: int

    @property
    def h_in_regs(self) -> bool:
        return self.variant == "loop"

    def w_resident(self, H: int) -> bool:
        return self.BLOCK_K >= H


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _compiled(like: torch.Tensor) -> bool:
    """Whether the kernels run compiled on a GPU for ``like``: the interpreter takes CUDA
    tensors too (it copies them to the host) and still runs one program at a time, in
    float32 for the half types."""
    return like.is_cuda and not interpreter_on()


def plan(B: int, H: int, n_gates: int, like: torch.Tensor, T: int = 0) -> Plan:
    """Pick the launch variant and block sizes for a [B, H] recurrence on ``like``'s device.

    A single step (T == 1, the sampling cell) has nothing to wait for between steps, so
    it takes the ``step`` grid rather than paying for the persistent barrier.
    """
    Hp = max(16, triton.next_power_of_2(H))
    BB = min(64, max(16, triton.next_power_of_2(B)))
    nb = triton.cdiv(B, BB)
    cuda = _compiled(like)
    variant = _forced_variant()
    if variant == "persistent" and not cuda:
        raise RuntimeError(
            "the persistent Triton variant needs a CUDA device: the interpreter runs "
            "programs one at a time, so its grid barrier would never open"
        )
    if variant is None:
        w_elems = n_gates * Hp * Hp
        if (not cuda and w_elems <= INTERPRETER_LOOP_MAX) or (
            cuda and w_elems * like.dtype.itemsize <= LOOP_MAX_BYTES
        ):
            variant = "loop"
        else:
            variant = "persistent" if cuda and T != 1 else "step"
    # ptxas reports spills for most kernels at 4 warps and none or few at 8 (sm_90, bf16)
    num_warps = 8 if cuda else 4
    if variant == "loop":
        fit = max(16, LOOP_ACC_MAX // (n_gates * Hp))
        BB = min(BB, 1 << (fit.bit_length() - 1))
        return Plan("loop", BB, Hp, Hp, num_warps, triton.cdiv(B, BB), 1)
    BK = 32 if like.dtype in (torch.float32, torch.float64) else 64
    BH = 16 if cuda else 32
    if variant == "persistent":
        sms = _sm_count(like.device)
        while nb * triton.cdiv(H, BH) > sms and BH < 128:
            BH *= 2
        if nb * triton.cdiv(H, BH) > sms:
            if _forced_variant() == "persistent":
                raise RuntimeError(
                    f"persistent variant: {nb * triton.cdiv(H, BH)} programs do not fit "
                    f"on {sms} SMs at once"
                )
            variant, BH = "step", 16
    BH = min(BH, Hp)
    BK = Hp if n_gates * BH * Hp <= RESIDENT_MAX else min(BK, Hp)
    return Plan(variant, BB, BH, BK, num_warps, nb, triton.cdiv(H, BH))


def dot_precision(like: torch.Tensor) -> str:
    """TF32 for float32 CUDA products exactly when cuDNN's RNNs would use it
    (``torch.backends.cudnn.allow_tf32``, on by default), else IEEE."""
    if like.is_cuda and like.dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


_TL_TYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def dot_type(like: torch.Tensor):
    """Operand type of the recurrent products: the input dtype on CUDA (tensor cores for
    the half types); float32 for half types under the interpreter, which cannot compute
    in bfloat16."""
    if _compiled(like):
        return _TL_TYPES[like.dtype]
    return tl.float64 if like.dtype == torch.float64 else tl.float32


def acc_type(dtype: torch.dtype):
    """Accumulation and state type: float64 stays float64, everything else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """``acc_type`` as a torch dtype, for host-side buffers the kernels accumulate into."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Packing:
    """What the kernels need of a PackedSequence's batch sizes."""

    batch_sizes: list[int]  # [T] on the host, for the ``step`` variant's grids
    steps: torch.Tensor  # [T + 1, 2] int64 on the device: (off[t], b_t), then (N, 0)
    last: torch.Tensor  # [B] int64 on the device: packed row of each sequence's last step


def packing(batch_sizes: torch.Tensor | None, N: int, B: int, like: torch.Tensor) -> Packing | None:
    """The step table for packed input of N rows and B sequences on ``like``'s device,
    or None for dense input."""
    if batch_sizes is None:
        return None
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.is_cuda:
        raise ValueError("batch_sizes must be a 1-D int64 CPU tensor")
    bs = batch_sizes
    T = bs.numel()
    if T == 0 or bs[0] != B or bs[-1] < 1 or bool((bs[1:] > bs[:-1]).any()) or bs.sum() != N:
        raise ValueError(
            f"batch_sizes must be non-increasing, start at B={B}, end >= 1 and sum to "
            f"N={N}; got {bs.tolist()}"
        )
    off = torch.cat([bs.new_zeros(1), bs.cumsum(0)])  # [T + 1]
    steps = torch.stack([off, torch.cat([bs, bs.new_zeros(1)])], 1)  # [T + 1, 2]
    # lengths[b] = #{t : b_t > b}, from how many steps have each batch size
    lengths = torch.bincount(bs, minlength=B + 1)[1:].flip(0).cumsum(0).flip(0)  # [B]
    last = off[lengths - 1] + torch.arange(B)
    table = torch.cat([steps.flatten(), last]).to(like.device)  # one copy to the device
    return Packing(bs.tolist(), table[: 2 * (T + 1)].view(T + 1, 2), table[2 * (T + 1) :])


def launch(
    kernel,
    p: Plan,
    args: tuple,
    T: int,
    H: int,
    like: torch.Tensor,
    backward: bool,
    pk: Packing | None = None,
):
    """Run ``kernel`` over all T steps according to the plan.

    Sequence kernels take ``*args, t0, n_steps, sync`` and the block/variant
    constexprs; backward kernels also take FINAL, the extra product that gives
    grad_h0 once the last step's gate gradients are complete. With packed input
    (``pk``) the ``step`` variant launches only the batch tiles that step has rows in.
    """
    sync = torch.zeros(
        p.n_btiles if p.variant == "persistent" else 1, dtype=torch.int32, device=like.device
    )
    # Triton launches on the current device, which need not be the tensors' one
    guard = torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext()
    with guard:
        try:
            _launch_steps(kernel, p, args, T, sync, _meta(p, H, like), backward, pk)
        except OutOfResources as e:
            if p.variant == "step":  # its launches may have run some steps: not again
                raise
            # One launch that did not start (it is checked as it loads): a GPU with less
            # shared memory per block than the plan's blocks take (an A100's 163 KB, a
            # consumer card's 99 KB) runs the step grid with the smallest blocks instead.
            bh = min(16, p.BLOCK_H)
            small = dataclasses.replace(
                p,
                variant="step",
                BLOCK_H=bh,
                BLOCK_K=min(32, p.BLOCK_K),
                n_htiles=triton.cdiv(H, bh),
            )
            warnings.warn(
                f"fastchar: the Triton {p.variant} kernel does not fit this GPU ({e}); "
                "running the step variant with smaller blocks",
                stacklevel=2,
            )
            _launch_steps(kernel, small, args, T, sync, _meta(small, H, like), backward, pk)


def _meta(p: Plan, H: int, like: torch.Tensor) -> dict:
    """The kernels' block, variant and type constexprs (and warps) for plan ``p``."""
    return dict(
        BLOCK_B=p.BLOCK_B,
        BLOCK_H=p.BLOCK_H,
        BLOCK_K=p.BLOCK_K,
        H_IN_REGS=p.h_in_regs,
        W_RESIDENT=p.w_resident(H),
        SYNC=p.variant == "persistent",
        CM=".cg" if p.variant == "persistent" else "",
        ACC=acc_type(like.dtype),
        PREC=dot_precision(like),
        DOT=dot_type(like),
        num_warps=p.num_warps,
    )


def _launch_steps(kernel, p: Plan, args: tuple, T: int, sync, meta: dict, backward: bool, pk):
    grid = (p.n_htiles, p.n_btiles)
    if p.variant != "step":
        kernel[grid](*args, 0, T, sync, **meta, **({"FINAL": True} if backward else {}))
        return
    for t in range(T):
        g = grid
        if pk is not None:  # backward launch t runs step T - 1 - t
            g = (p.n_htiles, triton.cdiv(pk.batch_sizes[T - 1 - t if backward else t], p.BLOCK_B))
        kernel[g](*args, t, 1, sync, **meta, **({"FINAL": False} if backward else {}))
    if backward:
        kernel[grid](*args, T, 0, sync, **meta, FINAL=True)
