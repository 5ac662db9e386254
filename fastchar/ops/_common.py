"""Pieces every cell's op module shares: argument checks, dtypes, weight gradients.

Shape letters: T time, B batch, I input, H hidden, G gates (4H / 3H / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_legacy_batchedtensor

from fastchar import plan
from fastchar.backends import autocast_dtype, cpp_loaded, resolve


def _check_tensor(name: str, t: object, shape: tuple[int, ...], like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise RuntimeError(f"{name} has dtype {t.dtype}, expected {like.dtype} like x")
    if t.device != like.device:
        raise RuntimeError(f"{name} is on {t.device}, expected {like.device} like x")


def check_batch_sizes(op: str, batch_sizes: object, x: Tensor) -> int:
    """Validate a packed sequence's ``batch_sizes`` (PackedSequence.batch_sizes) against its
    packed input x [N, I]; returns B = batch_sizes[0], the number of sequences.

    The same rules and messages as the C++ ops' check (csrc/common.h, SeqSteps): a
    non-empty 1-D int64 CPU tensor, positive and non-increasing, summing to N. torch.nn
    itself checks none of this (it fails later, or silently accepts a zero batch size).
    """
    if not isinstance(batch_sizes, Tensor):
        raise TypeError(f"{op}: batch_sizes must be a Tensor, got {type(batch_sizes).__name__}")
    if (
        batch_sizes.dim() != 1
        or batch_sizes.dtype != torch.int64
        or batch_sizes.device.type != "cpu"
        or batch_sizes.numel() == 0
    ):
        raise ValueError(
            f"{op}: batch_sizes must be a non-empty 1-D int64 CPU tensor, got "
            f"{batch_sizes.dtype} {list(batch_sizes.shape)} on {batch_sizes.device}"
        )
    if x.dim() != 2:
        raise ValueError(
            f"{op}: x must be 2-D [N, I] (a packed sequence, with batch_sizes), "
            f"got shape {list(x.shape)}"
        )
    sizes = batch_sizes.tolist()
    for t, b in enumerate(sizes):
        if b < 1 or b > sizes[t - 1 if t else 0]:
            raise ValueError(
                f"{op}: batch_sizes must be positive and non-increasing, got {b} at step {t}"
            )
    if sum(sizes) != x.shape[0]:
        raise ValueError(
            f"{op}: batch_sizes sum to {sum(sizes)} rows, but the packed input has {x.shape[0]}"
        )
    return sizes[0]


def check_args(
    op: str,
    x: Tensor,
    n_gates: int,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    states: dict[str, Tensor | None],
    seq: bool = True,
    batch_sizes: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[int, int]:
    """Validate a layer (x [T, B, I], ``seq``; packed x [N, I] with ``batch_sizes``) or cell
    (x [B, I]) call; returns (B, H).

    With an LSTM projection ``w_hr`` [P, H] (0 < P < H, as torch.nn.LSTM's proj_size) the
    recurrent state is P wide: w_hh [G, P] and the first of ``states`` (h) [B, P]; the
    others (c) stay [B, H].
    Raises ValueError for shapes and RuntimeError for dtype or device, naming the argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
    B = None
    if batch_sizes is not None:
        B = check_batch_sizes(op, batch_sizes, x)
    want = 3 if seq and B is None else 2
    if x.dim() != want:
        layout = "[T, B, I]" if seq else "[B, I]"
        raise ValueError(f"{op}: x must be {layout}, got shape {list(x.shape)}")
    if seq and x.shape[0] == 0:
        raise ValueError(f"{op}: x must have at least one time step, got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise RuntimeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if w_hr is not None:
        if not isinstance(w_hr, Tensor) or w_hr.dim() != 2 or not 0 < w_hr.shape[0] < w_hr.shape[1]:
            got = list(w_hr.shape) if isinstance(w_hr, Tensor) else type(w_hr).__name__
            raise ValueError(f"{op}: w_hr must be [P, H] with 0 < P < H, got {got}")
        P, H = w_hr.shape
        _check_tensor(f"{op}: w_hr", w_hr, (P, H), x)
    elif (
        not isinstance(w_hh, Tensor) or w_hh.dim() != 2 or w_hh.shape[0] != n_gates * w_hh.shape[1]
    ):
        got = list(w_hh.shape) if isinstance(w_hh, Tensor) else type(w_hh).__name__
        raise ValueError(f"{op}: w_hh must be [{n_gates}*H, H], got {got}")
    else:
        H = P = w_hh.shape[1]
    B, I = x.shape[-2] if B is None else B, x.shape[-1]
    if seq and (H == 0 or I == 0):  # torch.nn refuses both sizes; the kernels have no rows
        what = "hidden size (w_hh.shape[1])" if H == 0 else "input size (x.shape[-1])"
        raise ValueError(f"{op}: the {what} must be at least 1, got 0")
    _check_tensor(f"{op}: w_hh", w_hh, (n_gates * H, P), x)
    _check_tensor(f"{op}: w_ih", w_ih, (n_gates * H, I), x)
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(f"{op}: {name}", b, (n_gates * H,), x)
    for k, (name, s) in enumerate(states.items()):
        if s is not None:
            _check_tensor(f"{op}: {name}", s, (B, P if k == 0 else H), x)
    return B, H


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast the ops run in the autocast dtype, as torch's own RNN ops do.

    The casts are differentiable, so float32 master weights still get float32 gradients.
    Anything that is not a floating-point tensor is left for the argument checks, and
    float64 stays float64, as autocast leaves it.
    """
    first = tensors[0]
    if (
        not isinstance(first, Tensor)
        or autocast_dtype(first.device, torch.float32) is torch.float32
    ):
        return tensors  # autocast off (the common case: one check), or not a tensor
    return tuple(
        t.to(autocast_dtype(t.device, t.dtype))
        if isinstance(t, Tensor) and t.is_floating_point()
        else t
        for t in tensors
    )


def states_or_zeros(x: Tensor, B: int, *states: tuple[Tensor | None, int]) -> list[Tensor]:
    """A cell op's states, each (state, width); None is zeros [B, width], as torch.nn's cells
    read hx=None."""
    return [x.new_zeros(B, width) if s is None else s for s, width in states]


def resolve_cell(impl: str, x: Tensor, *tensors: Tensor | None) -> str:
    """``resolve`` for a *_cell op on x and its other tensor arguments. The kernels' step has
    no backward: where autograd would record the op (grad mode on and an argument requiring
    grad) a kernel impl runs the reference's differentiable step, as torch.nn's cells are
    differentiable."""
    kind = resolve(impl, x.device, dtype=x.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (x, *tensors)
    )
    return "reference" if needs_grad and kind in ("cpp", "triton") else kind


def skip_zero_grads(ctx) -> None:
    """For a sequence op's setup_context: no zero-filled gradients for unused outputs.

    The forward ops return what backward needs (gates [T, B, G], cell states) as
    outputs; by default autograd would fill each unused output's gradient with a
    zero tensor of its size before calling backward, adding several [T, B, H]
    buffers to the backward's peak memory. Backward then gets None for those and
    fills only the gradients its kernel reads, with ``grads_or_zeros``.
    """
    ctx.set_materialize_grads(False)


def keep_unsaved(ctx, *tensors: Tensor | None) -> None:
    """For a sequence op's setup_context: inputs that only a create_graph backward reads (the
    biases: the kernels' backward never does; see save_projected), kept on ctx with their
    versions rather than saved, so that changing one in place before a plain backward is no
    error, as with torch.nn; ``differentiable_grads`` refuses to re-run the layer from a
    changed one."""
    ctx.unsaved = tensors
    ctx.unsaved_versions = [None if t is None else t._version for t in tensors]


def save_projected(ctx, x: Tensor, w_ih: Tensor, x_needs_grad: bool, *rest: Tensor, biases=()):
    """For a setup_context of a sequence op that projects its input inside its loop: saves
    x and ``rest``, and w_ih only where x needs its gradient (the plain backward reads it
    for nothing else); otherwise w_ih is kept unsaved, as the ``biases`` are
    (``keep_unsaved``), so that a frozen w_ih changed in place between the forward and the
    backward is no error, as with torch.nn. x itself is always saved: an activation kept
    on ctx would outlive the backward and miss saved-tensor hooks (save_on_cpu).
    ``saved_projected`` gives them back."""
    ctx.save_for_backward(x, w_ih if x_needs_grad else None, *rest)
    keep_unsaved(ctx, *biases, None if x_needs_grad else w_ih)


def saved_projected(ctx) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """(x, w_ih, rest, biases) as ``save_projected`` kept them."""
    x, w_ih, *rest = ctx.saved_tensors
    *biases, unsaved_w = ctx.unsaved
    return x, unsaved_w if w_ih is None else w_ih, rest, biases


def differentiable_grads(ctx, layer, inputs: tuple, grad_outputs: tuple) -> tuple | None:
    """A sequence op's gradients as a graph of their own, when its backward runs under
    ``create_graph=True`` (the only time grad mode is on inside a backward); else None.

    The fused backward kernels have no derivative, so a gradient of their gradients (a
    gradient penalty, a Hessian-vector product) would come out silently zero; torch.nn's
    CPU RNNs give it. Here ``layer(*inputs)`` re-runs the layer with the reference's
    differentiable ops on the saved inputs (the op's, in its order) and returns the
    outputs that ``grad_outputs`` belong to; their gradients, built with create_graph,
    can be differentiated again. The reference's speed, for this case only.

    The same under ``autograd.grad(is_grads_batched=True)`` (``jacobian(vectorize=True)``):
    its vmap has no batching rule for the kernels' backward ops.
    """
    batched = any(g is not None and is_legacy_batchedtensor(g) for g in grad_outputs)
    if not torch.is_grad_enabled() and not batched:
        return None
    for t, version in zip(ctx.unsaved, ctx.unsaved_versions, strict=True):
        if t is not None and t._version != version:
            raise RuntimeError(
                "fastchar: an input of the layer (a bias, or w_ih where x needs no gradient) was "
                "modified in place between the forward and a backward with create_graph=True, "
                "which re-runs the layer from its inputs as they were"
            )
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and ctx.needs_input_grad[i]]
    # one alias per argument slot: a tensor passed in two (h0 and c0, or w_ih and w_hh)
    # gets each slot's own gradient, as the kernels' backward gives it, not their sum twice
    create_graph = torch.is_grad_enabled()
    grads = [None] * len(inputs)
    with torch.enable_grad():  # batched grads only: a graph to take them from, not to keep
        inputs = tuple(t.view_as(t) if i in wanted else t for i, t in enumerate(inputs))
        outs = layer(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs, strict=True) if g is not None]
        if wanted and pairs:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wanted],
                [g for _, g in pairs],
                create_graph=create_graph,
                allow_unused=True,
            )
            for i, g in zip(wanted, got, strict=True):
                grads[i] = g
    return tuple(grads)


def refuse_create_graph(op: str) -> None:
    """For the ops on a projected input xp, which they do not keep (it would cost a [T, B, G]
    buffer in every training step): under ``create_graph=True`` the layer cannot be re-run
    as ``differentiable_grads`` does, and a silently zero second derivative is worse than
    an error. cuDNN's RNNs have none either."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: no gradient of its gradient (backward with create_graph=True): its "
            "backward kernels have no derivative and it does not keep its input xp to "
            "re-run the layer. On the CPU, fastchar.ops and fastchar.nn with impl='cpp' "
            "give one; elsewhere use impl='reference'."
        )


def grads_or_zeros(*pairs: tuple[Tensor | None, Tensor]) -> list[Tensor]:
    """Each (grad, like) pair's gradient, or zeros shaped like ``like`` where it is None."""
    return [torch.zeros_like(like) if grad is None else grad for grad, like in pairs]


def _widens(t: Tensor, dtype: torch.dtype | None = None) -> bool:
    """bfloat16 CPU matmuls run in float32 where this CPU's bf16 GEMM is the slower one."""
    dtype = dtype or t.dtype
    return dtype == torch.bfloat16 and t.device.type == "cpu" and plan.bf16_matmul_widens()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, except that a bfloat16 CPU product (by dtype or under autocast) runs in
    float32 and is rounded to bfloat16 where this CPU's bf16 GEMM is slower than that
    (fastchar.plan.bf16_matmul_widens; 10-100x on CPUs without bf16 instructions). The
    input projection of every layer (x [T, B, I] -> [T, B, G]) and CharRNN's head use it.
    """
    dtype = autocast_dtype(x.device, x.dtype)
    if not _widens(x, dtype):
        return F.linear(x, w, bias)
    with torch.autocast("cpu", enabled=False):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), w.float(), b).to(torch.bfloat16)


def _mm_sum(a: list[Tensor], b: list[Tensor], trans_a: bool) -> Tensor:
    """sum_i op(a_i) @ b_i, op(a) = a^T when ``trans_a``: a backward pass's wide GEMMs.

    On the CPU with the C++ extension they run on the GEMM plan's engine for these shapes
    (torch.ops.fastchar.mm_sum: fastchar's micro-kernels ran them at 2-2.4x MKL's rate on
    an AMD EPYC Zen 5), float32 and bfloat16 with one float32 accumulator; elsewhere (other
    devices and dtypes) torch's matmuls. A bfloat16
    product runs in float32 where this CPU's bf16 GEMM is the slower one (``_widens``).
    """
    if _widens(a[0]):
        with torch.autocast("cpu", enabled=False):
            wide = _mm_sum([t.float() for t in a], [t.float() for t in b], trans_a)
        return wide.to(a[0].dtype)
    if a[0].device.type == "cpu" and a[0].dtype in plan.DTYPES and cpp_loaded():
        return torch.ops.fastchar.mm_sum(a, b, trans_a)
    out = None
    for ai, bi in zip(a, b, strict=True):
        ai = ai.t() if trans_a else ai
        out = ai.mm(bi) if out is None else out.addmm(ai, bi)
    return out


def previous_rows(batch_sizes: Tensor, B: int, N: int) -> Tensor:
    """For a packed sequence (PackedSequence.batch_sizes [T], B = batch_sizes[0] sequences,
    N = batch_sizes.sum() rows): the row of h_{t-1} in the packed output [N, H] for each
    packed row of steps 1.. (int64 [N - B]).

    Step t's rows are sequences 0..b_t-1, and h_{t-1} of sequence b sits b_{t-1} rows
    before its own row. B and N come from the tensors' shapes, not from batch_sizes' values,
    so that traced graphs (torch.compile, opcheck) keep static shapes.
    """
    steps = torch.arange(len(batch_sizes), device=batch_sizes.device)
    step = torch.repeat_interleave(steps, batch_sizes, output_size=N)  # [N]
    return torch.arange(B, N, device=batch_sizes.device) - batch_sizes[step[B:] - 1]


def previous_states(h0: Tensor, out: Tensor, batch_sizes: Tensor | None = None) -> list[Tensor]:
    """h_{t-1} for every row of a layer's gate gradient, as the terms ``weight_grad`` sums
    over: [h0 [B, H], the rows of steps 1.. [T*B - B or N - B, H]].

    Dense, the second term is a view (out[:-1]) rather than a concatenated copy of every
    h_{t-1}, which would raise the backward's peak memory; it is absent for T = 1. Packed
    (``batch_sizes``, out [N, H]), h_{t-1} rows are not a shifted view of out, so they are
    gathered once here and shared by every weight gradient of the layer.
    """
    B = h0.shape[0]
    if out.shape[0] == (B if batch_sizes is not None else 1):
        return [h0]
    if batch_sizes is None:
        return [h0, out[:-1].flatten(0, 1)]
    rows = previous_rows(batch_sizes, B, out.shape[0]).to(out.device)
    return [h0, out.index_select(0, rows)]


def weight_grad(d_gates: Tensor, prev: list[Tensor]) -> Tensor:
    """dW_hh [G, H] = sum over steps t of d_gates[t]^T h_{t-1}, with h_{-1} = h0.

    ``d_gates`` [T, B, G] (packed: [N, G]) may be a column block of a wider gradient (a
    view); ``prev`` is ``previous_states`` of the layer: its terms take d_gates' rows in
    order.
    """
    # [T * B, G] or [N, G]; a view. reshape, not flatten: autograd.grad(is_grads_batched=True)
    # runs this under a vmap that has no batching rule for flatten
    rows = d_gates.reshape(-1, d_gates.shape[-1])
    if rows.shape[0] == 0:  # no time steps (a direct op call with T = 0)
        return rows.new_zeros(rows.shape[1], prev[0].shape[1])
    B = prev[0].shape[0]
    a = [rows[:B]] + ([rows[B:]] if len(prev) > 1 else [])
    return _mm_sum(a, prev, trans_a=True)


def projection_grads(
    needs: tuple[bool, bool, bool], grad_xp: Tensor, x: Tensor, w_ih: Tensor, has_bias: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of xp = x @ w_ih^T + bias from grad_xp [T, B, G] (packed: [N, G]), for the
    C++ ops that project the input inside their time loop: (x [T, B, I] or [N, I], w_ih
    [G, I], bias [G]), each None where ``needs`` (x, w_ih, bias) says it is not wanted or
    there is no bias."""
    flat = grad_xp.reshape(-1, grad_xp.shape[-1])  # [T * B, G]
    grad_x = None
    if needs[0]:
        grad_x = _mm_sum([flat], [w_ih], trans_a=False).view(x.shape)  # [T, B, I]
    flat_x = x.reshape(-1, x.shape[-1])
    grad_w = _mm_sum([flat], [flat_x], trans_a=True) if needs[1] else None  # [G, I]
    grad_b = flat.sum(0) if needs[2] and has_bias else None
    return grad_x, grad_w, grad_b


def _fake_mm_sum(a: list[Tensor], b: list[Tensor], trans_a: bool) -> Tensor:
    return a[0].new_empty((a[0].shape[1 if trans_a else 0], b[0].shape[1]))


if cpp_loaded():
    torch.library.register_fake("fastchar::mm_sum")(_fake_mm_sum)


def torch_params(w_ih, w_hh, b_ih, b_hh) -> tuple[list[Tensor], bool]:
    """Flat weights for torch's own ``torch.lstm/gru/rnn_*`` kernels (both biases or none)."""
    if b_ih is None and b_hh is None:
        return [w_ih, w_hh], False
    if b_ih is None:
        b_ih = torch.zeros_like(b_hh)
    if b_hh is None:
        b_hh = torch.zeros_like(b_ih)
    return [w_ih, w_hh, b_ih, b_hh], True
