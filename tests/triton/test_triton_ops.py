"""Triton layer and cell ops vs ``reference`` and ``torch``: outputs, final states and
the gradient of every input (x, weights, biases, initial states), in every launch
variant that runs on this device."""

from __future__ import annotations

import pytest
import torch
import triton
from _cases import (
    CELLS,
    DEVICE,
    OUT_NAMES,
    VARIANTS,
    check_error_within_torch,
    make_inputs,
    run_cell,
    run_layer,
)
from parity import assert_close

import fastchar.triton._common as tcommon
from fastchar.triton._common import use_variant

SHAPES = {  # (T, B, I, H)
    "T17_B3_H33": (17, 3, 5, 33),
    "T1_B1_H17": (1, 1, 4, 17),
    "T5_B2_H16": (5, 2, 3, 16),
}
if DEVICE == "cuda":  # each shape compiles its own kernels there; T=1 and B=1 stay
    del SHAPES["T5_B2_H16"]
# float64 is the interpreter's exact check; on a GPU every case is a fresh compile, so
# the grid runs in float32 there (test_triton_gpu.py has float64 and the half types)
DTYPES = {"f64": torch.float64, "f32": torch.float32} if DEVICE == "cpu" else {"f32": torch.float32}
EXACT = torch.float64 if DEVICE == "cpu" else torch.float32  # for the single-dtype tests


