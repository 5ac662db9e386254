"""LSTM ops: registration (fake + autograd) for the C++ and Triton kernels, and ``lstm()``.

Shape letters: T time, B batch, I input, H hidden, G = 4H gates (i, f, g, o).

The C++ backend runs ``lstm_seq(x, h0, c0, w_ih, bias, w_hh)`` for a layer: lstm_fwd with
the input projection inside the time loop, same outputs, backward through lstm_bwd.
Both backends implement the same pair of sequence ops:
  lstm_fwd(xp [T, B, G], h0 [B, H], c0 [B, H], w_hh [G, H])
      -> out [T, B, H], h_n [B, H], c_n [B, H], gates [T, B, G] (activated), cs [T, B, H]
  lstm_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs) -> grad_xp, grad_h0, grad_c0
(the C++ op also takes bias_grad and returns grad_bias, the bias's gradient summed in its loop)
so the autograd formula below is written once; dW_hh is one GEMM after the loop.

With a projection w_hr [P, H] (torch.nn.LSTM's proj_size; h is P wide, c H wide) the C++
backend runs ``lstmp_seq`` (two halves per step: the gates, then h_t = r_t @ W_hr^T with
r_t = o_t * tanh(c_t)) and ``lstmp_bwd``; the Triton kernels have none, so ``fused`` on
CUDA runs the reference there (fastchar.backends.resolve, feature "proj_size").
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastchar import reference
from fastchar.backends import cpp_loaded, resolve
from fastchar.layout import state_dtype
from fastchar.ops._common import (
    autocast_inputs,
    check_args,
    differentiable_grads,
    grads_or_zeros,
    linear,
    previous_states,
    projection_grads,
    refuse_create_graph,
    resolve_cell,
    save_projected,
    saved_projected,
    skip_zero_grads,
    states_or_zeros,
    torch_params,
    weight_grad,
)


def _fake_fwd(xp: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, batch_sizes=None):
    rows, G = xp.shape[:-1], xp.shape[-1]  # rows: (T, B), or (N,) for a packed sequence
    H = G // 4
    return (
        xp.new_empty(*rows, H),  # out
        h0.new_empty(h0.shape),  # h_n
        c0.new_empty(c0.shape),  # c_n
        xp.new_empty(*rows, G),  # gates
        xp.new_empty(*rows, H, dtype=state_dtype(xp.dtype)),  # cs
    )


def _fake_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, batch_sizes=None):
    return gates.new_empty(gates.shape), c0.new_empty(c0.shape), c0.new_empty(c0.shape)


def _fake_cpp_bwd(
    grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, batch_sizes=None, bias_grad=False
):
    """The C++ lstm_bwd's: _fake_bwd's three and grad_bias ([G]; empty without bias_grad)."""
    grads = _fake_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs)
    return *grads, gates.new_empty(gates.shape[-1] if bias_grad else 0)


def _fake_seq(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, bias, w_hh: Tensor, batch_sizes=None
):
    return _fake_fwd(x.new_empty(*x.shape[:-1], w_hh.shape[0]), h0, c0, w_hh, batch_sizes)


def _fake_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, s_ih=None, s_hh=None):
    return h.new_empty(h.shape), c.new_empty(c.shape)


def _setup_context(ctx, inputs, output):
    xp, h0, c0, w_hh, *packed = inputs  # packed: [batch_sizes] for the Triton op
    out, _, _, gates, cs = output
    ctx.save_for_backward(h0, c0, w_hh, out, gates, cs)
    ctx.packed = packed
    skip_zero_grads(ctx)


def _autograd_backward(bwd, op: str):
    def backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cs):
        refuse_create_graph(op)
        h0, c0, w_hh, out, gates, cs = ctx.saved_tensors
        bs = ctx.packed[0] if ctx.packed else None
        grad_out, grad_h_n, grad_c_n = grads_or_zeros(
            (grad_out, out), (grad_h_n, h0), (grad_c_n, c0)
        )
        extra = [bs] if bs is not None else []
        # the C++ op also returns grad_bias (empty unless asked for); Triton's returns three
        grads = bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, *extra)
        grad_xp, grad_h0, grad_c0 = grads[:3]
        need_w = ctx.needs_input_grad[3]
        grad_w_hh = weight_grad(grad_xp, previous_states(h0, out, bs)) if need_w else None
        return grad_xp, grad_h0, grad_c0, grad_w_hh, *([None] * len(ctx.packed))

    return backward


@torch.library.custom_op("fastchar::triton_lstm_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_fwd(
    xp: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, batch_sizes: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastchar.triton import lstm as kernels

    return kernels.lstm_fwd(xp, h0, c0, w_hh, batch_sizes)


@torch.library.custom_op("fastchar::triton_lstm_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    w_hh: Tensor,
    c0: Tensor,
    gates: Tensor,
    cs: Tensor,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastchar.triton import lstm as kernels

    return kernels.lstm_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, batch_sizes)


@torch.library.custom_op(
    "fastchar::triton_lstm_cell", mutates_args=(), device_types=("cuda", "cpu")
)
def _triton_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor]:
    from fastchar.triton import lstm as kernels

    return kernels.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_cell.register_fake(_fake_cell)
_triton_fwd.register_autograd(
    _autograd_backward(_triton_bwd, "fastchar::triton_lstm_fwd"), setup_context=_setup_context
)

if cpp_loaded():
    torch.library.register_fake("fastchar::lstm_fwd")(_fake_fwd)
    torch.library.register_fake("fastchar::lstm_bwd")(_fake_cpp_bwd)
    torch.library.register_fake("fastchar::lstm_cell")(_fake_cell)
    torch.library.register_autograd(
        "fastchar::lstm_fwd",
        _autograd_backward(torch.ops.fastchar.lstm_bwd, "fastchar::lstm_fwd"),
        setup_context=_setup_context,
    )


def _setup_seq(ctx, inputs, output):
    x, h0, c0, w_ih, bias, w_hh, batch_sizes = inputs
    out, _, _, gates, cs = output
    need_x = ctx.needs_input_grad[0]
    save_projected(ctx, x, w_ih, need_x, h0, c0, w_hh, out, gates, cs, biases=(bias,))
    ctx.has_bias = bias is not None
    ctx.batch_sizes = batch_sizes
    skip_zero_grads(ctx)


def _seq_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cs):
    x, w_ih, (h0, c0, w_hh, out, gates, cs), (bias,) = saved_projected(ctx)
    bs = ctx.batch_sizes
    inputs = (x, h0, c0, w_ih, bias, w_hh, bs)
    second = differentiable_grads(ctx, _reference_seq, inputs, (grad_out, grad_h_n, grad_c_n))
    if second is not None:
        return second
    grad_out, grad_h_n, grad_c_n = grads_or_zeros((grad_out, out), (grad_h_n, h0), (grad_c_n, c0))
    need = ctx.needs_input_grad
    need_b = need[4] and ctx.has_bias  # summed inside the time loop, not over grad_xp after it
    grad_xp, grad_h0, grad_c0, grad_b = torch.ops.fastchar.lstm_bwd(
        grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs, bs, need_b
    )
    grad_x, grad_w_ih, _ = projection_grads((need[0], need[3], False), grad_xp, x, w_ih, False)
    grad_b = grad_b if need_b else None
    grad_w_hh = weight_grad(grad_xp, previous_states(h0, out, bs)) if need[5] else None
    return grad_x, grad_h0, grad_c0, grad_w_ih, grad_b, grad_w_hh, None


def _reference_seq(x, h0, c0, w_ih, bias, w_hh, batch_sizes):
    """lstm_seq's differentiable outputs (out, h_n, c_n) from its inputs, by the reference."""
    return reference.lstm(x, h0, c0, w_ih, w_hh, bias, batch_sizes=batch_sizes)


