// The step-GEMM engines behind StepGemm (gemm.h), the measured plan that picks one per
// (dtype, op, M, N, K), and the ops that report and seed it (fastchar.plan).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <utility>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCHAR_X86_KERNELS 1
#include <immintrin.h>
#else
#define FASTCHAR_X86_KERNELS 0
#endif

namespace fastchar {
namespace engines {
namespace {

constexpr int64_t kPanel = 16;  // columns per packed panel of B
// The cell ops' row-dot kernels split W's rows over the threads, 64 rows a task (at
// K = 512, 128 KB of float32): enough to stream, few enough to balance.
constexpr int64_t kCellRowsPerTask = 64;

// gemm_fma.inc's row blocks where MRMAX-row blocks (12 with AVX-512, 6 with AVX2) would
// leave a last block of 1-3 rows: balanced or MRMAX-row, whichever row_blocks_balanced
// measured faster on this CPU with the kernels it runs, unless gemm_row_blocks set one
// (g_row_blocks: -1 measured, 0 MRMAX-row, 1 balanced).
// t_row_blocks is the measuring thread's own setting while it times both.
std::atomic<int> g_row_blocks{-1};
thread_local int t_row_blocks = -1;
#if FASTCHAR_X86_KERNELS
bool row_blocks_balanced();
#endif

#if FASTCHAR_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int W = 8;
#define FASTCHAR_BCAST(p) _mm256_broadcast_ss(p)
#define FASTCHAR_I8_TO_F32(p) \
  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))
#include "gemm_fma.inc"
#undef FASTCHAR_I8_TO_F32
#undef FASTCHAR_BCAST

// a [kb, mb] (row stride lda) transposed into out [mb, kb] (row stride ldo), in 8 x 8 tiles
// of AVX shuffles: the wide GEMMs' transposed A (dgates^T), made rows for the micro-kernels.
// AVX only, so this one copy serves the AVX-512 kernels too (not in gemm_fma.inc, which is
// compiled once per instruction set).
inline void transpose_rows(const float* a, int64_t lda, int64_t kb, int64_t mb, float* out,
                           int64_t ldo) {
  int64_t k0 = 0;
  for (; k0 + 8 <= kb; k0 += 8) {
    int64_t m0 = 0;
    for (; m0 + 8 <= mb; m0 += 8) {
      __m256 r[8], t[8], u[8];  // rows k0.., then pairs interleaved, then quads
      _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) {
        r[i] = _mm256_loadu_ps(a + (k0 + i) * lda + m0);
      }
      _Pragma("GCC unroll 4") for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      _Pragma("GCC unroll 2") for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {  // the 128-bit halves
        _mm256_storeu_ps(out + (m0 + j) * ldo + k0, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(out + (m0 + j + 4) * ldo + k0,
                         _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
      }
    }
    for (; m0 < mb; ++m0) {
      for (int64_t k = k0; k < k0 + 8; ++k) {
        out[m0 * ldo + k] = a[k * lda + m0];
      }
    }
  }
  for (; k0 < kb; ++k0) {
    for (int64_t m = 0; m < mb; ++m) {
      out[m * ldo + k0] = a[k0 * lda + m];
    }
  }
}
}  // namespace avx2
#pragma GCC pop_options

// The two AVX-512 copies (with and without AVX512-BF16) share these.
#define FASTCHAR_BCAST(p) _mm512_set1_ps(*(p))
#define FASTCHAR_I8_TO_F32(p) \
  _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
constexpr int W = 16;
#include "gemm_fma.inc"
}  // namespace avx512
#pragma GCC pop_options

// vdpbf16ps needs GCC 10; its namespace is compiled apart so that nothing else in the
// AVX-512 code may use AVX512-BF16 instructions on a CPU without them.
#if __GNUC__ >= 10
#define FASTCHAR_HAVE_DPBF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
namespace avx512bf16 {
constexpr int W = 16;
#define FASTCHAR_DPBF16 1
#include "gemm_fma.inc"
#undef FASTCHAR_DPBF16
}  // namespace avx512bf16
#pragma GCC pop_options
#else
#define FASTCHAR_HAVE_DPBF16 0
#endif
#undef FASTCHAR_I8_TO_F32
#undef FASTCHAR_BCAST

struct Cpu {
  bool avx2, avx512f, avx512bf16;
  Cpu() {
    __builtin_cpu_init();
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    avx512f = __builtin_cpu_supports("avx512f");
    avx512bf16 = __builtin_cpu_supports("avx512bf16");
  }
};
#else
#define FASTCHAR_HAVE_DPBF16 0
struct Cpu {
  bool avx2 = false, avx512f = false, avx512bf16 = false;
};
#endif

const Cpu& cpu() {
  static const Cpu c;
  return c;
}

#if FASTCHAR_X86_KERNELS
// The row-block measurement: kTimedRows-row float32 products (N = 512, K = 256; 13 rows
// with AVX-512, 12 + 1 against balanced 6 + 7; 8 with AVX2, 6 + 2 against 4 + 4), in
// interleaved rounds, once per process; the one result decides every M with 1-3 rows
// over, for the float32 and the bfloat16 kernels.
struct RowBlockTimes {
  double equal_s = 0, balanced_s = 0;
};

// Measured with the FMA kernels this CPU runs (AVX-512, else AVX2), once per process.
const RowBlockTimes& row_block_times() {
  static const RowBlockTimes times = [] {
    constexpr int kRounds = 9, kReps = 16;
    std::vector<double> eq, bal;
    auto time = cpu().avx512f ? &avx512::time_row_blocks : &avx2::time_row_blocks;
    time(false, 2);  // warm: page in, clocks up
    for (int r = 0; r < kRounds; ++r) {
      eq.push_back(time(false, kReps));
      bal.push_back(time(true, kReps));
    }
    std::sort(eq.begin(), eq.end());
    std::sort(bal.begin(), bal.end());
    return RowBlockTimes{eq[kRounds / 2], bal[kRounds / 2]};
  }();
  return times;
}

bool row_blocks_balanced() {
  const auto& t = row_block_times();
  return t.balanced_s < t.equal_s;
}
#endif

// B = op(W) [K, N] (from W [N, K] when trans_w, else W [K, N]) as float32 panels. Each
// panel is written in order, lane by lane, while its 16 columns of B are read: 16 rows of
// W at once (trans_w) or 16 contiguous values of each row.
template <typename T>
at::Tensor pack_panels(bool trans_w, int64_t N, int64_t K, const T* W, int64_t ldw) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  auto out = at::empty({panels, K, kPanel}, at::kFloat);  // [panels, K, 16]
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanel, nn = std::min(kPanel, N - n0);
    float* dst = o + p * K * kPanel;
    for (int64_t k = 0; k < K; ++k, dst += kPanel) {
      for (int64_t j = 0; j < kPanel; ++j) {
        dst[j] = j >= nn ? 0.0f : float(trans_w ? W[(n0 + j) * ldw + k] : W[k * ldw + n0 + j]);
      }
    }
  }
  return out;
}

