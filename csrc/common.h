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
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// Each op defines `constexpr const char* OP` so the messages name the op too, and the
// argument by its name in the op's schema (`*b_ih`, an optional's value, is b_ih).
constexpr const char* arg_name(const char* s) { return s[0] == '*' ? s + 1 : s; }
#define CHECK_CPU(x)                                                                   \
  TORCH_CHECK((x).device().is_cpu(), OP, ": ", arg_name(#x), " must be a CPU tensor, got ", \
              (x).device())
#define CHECK_DTYPE(x, dtype)                                                       \
  TORCH_CHECK((x).scalar_type() == (dtype), OP, ": ", arg_name(#x), " has dtype ", \
              (x).scalar_type(), ", expected ", (dtype))
#define CHECK_SHAPE(x, ...)                                                            \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), OP, ": ",          \
                    arg_name(#x), " must have shape ", at::IntArrayRef({__VA_ARGS__}), \
                    ", got ", (x).sizes())
#define CHECK_DIM(x, n)                                                                 \
  TORCH_CHECK_VALUE((x).dim() == (n), OP, ": ", arg_name(#x), " must be ", (n),        \
                    "-D, got shape ", (x).sizes())
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

inline at::ScalarType state_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

inline void check_float_dtype(const char* OP, const char* name, const at::Tensor& x) {
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, OP, ": ", name,
              " has dtype ", t, ", which is not supported (float32, float64 or bfloat16)");
}
#define CHECK_FLOAT(x) check_float_dtype(OP, arg_name(#x), x)

// The checks every *_cell op shares: x [B, I] and w_hh [n_gates * H, H] on the CPU
// in a supported dtype, then w_ih [G, I], h [B, H] and the optional biases [G] in
// x's dtype. With scales s_ih / s_hh (float32 [G]) the weights are int8 rows quantised
// per row (w = s * q) and x is float32. Returns H. The messages name each argument as
// the op schemas do.
inline int64_t check_cell_args(const char* OP, int64_t n_gates, const at::Tensor& x,
                               const at::Tensor& h, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh,
                               const std::optional<at::Tensor>& s_ih = std::nullopt,
                               const std::optional<at::Tensor>& s_hh = std::nullopt) {
  CHECK_CPU(x);
  CHECK_DIM(x, 2);
  CHECK_FLOAT(x);
  CHECK_CPU(w_hh);
  CHECK_DIM(w_hh, 2);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1), G = n_gates * H;
  TORCH_CHECK_VALUE(s_ih.has_value() == s_hh.has_value(), OP,
                    ": give both s_ih and s_hh (int8 weights) or neither");
  const bool q8 = s_ih.has_value();
  TORCH_CHECK(!q8 || dt == at::kFloat, OP, ": int8 weights take a float32 x, got ", dt);
  CHECK_ARG(w_hh, q8 ? at::kChar : dt, G, H);
  CHECK_ARG(w_ih, q8 ? at::kChar : dt, G, I);
  if (q8) {
    CHECK_ARG(*s_ih, at::kFloat, G);
    CHECK_ARG(*s_hh, at::kFloat, G);
  }
  CHECK_ARG(h, dt, B, H);
  if (b_ih.has_value()) {
    CHECK_ARG(*b_ih, dt, G);
  }
  if (b_hh.has_value()) {
    CHECK_ARG(*b_hh, dt, G);
  }
  return H;
}

// A sequence-sized buffer ([T, B, G] gates, outputs, gradients), written once step after
// step: from a cache of freed blocks in transparent huge pages (seq_buffers.cpp) when it
// is 2 MB or more, else at::empty. CPU only; `options` gives the dtype.
at::Tensor empty_seq(at::IntArrayRef sizes, const at::TensorOptions& options);

// The checks a *_seq op (the input projection inside the time loop) shares: x [T, B, I]
// on the CPU in a supported dtype, then w_hh [n_gates * H, H], w_ih [G, I], h0 [B, H]
// and the optional bias [G] in x's dtype. Returns H.
// The rows of each time step in a sequence buffer: step t is rows [off[t], off[t] +
// rows[t]) of [N, ...]. Dense [T, B, ...] buffers: off[t] = t * B, rows[t] = B. Packed
// sequences (torch's PackedSequence order): rows[t] = batch_sizes[t], non-increasing, the
// sequences 0..rows[t]-1 of the B = rows[0] sorted ones; the time loops run each step's
// GEMM and gate pass on its rows only, and a finished sequence keeps its state.
struct SeqSteps {
  int64_t T = 0, B = 0, N = 0;
  bool packed = false;
  std::vector<int64_t> off, rows;

  SeqSteps(int64_t T_, int64_t B_) : T(T_), B(B_), N(T_ * B_), off(T_), rows(T_, B_) {
    for (int64_t t = 0; t < T; ++t) {
      off[t] = t * B;
    }
  }

  // batch_sizes: int64 [T] on the CPU; x_rows: the packed input's rows, which must be N.
  SeqSteps(const char* OP, const at::Tensor& batch_sizes, int64_t x_rows) : packed(true) {
    TORCH_CHECK_VALUE(batch_sizes.device().is_cpu() && batch_sizes.dim() == 1 &&
                          batch_sizes.scalar_type() == at::kLong && batch_sizes.numel() > 0,
                      OP, ": batch_sizes must be a non-empty 1-D int64 CPU tensor, got ",
                      batch_sizes.scalar_type(), " ", batch_sizes.sizes(), " on ",
                      batch_sizes.device());
    auto bs = batch_sizes.contiguous();
    const int64_t* p = bs.const_data_ptr<int64_t>();
    T = bs.numel();
    B = p[0];
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK_VALUE(p[t] >= 1 && p[t] <= (t > 0 ? p[t - 1] : p[0]), OP,
                        ": batch_sizes must be positive and non-increasing, got ", p[t],
                        " at step ", t);
      off.push_back(N);
      rows.push_back(p[t]);
      N += p[t];
    }
    TORCH_CHECK_VALUE(N == x_rows, OP, ": batch_sizes sum to ", N, " rows, but the packed input has ",
                      x_rows);
  }

  // A sequence buffer's shape: [N, ...] packed, [T, B, ...] dense.
  std::vector<int64_t> shape(int64_t cols) const {
    return packed ? std::vector<int64_t>{N, cols} : std::vector<int64_t>{T, B, cols};
  }

  // Each sequence's last row in a buffer [N, cols] (its final state), int64 [B].
  at::Tensor last_rows() const {
    auto out = at::empty({B}, at::kLong);
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t next = t + 1 < T ? rows[t + 1] : 0;
      for (int64_t b = next; b < rows[t]; ++b) {
        o[b] = off[t] + b;
      }
    }
    return out;
  }

  // The final states [B, cols] of a sequence buffer whose rows are states.
  at::Tensor finals(const at::Tensor& seq) const {
    auto flat = seq.reshape({N, seq.size(-1)});
    return packed ? flat.index_select(0, last_rows()) : flat.narrow(0, (T - 1) * B, B).clone();
  }
};

