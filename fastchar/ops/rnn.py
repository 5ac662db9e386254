"""Elman RNN ops (tanh or relu): registration (fake + autograd) for the C++ and Triton
kernels, and ``rnn()``.

Shape letters: T time, B batch, I input, H hidden, G = H.

The C++ backend runs ``rnn_seq(x, h0, w_ih, bias, w_hh, relu)`` for a layer: rnn_fwd with
the input projection inside the time loop, same outputs, backward through rnn_bwd.
Both backends implement the same pair of sequence ops:
  rnn_fwd(xp [T, B, H], h0 [B, H], w_hh [H, H], relu) -> out [T, B, H], h_n [B, H]
  rnn_bwd(grad_out, grad_h_n, w_hh, out, relu) -> grad_xp, grad_h0
The activation's derivative comes from the outputs themselves (1 - h^2, or h > 0),
so nothing beyond ``out`` is saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastchar import reference
from fastchar.backends import cpp_loaded, resolve
from fastchar.ops._common import (
    autocast_inputs,
    check_args,
    differentiable_grads,
    linear,
    previous_states,
    projection_grads,
    refuse_create_graph,
    resolve_cell,
    save_projected,
    saved_projected,
    states_or_zeros,
    torch_params,
    weight_grad,
)

NONLINEARITIES = ("tanh", "relu")


def _fake_fwd(xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, batch_sizes=None):
    return xp.new_empty(xp.shape), h0.new_empty(h0.shape)


def _fake_bwd(grad_out, grad_h_n, w_hh, out, relu, batch_sizes=None):
    return out.new_empty(out.shape), grad_h_n.new_empty(grad_h_n.shape)


def _fake_seq(
    x: Tensor, h0: Tensor, w_ih: Tensor, bias, w_hh: Tensor, relu: bool, batch_sizes=None
):
    return x.new_empty(*x.shape[:-1], w_hh.shape[0]), h0.new_empty(h0.shape)


def _fake_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu, s_ih=None, s_hh=None):
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    xp, h0, w_hh, relu, *packed = inputs  # packed: [batch_sizes] for the Triton op
    out, _ = output
    ctx.relu = relu
    ctx.packed = packed
    ctx.save_for_backward(h0, w_hh, out)


def _autograd_backward(bwd, op: str):
    def backward(ctx, grad_out, grad_h_n):
        refuse_create_graph(op)
        h0, w_hh, out = ctx.saved_tensors
        bs = ctx.packed[0] if ctx.packed else None
        grad_xp, grad_h0 = bwd(grad_out, grad_h_n, w_hh, out, ctx.relu, *ctx.packed)
        need_w = ctx.needs_input_grad[2]
        grad_w_hh = weight_grad(grad_xp, previous_states(h0, out, bs)) if need_w else None
        return grad_xp, grad_h0, grad_w_hh, None, *([None] * len(ctx.packed))

    return backward


@torch.library.custom_op("fastchar::triton_rnn_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_fwd(
    xp: Tensor, h0: Tensor, w_hh: Tensor, relu: bool, batch_sizes: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    from fastchar.triton import rnn as kernels

    return kernels.rnn_fwd(xp, h0, w_hh, relu, batch_sizes)


@torch.library.custom_op("fastchar::triton_rnn_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    w_hh: Tensor,
    out: Tensor,
    relu: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    from fastchar.triton import rnn as kernels

    return kernels.rnn_bwd(grad_out, grad_h_n, w_hh, out, relu, batch_sizes)


@torch.library.custom_op("fastchar::triton_rnn_cell", mutates_args=(), device_types=("cuda", "cpu"))
def _triton_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    relu: bool,
) -> Tensor:
    from fastchar.triton import rnn as kernels

    return kernels.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu)


_triton_fwd.register_fake(_fake_fwd)
_triton_bwd.register_fake(_fake_bwd)
_triton_cell.register_fake(_fake_cell)
_triton_fwd.register_autograd(
    _autograd_backward(_triton_bwd, "fastchar::triton_rnn_fwd"), setup_context=_setup_context
)

if cpp_loaded():
    torch.library.register_fake("fastchar::rnn_fwd")(_fake_fwd)
    torch.library.register_fake("fastchar::rnn_bwd")(_fake_bwd)
    torch.library.register_fake("fastchar::rnn_cell")(_fake_cell)
    torch.library.register_autograd(
        "fastchar::rnn_fwd",
        _autograd_backward(torch.ops.fastchar.rnn_bwd, "fastchar::rnn_fwd"),
        setup_context=_setup_context,
    )


def _setup_seq(ctx, inputs, output):
    x, h0, w_ih, bias, w_hh, relu, batch_sizes = inputs
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.batch_sizes = batch_sizes
    need_x = ctx.needs_input_grad[0]
    save_projected(ctx, x, w_ih, need_x, h0, w_hh, output[0], biases=(bias,))


def _seq_backward(ctx, grad_out, grad_h_n):
    x, w_ih, (h0, w_hh, out), (bias,) = saved_projected(ctx)
    bs = ctx.batch_sizes
    inputs = (x, h0, w_ih, bias, w_hh, ctx.relu, bs)
    second = differentiable_grads(ctx, _reference_seq, inputs, (grad_out, grad_h_n))
    if second is not None:
        return second
    grad_xp, grad_h0 = torch.ops.fastchar.rnn_bwd(grad_out, grad_h_n, w_hh, out, ctx.relu, bs)
    need = ctx.needs_input_grad
    grad_x, grad_w_ih, grad_b = projection_grads(
        (need[0], need[2], need[3]), grad_xp, x, w_ih, ctx.has_bias
    )
    grad_w_hh = weight_grad(grad_xp, previous_states(h0, out, bs)) if need[4] else None
    return grad_x, grad_h0, grad_w_ih, grad_b, grad_w_hh, None, None


def _reference_seq(x, h0, w_ih, bias, w_hh, relu, batch_sizes):
    """rnn_seq's out, h_n from its inputs, by the reference."""
    nonlinearity = "relu" if relu else "tanh"
    return reference.rnn(x, h0, w_ih, w_hh, bias, None, nonlinearity, batch_sizes=batch_sizes)