// B = op(W) [K, N] of bfloat16 as panels of pairs (gemm_fma.inc): lane j of step s of
// panel p holds B[2s][16p + j] in its low 16 bits and B[2s + 1][16p + j] in its high
// ones; an odd K ends with a zero. Written in order, as pack_panels.
at::Tensor pack_pairs(bool trans_w, int64_t N, int64_t K, const at::BFloat16* W, int64_t ldw) {
  const int64_t panels = (N + kPanel - 1) / kPanel, steps = (K + 1) / 2;
  auto out = at::empty({panels, steps, kPanel}, at::kInt);
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  auto bits = [&](int64_t k, int64_t n) -> uint32_t {
    return k < K ? (trans_w ? W[n * ldw + k] : W[k * ldw + n]).x : 0;
  };
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanel, nn = std::min(kPanel, N - n0);
    uint32_t* dst = o + p * steps * kPanel;
    for (int64_t s = 0; s < steps; ++s, dst += kPanel) {
      for (int64_t j = 0; j < kPanel; ++j) {
        dst[j] = j >= nn ? 0u : bits(2 * s, n0 + j) | bits(2 * s + 1, n0 + j) << 16;
      }
    }
  }
  return out;
}

// Rows of a bfloat16 A as float32 (out has ldo >= K columns).
void widen_rows(int64_t M, int64_t K, const at::BFloat16* a, int64_t lda, float* out,
                int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      out[m * ldo + k] = float(a[m * lda + k]);
    }
  }
}

// B = op(W) as a dense [K, N] matrix of T.
template <typename T>
at::Tensor dense_kn(bool trans_w, int64_t N, int64_t K, const T* W, int64_t ldw) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  auto w = trans_w ? at::from_blob(const_cast<T*>(W), {N, K}, {ldw, 1}, at::dtype(dtype)).t()
                   : at::from_blob(const_cast<T*>(W), {K, N}, {ldw, 1}, at::dtype(dtype));
  return w.contiguous();  // [K, N]
}

// `pack`: MKL's packed GEMM on a W packed once. The time loops' h @ W^T packs (2.5x at
// B=8, H=512 on a Xeon); their dgates @ W does not (packing slowed it there), nor do the
// cell ops, whose W is used once.
class MklKernel final : public Kernel {
 public:
  MklKernel(bool trans_w, bool pack, int64_t M, int64_t N, int64_t K, const float* W,
            int64_t ldw)
      : trans_w_(trans_w), M_(M), N_(N), K_(K), W_(W), ldw_(ldw) {
#if AT_MKL_ENABLED()
    if (pack) {
      size_t bytes = cblas_sgemm_pack_get_size(blas::kBMatrix, M, N, K);
      packed_ = at::empty({static_cast<int64_t>(bytes / sizeof(float)) + 1}, at::kFloat);
      cblas_sgemm_pack(blas::kRowMajor, blas::kBMatrix, trans_w ? blas::kTrans : blas::kNoTrans,
                       M, N, K, 1.0f, W, ldw, packed_.data_ptr<float>());
    }
#endif
  }
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
    const float* a = static_cast<const float*>(A);
    const float beta = accumulate ? 1.0f : 0.0f;
#if AT_MKL_ENABLED()
    if (packed_.defined()) {
      cblas_sgemm_compute(blas::kRowMajor, blas::kNoTrans, blas::kPacked, m, N_, K_, a, lda,
                          packed_.const_data_ptr<float>(), N_, beta, C, ldc);
      return;
    }
#endif
    fastchar::gemm<float>(trans_w_, m, N_, K_, a, lda, W_, ldw_, beta, C, ldc);
  }

 private:
  bool trans_w_;
  int64_t M_, N_, K_;
  const float* W_;
  int64_t ldw_;
  at::Tensor packed_;
};

// torch's BLAS on a bfloat16 W [N, K] as it is (MKL's bf16 x bf16 -> fp32 GEMM where torch
// has MKL): the cell ops' mkl engine in bfloat16.
class BlasBf16CellKernel final : public Kernel {
 public:
  BlasBf16CellKernel(int64_t M, int64_t N, int64_t K, const at::BFloat16* W, int64_t ldw)
      : M_(M), N_(N), K_(K), W_(W), ldw_(ldw) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    fastchar::gemm<at::BFloat16>(true, M_, N_, K_, static_cast<const at::BFloat16*>(A), lda, W_,
                                 ldw_, accumulate ? 1.0f : 0.0f, C, ldc);
  }

 private:
  int64_t M_, N_, K_;
  const at::BFloat16* W_;
  int64_t ldw_;
};

// oneDNN's brgemm reads B as [K, N]; N is split into blocks that its micro-kernel
// keeps in registers (one brgemm over a wide N ran at half the rate of 64-column blocks).
constexpr int64_t kBrgemmBlock = 64;

class OnednnF32Kernel final : public Kernel {
 public:
  OnednnF32Kernel(bool trans_w, int64_t M, int64_t N, int64_t K, const float* W, int64_t ldw)
      : M_(M), N_(N), K_(K), b_(dense_kn(trans_w, N, K, W, ldw)) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
    const float* a = static_cast<const float*>(A);
    const float* b = b_.const_data_ptr<float>();
    for (int64_t n0 = 0; n0 < N_; n0 += kBrgemmBlock) {
      const int64_t nb = std::min(kBrgemmBlock, N_ - n0);
      at::native::cpublas::brgemm(m, nb, K_, lda, N_, ldc, accumulate, a, b + n0, C + n0,
                                  /*is_vnni=*/false);
    }
  }

 private:
  int64_t M_, N_, K_;
  at::Tensor b_;  // [K, N]
};

// bfloat16 x bfloat16 -> float32 through oneDNN, where it packs bf16 for AMX: each
// 64-column block of B packed in oneDNN's VNNI layout, which pairs rows of B. An odd K is
// padded to an even one: B gets a row of zeros and A is copied per call into a scratch
// whose last column stays zero.
class OnednnBf16Kernel final : public Kernel {
 public:
  OnednnBf16Kernel(bool trans_w, int64_t M, int64_t N, int64_t K, const at::BFloat16* W,
                   int64_t ldw)
      : M_(M), N_(N), K_(K), Kp_(K + K % 2) {
    auto b = dense_kn(trans_w, N, K, W, ldw);  // [K, N]
    if (Kp_ != K_) {
      b = at::cat({b, at::zeros({1, N}, b.options())});  // [Kp, N]
      scratch_ = at::zeros({M, Kp_}, b.options());
    }
    for (int64_t n0 = 0; n0 < N; n0 += kBrgemmBlock) {
      const int64_t nb = std::min(kBrgemmBlock, N - n0);
      auto block = b.narrow(1, n0, nb).contiguous();  // [Kp, nb]
      auto packed = at::zeros({Kp_, ldb(nb)}, block.options());
      at::native::cpublas::pack(Kp_, nb, nb, ldb(nb), at::kBFloat16, at::kBFloat16,
                                block.const_data_ptr(), packed.data_ptr());
      blocks_.push_back(packed);
    }
  }
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
    const auto* a = static_cast<const at::BFloat16*>(A);
    if (Kp_ != K_) {
      auto* s = scratch_.data_ptr<at::BFloat16>();
      for (int64_t r = 0; r < m; ++r) {
        std::copy(a + r * lda, a + r * lda + K_, s + r * Kp_);
      }
      a = s;
      lda = Kp_;
    }
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const int64_t n0 = static_cast<int64_t>(i) * kBrgemmBlock;
      const int64_t nb = std::min(kBrgemmBlock, N_ - n0);
      at::native::cpublas::brgemm(m, nb, Kp_, lda, ldb(nb), ldc, accumulate, a,
                                  blocks_[i].const_data_ptr<at::BFloat16>(), C + n0,
                                  /*is_vnni=*/true);
    }
  }

 private:
  // oneDNN packs B's VNNI blocks with a row length of 16, 32, 48 or 64 only: a narrower
  // block is packed with zero columns up to the next of these.
  static int64_t ldb(int64_t nb) { return (nb + 15) / 16 * 16; }

  int64_t M_, N_, K_, Kp_;
  std::vector<at::Tensor> blocks_;
  at::Tensor scratch_;  // A [M, Kp] where K is odd
};

