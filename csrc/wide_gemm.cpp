// mm_sum: the backward passes' wide GEMMs (fastchar/ops/_common.py) on the planned engine:
// the weight gradients sum_i a_i^T @ b_i (dgates^T @ h_{t-1}, dgates^T @ x) and the input
// gradient a @ b (dgates @ W_ih), whose K or M is T * B. MKL runs these at 170-180 GFLOP/s
// on two AMD EPYC Zen 5 cores, fastchar's micro-kernels at the step GEMMs' ~430.
#include "common.h"

namespace fastchar {
namespace {

// The plan measures a wide GEMM at its T * B dimension rounded up to a power of two and
// capped at 2048: a longer one runs at the same rate, and one entry serves every batch.
int64_t plan_extent(int64_t n) {
  int64_t p = 16;
  while (p < n && p < 2048) {
    p *= 2;
  }
  return p;
}

// A 2-D operand as the kernels read it: unit column stride, rows at least a row apart.
at::Tensor rows_of(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

// sum_i op(a_i) @ b_i, op(a) = a^T when trans_a: a_i [K_i, M] (else [M, K_i]), b_i [K_i, N].
// One float32 accumulator for every term (k in order, term after term), rounded once to
// a's dtype; float64 (the gradcheck path) on ATen.
at::Tensor mm_sum(at::TensorList a, at::TensorList b, bool trans_a) {
  constexpr const char* OP = "fastchar::mm_sum";
  TORCH_CHECK_VALUE(!a.empty() && a.size() == b.size(), OP,
                    ": a and b must be lists of the same positive length, got ", a.size(),
                    " and ", b.size());
  const auto dt = a[0].scalar_type();
  const int64_t M = a[0].dim() == 2 ? a[0].size(trans_a ? 1 : 0) : -1;
  const int64_t N = b[0].dim() == 2 ? b[0].size(1) : -1;
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK_CPU(a[i]);
    CHECK_CPU(b[i]);
    CHECK_DIM(a[i], 2);
    CHECK_DIM(b[i], 2);
    CHECK_DTYPE(a[i], dt);
    CHECK_DTYPE(b[i], dt);
    const int64_t K = a[i].size(trans_a ? 0 : 1);
    TORCH_CHECK_VALUE(a[i].size(trans_a ? 1 : 0) == M && b[i].size(0) == K && b[i].size(1) == N,
                      OP, ": term ", i, " has a ", a[i].sizes(), " and b ", b[i].sizes(),
                      ", which do not fit op(a) [", M, ", K] @ b [K, ", N, "]");
  }
  check_float_dtype(OP, a[0]);
  if (dt != at::kFloat && dt != at::kBFloat16) {
    auto out = at::zeros({M, N}, a[0].options());
    for (size_t i = 0; i < a.size(); ++i) {
      out.addmm_(trans_a ? a[i].t() : a[i], b[i]);
    }
    return out;
  }
  const auto op = trans_a ? engines::Op::kWideTN : engines::Op::kWideNN;
  auto out = at::zeros({M, N}, a[0].options().dtype(at::kFloat));
  bool accumulate = false;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto ai = rows_of(a[i]), bi = rows_of(b[i]);
    const int64_t K = ai.size(trans_a ? 0 : 1);
    if (M == 0 || N == 0 || K == 0) {
      continue;
    }
    const auto e = trans_a ? engines::choose(dt, op, M, N, plan_extent(K), 1)
                           : engines::choose(dt, op, plan_extent(M), N, K, 1);
    engines::make_kernel(e, dt, op, M, N, K, bi.const_data_ptr(), bi.stride(0))
        ->run(ai.const_data_ptr(), ai.stride(0), accumulate, out.data_ptr<float>(), N);
    accumulate = true;
  }
  return dt == at::kFloat ? out : out.to(dt);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("mm_sum", &mm_sum);
}

}  // namespace fastchar
