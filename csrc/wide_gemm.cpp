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

// The bfloat16 path's float32 accumulator: at most this many elements (1 MB) at a time.
constexpr int64_t kAccBlockElems = 256 * 1024;

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
  CHECK_FLOAT(a[0]);
  if (dt != at::kFloat && dt != at::kBFloat16) {
    auto out = at::zeros({M, N}, a[0].options());
    for (size_t i = 0; i < a.size(); ++i) {
      out.addmm_(trans_a ? a[i].t() : a[i], b[i]);
    }
    return out;
  }
  const auto op = trans_a ? engines::Op::kWideTN : engines::Op::kWideNN;
  std::vector<at::Tensor> as, bs;
  for (size_t i = 0; i < a.size(); ++i) {
    as.push_back(rows_of(a[i]));
    bs.push_back(rows_of(b[i]));
  }
  const size_t elem = c10::elementSize(dt);
  // C's rows [m0, m0 + rows) of every term into acc [rows, N] (float32).
  auto rows_into = [&](int64_t m0, int64_t rows, float* acc) {
    bool accumulate = false;
    for (size_t i = 0; i < as.size(); ++i) {
      const int64_t K = as[i].size(trans_a ? 0 : 1), lda = as[i].stride(0);
      if (rows == 0 || N == 0 || K == 0) {
        continue;
      }
      const auto e = trans_a ? engines::choose(dt, op, M, N, plan_extent(K), 1)
                             : engines::choose(dt, op, plan_extent(M), N, K, 1);
      // op(a)'s rows m0.. are a's columns m0.. when trans_a, else its rows m0..
      const auto* a0 = static_cast<const char*>(as[i].const_data_ptr()) +
                       (trans_a ? m0 : m0 * lda) * elem;
      engines::make_kernel(e, dt, op, rows, N, K, bs[i].const_data_ptr(), bs[i].stride(0))
          ->run(a0, lda, accumulate, acc, N);
      accumulate = true;
    }
    if (!accumulate) {
      std::fill(acc, acc + rows * N, 0.0f);
    }
  };
  if (dt == at::kFloat) {
    auto out = at::empty({M, N}, a[0].options());
    rows_into(0, M, out.data_ptr<float>());
    return out;
  }
  // bfloat16: a float32 accumulator for a block of rows at a time, rounded into the
  // output, so that a tall product (grad_x, [T * B, I]) needs no float32 copy of itself.
  auto out = at::empty({M, N}, a[0].options());
  const int64_t block = std::max<int64_t>(1, kAccBlockElems / std::max<int64_t>(N, 1));
  auto acc = at::empty({std::min(M, block), N}, a[0].options().dtype(at::kFloat));
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    rows_into(m0, rows, acc.data_ptr<float>());
    out.narrow(0, m0, rows).copy_(acc.narrow(0, 0, rows));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("mm_sum", &mm_sum);
}

}  // namespace fastchar