if cpp_loaded():
    torch.library.register_fake("fastchar::rnn_seq")(_fake_seq)
    torch.library.register_autograd("fastchar::rnn_seq", _seq_backward, setup_context=_setup_seq)


def _kernels(kind: str):
    if kind == "cpp":
        return torch.ops.fastchar.rnn_fwd, torch.ops.fastchar.rnn_cell
    return _triton_fwd, _triton_cell


def _check_nonlinearity(nonlinearity: str) -> bool:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity == "relu"


def rnn(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
    *,
    impl: str = "fused",
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer, one direction, over a whole sequence.

    x [T, B, I]; h0 [B, H] or None for zeros; w_ih [H, I]; w_hh [H, H];
    b_ih, b_hh [H] or None; nonlinearity "tanh" or "relu".
    Returns out [T, B, H], h_n [B, H]. Differentiable with respect to every tensor argument;
    twice (create_graph) with impl='cpp', whose backward then re-runs the layer by the
    reference, not with impl='triton'.
    With ``batch_sizes`` (PackedSequence.batch_sizes, int64 [T] on the CPU) x is packed
    [N, I] and out [N, H]; h_n is each sequence's state after its own last step.
    """
    relu = _check_nonlinearity(nonlinearity)
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, w_ih, w_hh, b_ih, b_hh)
    check_args("rnn", x, 1, w_ih, w_hh, b_ih, b_hh, {"h0": h0}, True, batch_sizes)
    kind = resolve(impl, x.device, dtype=x.dtype)
    if batch_sizes is not None:
        return _packed(kind, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes)
    if kind == "reference":
        return reference.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    B, H = x.shape[1], w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        run = torch.rnn_relu if relu else torch.rnn_tanh
        out, h_n = run(x, h0[None], params, has_bias, 1, 0.0, False, False, False)
        return out, h_n[0]
    if kind == "cpp":  # the input projection inside the time loop
        bias = reference.bias_sum(b_ih, b_hh)
        return torch.ops.fastchar.rnn_seq(x, h0, w_ih, bias, w_hh, relu)
    fwd, _ = _kernels(kind)
    xp = linear(x, w_ih, reference.bias_sum(b_ih, b_hh))  # [T, B, H], one GEMM
    return fwd(xp, h0, w_hh, relu)


def _packed(kind, x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes):
    """``rnn()`` on a packed sequence x [N, I] (checked) -> out [N, H], h_n [B, H]."""
    if kind == "reference":
        return reference.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes=batch_sizes)
    B, H = int(batch_sizes[0]), w_hh.shape[1]
    h0 = x.new_zeros(B, H) if h0 is None else h0
    if kind == "torch":
        params, has_bias = torch_params(w_ih, w_hh, b_ih, b_hh)
        run = torch.rnn_relu if nonlinearity == "relu" else torch.rnn_tanh
        out, h_n = run(x, batch_sizes, h0[None], params, has_bias, 1, 0.0, False, False)
        return out, h_n[0]
    if kind == "cpp":
        bias = reference.bias_sum(b_ih, b_hh)
        relu = nonlinearity == "relu"
        return torch.ops.fastchar.rnn_seq(x, h0, w_ih, bias, w_hh, relu, batch_sizes)
    xp = linear(x, w_ih, reference.bias_sum(b_ih, b_hh))  # [N, H], one GEMM
    out, h_n = _triton_fwd(xp, h0, w_hh, nonlinearity == "relu", batch_sizes)
    return out, h_n


def rnn_cell(
    x: Tensor,
    h: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
    *,
    impl: str = "fused",
) -> Tensor:
    """One RNN step, for sampling. x [B, I]; h [B, H] (None: zeros) -> h'. Differentiable
    as lstm_cell is: the reference's step where autograd needs one, the kernels' otherwise."""
    relu = _check_nonlinearity(nonlinearity)
    x, h, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h, w_ih, w_hh, b_ih, b_hh)
    B, H = check_args("rnn_cell", x, 1, w_ih, w_hh, b_ih, b_hh, {"h": h}, seq=False)
    (h,) = states_or_zeros(x, B, (h, H))
    kind = resolve_cell(impl, x, h, w_ih, w_hh, b_ih, b_hh)
    if kind == "reference":
        return reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if kind == "torch":
        step = torch.rnn_relu_cell if relu else torch.rnn_tanh_cell
        return step(x, h, w_ih, w_hh, b_ih, b_hh)
    _, cell = _kernels(kind)
    return cell(x, h, w_ih, w_hh, b_ih, b_hh, relu)
