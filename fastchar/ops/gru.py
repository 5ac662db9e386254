"""GRU ops: registration (fake + autograd) for the C++ and Triton kernels, and ``gru()``.

Shape letters: T time, B batch, I input, H hidden, G = 3H gates (r, z, n).

The C++ backend runs ``gru_seq(x, h0, w_ih, b_x, w_hh, b_hn)`` for a layer: gru_fwd with the
input projection inside the time loop, same outputs, backward through gru_bwd.
Both backends implement the same pair of sequence ops:
  gru_fwd(xp [T, B, G], h0 [B, H], w_hh [G, H], b_hn [H])
      -> out [T, B, H], h_n [B, H], gates [T, B, G] (activated r, z, n), hn [T, B, H]
  gru_bwd(grad_out, grad_h_n, w_hh, h0, out, gates, hn) -> grad_xp, grad_ghn, grad_h0
where xp = x W_ih^T + b_ih + [b_hr, b_hz, 0] and hn = W_hn h_{t-1} + b_hn. The gradient
of the hidden-side pre-activation W_hh h_{t-1} + b_hh equals grad_xp in the r and z
blocks and differs in the n block, which the reset gate scales: grad_ghn [T, B, H] is
that block alone, so the backward holds one [T, B, G] gradient, not two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastchar import reference
from fastchar.backends import cpp_loaded, resolve
from fastchar.layout import split_gru_bias
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


def _fake_fwd(xp: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor, batch_sizes=None):
    rows, G = xp.shape[:-1], xp.shape[-1]  # rows: (T, B), or (N,) for a packed sequence
    H = G // 3
    return (
        xp.new_empty(*rows, H),  # out
        h0.new_empty(h0.shape),  # h_n
        xp.new_empty(*rows, G),  # gates
        xp.new_empty(*rows, H),  # hn
    )


def _fake_bwd(grad_out, grad_h_n, w_hh, h0, out, gates, hn, batch_sizes=None):
    return gates.new_empty(gates.shape), hn.new_empty(hn.shape), h0.new_empty(h0.shape)


def _fake_seq(
    x: Tensor, h0: Tensor, w_ih: Tensor, b_x, w_hh: Tensor, b_hn: Tensor, batch_sizes=None
):
    return _fake_fwd(x.new_empty(*x.shape[:-1], w_hh.shape[0]), h0, w_hh, b_hn, batch_sizes)


def _fake_cell(x, h, w_ih, w_hh, b_ih, b_hh, s_ih=None, s_hh=None):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    xp, h0, w_hh, b_hn, *packed = inputs  # packed: [batch_sizes] for the Triton op
    out, _, gates, hn = output
    ctx.save_for_backward(h0, w_hh, out, gates, hn)
    ctx.packed = packed
    skip_zero_grads(ctx)


def _hidden_grads(
    bwd, saved, grad_out, grad_h_n, need_w_hh: bool, need_b_hn: bool, batch_sizes=None
):
    """gru_bwd and the hidden-side weight gradients: (grad_xp, grad_h0, grad_w_hh, grad_b_hn).

    With ``batch_sizes`` (the C++ op on a packed sequence) every sequence tensor is [N, ...].
    """
    h0, w_hh, out, gates, hn = saved
    grad_out, grad_h_n = grads_or_zeros((grad_out, out), (grad_h_n, h0))
    packed = [] if batch_sizes is None else [batch_sizes]
    grad_xp, grad_ghn, grad_h0 = bwd(grad_out, grad_h_n, w_hh, h0, out, gates, hn, *packed)
    H = w_hh.shape[1]
    grad_w_hh = None
    if need_w_hh:  # rows r, z from grad_xp's blocks (views), n from grad_ghn
        prev = previous_states(h0, out, batch_sizes)
        grad_w_hh = torch.cat(
            (
                weight_grad(grad_xp[..., : 2 * H], prev),
                weight_grad(grad_ghn, prev),
            )
        )
    grad_b_hn = grad_ghn.reshape(-1, H).sum(0) if need_b_hn else None
    return grad_xp, grad_h0, grad_w_hh, grad_b_hn


def _autograd_backward(bwd, op: str):
    def backward(ctx, grad_out, grad_h_n, _grad_gates, _grad_hn):
        refuse_create_graph(op)
        need = ctx.needs_input_grad
        bs = ctx.packed[0] if ctx.packed else None
        grads = _hidden_grads(bwd, ctx.saved_tensors, grad_out, grad_h_n, need[2], need[3], bs)
        return *grads, *([None] * len(ctx.packed))

    return backward


def _setup_seq(ctx, inputs, output):
    x, h0, w_ih, b_x, w_hh, b_hn, batch_sizes = inputs
    out, _, gates, hn = output
    need_x = ctx.needs_input_grad[0]
    save_projected(ctx, x, w_ih, need_x, h0, w_hh, out, gates, hn, biases=(b_x, b_hn))
    ctx.has_bias = b_x is not None
    ctx.batch_sizes = batch_sizes
    skip_zero_grads(ctx)


def _seq_backward(ctx, grad_out, grad_h_n, _grad_gates, _grad_hn):
    x, w_ih, saved, (b_x, b_hn) = saved_projected(ctx)
    h0, w_hh = saved[:2]
    inputs = (x, h0, w_ih, b_x, w_hh, b_hn, ctx.batch_sizes)
    second = differentiable_grads(ctx, _reference_seq, inputs, (grad_out, grad_h_n))
    if second is not None:
        return second
    need = ctx.needs_input_grad
    grad_xp, grad_h0, grad_w_hh, grad_b_hn = _hidden_grads(
        torch.ops.fastchar.gru_bwd, saved, grad_out, grad_h_n, need[4], need[5], ctx.batch_sizes
    )
    grad_x, grad_w_ih, grad_b_x = projection_grads(
        (need[0], need[2], need[3]), grad_xp, x, w_ih, ctx.has_bias
    )
    return grad_x, grad_h0, grad_w_ih, grad_b_x, grad_w_hh, grad_b_hn, None


def _reference_seq(x, h0, w_ih, b_x, w_hh, b_hn, batch_sizes):
    """gru_seq's out, h_n from its inputs, by the reference: b_x holds b_ih and the r and z
    blocks of b_hh, so the hidden side's bias is b_hn alone."""
    b_hh = torch.cat((b_hn.new_zeros(2 * b_hn.shape[0]), b_hn))
    return reference.gru(x, h0, w_ih, w_hh, b_x, b_hh, batch_sizes=batch_sizes)