// The steps of a time loop's sequence `name`: packed [N, features] with batch_sizes, else
// [T, B, features].
inline SeqSteps seq_steps(const char* OP, const char* name, const at::Tensor& x,
                          const std::optional<at::Tensor>& batch_sizes) {
  if (batch_sizes.has_value()) {
    TORCH_CHECK_VALUE(x.dim() == 2, OP, ": ", name,
                      " must be 2-D [N, features] (a packed sequence, with batch_sizes), got "
                      "shape ", x.sizes());
    return SeqSteps(OP, *batch_sizes, x.size(0));
  }
  TORCH_CHECK_VALUE(x.dim() == 3, OP, ": ", name,
                    " must be 3-D [T, B, features] (or 2-D with batch_sizes), got shape ",
                    x.sizes());
  return SeqSteps(x.size(0), x.size(1));
}

// A sequence buffer argument of a *_bwd op: CPU, `dtype`, and [T, B, cols] or packed [N, cols].
inline void check_seq_shape(const char* OP, const char* name, const at::Tensor& x,
                            const SeqSteps& steps, int64_t cols, at::ScalarType dtype) {
  const auto want = steps.shape(cols);
  TORCH_CHECK(x.device().is_cpu(), OP, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == dtype, OP, ": ", name, " has dtype ", x.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK_VALUE(x.sizes() == at::IntArrayRef(want), OP, ": ", name, " must have shape ",
                    at::IntArrayRef(want), ", got ", x.sizes());
}

// A time loop's sizes: at least one hidden unit (the threads split the units into slices;
// none to split crashed) and one input feature, as torch.nn's RNNs ask.
inline void check_sizes(const char* OP, int64_t H, int64_t I = 1) {
  TORCH_CHECK_VALUE(H > 0, OP, ": the hidden size must be at least 1, got 0");
  TORCH_CHECK_VALUE(I > 0, OP, ": the input size (x.size(-1)) must be at least 1, got 0");
}

// The check of a *_seq op's arguments; returns H. x: [T, B, I], or [N, I] with steps packed.
// With an LSTM projection w_hr [P, H] the recurrent state is P wide: w_hh [G, P], h0 [B, P].
inline int64_t check_seq_args(const char* OP, int64_t n_gates, const at::Tensor& x,
                              const SeqSteps& steps, const at::Tensor& h0,
                              const at::Tensor& w_ih, const std::optional<at::Tensor>& b,
                              const at::Tensor& w_hh, const at::Tensor* proj = nullptr) {
  CHECK_CPU(x);
  CHECK_FLOAT(x);
  const auto dt = x.scalar_type();
  CHECK_CPU(w_hh);
  CHECK_DIM(w_hh, 2);
  int64_t H = w_hh.size(1), P = H;
  if (proj != nullptr) {
    const at::Tensor& w_hr = *proj;
    CHECK_CPU(w_hr);
    CHECK_DIM(w_hr, 2);
    P = w_hr.size(0);
    H = w_hr.size(1);
    TORCH_CHECK_VALUE(0 < P && P < H, OP, ": w_hr must be [P, H] with 0 < P < H, got shape ",
                      w_hr.sizes());
    CHECK_ARG(w_hr, dt, P, H);
  }
  const int64_t B = steps.B, I = x.size(-1), G = n_gates * H;
  check_sizes(OP, H, I);
  CHECK_ARG(w_hh, dt, G, P);
  CHECK_ARG(w_ih, dt, G, I);
  CHECK_ARG(h0, dt, B, P);
  if (b.has_value()) {
    const at::Tensor& bias = *b;
    CHECK_ARG(bias, dt, G);
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

// The gate passes' conversions between a storage type T and its accumulation type. For
// bfloat16 they are bit operations the compiler vectorises (c10::BFloat16's are scalar
// calls, which left the bf16 passes several times slower than the step GEMM), rounding
// to nearest even with NaN -> 0x7fc0, bit for bit as c10 rounds.
template <typename T>
FASTCHAR_INLINE at::opmath_type<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const uint32_t u = uint32_t(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return at::opmath_type<T>(v);
  }
}

template <typename T>
FASTCHAR_INLINE T from_acc(at::opmath_type<T> v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return at::BFloat16(static_cast<uint16_t>(nan ? 0x7fc0u : rounded), at::BFloat16::from_bits());
  } else {
    return T(v);
  }
}

// torch.relu: NaN stays NaN (and -0 stays -0), as `x > 0 ? x : 0` would not keep it.
template <typename A>
FASTCHAR_INLINE A relu_act(A x) {
  return x < A(0) ? A(0) : x;
}

}  // namespace fastchar