class FmaKernel final : public Kernel {
 public:
  template <typename T>
  FmaKernel(bool trans_w, int64_t M, int64_t N, int64_t K, const T* W, int64_t ldw)
      : M_(M), N_(N), K_(K), panels_(pack_panels(trans_w, N, K, W, ldw)),
        wide_(cpu().avx512f) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
#if FASTCHAR_X86_KERNELS
    const float* a = static_cast<const float*>(A);
    const float* b = panels_.const_data_ptr<float>();
    reverse_ = !reverse_;
    if (wide_) {
      avx512::gemm_panels<avx512::F32>(m, N_, K_, a, lda, b, accumulate, C, ldc, reverse_);
    } else {
      avx2::gemm_panels<avx2::F32>(m, N_, K_, a, lda, b, accumulate, C, ldc, reverse_);
    }
#else
    TORCH_CHECK(false, "fastchar: the fma engine is not built on this platform");
#endif
  }

 private:
  int64_t M_, N_, K_;
  at::Tensor panels_;  // [panels, K, 16]
  bool wide_;
  bool reverse_ = false;  // flips every call (gemm_panels)
};

// The *_cell ops' GEMMs, C[M, N] (= or +=) A[M, K] @ W[N, K]^T with a W used once:
// nothing is packed. mkl calls the BLAS on W as it is (MklKernel unpacked); fastchar's
// kernels read each W row once as a memory-bound matrix-vector product, rows split over
// the threads: fma in float32, bf16fma on bfloat16 rows widened in registers (A split
// into even and odd k once per call), bf16dot on bfloat16 rows through vdpbf16ps.
class CellKernel final : public Kernel {
 public:
  CellKernel(Engine e, int64_t M, int64_t N, int64_t K, const void* W, int64_t ldw)
      : e_(e), M_(M), N_(N), K_(K), W_(W), ldw_(ldw), wide_(cpu().avx512f) {
    if (e == Engine::kBf16fma) {
      split_ = at::empty({M, 2 * ((K + 1) / 2)}, at::kFloat);
    }
  }
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
#if FASTCHAR_X86_KERNELS
    if (e_ == Engine::kFma) {
      const auto* a = static_cast<const float*>(A);
      const auto* w = static_cast<const float*>(W_);
      rows([&](int64_t n0, int64_t n1) {
        if (wide_) {
          avx512::gemv_rows<avx512::F32Rows>(M_, n0, n1, K_, a, lda, w, ldw_, accumulate, C, ldc);
        } else {
          avx2::gemv_rows<avx2::F32Rows>(M_, n0, n1, K_, a, lda, w, ldw_, accumulate, C, ldc);
        }
      });
      return;
    }
    const auto* a = static_cast<const at::BFloat16*>(A);
    const auto* w = static_cast<const at::BFloat16*>(W_);
    if (e_ == Engine::kBf16dot) {
#if FASTCHAR_HAVE_DPBF16
      rows([&](int64_t n0, int64_t n1) {
        avx512bf16::gemv_rows<avx512bf16::DotRows>(M_, n0, n1, K_, a, lda, w, ldw_, accumulate,
                                                    C, ldc);
      });
      return;
#endif
    }
    const int64_t half = split_.size(1) / 2;
    float* s = split_.data_ptr<float>();
    for (int64_t m = 0; m < M_; ++m) {
      for (int64_t k = 0; k < K_; ++k) {
        s[m * 2 * half + k % 2 * half + k / 2] = float(a[m * lda + k]);
      }
    }
    rows([&](int64_t n0, int64_t n1) {
      if (wide_) {
        avx512::gemv_rows<avx512::PairRows>(M_, n0, n1, K_, s, 2 * half, w, ldw_, accumulate, C,
                                            ldc);
      } else {
        avx2::gemv_rows<avx2::PairRows>(M_, n0, n1, K_, s, 2 * half, w, ldw_, accumulate, C, ldc);
      }
    });
#else
    TORCH_CHECK(false, "fastchar: engine ", engine_name(e_), " is not built on this platform");
#endif
  }

 private:
  template <typename F>
  void rows(const F& f) const {
    at::parallel_for(0, N_, kCellRowsPerTask, f);
  }

  Engine e_;
  int64_t M_, N_, K_;
  const void* W_;
  int64_t ldw_;
  bool wide_;
  at::Tensor split_;  // bf16fma: A [M, 2 * ceil(K / 2)], even k then odd k per row
};

// A bfloat16 GEMM on a float32 engine: W widened once (inside `inner`), A per step.
class Widened final : public Kernel {
 public:
  Widened(std::unique_ptr<Kernel> inner, int64_t M, int64_t K, at::Tensor wide_w)
      : inner_(std::move(inner)), M_(M), K_(K), wide_w_(std::move(wide_w)),
        scratch_(at::empty({M, K}, at::kFloat)) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
    float* s = scratch_.data_ptr<float>();
    widen_rows(m, K_, static_cast<const at::BFloat16*>(A), lda, s, K_);
    inner_->run_rows(m, s, K_, accumulate, C, ldc);
  }

 private:
  std::unique_ptr<Kernel> inner_;
  int64_t M_, K_;
  at::Tensor wide_w_;  // the float32 W that `inner` may point into
  at::Tensor scratch_;  // [M, K]
};

// bfloat16 x bfloat16 -> float32 on W packed once as bf16 pairs (pack_pairs), half the
// bytes of float32 panels: bf16fma widens each pair in registers for FMAs (AVX-512F or
// AVX2), bf16dot feeds it to vdpbf16ps (AVX512-BF16). A is copied per call into a scratch
// with an even K (its padding stays zero): float32 for bf16fma, bf16 for bf16dot.
class PairKernel final : public Kernel {
 public:
  PairKernel(bool dot, bool trans_w, int64_t M, int64_t N, int64_t K, const at::BFloat16* W,
             int64_t ldw)
      : dot_(dot), M_(M), N_(N), K_(K), steps_((K + 1) / 2),
        panels_(pack_pairs(trans_w, N, K, W, ldw)), wide_(cpu().avx512f),
        scratch_(at::zeros({M, 2 * steps_}, dot ? at::kBFloat16 : at::kFloat)) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    run_rows(M_, A, lda, accumulate, C, ldc);
  }
  void run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                int64_t ldc) override {
#if FASTCHAR_X86_KERNELS
    const auto* a = static_cast<const at::BFloat16*>(A);
    const auto* b = reinterpret_cast<const uint32_t*>(panels_.const_data_ptr<int32_t>());
    reverse_ = !reverse_;
    if (dot_) {
#if FASTCHAR_HAVE_DPBF16
      auto* s = scratch_.data_ptr<at::BFloat16>();
      for (int64_t r = 0; r < m; ++r) {
        std::copy(a + r * lda, a + r * lda + K_, s + r * 2 * steps_);
      }
      avx512bf16::gemm_panels<avx512bf16::Dot>(m, N_, steps_, reinterpret_cast<const uint32_t*>(s),
                                                steps_, b, accumulate, C, ldc, reverse_);
      return;
#endif
    }
    float* s = scratch_.data_ptr<float>();
    widen_rows(m, K_, a, lda, s, 2 * steps_);
    if (wide_) {
      avx512::gemm_panels<avx512::Pairs>(m, N_, steps_, s, 2 * steps_, b, accumulate, C, ldc,
                                         reverse_);
    } else {
      avx2::gemm_panels<avx2::Pairs>(m, N_, steps_, s, 2 * steps_, b, accumulate, C, ldc,
                                     reverse_);
    }
#else
    TORCH_CHECK(false, "fastchar: the bf16 engines are not built on this platform");
#endif
  }

 private:
  bool dot_;
  int64_t M_, N_, K_, steps_;
  at::Tensor panels_;  // [panels, steps, 16] pairs
  bool wide_;
  at::Tensor scratch_;  // A [M, 2 * steps]
  bool reverse_ = false;  // flips every call (gemm_panels)
};