if cpp_loaded():
    torch.library.register_fake("fastchar::lstm_seq")(_fake_seq)
    torch.library.register_autograd("fastchar::lstm_seq", _seq_backward, setup_context=_setup_seq)


def _fake_proj_seq(x, h0, c0, w_ih, bias, w_hh, w_hr, batch_sizes=None):
    rows, H = x.shape[:-1], w_hr.shape[1]  # rows: (T, B), or (N,) for a packed sequence
    out, h_n, c_n, gates, cs = _fake_fwd(x.new_empty(*rows, 4 * H), h0, c0, w_hh)
    return out.new_empty(*rows, w_hr.shape[0]), h_n, c_n, gates, cs, x.new_empty(*rows, H)


def _fake_proj_bwd(grad_out, grad_h_n, grad_c_n, w_hh, w_hr, c0, gates, cs, batch_sizes=None):
    grad_xp, _, grad_c0 = _fake_bwd(grad_out, grad_h_n, grad_c_n, w_hh, c0, gates, cs)
    return grad_xp, grad_h_n.new_empty(grad_h_n.shape), grad_c0, grad_out.new_empty(grad_out.shape)


def _setup_proj_seq(ctx, inputs, output):
    x, h0, c0, w_ih, bias, w_hh, w_hr, batch_sizes = inputs
    out, _, _, gates, cs, rs = output
    need_x = ctx.needs_input_grad[0]
    save_projected(ctx, x, w_ih, need_x, h0, c0, w_hh, w_hr, out, gates, cs, rs, biases=(bias,))
    ctx.has_bias = bias is not None
    ctx.batch_sizes = batch_sizes
    skip_zero_grads(ctx)


