// Every fastchar op schema, declared once. The CPU kernels live in one file per
// cell (lstm.cpp, gru.cpp, rnn.cpp) and register with TORCH_LIBRARY_IMPL.
//
// Layout shared by every backend (fastchar/ops/ holds the autograd glue):
//   xp     [T, B, G]  input projection x @ W_ih^T + biases, computed outside
//   gates  [T, B, G]  activated gates saved for backward, in the input dtype
//   cs     [T, B, H]  LSTM cell states c_1..c_T, float32 for bf16/fp16 inputs
//   hn     [T, B, H]  GRU W_hn h_{t-1} + b_hn, needed for the reset-gate grad
//   s_ih, s_hh        *_cell ops: a float32 scale per row [G] of int8 weights (w = s * q)
//   batch_sizes       *_seq and *_bwd (C++): int64 [T], a packed sequence's rows per step
//                     (PackedSequence.batch_sizes); every [T, B, X] buffer is then packed
//                     [N, X], N = sum(batch_sizes), step t's rows after those of steps < t
//
// The gemm_* ops report, seed and time the GEMM plan (gemm.h, fastchar/plan.py); mm_sum
// runs the backward passes' wide GEMMs on it (wide_gemm.cpp);
// generate runs a CharRNN's whole sampling loop (generate.cpp, fastchar/generator.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastchar, m) {
  m.def(
      "lstm_fwd(Tensor xp, Tensor h0, Tensor c0, Tensor w_hh) -> "
      "(Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cs)");
  // lstm_seq / gru_seq / rnn_seq: the *_fwd ops with the input projection in the time
  // loop (C++ only): x [T, B, I], w_ih, the input-side bias (b_ih + b_hh; GRU: b_ih +
  // [b_hr, b_hz, 0]) or None; backward is the *_bwd op, whose grad_xp feeds x, w_ih and
  // that bias.
  m.def(
      "lstm_seq(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor? bias, Tensor w_hh, "
      "Tensor? batch_sizes=None) -> "
      "(Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cs)");
  m.def(
      "lstm_bwd(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh, "
      "Tensor c0, Tensor gates, Tensor cs, Tensor? batch_sizes=None, bool bias_grad=False) -> "
      "(Tensor grad_xp, Tensor grad_h0, Tensor grad_c0, Tensor grad_bias)");
  // lstmp_seq / lstmp_bwd: lstm_seq / lstm_bwd with a projection w_hr [P, H]
  // (torch.nn.LSTM's proj_size): out, h0, h_n and w_hh's columns are P wide; rs [T, B, H]
  // keeps every o_t * tanh(c_t) and grad_hs [T, B, P] every h_t's whole gradient, for dW_hr.
  m.def(
      "lstmp_seq(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor? bias, Tensor w_hh, "
      "Tensor w_hr, Tensor? batch_sizes=None) -> "
      "(Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cs, Tensor rs)");
  m.def(
      "lstmp_bwd(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh, Tensor w_hr, "
      "Tensor c0, Tensor gates, Tensor cs, Tensor? batch_sizes=None) -> "
      "(Tensor grad_xp, Tensor grad_h0, Tensor grad_c0, Tensor grad_hs)");
  m.def(
      "lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? s_ih=None, Tensor? s_hh=None) -> "
      "(Tensor h_new, Tensor c_new)");

  m.def(
      "gru_fwd(Tensor xp, Tensor h0, Tensor w_hh, Tensor b_hn) -> "
      "(Tensor out, Tensor h_n, Tensor gates, Tensor hn)");
  m.def(
      "gru_seq(Tensor x, Tensor h0, Tensor w_ih, Tensor? b_x, Tensor w_hh, Tensor b_hn, "
      "Tensor? batch_sizes=None) -> "
      "(Tensor out, Tensor h_n, Tensor gates, Tensor hn)");
  m.def(
      "gru_bwd(Tensor grad_out, Tensor grad_h_n, Tensor w_hh, Tensor h0, "
      "Tensor out, Tensor gates, Tensor hn, Tensor? batch_sizes=None) -> "
      "(Tensor grad_xp, Tensor grad_ghn, Tensor grad_h0)");
  m.def(
      "gru_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? s_ih=None, Tensor? s_hh=None) -> Tensor");

  m.def("gemm_why_not(str engine, ScalarType dtype) -> str");
  m.def("gemm_choose(ScalarType dtype, int op, int M, int N, int K, int threads=1) -> str");
  m.def("gemm_row_blocks(str mode=\"\") -> str");
  m.def("gemm_row_block_starts(int M) -> int[]");
  m.def("gemm_plan_entries() -> Tensor");
  m.def("gemm_plan_load(Tensor rows) -> int");
  m.def("gemm_plan_clear() -> ()");
  m.def("gemm_rate(str engine, ScalarType dtype, int op, int M, int N, int K, int threads=1) -> float");
  m.def("gemm_run(str engine, Tensor a, Tensor w, int op, Tensor? c=None) -> Tensor");
  // sum_i op(a_i) @ b_i (op(a) = a^T when trans_a), float32 accumulation: the backward
  // passes' weight and input gradients on the planned engine (wide_gemm.cpp).
  m.def("mm_sum(Tensor[] a, Tensor[] b, bool trans_a) -> Tensor");

  m.def("rnn_fwd(Tensor xp, Tensor h0, Tensor w_hh, bool relu) -> (Tensor out, Tensor h_n)");
  m.def(
      "rnn_seq(Tensor x, Tensor h0, Tensor w_ih, Tensor? bias, Tensor w_hh, bool relu, "
      "Tensor? batch_sizes=None) -> "
      "(Tensor out, Tensor h_n)");
  m.def(
      "rnn_bwd(Tensor grad_out, Tensor grad_h_n, Tensor w_hh, Tensor out, bool relu, "
      "Tensor? batch_sizes=None) -> "
      "(Tensor grad_xp, Tensor grad_h0)");
  m.def(
      "rnn_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool relu, Tensor? s_ih=None, Tensor? s_hh=None) -> Tensor");

  // A CharRNN's sampling loop (generate.cpp): `length` draws for K samples, each followed
  // by a step; returns the ids [K, length], the state and the logits after the last id.
  m.def(
      "generate(Tensor logits, Tensor[] state, Tensor embedding, Tensor[] weights, "
      "Tensor?[] biases, Tensor?[] scales, Tensor head_w, Tensor? head_b, str cell, int length, "
      "float temperature, int top_k, float top_p, Generator? generator=None) -> "
      "(Tensor ids, Tensor[] state, Tensor logits)");
}

// `import fastchar._C` loads this library, which runs the registrations above.
static struct PyModuleDef fastchar_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&fastchar_c_module);
}