// ---- the wide GEMMs (Op::kWideNN, kWideTN): C[M, N] (= or +=) op(A) @ B, B [K, N] ----

// mkl: ATen's matmul (MKL / oneDNN, its own threads); bfloat16 products are added to C
// as ATen rounds them.
class AtenWideKernel final : public Kernel {
 public:
  AtenWideKernel(at::ScalarType dtype, bool trans_a, int64_t M, int64_t N, int64_t K,
                 const void* B, int64_t ldb)
      : dtype_(dtype), trans_a_(trans_a), M_(M), N_(N), K_(K),
        b_(at::from_blob(const_cast<void*>(B), {K, N}, {ldb, 1}, at::dtype(dtype))) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
    auto a = trans_a_ ? at::from_blob(const_cast<void*>(A), {K_, M_}, {lda, 1}, at::dtype(dtype_)).t()
                      : at::from_blob(const_cast<void*>(A), {M_, K_}, {lda, 1}, at::dtype(dtype_));
    auto c = at::from_blob(C, {M_, N_}, {ldc, 1}, at::dtype(at::kFloat));
    if (dtype_ != at::kFloat) {
      auto prod = at::mm(a, b_);
      accumulate ? c.add_(prod) : c.copy_(prod);
    } else if (accumulate) {
      c.addmm_(a, b_);
    } else {
      at::mm_out(c, a, b_);
    }
  }

 private:
  at::ScalarType dtype_;
  bool trans_a_;
  int64_t M_, N_, K_;
  at::Tensor b_;
};

// fma (float32) and bf16dot (bfloat16) on the wide GEMMs. Each thread takes a range of C's
// rows and walks K in blocks of kWideK: it packs B's block into panels of its own (B is
// read once per thread: 2 * rows FLOPs per packed element) and runs gemm_panels over row
// blocks of kWideM, whose A block stays in L2. Every C element is still one chain of FMAs
// over k in order, whatever the threads. fma reads A in place, or a transposed A's block
// (dgates^T) turned into rows first (transpose_block); bf16dot reads A's pairs in place
// where they are 4-byte aligned, else copies the block: rows of k pairs, or for a
// transposed A rows k, k + 1 interleaved into pairs.
constexpr int64_t kWideK = 256;  // = KC: one K block of gemm_panels
constexpr int64_t kWideM = 192;  // A's block: 192 KB of float32 at kWideK

class OwnWideKernel final : public Kernel {
 public:
  OwnWideKernel(bool dot, bool trans_a, int64_t M, int64_t N, int64_t K, const void* B,
                int64_t ldb)
      : dot_(dot), trans_a_(trans_a), M_(M), N_(N), K_(K), B_(B), ldb_(ldb) {}
  void run(const void* A, int64_t lda, bool accumulate, float* C, int64_t ldc) override {
#if FASTCHAR_X86_KERNELS
    const int64_t threads = at::get_num_threads();
    const int64_t chunk = ((M_ + threads - 1) / threads + 15) / 16 * 16;
    const int64_t tasks = (M_ + chunk - 1) / chunk;  // one range of rows per thread
#ifdef _OPENMP
#pragma omp parallel for num_threads(static_cast<int>(tasks)) schedule(static, 1)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      rows(t * chunk, std::min(M_, (t + 1) * chunk), A, lda, accumulate, C, ldc);
    }
#else
    TORCH_CHECK(false, "fastchar: the fma and bf16dot engines are not built on this platform");
#endif
  }

 private:
#if FASTCHAR_X86_KERNELS
  // C rows [m_lo, m_hi) on the calling thread.
  void rows(int64_t m_lo, int64_t m_hi, const void* A, int64_t lda, bool accumulate, float* C,
            int64_t ldc) const {
    const int64_t panels = (N_ + kPanel - 1) / kPanel;
    std::vector<uint32_t> packed(panels * kWideK * kPanel);
    std::vector<uint32_t> scratch;
    std::vector<float> a_rows;  // a transposed A's block as rows [mb, kb]
    for (int64_t k0 = 0; k0 < K_; k0 += kWideK) {
      const int64_t kb = std::min(kWideK, K_ - k0), steps = (kb + 1) / 2;
      const bool load = accumulate || k0 > 0;
      if (!dot_) {
        pack_block(reinterpret_cast<float*>(packed.data()), k0, kb, panels);
        const auto* a = static_cast<const float*>(A);
        for (int64_t m0 = m_lo; m0 < m_hi; m0 += kWideM) {
          const int64_t mb = std::min(kWideM, m_hi - m0);
          const auto* pb = reinterpret_cast<const float*>(packed.data());
          if (trans_a_) {
            transpose_block(a + k0 * lda + m0, lda, kb, mb, a_rows);
            wide_fma(mb, kb, a_rows.data(), kb, pb, load, C + m0 * ldc, ldc);
          } else {
            wide_fma(mb, kb, a + m0 * lda + k0, lda, pb, load, C + m0 * ldc, ldc);
          }
        }
        continue;
      }
#if FASTCHAR_HAVE_DPBF16
      pack_pairs_block(packed.data(), k0, kb, steps, panels);
      const auto* a = static_cast<const at::BFloat16*>(A);
      for (int64_t m0 = m_lo; m0 < m_hi; m0 += kWideM) {
        const int64_t mb = std::min(kWideM, m_hi - m0);
        const uint32_t* pa;
        int64_t ldp;
        if (trans_a_) {  // pairs of rows k, k + 1 of A [K, M]: pa [steps, mb]
          scratch.resize(steps * mb);
          for (int64_t s = 0; s < steps; ++s) {
            const uint16_t* r0 = &a[(k0 + 2 * s) * lda + m0].x;
            const uint16_t* r1 = 2 * s + 1 < kb ? &a[(k0 + 2 * s + 1) * lda + m0].x : nullptr;
            uint32_t* o = scratch.data() + s * mb;
#pragma omp simd
            for (int64_t m = 0; m < mb; ++m) {
              o[m] = uint32_t(r0[m]) | (r1 != nullptr ? uint32_t(r1[m]) << 16 : 0u);
            }
          }
          pa = scratch.data();
          ldp = mb;
          avx512bf16::gemm_panels<avx512bf16::Dot, true>(mb, N_, steps, pa, ldp, packed.data(),
                                                          load, C + m0 * ldc, ldc, false);
          continue;
        }
        const at::BFloat16* row0 = a + m0 * lda + k0;
        if (kb % 2 == 0 && lda % 2 == 0 && reinterpret_cast<uintptr_t>(row0) % 4 == 0) {
          pa = reinterpret_cast<const uint32_t*>(row0);  // pairs in place
          ldp = lda / 2;
        } else {  // rows of k pairs, an odd K padded with a zero
          scratch.assign(mb * steps, 0u);
          auto* o = reinterpret_cast<at::BFloat16*>(scratch.data());
          for (int64_t m = 0; m < mb; ++m) {
            std::copy(row0 + m * lda, row0 + m * lda + kb, o + m * 2 * steps);
          }
          pa = scratch.data();
          ldp = steps;
        }
        avx512bf16::gemm_panels<avx512bf16::Dot>(mb, N_, steps, pa, ldp, packed.data(), load,
                                                 C + m0 * ldc, ldc, false);
      }
#endif
    }
  }

  void wide_fma(int64_t mb, int64_t kb, const float* a, int64_t lda, const float* pb, bool load,
                float* C, int64_t ldc) const {
    if (cpu().avx512f) {
      avx512::gemm_panels<avx512::F32>(mb, N_, kb, a, lda, pb, load, C, ldc, false);
    } else {
      avx2::gemm_panels<avx2::F32>(mb, N_, kb, a, lda, pb, load, C, ldc, false);
    }
  }

  // A transposed block a [kb, mb] (row stride lda) into out as rows [mb, kb]. Read in
  // place, the micro-kernel's A steps are lda apart: at the weight gradients' lda (G
  // floats: 4 KB for an LSTM at H 256, 8 KB at H 512) every step of a row block falls in
  // the same L1 set; dgates^T @ h ran 1.1-1.3x faster transposed first on an AMD EPYC
  // Zen 3 (benchmarks/RESULTS.md, session 19).
  static void transpose_block(const float* a, int64_t lda, int64_t kb, int64_t mb,
                              std::vector<float>& out) {
    out.resize(mb * kb);
    avx2::transpose_rows(a, lda, kb, mb, out.data(), kb);
  }

  // B rows [k0, k0 + kb) as float32 panels [panels, kb, 16], the last panel zero padded.
  void pack_block(float* out, int64_t k0, int64_t kb, int64_t panels) const {
    const auto* b = static_cast<const float*>(B_);
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, nn = std::min(kPanel, N_ - n0);
      float* o = out + p * kb * kPanel;
      for (int64_t k = 0; k < kb; ++k) {
        const float* src = b + (k0 + k) * ldb_ + n0;
        for (int64_t j = 0; j < kPanel; ++j) {
          o[k * kPanel + j] = j < nn ? src[j] : 0.0f;
        }
      }
    }
  }

  // B rows [k0, k0 + kb) of bfloat16 as pairs [panels, steps, 16] (pack_pairs' layout).
  void pack_pairs_block(uint32_t* out, int64_t k0, int64_t kb, int64_t steps,
                        int64_t panels) const {
    const auto* b = static_cast<const at::BFloat16*>(B_);
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * kPanel, nn = std::min(kPanel, N_ - n0);
      uint32_t* o = out + p * steps * kPanel;
      for (int64_t s = 0; s < steps; ++s) {
        const at::BFloat16* r0 = b + (k0 + 2 * s) * ldb_ + n0;
        const bool odd = 2 * s + 1 < kb;
        for (int64_t j = 0; j < kPanel; ++j) {
          const uint32_t lo = j < nn ? r0[j].x : 0u;
          const uint32_t hi = j < nn && odd ? r0[ldb_ + j].x : 0u;
          o[s * kPanel + j] = lo | hi << 16;
        }
      }
    }
  }
#endif

  bool dot_, trans_a_;
  int64_t M_, N_, K_;
  const void* B_;
  int64_t ldb_;
};

std::unique_ptr<Kernel> make_wide(Engine e, at::ScalarType dtype, Op op, int64_t M, int64_t N,
                                  int64_t K, const void* B, int64_t ldb) {
  const bool trans_a = op == Op::kWideTN;
  if (e == Engine::kMkl) {
    return std::make_unique<AtenWideKernel>(dtype, trans_a, M, N, K, B, ldb);
  }
  return std::make_unique<OwnWideKernel>(e == Engine::kBf16dot, trans_a, M, N, K, B, ldb);
}

std::unique_ptr<Kernel> make_f32(Engine e, Op op, int64_t M, int64_t N, int64_t K,
                                 const float* W, int64_t ldw) {
  const bool trans_w = op != Op::kNN;
  switch (e) {
    case Engine::kMkl:
      return std::make_unique<MklKernel>(trans_w, /*pack=*/trans_w, M, N, K, W, ldw);
    case Engine::kOnednn:
      return std::make_unique<OnednnF32Kernel>(trans_w, M, N, K, W, ldw);
    case Engine::kFma:
      return std::make_unique<FmaKernel>(trans_w, M, N, K, W, ldw);
    default:
      TORCH_CHECK(false, "fastchar: engine ", engine_name(e), " has no float32 kernel");
  }
}

// ---- the plan ----

using Key = std::tuple<int, int, int64_t, int64_t, int64_t>;  // dtype, op, M, N, K

struct Plan {
  std::mutex mutex;
  std::map<Key, Engine> chosen;
};

Plan& plan() {
  static Plan p;
  return p;
}

// Limits of an engine for one op and shape beyond the CPU and dtype (why_not).
std::string op_why_not(Engine e, at::ScalarType dtype, Op op) {
  if (is_wide(op) && e != Engine::kMkl &&
      e != (dtype == at::kFloat ? Engine::kFma : Engine::kBf16dot)) {
    return "the wide GEMMs (weight and input gradients) run float32 on mkl or fma and "
           "bfloat16 on mkl or bf16dot";
  }
  if (op == Op::kCell && e != Engine::kMkl &&
      e != (dtype == at::kFloat ? Engine::kFma : Engine::kBf16fma) && e != Engine::kBf16dot) {
    return "the cell ops' GEMM (W used once, unpacked) runs float32 on mkl or fma and "
           "bfloat16 on mkl, bf16fma or bf16dot";
  }
  return "";
}

// Why `e` cannot run this op in `dtype` here (the CPU and build's reason, then the op's,
// joined by "; "); empty when it can.
std::string reasons_not(Engine e, at::ScalarType dtype, Op op) {
  std::string reason = why_not(e, dtype);
  const std::string op_reason = op_why_not(e, dtype, op);
  if (!op_reason.empty()) {
    reason += (reason.empty() ? "" : "; ") + op_reason;
  }
  return reason;
}

std::vector<Engine> candidates(at::ScalarType dtype, Op op) {
  std::vector<Engine> out;
  for (int i = 0; i < kEngines; ++i) {
    const auto e = static_cast<Engine>(i);
    if (reasons_not(e, dtype, op).empty()) {
      out.push_back(e);
    }
  }
  return out;
}

// Whether the op reads W as W^T (h @ W^T, x @ W^T), else as it is.
bool transposes_w(Op op) {
  return op == Op::kNT || op == Op::kCell;
}