def _proj_seq_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cs, _grad_rs):
    x, w_ih, (h0, c0, w_hh, w_hr, out, gates, cs, rs), (bias,) = saved_projected(ctx)
    bs = ctx.batch_sizes
    inputs = (x, h0, c0, w_ih, bias, w_hh, w_hr, bs)
    second = differentiable_grads(ctx, _reference_proj_seq, inputs, (grad_out, grad_h_n, grad_c_n))
    if second is not None:
        return second
    grad_out, grad_h_n, grad_c_n = grads_or_zeros((grad_out, out), (grad_h_n, h0), (grad_c_n, c0))
    grad_xp, grad_h0, grad_c0, grad_hs = torch.ops.fastchar.lstmp_bwd(
        grad_out, grad_h_n, grad_c_n, w_hh, w_hr, c0, gates, cs, bs
    )
    need = ctx.needs_input_grad
    grad_x, grad_w_ih, grad_b = projection_grads(
        (need[0], need[3], need[4]), grad_xp, x, w_ih, ctx.has_bias
    )
    grad_w_hh = weight_grad(grad_xp, previous_states(h0, out, bs)) if need[5] else None
    # dW_hr = sum over steps of grad_hs[t]^T r_t: one term over every row
    grad_w_hr = weight_grad(grad_hs, [rs.flatten(0, -2)]) if need[6] else None
    return grad_x, grad_h0, grad_c0, grad_w_ih, grad_b, grad_w_hh, grad_w_hr, None


def _reference_proj_seq(x, h0, c0, w_ih, bias, w_hh, w_hr, batch_sizes):
    """lstmp_seq's out, h_n, c_n from its inputs, by the reference."""
    return reference.lstm(x, h0, c0, w_ih, w_hh, bias, batch_sizes=batch_sizes, w_hr=w_hr)


if cpp_loaded():
    torch.library.register_fake("fastchar::lstmp_seq")(_fake_proj_seq)
    torch.library.register_fake("fastchar::lstmp_bwd")(_fake_proj_bwd)
    torch.library.register_autograd(
        "fastchar::lstmp_seq", _proj_seq_backward, setup_context=_setup_proj_seq
    )


def _kernels(kind: str):
    if kind == "cpp":
        return torch.ops.fastchar.lstm_fwd, torch.ops.fastchar.lstm_cell
    return _triton_fwd, _triton_cell