def check_layer(cell, inputs, dtype, variant):
    with use_variant(variant):
        got, got_grads = run_layer(cell, "triton", inputs)
    for impl in ("reference", "torch"):
        want, want_grads = run_layer(cell, impl, inputs)
        assert len(got) == len(want)
        for name, a, b in zip(OUT_NAMES[: len(want)], got, want, strict=True):
            assert_close(a, b, dtype, f"{name} vs {impl}")
        assert got_grads.keys() == want_grads.keys()
        for name, g in want_grads.items():
            assert_close(got_grads[name], g, dtype, f"grad {name} vs {impl}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_layer_parity(cell, shape, dtype, variant):
    check_layer(cell, make_inputs(cell, *shape, dtype), dtype, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cell", CELLS)
def test_layer_zero_state_and_no_bias(cell, variant):
    # H and B as in T17_B3_H33, so that a GPU run reuses its compiled kernels
    inputs = make_inputs(cell, 6, 3, 4, 33, EXACT, with_state=False, bias=False)
    check_layer(cell, inputs, EXACT, variant)


@pytest.mark.skipif(DEVICE != "cpu", reason="test_triton_gpu.py checks the GPU against cuDNN")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_types_within_torch_error(cell, dtype):
    """bfloat16/float16 under the interpreter (products in float32 there) vs torch's CPU
    kernels' own error."""
    check_error_within_torch(cell, (9, 3, 5, 33), dtype, ("loop", "step"))


@pytest.mark.parametrize("cell", CELLS)
def test_layer_streams_weights_in_chunks(cell, monkeypatch):
    """W_hh too large to keep resident: the product loops over BK-wide chunks of H."""
    monkeypatch.setattr(tcommon, "RESIDENT_MAX", 0)
    variant = "step" if DEVICE == "cpu" else "persistent"
    check_layer(cell, make_inputs(cell, 4, 3, 5, 40, EXACT), EXACT, variant)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("B", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("cell", CELLS)
def test_cell_parity(cell, B, dtype):
    inputs = make_inputs(cell, None, B, 5, 33, dtype)
    got = run_cell(cell, "triton", inputs)
    for impl in ("reference", "torch"):
        want = run_cell(cell, impl, inputs)
        assert len(got) == len(want)
        for name, a, b in zip(("h", "c")[: len(want)], got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_close(a, b, dtype, f"cell {name} vs {impl}")


@pytest.mark.parametrize("scale", [1e-3, 1e-5])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_tanh_keeps_small_values_relatively_exact(cell, scale):
    """float32 layers whose every activation is tiny (inputs, weights and states scaled
    down): each tanh's result is exact relative to its size, as torch's, where the
    kernels' 2 * sigmoid(2x) - 1 alone kept only its absolute round-off (the outputs
    then off by up to 2% of their size)."""
    inputs = make_inputs(cell, 5, 3, 4, 33, torch.float64)
    inputs = {k: None if v is None else v * scale for k, v in inputs.items()}
    want = run_layer(cell, "reference", inputs)[0]
    f32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    for impl in ("triton", "torch"):
        got = run_layer(cell, impl, f32)[0]
        for name, a, b in zip(OUT_NAMES, got, want, strict=False):
            err = ((a.double() - b).abs().max() / b.abs().max()).item()
            assert err < 1e-6, (impl, name, err)


@pytest.mark.parametrize("variant", VARIANTS)
def test_relu_propagates_nan_and_inf_as_torch(variant):
    """relu(NaN) is NaN as torch.relu's (tl.maximum may drop it), and the backward passes
    the gradient where h is NaN, as torch's threshold_backward does."""
    inputs = make_inputs("rnn_relu", 3, 2, 3, 16, EXACT)
    inputs["x"][0, 0, 0] = float("nan")
    inputs["x"][1, 1, 1] = float("inf")
    inputs["x"][2, 1, 2] = -float("inf")
    with use_variant(variant):
        got, got_grads = run_layer("rnn_relu", "triton", inputs)
    want, want_grads = run_layer("rnn_relu", "reference", inputs)
    assert want[0].isnan().any() and want_grads["w_hh"].isnan().any()
    for a, b in zip(got + list(got_grads.values()), want + list(want_grads.values()), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    cell_inputs = {k: v[0] if k == "x" else v for k, v in inputs.items()}
    (h,) = run_cell("rnn_relu", "triton", cell_inputs)
    assert h.isnan().any()
    torch.testing.assert_close(h, want[0][0], equal_nan=True)


def test_cell_without_bias_and_state_dtypes():
    inputs = make_inputs("lstm", None, 2, 3, 16, torch.float32, bias=False)
    h, c = run_cell("lstm", "triton", inputs)
    want_h, want_c = run_cell("lstm", "reference", inputs)
    assert_close(h, want_h, torch.float32, "h")
    assert_close(c, want_c, torch.float32, "c")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_opcheck(cell):
    """Schema, fake (meta) and autograd registration of the Triton custom ops."""
    n_gates, n_states, *_ = CELLS[cell]
    name = cell.split("_")[0]
    T, B, H = 3, 2, 16
    kw = dict(dtype=torch.float64, device=DEVICE)
    xp = torch.randn(T, B, n_gates * H, **kw, requires_grad=True)
    h0 = torch.randn(B, H, **kw, requires_grad=True)
    w_hh = (torch.randn(n_gates * H, H, **kw) / 4).requires_grad_()
    args = {
        "lstm": (xp, h0, torch.randn(B, H, **kw, requires_grad=True), w_hh),
        "gru": (xp, h0, w_hh, torch.randn(H, **kw, requires_grad=True)),
        "rnn": (xp, h0, w_hh, True),
    }[name]
    fwd = getattr(torch.ops.fastchar, f"triton_{name}_fwd")
    torch.library.opcheck(fwd, args)

    saved = [t.detach() for t in fwd(*args)]
    grads = [torch.randn_like(saved[0]), torch.randn_like(saved[1])]
    bwd_args = {
        "lstm": lambda: (*grads, torch.randn_like(saved[2]), w_hh, args[2], *saved[3:]),
        "gru": lambda: (*grads, w_hh, h0, saved[0], *saved[2:]),
        "rnn": lambda: (*grads, w_hh, saved[0], True),
    }[name]()
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args)
    torch.library.opcheck(getattr(torch.ops.fastchar, f"triton_{name}_bwd"), bwd_args)

    inputs = make_inputs(cell, None, B, 4, H, torch.float64)
    cell_args = tuple(inputs.values()) + ((True,) if name == "rnn" else ())
    torch.library.opcheck(getattr(torch.ops.fastchar, f"triton_{name}_cell"), cell_args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_a_launch_that_does_not_fit_runs_the_step_variant(cell, monkeypatch):
    """A loop or persistent launch that needs more shared memory than the GPU has (Triton
    raises OutOfResources as it loads the kernel, before it runs) runs as the step variant
    with the smallest blocks, with a warning, forward and backward; a step launch that
    does not fit raises."""
    real = tcommon._launch_steps
    tried = []

    def launch_steps(kernel, p, *args):
        tried.append((p.variant, p.BLOCK_H))
        if p.variant != "step" or p.BLOCK_H > 16:
            raise triton.runtime.errors.OutOfResources(232448, 166912, "shared memory")
        return real(kernel, p, *args)

    monkeypatch.setattr(tcommon, "_launch_steps", launch_steps)
    with pytest.warns(UserWarning, match="does not fit this GPU.*running the step variant"):
        check_layer(cell, make_inputs(cell, 4, 3, 5, 40, EXACT), EXACT, "loop")
    assert ("loop", 64) in tried and ("step", 16) in tried
    with use_variant("step"), pytest.raises(triton.runtime.errors.OutOfResources):
        run_layer(cell, "triton", make_inputs(cell, 2, 3, 5, 40, EXACT))


def test_forcing_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        with use_variant("warp-speed"):
            pass


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs on CPU tensors")
def test_persistent_variant_is_refused_under_the_interpreter():
    inputs = make_inputs("rnn_tanh", 2, 1, 3, 16, torch.float32)
    with use_variant("persistent"), pytest.raises(RuntimeError, match="needs a CUDA device"):
        run_layer("rnn_tanh", "triton", inputs)


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the real persistent grid")
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_code_path_with_one_program_per_batch_tile(cell, resident, monkeypatch):
    """The persistent kernels (grid barrier, state carried across steps in registers,
    h_{t-1} read back from memory) under the interpreter: with a single program per
    batch tile every barrier is already complete when reached, so nothing waits."""
    from fastchar.triton import gru, lstm, rnn

    def one_program_per_tile(B, H, n_gates, like, T=0):
        Hp = max(16, triton.next_power_of_2(H))
        return tcommon.Plan("persistent", 16, Hp, Hp if resident else 16, 4, triton.cdiv(B, 16), 1)

    for module in (lstm, gru, rnn):
        monkeypatch.setattr(module, "plan", one_program_per_tile)
    inputs = make_inputs(cell, 5, 20, 3, 40, torch.float64)  # B=20: two batch tiles
    check_layer(cell, inputs, torch.float64, None)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_layer_under_torch_compile(cell):
    """The Triton ops trace whole (fullgraph) through their fake and autograd
    registrations, and the compiled forward + backward matches eager."""
    *_, layer, _, extra = CELLS[cell]
    inputs = make_inputs(cell, 4, 3, 5, 16, EXACT)

    def loss(*args):
        return sum(r.square().sum() for r in layer(*args, **extra, impl="triton"))

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss):
        leaves = [v.clone().requires_grad_() for v in inputs.values()]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [leaf.grad for leaf in leaves])
    for name, a, b in zip(["loss", *inputs], *results, strict=True):
        assert_close(a, b, EXACT, f"compiled {name}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_second_derivative_is_refused(cell):
    """The Triton ops keep no input xp to re-run the layer from and their backward kernels
    have no derivative (nor have cuDNN's): create_graph=True is a clear RuntimeError, not a
    silently zero gradient of the gradient; the first derivative still runs."""
    *_, layer, _, extra = CELLS[cell]
    leaves = [v.clone().requires_grad_() for v in make_inputs(cell, 3, 2, 3, 16, EXACT).values()]
    out = layer(*leaves, **extra, impl="triton")[0]
    torch.autograd.grad(out.sum(), leaves[0], retain_graph=True)
    with pytest.raises(RuntimeError, match=r"fastchar::triton_\w+_fwd: no gradient of its"):
        torch.autograd.grad(out.sum(), leaves[0], create_graph=True)