// Random operands of one GEMM shape, from a generator of their own: measuring must not
// move the user's random stream (a run that measures and one that reads the plan from
// its cache must draw the same masks).
struct Operands {
  Op op;
  int64_t M, N, K;
  at::Tensor w, a, c;  // op(W)'s storage, A [M, K] ([K, M] for kWideTN), C [M, N] (zeros)
  Operands(at::ScalarType dtype, Op op_, int64_t M_, int64_t N_, int64_t K_, uint64_t seed)
      : op(op_), M(M_), N(N_), K(K_) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    w = (transposes_w(op) ? at::randn({N, K}, gen) : at::randn({K, N}, gen)).to(dtype);
    a = (op == Op::kWideTN ? at::randn({K, M}, gen) : at::randn({M, K}, gen)).to(dtype);
    c = at::zeros({M, N});
  }
  std::unique_ptr<Kernel> kernel(Engine e) const {
    return make_kernel(e, w.scalar_type(), op, M, N, K, w.const_data_ptr(), w.size(1));
  }
  void run(Kernel& k) {
    k.run(a.const_data_ptr(), a.size(1), false, c.data_ptr<float>(), N);
  }
  // The float64 product the engines must match.
  at::Tensor want() const {
    auto ad = a.to(at::kDouble), wd = w.to(at::kDouble);
    return at::mm(op == Op::kWideTN ? ad.t() : ad, transposes_w(op) ? wd.t() : wd);
  }
};

// Seconds per call of one engine's kernel at this shape, best of three timed batches,
// with `threads` copies running at once as the time loops run them (one slice per
// thread, sharing the caches and memory; MKL then runs one thread per call, as it does
// inside the loops' parallel region). The slowest thread's time counts.
double time_engine(Engine e, at::ScalarType dtype, Op op, int64_t M, int64_t N, int64_t K,
                   int threads) {
  std::vector<double> per_thread(threads, 0.0);
  auto body = [&](int tid) {
    Operands x(dtype, op, M, N, K, 1234 + tid);
    auto kernel = x.kernel(e);
    using clock = std::chrono::steady_clock;
    auto batch = [&](int64_t reps) {
      auto t0 = clock::now();
      for (int64_t r = 0; r < reps; ++r) {
        x.run(*kernel);
      }
      return std::chrono::duration<double>(clock::now() - t0).count() / reps;
    };
    batch(1);  // warm-up: first touch, oneDNN's kernel generation
    const double first = std::max(batch(1), 1e-7);
    const int64_t reps = std::clamp<int64_t>(static_cast<int64_t>(1e-3 / first), 1, 200);
    double best = first;
    for (int trial = 0; trial < 3; ++trial) {
      best = std::min(best, batch(reps));
    }
    release_thread();
    per_thread[tid] = best;
  };
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num());
  } else {
    body(0);
  }
#else
  body(0);
#endif
  return *std::max_element(per_thread.begin(), per_thread.end());
}

// Whether an engine's result at this shape matches a float64 product of the same inputs
// (to float32 rounding of the sums). The plan takes no engine it has not seen agree: a
// kernel for an instruction set that no test machine had must not be picked for speed
// alone.
bool agrees(Engine e, at::ScalarType dtype, Op op, int64_t M, int64_t N, int64_t K) {
  Operands x(dtype, op, M, N, K, 4321);
  x.run(*x.kernel(e));
  release_thread();
  const double err = (x.c.to(at::kDouble) - x.want()).abs().max().item<double>();
  return err <= 1e-4 * std::sqrt(static_cast<double>(K)) + 1e-5;
}

Engine measure(at::ScalarType dtype, Op op, int64_t M, int64_t N, int64_t K, int threads) {
  const auto engines = candidates(dtype, op);
  TORCH_CHECK(!engines.empty(), "fastchar: no GEMM engine runs ", dtype, " here");
  Engine best = Engine::kMkl;
  double best_s = -1;
  for (Engine e : engines) {
    if (e != Engine::kMkl && !agrees(e, dtype, op, M, N, K)) {
      TORCH_WARN_ONCE("fastchar: GEMM engine ", engine_name(e), " gave a wrong ", dtype,
                      " result at M=", M, " N=", N, " K=", K,
                      " on this CPU and is left out of the plan; please report it");
      continue;
    }
    const double s = time_engine(e, dtype, op, M, N, K, threads);
    if (best_s < 0 || s < best_s) {
      best = e;
      best_s = s;
    }
  }
  return best;
}

Engine parse_engine(const std::string& name) {
  for (int i = 0; i < kEngines; ++i) {
    if (name == engine_name(static_cast<Engine>(i))) {
      return static_cast<Engine>(i);
    }
  }
  TORCH_CHECK(false, "fastchar: unknown GEMM engine '", name,
              "' (choose from auto, mkl, onednn, fma, bf16dot, bf16fma)");
}

// FASTCHAR_GEMM as an engine's name, blanks around it dropped and case ignored; "" where
// it is unset, empty or "auto" (the plan decides).
std::string forced_engine() {
  const char* env = std::getenv("FASTCHAR_GEMM");
  std::string name = env == nullptr ? "" : env;
  const auto blank = [](unsigned char c) { return std::isspace(c) != 0; };
  name.erase(name.begin(), std::find_if_not(name.begin(), name.end(), blank));
  name.erase(std::find_if_not(name.rbegin(), name.rend(), blank).base(), name.end());
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return name == "auto" ? "" : name;
}

}  // namespace

const char* engine_name(Engine e) {
  static constexpr std::array<const char*, kEngines> names = {"mkl", "onednn", "fma", "bf16dot",
                                                             "bf16fma"};
  return names.at(static_cast<int>(e));
}

std::string why_not(Engine e, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    return std::string("the engines run float32 and bfloat16 GEMMs, not ") + c10::toString(dtype);
  }
  switch (e) {
    case Engine::kMkl:
      return "";
    case Engine::kOnednn:
#if AT_MKLDNN_ENABLED()
      if (dtype == at::kBFloat16 && !at::native::cpublas::could_pack(at::kBFloat16)) {
        return "oneDNN's micro-kernel runs bfloat16 only with AMX, which this CPU does not "
               "expose (cpublas::could_pack(bfloat16) is false)";
      }
      return "";
#else
      return "this torch build has no oneDNN";
#endif
    case Engine::kFma:
      if (!FASTCHAR_X86_KERNELS) {
        return "built only for x86-64 with GCC";
      }
      return cpu().avx2 || cpu().avx512f ? "" : "this CPU has neither AVX2+FMA nor AVX-512";
    case Engine::kBf16dot:
      if (dtype != at::kBFloat16) {
        return "bf16dot runs bfloat16 GEMMs only";
      }
      if (!FASTCHAR_HAVE_DPBF16) {
        return "bf16dot is built only for x86-64 with GCC 10 or newer";
      }
      return cpu().avx512bf16 ? "" : "this CPU lacks avx512_bf16 (vdpbf16ps)";
    case Engine::kBf16fma:
      if (dtype != at::kBFloat16) {
        return "bf16fma runs bfloat16 GEMMs only";
      }
      if (!FASTCHAR_X86_KERNELS) {
        return "built only for x86-64 with GCC";
      }
      return cpu().avx2 || cpu().avx512f ? "" : "this CPU has neither AVX2+FMA nor AVX-512";
  }
  return "unknown engine";
}

