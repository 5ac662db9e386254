// The recurrent step GEMM: one interface, several engines, a plan chosen by measurement.
//
//   StepGemm<T> g(trans_w, M, N, K, W, ldw);   // W used on every step of a time loop
//   g(A, lda, beta, C, ldc);                   // C[M, N] = beta * C + A[M, K] @ op(W)
//
// op(W) = W^T when trans_w (forward: h @ W_hh^T), else W (backward: dgates @ W_hh).
// beta is 0 or 1. For float32 and bfloat16 the engine is picked per (dtype, op, M, N, K)
// by timing every engine this CPU runs at first use (FFTW-style), kept for the process;
// FASTCHAR_GEMM=auto|mkl|onednn|fma|bf16dot|bf16fma forces one. float64 (the gradcheck
// path) always runs torch's BLAS.
//
// Engines:
//   mkl      torch's BLAS: MKL's packed GEMM for h @ W^T, plain sgemm otherwise
//            (at::mm where torch has no MKL); bfloat16 is widened to float32
//   onednn   oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm):
//            float32; bfloat16 only where oneDNN packs bf16 (AMX)
//   fma      fastchar's float32 FMA micro-kernel (AVX2 or AVX-512), W packed in panels;
//            bfloat16 is widened to float32
//   bf16dot  fastchar's AVX512-BF16 micro-kernel: bf16 x bf16 -> fp32 through vdpbf16ps,
//            W packed once in pair-interleaved bf16 panels
//   bf16fma  the same bf16 panels (half the bytes of fp32 ones) widened in registers for
//            the FMA micro-kernel (AVX2 or AVX-512F): for CPUs without avx512_bf16
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/OpMathType.h>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace fastchar {

template <typename T>
using acc_t = at::opmath_type<T>;

// torch's BLAS, row-major, C in the accumulation type:
//   gemm(trans_w, ...): C[M, N] = beta * C + A[M, K] @ op(W), op(W) = W^T when trans_w
//   gemm_nt:            the same with W [N, K] transposed (x @ W^T)
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

namespace engines {

enum class Engine : int { kMkl = 0, kOnednn = 1, kFma = 2, kBf16dot = 3, kBf16fma = 4 };
// kNN: a time loop's dgates @ W; kNT: its h @ W^T; kCell: a *_cell op's x @ W^T, W used
// once (nothing to pack). kWideNN / kWideTN: a backward pass's wide GEMMs, whose M or K is
// T * B and whose W is data that changes every call: grad_x = dgates @ W_ih (A [M, K]) and
// the weight gradients dgates^T @ h (A stored [K, M]); W is B [K, N], and the kernel runs
// on every thread itself (wide_gemm.cpp).
enum class Op : int { kNN = 0, kNT = 1, kCell = 2, kWideNN = 3, kWideTN = 4 };
constexpr int kOps = 5;
inline bool is_wide(Op op) {
  return op == Op::kWideNN || op == Op::kWideTN;
}
constexpr int kEngines = 5;
const char* engine_name(Engine e);

// Empty when `e` can run `dtype` step GEMMs on this CPU and build, else why not.
std::string why_not(Engine e, at::ScalarType dtype);

// The engine for one step-GEMM shape: forced by FASTCHAR_GEMM, else from the plan
// (measured now if this shape is new, with `threads` copies running at once as the
// time loop runs its slices). Throws when a forced engine cannot run.
Engine choose(at::ScalarType dtype, Op op, int64_t M, int64_t N, int64_t K, int threads);

// One engine's prepared GEMM for a fixed W: C[M, N] (= or +=) A @ op(W), fp32 C (for the
// wide ops, op(A) @ W).
class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) = 0;
  // The first m rows of A and C only, m <= M: the shorter steps of a packed sequence. The
  // step engines' kernels (ops kNN, kNT) run them; the others run only their own M.
  virtual void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                        int64_t ldc);
};
std::unique_ptr<Kernel> make_kernel(Engine e, at::ScalarType dtype, Op op, int64_t M,
                                    int64_t N, int64_t K, const void* W, int64_t ldw);

