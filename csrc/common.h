// Shared pieces of the CPU kernels: argument checks, the recurrent GEMMs and
// the fast activations used by every cell's pointwise pass.
//
// Shape letters: T time, B batch, I input, H hidden, G gates (4H / 3H / H).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Each op defines `constexpr const char* OP` so the messages name the op too.
#define CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), OP, ": ", #x, " must be a CPU tensor, got ", (x).device())
#define CHECK_DTYPE(x, dtype)                                                             \
  TORCH_CHECK((x).scalar_type() == (dtype), OP, ": ", #x, " has dtype ", (x).scalar_type(), \
              ", expected ", (dtype))
#define CHECK_SHAPE(x, ...)                                                           \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), OP, ": ", #x,      \
                    " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", \
                    (x).sizes())
#define CHECK_DIM(x, n)                                                                   \
  TORCH_CHECK_VALUE((x).dim() == (n), OP, ": ", #x, " must be ", (n), "-D, got shape ", \
                    (x).sizes())
#define CHECK_ARG(x, dtype, ...) \
  CHECK_CPU(x);                  \
  CHECK_DTYPE(x, dtype);         \
  CHECK_SHAPE(x, __VA_ARGS__)

// The pointwise passes are compiled for AVX-512 and AVX2 as well as the
// baseline, and the loader picks the best one the CPU runs; a plain
// `-march=native` build would crash on an older CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCHAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCHAR_CLONES
#endif
#define FASTCHAR_INLINE inline __attribute__((always_inline))

namespace fastchar {

template <typename T>
using acc_t = at::opmath_type<T>;

inline at::ScalarType state_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

inline void check_float_dtype(const char* OP, const at::Tensor& x) {
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, OP,
              ": dtype ", t, " is not supported (float32, float64 or bfloat16)");
}

// The checks every *_cell op shares: x [B, I] and w_hh [n_gates * H, H] on the CPU
// in a supported dtype, then w_ih [G, I], h [B, H] and the optional biases [G] in
// x's dtype. Returns H. The messages name each argument as the op schemas do.
inline int64_t check_cell_args(const char* OP, int64_t n_gates, const at::Tensor& x,
                               const at::Tensor& h, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  check_float_dtype(OP, x);
  CHECK_CPU(w_hh);
  CHECK_DIM(w_hh, 2);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1), G = n_gates * H;
  CHECK_ARG(w_hh, dt, G, H);
  CHECK_ARG(w_ih, dt, G, I);
  CHECK_ARG(h, dt, B, H);
  if (b_ih.has_value()) {
    CHECK_ARG(*b_ih, dt, G);
  }
  if (b_hh.has_value()) {
    CHECK_ARG(*b_hh, dt, G);
  }
  return H;
}

// Rows per parallel task: small passes stay on one thread, where a fork and
// join would cost more than the work.
inline int64_t row_grain(int64_t H) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1));
}

// Activations. float: a branch-free Cephes-style exp (about 1 ulp) that the compiler
// vectorises; double is the gradcheck path and uses libm.

FASTCHAR_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round to nearest by adding and removing 1.5 * 2^23, which vectorises.
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

FASTCHAR_INLINE float sigmoid_act(float x) {
  return 1.0f / (1.0f + fast_exp(-x));
}

FASTCHAR_INLINE float tanh_act(float x) {
  float ax = std::fabs(x);
  // Near zero 1 - 2 / (e^2x + 1) cancels; use Cephes' odd polynomial there.
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = x + x * z * p;
  float big = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

FASTCHAR_INLINE double sigmoid_act(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

FASTCHAR_INLINE double tanh_act(double x) {
  return std::tanh(x);
}

template <typename A>
FASTCHAR_INLINE A relu_act(A x) {
  return x > A(0) ? x : A(0);
}

// Recurrent GEMMs, row-major, C in the accumulation type:
//   gemm_nt: C[M, N] = beta * C + A[M, K] @ W[N, K]^T   (forward: h @ W_hh^T)
//   gemm_nn: C[M, N] = beta * C + A[M, K] @ W[K, N]     (backward: dgates @ W_hh)
// With MKL (torch's CPU BLAS on x86) the BLAS is called directly: the time
// loop runs one small GEMM per step, where the dispatcher's overhead shows.

#if AT_MKL_ENABLED()
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc);
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                            float alpha, const uint16_t* a, int lda, const uint16_t* b,
                            int ldb, float beta, float* c, int ldc);
}