std::unique_ptr<Kernel> make_kernel(Engine e, at::ScalarType dtype, Op op, int64_t M,
                                    int64_t N, int64_t K, const void* W, int64_t ldw) {
  if (is_wide(op)) {
    const std::string reason = reasons_not(e, dtype, op);
    TORCH_CHECK(reason.empty(), "fastchar: engine ", engine_name(e), ": ", reason);
    return make_wide(e, dtype, op, M, N, K, W, ldw);
  }
  if (op == Op::kCell) {
    const std::string reason = reasons_not(e, dtype, op);
    TORCH_CHECK(reason.empty(), "fastchar: engine ", engine_name(e), ": ", reason);
    if (e != Engine::kMkl) {
      return std::make_unique<CellKernel>(e, M, N, K, W, ldw);
    }
    if (dtype == at::kFloat) {
      return std::make_unique<MklKernel>(true, /*pack=*/false, M, N, K,
                                         static_cast<const float*>(W), ldw);
    }
    return std::make_unique<BlasBf16CellKernel>(M, N, K, static_cast<const at::BFloat16*>(W),
                                                ldw);
  }
  if (dtype == at::kFloat) {
    return make_f32(e, op, M, N, K, static_cast<const float*>(W), ldw);
  }
  const bool trans_w = op == Op::kNT;
  TORCH_CHECK(dtype == at::kBFloat16, "fastchar: no GEMM engine for ", dtype);
  const auto* w = static_cast<const at::BFloat16*>(W);
  if (e == Engine::kOnednn) {
    return std::make_unique<OnednnBf16Kernel>(trans_w, M, N, K, w, ldw);
  }
  if (e == Engine::kBf16dot || e == Engine::kBf16fma) {
    return std::make_unique<PairKernel>(e == Engine::kBf16dot, trans_w, M, N, K, w, ldw);
  }
  // A float32 engine on W widened once, in W's own orientation.
  const int64_t rows = trans_w ? N : K, cols = trans_w ? K : N;
  auto wide = at::from_blob(const_cast<at::BFloat16*>(w), {rows, cols}, {ldw, 1},
                            at::dtype(at::kBFloat16))
                  .to(at::kFloat)
                  .contiguous();
  auto inner = make_f32(e, op, M, N, K, wide.const_data_ptr<float>(), cols);
  return std::make_unique<Widened>(std::move(inner), M, K, std::move(wide));
}

Engine choose(at::ScalarType dtype, Op op, int64_t M, int64_t N, int64_t K, int threads) {
#if FASTCHAR_X86_KERNELS
  // The row blocks are measured here, on the one thread that asks before a time loop (also
  // for a shape the plan's cache holds), not inside the loop or the engines' timings.
  if (why_not(Engine::kFma, at::kFloat).empty() &&
      g_row_blocks.load(std::memory_order_relaxed) < 0) {
    row_block_times();
  }
#endif
  const std::string forced = forced_engine();
  if (!forced.empty()) {
    const Engine e = parse_engine(forced);
    const std::string reason = reasons_not(e, dtype, op);
    // A step-GEMM engine that runs on this CPU but has no kernel for this op and dtype leaves
    // it on mkl: a cell op, or a wide GEMM (also a bfloat16 one widened to float32, where
    // this CPU's bf16 GEMM is the slower one, under FASTCHAR_GEMM=bf16fma).
    const bool runs_here = why_not(e, at::kFloat).empty() || why_not(e, at::kBFloat16).empty();
    if ((op == Op::kCell || is_wide(op)) && runs_here && !reason.empty()) {
      return Engine::kMkl;
    }
    TORCH_CHECK(reason.empty(), "fastchar: FASTCHAR_GEMM=", forced, " cannot run this ", dtype,
                " GEMM: ", reason, " (unset FASTCHAR_GEMM or set it to auto)");
    return e;
  }
  // Under torch.use_deterministic_algorithms(True) no timing decides, as the plan's may
  // choose differently from one process to the next (engines round differently): a fixed
  // engine for this CPU, the first of these that runs the op. Not kept in the plan.
  if (at::globalContext().deterministicAlgorithms()) {
    for (const Engine e : {Engine::kBf16dot, Engine::kFma}) {
      if (reasons_not(e, dtype, op).empty()) {
        return e;
      }
    }
    return Engine::kMkl;
  }
  const Key key{static_cast<int>(dtype), static_cast<int>(op), M, N, K};
  auto& p = plan();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    auto it = p.chosen.find(key);
    if (it != p.chosen.end()) {
      return it->second;
    }
  }
  const Engine e = measure(dtype, op, M, N, K, threads);
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.chosen.emplace(key, e).first->second;
}

void cell_gemm_q8(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const int8_t* Q,
                  int64_t ldq, const float* scale, bool accumulate, float* C, int64_t ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  at::parallel_for(0, N, kCellRowsPerTask, [&](int64_t n0, int64_t n1) {
#if FASTCHAR_X86_KERNELS
    if (cpu().avx512f) {
      avx512::gemv_rows<avx512::I8Rows>(M, n0, n1, K, A, lda, Q, ldq, accumulate, C, ldc, scale);
      return;
    }
    if (cpu().avx2) {
      avx2::gemv_rows<avx2::I8Rows>(M, n0, n1, K, A, lda, Q, ldq, accumulate, C, ldc, scale);
      return;
    }
#endif
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          s += A[m * lda + k] * float(Q[n * ldq + k]);
        }
        float* c = C + m * ldc + n;
        *c = (accumulate ? *c : 0.0f) + s * scale[n];
      }
    }
  });
}

void Kernel::run_rows(int64_t m, const void* A, int64_t lda, bool accumulate, float* C,
                      int64_t ldc) {
  TORCH_CHECK(false, "fastchar: this GEMM kernel runs only the M it was made for (asked ", m,
              " rows)");
}

void release_thread() {
#if AT_MKLDNN_ENABLED()
  if (at::native::cpublas::could_pack(at::kBFloat16)) {
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  }
#endif
}