def lstm(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    impl: str = "fused",
    batch_sizes: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over a whole sequence.

    x [T, B, I]; h0, c0 [B, H] or None for zeros; w_ih [4H, I]; w_hh [4H, H];
    b_ih, b_hh [4H] or None. Returns out [T, B, H], h_n [B, H], c_n [B, H].
    With ``batch_sizes`` (PackedSequence.batch_sizes, int64 [T] on the CPU) x is packed
    [N, I] and out [N, H]; h_n, c_n are each sequence's state after its own last step.
    With ``w_hr`` [P, H] (torch.nn.LSTM's weight_hr, proj_size P < H) h_t = W_hr (o_t *
    tanh(c_t)): w_hh is [4H, P], and h0, out and h_n are P wide (c0, c_n stay H wide).
    Differentiable with respect to every tensor argument; twice (create_graph) with impl='cpp',
    whose backward then re-runs the layer by the reference, not with impl='triton'.
    """
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = autocast_inputs(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
    )
    states = {"h0": h0, "c0": c0}
    check_args("lstm", x, 4, w_ih, w_hh, b_ih, b_hh, states, True, batch_sizes, w_hr)
    kind = resolve(impl, x.device, None if w_hr is None else "proj_size", x.dtype)
    if w_hr is not None:
        return _projected(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes)
    if batch_sizes is not None:
        return _packed(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes)
    if kind == "reference":
        return reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    B, H = x.shape[1], w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    c0 = x.new_zeros(B, H) if c0 is None else c0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        out, h_n, c_n = torch.lstm(
            x, (h0[None], c0[None]), params, has_bias, 1, 0.0, False, False, False
        )
        return out, h_n[0], c_n[0]
    if kind == "cpp":  # the input projection inside the time loop
        bias = reference.bias_sum(b_ih, b_hh)
        out, h_n, c_n, _, _ = torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih, bias, w_hh)
        return out, h_n, c_n
    fwd, _ = _kernels(kind)
    xp = linear(x, w_ih, reference.bias_sum(b_ih, b_hh))  # [T, B, G], one GEMM
    out, h_n, c_n, _, _ = fwd(xp, h0, c0, w_hh)
    return out, h_n, c_n


def _packed(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes):
    """``lstm()`` on a packed sequence x [N, I] (checked) -> out [N, H], h_n, c_n [B, H]."""
    if kind == "reference":
        return reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes=batch_sizes)
    B, H = int(batch_sizes[0]), w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    c0 = x.new_zeros(B, H) if c0 is None else c0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        out, h_n, c_n = torch.lstm(
            x, batch_sizes, (h0[None], c0[None]), params, has_bias, 1, 0.0, False, False
        )
        return out, h_n[0], c_n[0]
    if kind == "cpp":
        bias = reference.bias_sum(b_ih, b_hh)
        out, h_n, c_n, _, _ = torch.ops.fastchar.lstm_seq(x, h0, c0, w_ih, bias, w_hh, batch_sizes)
        return out, h_n, c_n
    xp = linear(x, w_ih, reference.bias_sum(b_ih, b_hh))  # [N, G], one GEMM
    out, h_n, c_n, _, _ = _triton_fwd(xp, h0, c0, w_hh, batch_sizes)
    return out, h_n, c_n


def _projected(kind, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
    """``lstm()`` with a projection w_hr [P, H] (checked), dense or packed."""
    if kind == "reference":
        return reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes=batch_sizes, w_hr=w_hr)
    B = x.shape[1] if batch_sizes is None else int(batch_sizes[0])
    (P, H), packed = w_hr.shape, [] if batch_sizes is None else [batch_sizes]
    h0 = x.new_zeros(B, P) if h0 is None else h0
    c0 = x.new_zeros(B, H) if c0 is None else c0
    if kind == "torch":  # torch tells a projection by h0 and c0 of different widths
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        args = (params + [w_hr], has_bias, 1, 0.0, False, False)
        dense = [] if packed else [False]  # batch_first
        out, h_n, c_n = torch.lstm(x, *packed, (h0[None], c0[None]), *args, *dense)
        return out, h_n[0], c_n[0]
    bias = reference.bias_sum(b_ih, b_hh)
    out, h_n, c_n, _, _, _ = torch.ops.fastchar.lstmp_seq(
        x, h0, c0, w_ih, bias, w_hh, w_hr, *packed
    )
    return out, h_n, c_n


def lstm_cell(
    x: Tensor,
    h: Tensor | None,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    impl: str = "fused",
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step, for sampling.

    x [B, I]; h, c [B, H] (None: zeros). Returns (h', c') [B, H]. With ``w_hr`` [P, H]
    (proj_size) h and h' are [B, P] and w_hh [4H, P]; no kernel has a projected step, so
    every impl runs the reference's. The kernels' step has no backward: where autograd
    needs one (grad mode on and an input requiring grad) the fused and cpp impls run the
    reference's differentiable step instead.
    """
    x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr = autocast_inputs(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
    B, H = check_args(
        "lstm_cell", x, 4, w_ih, w_hh, b_ih, b_hh, {"h": h, "c": c}, seq=False, w_hr=w_hr
    )
    h, c = states_or_zeros(x, B, (h, w_hh.shape[1]), (c, H))
    kind = resolve_cell(impl, x, h, c, w_ih, w_hh, b_ih, b_hh)
    if kind == "reference" or w_hr is not None:
        return reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
    if kind == "torch":
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    _, cell = _kernels(kind)
    return cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