// C[M, N] (= or +=) A[M, K] @ (scale[n] * Q[N, K])^T for int8 weight rows Q with a float32
// scale per row (the cell ops' int8 weights): fastchar's row-dot kernel, dequantising
// inside its inner loop; rows split over the threads.
void cell_gemm_q8(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const int8_t* Q,
                  int64_t ldq, const float* scale, bool accumulate, float* C, int64_t ldc);

// Releases per-thread engine state (oneDNN's AMX tile configuration) after a time loop.
void release_thread();

}  // namespace engines

template <typename T>
class StepGemm {
 public:
  // `threads`: how many StepGemms run at once (the time loop's slices), for the plan.
  StepGemm(bool trans_w, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw,
           int threads = 1)
      : StepGemm(trans_w, M, N, K, W, ldw, engine(trans_w, M, N, K, threads)) {}

  // On a given engine (from engine()): the plan may measure, so a time loop asks it on
  // one thread and may then pack each slice's W on the thread that will use it.
  StepGemm(bool trans_w, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw,
           engines::Engine e)
      : trans_w_(trans_w), M_(M), N_(N), K_(K), W_(W), ldw_(ldw) {
    if constexpr (!std::is_same_v<T, double>) {
      if (M > 0 && N > 0 && K > 0) {
        const auto dtype = c10::CppTypeToScalarType<T>::value;
        kernel_ = engines::make_kernel(e, dtype, op(trans_w), M, N, K, W, ldw);
      }
    }
  }

  StepGemm() = default;  // a placeholder, assigned before use

  // The planned engine for this shape (any engine for float64 and empty shapes, which
  // run torch's BLAS).
  static engines::Engine engine(bool trans_w, int64_t M, int64_t N, int64_t K, int threads) {
    if constexpr (!std::is_same_v<T, double>) {
      if (M > 0 && N > 0 && K > 0) {
        return engines::choose(c10::CppTypeToScalarType<T>::value, op(trans_w), M, N, K,
                               threads);
      }
    }
    return engines::Engine::kMkl;
  }

  void operator()(const T* A, int64_t lda, acc_t<T> beta, acc_t<T>* C, int64_t ldc) const {
    rows(M_, A, lda, beta, C, ldc);
  }

  // The first m <= M rows of A and C (a packed sequence's step with fewer rows).
  void rows(int64_t m, const T* A, int64_t lda, acc_t<T> beta, acc_t<T>* C, int64_t ldc) const {
    if constexpr (!std::is_same_v<T, double>) {
      if (kernel_) {
        kernel_->run_rows(m, A, lda, beta != acc_t<T>(0), C, ldc);
        return;
      }
    }
    gemm<T>(trans_w_, m, N_, K_, A, lda, W_, ldw_, beta, C, ldc);
  }

 private:
  static engines::Op op(bool trans_w) {
    return trans_w ? engines::Op::kNT : engines::Op::kNN;
  }

  bool trans_w_ = false;
  int64_t M_ = 0, N_ = 0, K_ = 0;
  const T* W_ = nullptr;
  int64_t ldw_ = 0;
  std::shared_ptr<engines::Kernel> kernel_;
};

// The int8 cell kernels' row block: they read every W row once per 4 rows of A, so
// fastchar::generate dequantises int8 weights for more samples than this (generate.cpp).
constexpr int64_t kCellPackRows = 4;

// A *_cell op's C[M, N] = beta * C + A[M, K] @ W[N, K]^T: float32 and bfloat16 on the
// engine the plan picks for this shape (W is used once, so nothing is packed); float64 on
// torch's BLAS.
template <typename T>
void cell_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw,
               acc_t<T> beta, acc_t<T>* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    if (M > 0 && N > 0 && K > 0) {
      const auto dtype = c10::CppTypeToScalarType<T>::value;
      const auto e = engines::choose(dtype, engines::Op::kCell, M, N, K, 1);
      engines::make_kernel(e, dtype, engines::Op::kCell, M, N, K, W, ldw)
          ->run(A, lda, beta != 0.0f, C, ldc);
      return;
    }
  }
  gemm_nt<T>(M, N, K, A, lda, W, ldw, beta, C, ldc);
}

}  // namespace fastchar