#include "gemm.h"

namespace fastchar {

// A barrier split in two for the time loops' threads: arrive(tid, phase) publishes that
// thread tid has finished the phase (its writes before it become visible), wait(n,
// phase) spins until threads 0..n-1 all have. Between the two a thread may do work of
// its own. Each flag has its own cache line; after a long spin a thread yields, so an
// oversubscribed CPU still makes progress.
class StepFlags {
 public:
  explicit StepFlags(int64_t n) : flags_(static_cast<size_t>(n)) {}
  void arrive(int64_t tid, int64_t phase) {
    flags_[tid].v.store(phase, std::memory_order_release);
  }
  // A whole barrier: arrive, then wait.
  void sync(int64_t tid, int64_t n, int64_t phase) {
    arrive(tid, phase);
    wait(n, phase);
  }
  void wait(int64_t n, int64_t phase) const {
    for (int64_t k = 0; k < n; ++k) {
      for (int spins = 0; flags_[k].v.load(std::memory_order_acquire) < phase;) {
        if (spins < kSpins) {
          ++spins;
          pause();
        } else {
          std::this_thread::yield();
        }
      }
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  }
  // Pauses before each yield: a wait between two steps lasts a few thousand cycles; a
  // thread that is not running (more threads than cores) must get the core soon.
  static constexpr int kSpins = 256;
  struct alignas(64) Flag {
    std::atomic<int64_t> v{0};
  };
  std::vector<Flag> flags_;
};

inline constexpr auto kNoWork = [](int64_t, int64_t) {};

// Hidden units split into contiguous slices, one per thread, for time loops
// that run inside a single parallel region: a thread keeps its slice of W_hh
// in its own core's cache and meets the others at one barrier per step,
// instead of a GEMM fork and a pointwise fork per step.
class UnitSlices {
 public:
  UnitSlices(int64_t H, int64_t n_gates) : UnitSlices(H, n_gates, default_threads(H)) {}