namespace blas {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

inline void gemm(bool trans_w, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* W, int64_t ldw, float beta, float* C, int64_t ldc) {
  // Column-major view: C^T [N, M] = op(W) @ A^T.
  const char tw = trans_w ? 'T' : 'N', ta = 'N';
  const int m = N, n = M, k = K, la = lda, lw = ldw, lc = ldc;
  const float one = 1.0f;
  sgemm_(&tw, &ta, &m, &n, &k, &one, W, &lw, A, &la, &beta, C, &lc);
}

inline void gemm(bool trans_w, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                 const double* W, int64_t ldw, double beta, double* C, int64_t ldc) {
  const char tw = trans_w ? 'T' : 'N', ta = 'N';
  const int m = N, n = M, k = K, la = lda, lw = ldw, lc = ldc;
  const double one = 1.0;
  dgemm_(&tw, &ta, &m, &n, &k, &one, W, &lw, A, &la, &beta, C, &lc);
}

inline void gemm(bool trans_w, int64_t M, int64_t N, int64_t K, const at::BFloat16* A,
                 int64_t lda, const at::BFloat16* W, int64_t ldw, float beta, float* C,
                 int64_t ldc) {
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, trans_w ? kTrans : kNoTrans, M, N, K, 1.0f,
                         reinterpret_cast<const uint16_t*>(A), lda,
                         reinterpret_cast<const uint16_t*>(W), ldw, beta, C, ldc);
}
}  // namespace blas
#endif

template <typename T>
void gemm(bool trans_w, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W,
          int64_t ldw, acc_t<T> beta, acc_t<T>* C, int64_t ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        C[m * ldc + n] = beta == acc_t<T>(0) ? acc_t<T>(0) : C[m * ldc + n];
      }
    }
    return;
  }
#if AT_MKL_ENABLED()
  blas::gemm(trans_w, M, N, K, A, lda, W, ldw, beta, C, ldc);
#else
  auto dtype = c10::CppTypeToScalarType<T>::value;
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, at::dtype(dtype));
  auto w = trans_w ? at::from_blob(const_cast<T*>(W), {N, K}, {ldw, 1}, at::dtype(dtype)).t()
                   : at::from_blob(const_cast<T*>(W), {K, N}, {ldw, 1}, at::dtype(dtype));
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::dtype(c10::CppTypeToScalarType<acc_t<T>>::value));
  auto prod = at::mm(a, w).to(c.scalar_type());
  if (beta == acc_t<T>(0)) {
    c.copy_(prod);
  } else {
    c.add_(prod);
  }
#endif
}

template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw,
             acc_t<T> beta, acc_t<T>* C, int64_t ldc) {
  gemm<T>(true, M, N, K, A, lda, W, ldw, beta, C, ldc);
}

template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw,
             acc_t<T> beta, acc_t<T>* C, int64_t ldc) {
  gemm<T>(false, M, N, K, A, lda, W, ldw, beta, C, ldc);
}

// C[M, N] = beta * C + A[M, K] @ op(W) for one W used on every step of a time
// loop (op(W) = W^T when trans_w). With MKL, W is packed once for the packed
// GEMM, which otherwise re-packs W on every small per-step call. bfloat16 runs
// this GEMM in float32 (W widened once, A widened per step): without AMX, as
// on the machines measured so far, MKL's float32 GEMM beats its bf16 one, and
// the per-step A is only [B, H].
template <typename T>
class StepGemm {
 public:
  StepGemm(bool trans_w, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw)
      : trans_w_(trans_w), M_(M), N_(N), K_(K), W_(W), ldw_(ldw) {
#if AT_MKL_ENABLED()
    if constexpr (kPack) {
      // Measured on the 2-core Xeon: packing speeds up the forward's h @ W^T
      // (2.5x at B=8, H=512) but slows the backward's dgates @ W (1.6x slower
      // at B=64), so float packs only the transposed case.
      const bool pack = trans_w || std::is_same_v<T, at::BFloat16>;
      if (pack && M > 0 && N > 0 && K > 0) {
        const float* w32 = reinterpret_cast<const float*>(W);
        at::Tensor wide;
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          const int64_t rows = trans_w ? N : K, cols = trans_w ? K : N;
          wide = at::empty({rows, cols}, at::kFloat);
          widen(rows, cols, W, ldw, wide.data_ptr<float>(), cols);
          w32 = wide.const_data_ptr<float>();
          ldw = cols;
          scratch_ = at::empty({M, K}, at::kFloat);
        }
        size_t bytes = cblas_sgemm_pack_get_size(blas::kBMatrix, M, N, K);
        packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, at::kFloat);
        cblas_sgemm_pack(blas::kRowMajor, blas::kBMatrix, trans_w ? blas::kTrans : blas::kNoTrans,
                         M, N, K, 1.0f, w32, ldw, packed_.data_ptr<float>());
      }
    }
#endif
  }

  void operator()(const T* A, int64_t lda, acc_t<T> beta, acc_t<T>* C, int64_t ldc) const {
#if AT_MKL_ENABLED()
    if constexpr (kPack) {
      if (packed_.defined()) {
        const float* a32 = reinterpret_cast<const float*>(A);
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          float* s = scratch_.data_ptr<float>();
          widen(M_, K_, A, lda, s, K_);
          a32 = s;
          lda = K_;
        }
        cblas_sgemm_compute(blas::kRowMajor, blas::kNoTrans, blas::kPacked, M_, N_, K_, a32, lda,
                            packed_.const_data_ptr<float>(), N_, beta, C, ldc);
        return;
      }
    }