namespace {

// ---- ops: fastchar.plan reads, seeds and times the plan through these ----

std::string gemm_why_not(c10::string_view engine, at::ScalarType dtype) {
  return why_not(parse_engine(std::string(engine)), dtype);
}

Op parse_op(int64_t op) {
  TORCH_CHECK_VALUE(op >= 0 && op < kOps,
                    "fastchar: op must be 0 (d @ W), 1 (h @ W^T), 2 (cell), 3 (wide A @ B) or "
                    "4 (wide A^T @ B)");
  return static_cast<Op>(op);
}

// The FMA kernels' row blocks: `mode` "" leaves them as they are, "auto" (measured),
// "equal" (MRMAX-row) or "balanced" sets them; returns what is in force and why.
std::string gemm_row_blocks(c10::string_view mode) {
  const std::string m(mode);
  TORCH_CHECK_VALUE(m.empty() || m == "auto" || m == "equal" || m == "balanced",
                    "fastchar::gemm_row_blocks: mode must be '', 'auto', 'equal' or 'balanced', "
                    "got '", m, "'");
  if (!m.empty()) {
    g_row_blocks.store(m == "auto" ? -1 : m == "balanced" ? 1 : 0);
  }
#if FASTCHAR_X86_KERNELS
  const std::string no_fma = why_not(Engine::kFma, at::kFloat);
  if (!no_fma.empty()) {
    return "n/a: " + no_fma;
  }
  const int g = g_row_blocks.load();
  if (g >= 0) {
    return g == 1 ? "balanced (set)" : "equal (set)";
  }
  const auto& t = row_block_times();
  std::ostringstream out;
  out.precision(3);
  out << (row_blocks_balanced() ? "balanced" : "equal") << " (measured: "
      << (cpu().avx512f ? "13 rows as 6 + 7" : "8 rows as 4 + 4") << " at "
      << t.equal_s / t.balanced_s << "x the rate of "
      << (cpu().avx512f ? "12 + 1" : "6 + 2") << ")";
  return out.str();
#else
  return "n/a: fastchar's FMA kernels are not built here";
#endif
}

// Where gemm_fma.inc's row blocks start for M rows on this CPU (its widest kernels), as
// the blocks now in force place them, and M last: the tests' view of the blocking.
std::vector<int64_t> gemm_row_block_starts(int64_t M) {
  TORCH_CHECK_VALUE(M > 0, "fastchar::gemm_row_block_starts: M must be positive, got ", M);
  std::vector<int64_t> starts;
#if FASTCHAR_X86_KERNELS
  auto add = [&](const auto& rb) {
    for (int64_t i = 0; i <= rb.blocks; ++i) {
      starts.push_back(rb.begin(i));
    }
  };
  if (cpu().avx512f) {
    add(avx512::RowBlocks(M));
  } else if (cpu().avx2) {
    add(avx2::RowBlocks(M));
  }
#endif
  return starts;
}

constexpr int64_t kMaxThreads = 1024;  // timing threads: the benchmarks' --threads bound

std::string gemm_choose(at::ScalarType dtype, int64_t op, int64_t M, int64_t N, int64_t K,
                        int64_t threads) {
  TORCH_CHECK_VALUE(M > 0 && N > 0 && K > 0 && threads > 0 && threads <= kMaxThreads,
                    "fastchar::gemm_choose: M, N and K must be positive and threads in [1, ",
                    kMaxThreads, "]");
  return engine_name(choose(dtype, parse_op(op), M, N, K, static_cast<int>(threads)));
}

// The plan as rows [dtype, op, M, N, K, engine] (int64 [n, 6]).
at::Tensor gemm_plan_entries() {
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mutex);
  auto out = at::empty({static_cast<int64_t>(p.chosen.size()), 6}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& [key, e] : p.chosen) {
    const auto& [dtype, op, M, N, K] = key;
    for (int64_t v : {int64_t(dtype), int64_t(op), M, N, K, int64_t(e)}) {
      *o++ = v;
    }
  }
  return out;
}

// Adds rows from a cache file; a row that names an engine this CPU cannot run, or a
// shape that is not positive, is dropped. Returns how many rows were taken.
int64_t gemm_plan_load(const at::Tensor& rows) {
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) == 6 && rows.scalar_type() == at::kLong,
                    "fastchar::gemm_plan_load: rows must be int64 [n, 6]");
  auto r = rows.contiguous();
  const int64_t* v = r.const_data_ptr<int64_t>();
  int64_t taken = 0;
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (int64_t i = 0; i < r.size(0); ++i, v += 6) {
    const int64_t dt = v[0], e = v[5];
    if ((dt != int64_t(at::kFloat) && dt != int64_t(at::kBFloat16)) || v[1] < 0 || v[1] >= kOps ||
        v[2] <= 0 || v[3] <= 0 || v[4] <= 0 || e < 0 || e >= kEngines) {
      continue;
    }
    const auto dtype = static_cast<at::ScalarType>(dt);
    const auto op = static_cast<Op>(v[1]);
    if (!reasons_not(static_cast<Engine>(e), dtype, op).empty()) {
      continue;
    }
    p.chosen[Key{int(dt), int(v[1]), v[2], v[3], v[4]}] = static_cast<Engine>(e);
    ++taken;
  }
  return taken;
}

void gemm_plan_clear() {
  auto& p = plan();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.chosen.clear();
}

// GFLOP/s of one engine at a step shape, summed over `threads` concurrent copies.
double gemm_rate(c10::string_view engine, at::ScalarType dtype, int64_t op, int64_t M,
                 int64_t N, int64_t K, int64_t threads) {
  const Engine e = parse_engine(std::string(engine));
  const std::string reason = reasons_not(e, dtype, parse_op(op));
  TORCH_CHECK(reason.empty(), "fastchar: engine ", engine, " cannot run ", dtype, ": ", reason);
  TORCH_CHECK_VALUE(M > 0 && N > 0 && K > 0 && threads > 0 && threads <= kMaxThreads,
                    "fastchar::gemm_rate: M, N and K must be positive and threads in [1, ",
                    kMaxThreads, "]");
  const int th = static_cast<int>(threads);
  return 2.0 * M * N * K * th / time_engine(e, dtype, parse_op(op), M, N, K, th) / 1e9;
}

// A [M, K] @ op(W) through one engine, float32 out: the engines' direct test.
at::Tensor gemm_run(c10::string_view engine, const at::Tensor& a, const at::Tensor& w,
                    int64_t op_code, const std::optional<at::Tensor>& c) {
  constexpr const char* OP = "fastchar::gemm_run";
  CHECK_CPU(a);
  CHECK_DIM(a, 2);
  CHECK_CPU(w);
  CHECK_DIM(w, 2);
  CHECK_DTYPE(w, a.scalar_type());
  const Engine e = parse_engine(std::string(engine));
  const auto dtype = a.scalar_type();
  const Op op = parse_op(op_code);
  const bool trans_w = transposes_w(op), trans_a = op == Op::kWideTN;  // a [K, M] for kWideTN
  const int64_t M = a.size(trans_a ? 1 : 0), K = a.size(trans_a ? 0 : 1);
  const int64_t N = trans_w ? w.size(0) : w.size(1);
  const std::string reason = reasons_not(e, dtype, op);
  TORCH_CHECK(reason.empty(), OP, ": engine ", engine, " cannot run ", dtype, ": ", reason);
  TORCH_CHECK_VALUE((trans_w ? w.size(1) : w.size(0)) == K, OP, ": w has shape ", w.sizes(),
                    ", which does not fit a ", a.sizes());
  auto wc = w.contiguous(), ac = a.contiguous();
  auto out = c.has_value() ? c->to(at::kFloat).contiguous().clone() : at::zeros({M, N});
  CHECK_SHAPE(out, M, N);
  if (M > 0 && N > 0 && K > 0) {
    auto kernel = make_kernel(e, dtype, op, M, N, K, wc.const_data_ptr(), wc.size(1));
    kernel->run(ac.const_data_ptr(), ac.size(1), c.has_value(), out.data_ptr<float>(), N);
    release_thread();
  }
  return out;
}

}  // namespace
}  // namespace engines

TORCH_LIBRARY_IMPL(fastchar, CompositeExplicitAutograd, m) {
  m.impl("gemm_why_not", &engines::gemm_why_not);
  m.impl("gemm_choose", &engines::gemm_choose);
  m.impl("gemm_row_blocks", &engines::gemm_row_blocks);
  m.impl("gemm_row_block_starts", &engines::gemm_row_block_starts);
  m.impl("gemm_plan_entries", &engines::gemm_plan_entries);
  m.impl("gemm_plan_clear", &engines::gemm_plan_clear);
  m.impl("gemm_rate", &engines::gemm_rate);
}

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("gemm_plan_load", &engines::gemm_plan_load);
  m.impl("gemm_run", &engines::gemm_run);
}

}  // namespace fastchar