@torch.library.custom_op("fastchar::triton_gru_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_fwd(
    xp: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor, batch_sizes: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastchar.triton import gru as kernels

    return kernels.gru_fwd(xp, h0, w_hh, b_hn, batch_sizes)


@torch.library.custom_op("fastchar::triton_gru_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    out: Tensor,
    gates: Tensor,
    hn: Tensor,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastchar.triton import gru as kernels

    return kernels.gru_bwd(grad_out, grad_h_n, w_hh, h0, out, gates, hn, batch_sizes)


@torch.library.custom_op("fastchar::triton_gru_cell", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> Tensor:
    from fastchar.triton import gru as kernels

    return kernels.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_cell.register_fake(_fake_cell)
_triton_fwd.register_autograd(
    _autograd_backward(_triton_bwd, "fastchar::triton_gru_fwd"), setup_context=_setup_context
)

if cpp_loaded():
    torch.library.register_fake("fastchar::gru_seq")(_fake_seq)
    torch.library.register_autograd("fastchar::gru_seq", _seq_backward, setup_context=_setup_seq)
    torch.library.register_fake("fastchar::gru_fwd")(_fake_fwd)
    torch.library.register_fake("fastchar::gru_bwd")(_fake_bwd)
    torch.library.register_fake("fastchar::gru_cell")(_fake_cell)
    torch.library.register_autograd(
        "fastchar::gru_fwd",
        _autograd_backward(torch.ops.fastchar.gru_bwd, "fastchar::gru_fwd"),
        setup_context=_setup_context,
    )


def _kernels(kind: str):
    if kind == "cpp":
        return torch.ops.fastchar.gru_fwd, torch.ops.fastchar.gru_cell
    return _triton_fwd, _triton_cell


def gru(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    impl: str = "fused",
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction, over a whole sequence.

    x [T, B, I]; h0 [B, H] or None for zeros; w_ih [3H, I]; w_hh [3H, H];
    b_ih, b_hh [3H] or None. Returns out [T, B, H], h_n [B, H].
    With ``batch_sizes`` (PackedSequence.batch_sizes, int64 [T] on the CPU) x is packed
    [N, I] and out [N, H]; h_n is each sequence's state after its own last step.
    Differentiable with respect to every tensor argument; twice (create_graph) with impl='cpp',
    whose backward then re-runs the layer by the reference, not with impl='triton'.
    """
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, w_ih, w_hh, b_ih, b_hh)
    check_args("gru", x, 3, w_ih, w_hh, b_ih, b_hh, {"h0": h0}, True, batch_sizes)
    kind = resolve(impl, x.device, dtype=x.dtype)
    if batch_sizes is not None:
        return _packed(kind, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes)
    if kind == "reference":
        return reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh)
    B, H = x.shape[1], w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        out, h_n = torch.gru(x, h0[None], params, has_bias, 1, 0.0, False, False, False)
        return out, h_n[0]
    b_x, b_hn = split_gru_bias(x, H, b_ih, b_hh)
    if kind == "cpp":  # the input projection inside the time loop
        out, h_n, _, _ = torch.ops.fastchar.gru_seq(x, h0, w_ih, b_x, w_hh, b_hn)
        return out, h_n
    fwd, _ = _kernels(kind)
    xp = linear(x, w_ih, b_x)  # [T, B, G], one GEMM
    out, h_n, _, _ = fwd(xp, h0, w_hh, b_hn)
    return out, h_n


def _packed(kind, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes):
    """``gru()`` on a packed sequence x [N, I] (checked) -> out [N, H], h_n [B, H]."""
    if kind == "reference":
        return reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes=batch_sizes)
    B, H = int(batch_sizes[0]), w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        out, h_n = torch.gru(x, batch_sizes, h0[None], params, has_bias, 1, 0.0, False, False)
        return out, h_n[0]
    if kind == "cpp":
        b_x, b_hn = split_gru_bias(x, H, b_ih, b_hh)
        out, h_n, _, _ = torch.ops.fastchar.gru_seq(x, h0, w_ih, b_x, w_hh, b_hn, batch_sizes)
        return out, h_n
    b_x, b_hn = split_gru_bias(x, H, b_ih, b_hh)
    xp = linear(x, w_ih, b_x)  # [N, G], one GEMM
    out, h_n, _, _ = _triton_fwd(xp, h0, w_hh, b_hn, batch_sizes)
    return out, h_n


def gru_cell(
    x: Tensor,
    h: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    impl: str = "fused",
) -> Tensor:
    """One GRU step, for sampling. x [B, I]; h [B, H] (None: zeros) -> h'. Differentiable
    as lstm_cell is: the reference's step where autograd needs one, the kernels' otherwise."""
    x, h, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h, w_ih, w_hh, b_ih, b_hh)
    B, H = check_args("gru_cell", x, 3, w_ih, w_hh, b_ih, b_hh, {"h": h}, seq=False)
    (h,) = states_or_zeros(x, B, (h, H))
    kind = resolve_cell(impl, x, h, w_ih, w_hh, b_ih, b_hh)
    if kind == "reference":
        return reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    if kind == "torch":
        return torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
    _, cell = _kernels(kind)
    return cell(x, h, w_ih, w_hh, b_ih, b_hh)