  // At most `threads` slices: a second split of the same loop (an LSTM projection's P
  // columns) takes the first's count, so that slice s of both runs on the same thread.
  UnitSlices(int64_t H, int64_t n_gates, int64_t threads) : H_(H), n_gates_(n_gates) {
    // Slices are whole 16-lane vectors except the last.
    chunk_ = (H + threads - 1) / threads;
    chunk_ = std::max<int64_t>(1, (chunk_ + 15) / 16 * 16);
    count = (H + chunk_ - 1) / chunk_;
  }

  static int64_t default_threads(int64_t H) {
#ifdef _OPENMP
    // Inside another parallel region a nested team would get one thread.
    return omp_in_parallel() || H < 32 ? 1 : at::get_num_threads();
#else
    return 1;
#endif
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
  // The W columns of slice s: [rows, n], a view (row stride w's): every engine reads W
  // through its row stride, and a copy of it cost a fresh buffer's page faults per call.
  at::Tensor columns(const at::Tensor& w, int64_t s) const {
    return w.narrow(1, begin(s), size(s));
  }

  // For steps i = 0..steps-1: before(s, i) for every slice, a barrier, then
  // after(s, i). A thread always serves the same slices, so a slice's own
  // data needs no barrier between after(s, i) and before(s, i + 1); with `sync_after`
  // there is one there too (before needs every slice's after: an LSTM projection).
  // `ahead(s, i)` runs inside the first barrier, after this thread's arrival and before
  // its wait: work that needs only the slice's own data (the next step's input product),
  // done while the other threads finish theirs.
  template <typename Before, typename After, typename Ahead = decltype(kNoWork)>
  void run(int64_t steps, const Before& before, const After& after, bool sync_after = false,
           const Ahead& ahead = kNoWork) const {
    if (count == 1) {
      for (int64_t i = 0; i < steps; ++i) {
        before(0, i);
        ahead(0, i);
        after(0, i);
      }
      engines::release_thread();
      return;
    }
#ifdef _OPENMP
    StepFlags flags(count);
#pragma omp parallel num_threads(count)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      int64_t phase = 0;
      for (int64_t i = 0; i < steps; ++i) {
        for (int64_t s = tid; s < count; s += nth) {
          before(s, i);
        }
        flags.arrive(tid, ++phase);
        for (int64_t s = tid; s < count; s += nth) {
          ahead(s, i);
        }
        flags.wait(nth, phase);
        for (int64_t s = tid; s < count; s += nth) {
          after(s, i);
        }
        if (sync_after) {
          flags.sync(tid, nth, ++phase);
        }
      }
      engines::release_thread();
    }
#endif
  }

  int64_t n_gates() const {
    return n_gates_;
  }

  int64_t count;

 private:
  int64_t H_, n_gates_, chunk_;
};

// One step GEMM per unit slice, over that slice's part of a weight W [G, K] (kept alive
// in `weights`, which the GEMMs point into). Forward: a [B, K] @ the slice's gate rows^T
// -> [B, n_gates * n], for W_hh (a = h_{t-1}) or W_ih (a = x_t, the input projection done
// step by step). Backward: dgates_t [B, G] @ W_hh[:, slice] -> [B, n].
template <typename T>
struct SliceGemms {
  std::vector<at::Tensor> weights;
  std::vector<StepGemm<T>> gemms;