#endif
    gemm<T>(trans_w_, M_, N_, K_, A, lda, W_, ldw_, beta, C, ldc);
  }

 private:
  static constexpr bool kPack = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;

  static void widen(int64_t rows, int64_t cols, const T* src, int64_t ld_src, float* dst,
                    int64_t ld_dst) {
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        dst[r * ld_dst + c] = float(src[r * ld_src + c]);
      }
    }
  }

  bool trans_w_;
  int64_t M_, N_, K_;
  const T* W_;
  int64_t ldw_;
  at::Tensor packed_, scratch_;
};

// Hidden units split into contiguous slices, one per thread, for time loops
// that run inside a single parallel region: a thread keeps its slice of W_hh
// in its own core's cache and meets the others at one barrier per step,
// instead of a GEMM fork and a pointwise fork per step.
class UnitSlices {
 public:
  UnitSlices(int64_t H, int64_t n_gates) : H_(H), n_gates_(n_gates) {
#ifdef _OPENMP
    // Inside another parallel region a nested team would get one thread.
    int64_t threads = omp_in_parallel() || H < 32 ? 1 : at::get_num_threads();
#else
    int64_t threads = 1;
#endif
    // Slices are whole 16-lane vectors except the last.
    chunk_ = (H + threads - 1) / threads;
    chunk_ = std::max<int64_t>(1, (chunk_ + 15) / 16 * 16);
    count = (H + chunk_ - 1) / chunk_;
  }

  int64_t begin(int64_t s) const {
    return std::min(s * chunk_, H_);
  }
  int64_t size(int64_t s) const {
    return std::min((s + 1) * chunk_, H_) - begin(s);
  }

  // The W rows of slice s for every gate: [n_gates * n, K], gate-major.
  at::Tensor gate_rows(const at::Tensor& w, int64_t s) const {
    return w.view({n_gates_, H_, w.size(1)}).narrow(1, begin(s), size(s)).reshape({-1, w.size(1)}).contiguous();
  }
  // The W columns of slice s: [rows, n].
  at::Tensor columns(const at::Tensor& w, int64_t s) const {
    return w.narrow(1, begin(s), size(s)).contiguous();
  }

  // For steps i = 0..steps-1: before(s, i) for every slice, a barrier, then
  // after(s, i). A thread always serves the same slices, so a slice's own
  // data needs no barrier between after(s, i) and before(s, i + 1).
  template <typename Before, typename After>
  void run(int64_t steps, const Before& before, const After& after) const {
    if (count == 1) {
      for (int64_t i = 0; i < steps; ++i) {
        before(0, i);
        after(0, i);
      }
      return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(count)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      for (int64_t i = 0; i < steps; ++i) {
        for (int64_t s = tid; s < count; s += nth) {
          before(s, i);
        }
#pragma omp barrier
        for (int64_t s = tid; s < count; s += nth) {
          after(s, i);
        }
      }
    }
#endif
  }

  int64_t count;

 private:
  int64_t H_, n_gates_, chunk_;
};

// One step GEMM per unit slice, over that slice's part of W_hh (kept alive in
// `weights`, which the GEMMs point into). Forward: h_{t-1} [B, H] @ the slice's
// gate rows^T -> [B, n_gates * n]. Backward: dgates_t [B, G] @ W_hh[:, slice] -> [B, n].
template <typename T>
struct SliceGemms {
  std::vector<at::Tensor> weights;
  std::vector<StepGemm<T>> gemms;

  SliceGemms(const UnitSlices& slices, const at::Tensor& w_hh, int64_t B, bool forward) {
    const int64_t G = w_hh.size(0), H = w_hh.size(1);
    for (int64_t s = 0; s < slices.count; ++s) {
      const int64_t n = slices.size(s);
      if (forward) {
        weights.push_back(slices.gate_rows(w_hh, s));  // [n_gates * n, H]
        gemms.emplace_back(true, B, G / H * n, H, weights.back().template const_data_ptr<T>(), H);
      } else {
        weights.push_back(slices.columns(w_hh, s));  // [G, n]
        gemms.emplace_back(false, B, n, G, weights.back().template const_data_ptr<T>(), n);
      }
    }
  }
};

// Bias b_ih + b_hh (either may be absent) as an accumulation-type vector [G].
inline at::Tensor bias_acc(const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, int64_t G,
                           at::ScalarType acc) {
  auto sum = at::zeros({G}, at::dtype(acc));
  if (b_ih.has_value()) {
    sum.add_(b_ih->to(acc));
  }
  if (b_hh.has_value()) {
    sum.add_(b_hh->to(acc));
  }
  return sum;
}

}  // namespace fastchar