  // Each slice's rows of W (forward; the backward's columns are a view of W) are copied and
  // packed on the thread that will run them (UnitSlices::run serves slice s on thread s):
  // half the time on two threads, and the packed W starts in that thread's cache.
  SliceGemms(const UnitSlices& slices, const at::Tensor& w, int64_t B, bool forward)
      : weights(slices.count), gemms(slices.count) {
    const int64_t G = w.size(0), K = w.size(1), count = slices.count;
    const int threads = static_cast<int>(count);  // slices run at once, one per thread
    // [B, n_gates * n] @ [n_gates * n, K]^T forward, [B, G] @ [G, n] backward
    auto shape = [&](int64_t s) {
      const int64_t n = slices.size(s);
      return forward ? std::array<int64_t, 2>{slices.n_gates() * n, K}
                     : std::array<int64_t, 2>{n, G};
    };
    std::vector<engines::Engine> engines(count);
    for (int64_t s = 0; s < count; ++s) {
      const auto [N, k] = shape(s);
      engines[s] = StepGemm<T>::engine(forward, B, N, k, threads);
    }
    auto build = [&](int64_t s) {
      const auto [N, k] = shape(s);
      weights[s] = forward ? slices.gate_rows(w, s) : slices.columns(w, s);
      gemms[s] = StepGemm<T>(forward, B, N, k, weights[s].template const_data_ptr<T>(),
                             weights[s].stride(0), engines[s]);
    };
#ifdef _OPENMP
    if (count == 1) {
      build(0);
      return;
    }
    std::exception_ptr error;
#pragma omp parallel for num_threads(count) schedule(static, 1)
    for (int64_t s = 0; s < count; ++s) {
      try {
        build(s);
      } catch (...) {
#pragma omp critical(fastchar_slice_gemms)
        error = std::current_exception();
      }
    }
    if (error) {
      std::rethrow_exception(error);
    }
#else
    for (int64_t s = 0; s < count; ++s) {
      build(s);
    }
#endif
  }
};

// The forward step products of one weight w [G, K] for every unit slice, acc (= or +=)
// a [m, K] @ the slice's gate rows^T [m, n_gates * n]: on the planned step engines
// (SliceGemms), or, for int8 w with a float32 scale per row (`scale` [G]; T float), on the
// int8 row kernel over each slice's own contiguous copy of its rows and scales, which then
// stay in the cache of the thread that serves the slice (fastchar::generate's loop).
template <typename T>
class SliceProducts {
 public:
  SliceProducts(const UnitSlices& slices, const at::Tensor& w, int64_t B,
                const std::optional<at::Tensor>& scale = std::nullopt)
      : K_(w.size(1)) {
    if (!scale.has_value()) {
      gemms_.emplace(slices, w, B, /*forward=*/true);
      return;
    }
    TORCH_CHECK((std::is_same_v<T, float>), "fastchar: int8 weights take float32 activations");
    const auto sc = scale->view({-1, 1});
    for (int64_t s = 0; s < slices.count; ++s) {
      q_.push_back(slices.gate_rows(w, s));  // [n_gates * n, K] int8
      scales_.push_back(slices.gate_rows(sc, s).view({-1}));  // [n_gates * n]
    }
  }

  void rows(int64_t s, int64_t m, const T* a, int64_t lda, acc_t<T> beta, acc_t<T>* c,
            int64_t ldc) const {
    if (gemms_) {
      gemms_->gemms[s].rows(m, a, lda, beta, c, ldc);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      engines::cell_gemm_q8(m, q_[s].size(0), K_, a, lda, q_[s].template const_data_ptr<int8_t>(),
                            K_, scales_[s].template const_data_ptr<float>(), beta != 0.0f, c,
                            ldc);
    }
  }

 private:
  int64_t K_;
  std::optional<SliceGemms<T>> gemms_;
  std::vector<at::Tensor> q_, scales_;
};

// A cell op's acc[B, N] (= or +=) x [B, K] @ w [N, K]^T: w in x's dtype on the planned
// cell GEMM, or int8 rows with a float32 scale per row (`scale` given; x float32).
template <typename T>
void cell_product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  bool accumulate, acc_t<T>* acc, int64_t ldc) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  auto xc = x.contiguous(), wc = w.contiguous();
  if constexpr (std::is_same_v<T, float>) {
    if (scale.has_value()) {
      auto sc = scale->contiguous();
      engines::cell_gemm_q8(B, N, K, xc.const_data_ptr<float>(), K, wc.const_data_ptr<int8_t>(), K,
                            sc.const_data_ptr<float>(), accumulate, acc, ldc);
      return;
    }
  }
  cell_gemm<T>(B, N, K, xc.const_data_ptr<T>(), K, wc.const_data_ptr<T>(), K,
               accumulate ? acc_t<T>(1) : acc_t<T>(0), acc, ldc);
}

// A cell op's two products: acc_x [B, N] = x @ w_ih^T, then acc_h (= or +=, accumulate_h)
// h @ w_hh^T, both with row stride ldc (acc_h may be acc_x).
template <typename T>
void cell_products(const at::Tensor& x, const at::Tensor& w_ih,
                   const std::optional<at::Tensor>& s_ih, acc_t<T>* acc_x, const at::Tensor& h,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& s_hh,
                   acc_t<T>* acc_h, bool accumulate_h, int64_t ldc) {
  cell_product<T>(x, w_ih, s_ih, false, acc_x, ldc);
  cell_product<T>(h, w_hh, s_hh, accumulate_h, acc_h, ldc);
}

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
