// fastchar::generate: a CharRNN's sampling loop in one op, for all samples at once
// (fastchar/generator.py). Per step: a draw from the current logits (argmax at
// temperature 0, else temperature, top-k, then top-p, from the caller's generator), the
// embedding rows of the drawn ids, every layer's step and the head. float32 and bfloat16
// weights run the whole loop in one parallel region on the step engines (fused_loop);
// int8 weights (4 samples or fewer) and float64 run every layer's *_cell op and the head
// on the planned cell GEMM. No Python per character; the caller asks for the ids in
// chunks and passes the returned state and logits back in, so text can stream.
//
// Shape letters: K samples, V vocabulary, E embedding, L layers, H hidden.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "cell_steps.h"

namespace fastchar {
namespace {

using Opt = std::optional<at::Tensor>;

// p[v] = exp((row[v] - top) / temperature), unnormalised, vectorised: the quotient in
// double (a tiny temperature gives 0 and -inf, never NaN), the exp the gate passes' float32
// one (about 1 ulp), 0 below e^-87 (a -inf logit is never drawn). libm's double exp here
// took 3% of a 16-sample step of a 2 x 512 LSTM.
FASTCHAR_CLONES void weights_of(const float* row, int64_t V, float top, double temperature,
                                float* p) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float z = static_cast<float>((double(row[v]) - double(top)) / temperature);
    p[v] = z < -87.0f ? 0.0f : fast_exp(z);
  }
}

// One uniform in [0, 1) per row of a draw (none at temperature 0, which takes the argmax),
// from the caller's generator in row order: drawn before the rows, so that threads can
// then draw their own rows and the ids stay those of one thread drawing them in order.
void uniforms(at::CPUGeneratorImpl* gen, double temperature, int64_t K, double* u) {
  if (temperature == 0.0) {
    return;
  }
  at::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::lock_guard<std::mutex> lock(gen->mutex_);
  for (int64_t k = 0; k < K; ++k) {
    u[k] = uniform(gen);
  }
}

// A draw's scratch for V logits, one per thread, allocated once per call of the loop.
struct DrawScratch {
  explicit DrawScratch(int64_t V) : p(V), order(V) {}
  std::vector<float> p;
  std::vector<int64_t> order;
};

// One id for each of rows [k0, k1) of float32 logits [K, V] into out[k * stride], row k
// with the uniform u[k] (uniforms). False when a row has a NaN or +inf logit (a diverged
// model), which has no distribution to draw from: that row gets id 0 (an id the loop can
// go on with; the caller then throws, out of its parallel region).
bool draw_rows(const at::Tensor& logits, int64_t k0, int64_t k1, double temperature,
               int64_t top_k, double top_p, const double* u_rows, DrawScratch& scratch,
               int64_t* out, int64_t stride) {
  const int64_t V = logits.size(1);
  const float* L = logits.const_data_ptr<float>();
  std::vector<float>& p = scratch.p;
  std::vector<int64_t>& order = scratch.order;
  bool finite = true;
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = L + k * V;
    const int64_t best = std::max_element(row, row + V) - row;  // the first of the largest
    if (std::isinf(row[best]) ||  // +inf, or every logit -inf: no distribution
        std::any_of(row, row + V, [](float v) { return std::isnan(v); })) {
      out[k * stride] = 0;
      finite = false;
      continue;
    }
    if (temperature == 0.0) {
      out[k * stride] = best;
      continue;
    }
    weights_of(row, V, row[best], temperature, p.data());
    std::iota(order.begin(), order.end(), 0);
    const bool truncated = (top_k > 0 && top_k < V) || top_p < 1.0;
    if (truncated) {  // likeliest first; without truncation any order draws alike
      // by logit, not by weight: at a large temperature distinct logits' weights round
      // to one value, and top_k=1 must still be the argmax
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    }
    int64_t n = top_k > 0 && top_k < V ? top_k : V;
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      total += p[order[i]];
    }
    if (top_p < 1.0) {  // the smallest prefix whose probability reaches top_p
      double before = 0.0;
      int64_t m = 0;
      while (m < n && before < top_p * total) {
        before += p[order[m++]];
      }
      n = std::max<int64_t>(m, 1);
      total = before;
    }
    double u = u_rows[k] * total;
    int64_t pick = order[n - 1];
    for (int64_t i = 0; i < n; ++i) {
      u -= p[order[i]];
      if (u < 0.0) {
        pick = order[i];
        break;
      }
    }
    out[k * stride] = pick;
  }
  return finite;
}

void check_logits(bool finite) {
  TORCH_CHECK(finite, "fastchar::generate: the model's logits are NaN or +inf (or all -inf), "
              "so there is no distribution to draw the next character from (a diverged "
              "model?)");
}

// logits [K, V] float32 = h [K, H] @ w [V, H]^T + b (w contiguous), on the planned cell
// GEMM, in the accumulation type (float32 but for float64 models).
at::Tensor head(const at::Tensor& h, const at::Tensor& w, const Opt& b) {
  const int64_t K = h.size(0), H = h.size(1), V = w.size(0);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "generate_head", [&] {
    using A = acc_t<scalar_t>;
    out = at::empty({K, V}, h.options().dtype(c10::CppTypeToScalarType<A>::value));
    cell_gemm<scalar_t>(K, V, H, h.const_data_ptr<scalar_t>(), H, w.const_data_ptr<scalar_t>(), H,
                        A(0), out.data_ptr<A>(), V);
  });
  if (b.has_value()) {
    out.add_(*b);
  }
  return out.to(at::kFloat);
}

// The step engines' layers and head for fused_loop: every layer's LstmSteps, GruSteps or
// RnnSteps (W packed for M = K rows, each thread a slice of the units) and the head's
// slices of V rows. Building them packs every weight (5-9 ms for a 2x512 LSTM on an Intel
// Xeon, the steps of 30-40 characters), so a thread keeps the last call's set while its
// weights are unchanged: `keys` holds the weight, bias, scale and head tensors it was built
// from (alive, so no other tensor takes their place), and a call matches when it passes
// the same tensors at the same versions, over the same storage, data pointer, sizes and
// strides (any in-place change, an optimizer step included, bumps a tensor's version;
// assigning .data, as Module.to does, swaps the storage; an in-place change made through a
// .data alias does neither and is not seen), for the same cell, samples and thread count.
template <typename T>
struct LoopEngines {
  std::string cell;
  int64_t K, threads;
  std::vector<at::Tensor> keys;
  // What a key tensor was when the engines were built from it: its version (0 for an
  // absent tensor, -1 where it has none: an inference tensor, never matched), its storage
  // (held, so that no other storage takes its place), data pointer, sizes and strides.
  struct KeyState {
    int64_t version = 0;
    c10::Storage storage;
    const void* data = nullptr;
    std::vector<int64_t> shape;  // sizes then strides

    explicit KeyState(const at::Tensor& t) {
      if (!t.defined()) {
        return;
      }
      version = t.is_inference() ? -1
                                 : static_cast<int64_t>(
                                       t.unsafeGetTensorImpl()->version_counter().current_version());
      storage = t.storage();
      data = t.const_data_ptr();
      shape = t.sizes().vec();
      const auto st = t.strides();
      shape.insert(shape.end(), st.begin(), st.end());
    }
  };
  std::vector<KeyState> states;
  UnitSlices slices, rows;
  std::vector<LstmSteps<T>> lstms;
  std::vector<GruSteps<T>> grus;
  std::vector<RnnSteps<T>> rnns;
  at::Tensor head_w, head_bias;
  SliceGemms<T> head;

  // ws: float32 or bfloat16 weights, or int8 ones with `scales` (else all None).
  LoopEngines(const std::string& cell_, int64_t K_, int64_t H, at::TensorList ws,
              const c10::List<std::optional<at::Tensor>>& biases,
              const std::vector<Opt>& scales, const at::Tensor& head_w_, const Opt& head_b,
              std::vector<at::Tensor> keys_)
      : cell(cell_),
        K(K_),
        threads(at::get_num_threads()),
        keys(std::move(keys_)),
        states(keys.begin(), keys.end()),
        slices(H, cell == "lstm" ? 4 : cell == "gru" ? 3 : 1),
        rows(head_w_.size(0), 1, slices.count),  // the head's rows of W, a slice per thread
        head_w(head_w_.contiguous()),
        head_bias(head_b.has_value() ? head_b->to(at::kFloat).contiguous()
                                     : at::zeros({head_w_.size(0)}, at::kFloat)),
        head(rows, head_w, K_, /*forward=*/true) {
    for (int64_t l = 0; 2 * l < static_cast<int64_t>(ws.size()); ++l) {
      const auto w_ih = ws[2 * l].contiguous(), w_hh = ws[2 * l + 1].contiguous();
      const Opt b_ih = biases.get(2 * l), b_hh = biases.get(2 * l + 1);
      const Opt &s_ih = scales[2 * l], &s_hh = scales[2 * l + 1];
      if (cell == "gru") {
        const auto [b_x, b_hn] = gru_biases(b_ih, b_hh, H, at::kFloat);
        grus.emplace_back(slices, K, w_ih, w_hh, b_x, b_hn, s_ih, s_hh);
      } else if (cell == "lstm") {
        lstms.emplace_back(slices, K, w_ih, w_hh, bias_acc(b_ih, b_hh, 4 * H, at::kFloat), s_ih,
                           s_hh);
      } else {
        rnns.emplace_back(slices, K, w_ih, w_hh, bias_acc(b_ih, b_hh, H, at::kFloat),
                          cell == "rnn_relu", s_ih, s_hh);
      }
    }
  }

  bool matches(const std::string& cell_, int64_t K_, const std::vector<at::Tensor>& ts) const {
    if (cell_ != cell || K_ != K || at::get_num_threads() != threads || ts.size() != keys.size()) {
      return false;
    }
    for (size_t i = 0; i < ts.size(); ++i) {
      const KeyState now(ts[i]);
      const KeyState& then = states[i];
      if (ts[i].defined() != keys[i].defined() || now.version < 0 ||
          now.version != then.version || now.data != then.data || now.shape != then.shape) {
        return false;
      }
      if (ts[i].defined() &&
          (!ts[i].is_same(keys[i]) || !now.storage.is_alias_of(then.storage))) {
        return false;
      }
    }
    return true;
  }
};

// The sampling loop in one parallel region, float32 or bfloat16 weights: per step each
// thread draws its rows of the K ids (with uniforms thread 0 drew at the end of the last
// step) and gathers their embedding rows, then every layer's step runs with each thread
// on its unit slices and the head with each thread on its slice of the V logits, a
// barrier after each (StepFlags): L + 2 barriers a step, no fork, no allocation in a
// step. h and c [K, H] per layer and logits [K, V] are replaced by their values after the
// last step.
template <typename T>
void fused_loop(const LoopEngines<T>& eng, const at::Tensor& emb, std::vector<at::Tensor>& h,
                std::vector<at::Tensor>& c, at::Tensor& logits, int64_t length,
                double temperature, int64_t top_k, double top_p, at::CPUGeneratorImpl* gen,
                int64_t* idp) {
  using A = acc_t<T>;
  static_assert(std::is_same_v<A, float>, "the logits are float32");
  const bool lstm = eng.cell == "lstm", gru = eng.cell == "gru";
  const int64_t L = static_cast<int64_t>(h.size()), K = h[0].size(0), H = h[0].size(1);
  const int64_t E = emb.size(1), V = eng.head_w.size(0), n_gates = lstm ? 4 : gru ? 3 : 1;
  auto x0 = at::empty({K, E}, emb.options());
  std::vector<at::Tensor> hs[2], cs;  // h_{t-1} and h_t per layer, swapped every step
  for (int64_t l = 0; l < L; ++l) {
    hs[0].push_back(h[l].contiguous().clone());
    hs[1].push_back(at::empty({K, H}, emb.options()));
    if (lstm) {
      cs.push_back(c[l].to(at::kFloat).contiguous().clone());
    }
  }
  auto gates = at::empty({K, n_gates * H}, emb.options());  // scratch: no backward here
  auto hn = at::empty({gru ? K : 0, H}, emb.options());
  logits = logits.contiguous().clone();  // [K, V], float32: drawn from, then rewritten
  float* lp = logits.data_ptr<float>();
  const float* hb = eng.head_bias.template const_data_ptr<float>();
  const T* ep = emb.const_data_ptr<T>();
  T* xp = x0.data_ptr<T>();
  T* gp = gates.data_ptr<T>();
  T* hnp = hn.data_ptr<T>();
  const int64_t count = eng.slices.count;
  std::vector<double> u(K);  // the current step's uniforms (uniforms)
  std::atomic<bool> finite{true};  // every draw had finite logits (draw_rows)
  uniforms(gen, temperature, K, u.data());
  auto run = [&](int64_t tid, int64_t nth, auto&& barrier) {
    int64_t cur = 0;  // hs[cur] holds h_{t-1}
    // The thread's rows of the draw and of x0: the draw took 3% of a 16-sample step of a
    // 2 x 512 LSTM on one thread while the others waited.
    const int64_t k0 = K * tid / nth, k1 = K * (tid + 1) / nth;
    DrawScratch scratch(V);
    for (int64_t t = 0; t < length; ++t) {
      if (!draw_rows(logits, k0, k1, temperature, top_k, top_p, u.data(), scratch, idp + t,
                     length)) {
        finite.store(false, std::memory_order_relaxed);
      }
      for (int64_t k = k0; k < k1; ++k) {
        std::memcpy(xp + k * E, ep + idp[k * length + t] * E, E * sizeof(T));
      }
      barrier();
      const T* x = xp;
      int64_t ldx = E;
      for (int64_t l = 0; l < L; ++l) {
        const T* h_prev = hs[cur][l].template const_data_ptr<T>();
        T* h_new = hs[1 - cur][l].template data_ptr<T>();
        for (int64_t s = tid; s < count; s += nth) {
          if (lstm) {
            float* cp = cs[l].template data_ptr<float>();
            eng.lstms[l].step(s, K, x, ldx, h_prev, cp, gp, cp, h_new);
            if constexpr (!std::is_same_v<T, float>) {
              // the state a *_cell op returns is T: round c as model.step does, so that
              // the texts do not depend on the chunks the caller asks for
              const int64_t j0 = eng.slices.begin(s), n = eng.slices.size(s);
              for (int64_t k = 0; k < K; ++k) {
                for (int64_t j = j0; j < j0 + n; ++j) {
                  cp[k * H + j] = to_acc(from_acc<T>(cp[k * H + j]));
                }
              }
            }
          } else if (gru) {
            eng.grus[l].step(s, K, x, ldx, h_prev, gp, hnp, h_new);
          } else {
            eng.rnns[l].step(s, K, x, ldx, h_prev, h_new);
          }
        }
        barrier();
        x = h_new;
        ldx = H;
      }
      for (int64_t s = tid; s < eng.rows.count; s += nth) {
        const int64_t v0 = eng.rows.begin(s), nv = eng.rows.size(s);
        eng.head.gemms[s](x, H, 0.0f, lp + v0, V);  // logits[:, rows] = h @ W_head[rows]^T
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t j = 0; j < nv; ++j) {
            lp[k * V + v0 + j] += hb[v0 + j];
          }
        }
      }
      if (tid == 0 && t + 1 < length) {  // every thread drew its rows of step t before
        uniforms(gen, temperature, K, u.data());  // this step's last barrier
      }
      barrier();
      cur = 1 - cur;
    }
    engines::release_thread();
  };
#ifdef _OPENMP
  if (count > 1) {
    StepFlags flags(count);
#pragma omp parallel num_threads(count)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      int64_t phase = 0;
      run(tid, nth, [&] { flags.sync(tid, nth, ++phase); });
    }
  } else {
    run(0, 1, [] {});
  }
#else
  run(0, 1, [] {});
#endif
  check_logits(finite.load());
  for (int64_t l = 0; l < L; ++l) {
    h[l] = hs[length % 2][l];
    if (lstm) {
      c[l] = cs[l].to(c[l].scalar_type());
    }
  }
}

// This thread's engines for the call, from its cache of the last call's or built anew.
template <typename T>
const LoopEngines<T>& loop_engines(const std::string& cell, int64_t K, int64_t H,
                                   at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases,
                                   const c10::List<std::optional<at::Tensor>>& scales,
                                   const at::Tensor& head_w, const Opt& head_b) {
  std::vector<at::Tensor> keys(weights.begin(), weights.end());
  for (const auto& list : {biases, scales}) {
    for (size_t i = 0; i < list.size(); ++i) {
      const Opt t = list.get(i);
      keys.push_back(t.has_value() ? *t : at::Tensor());
    }
  }
  keys.push_back(head_w);
  keys.push_back(head_b.has_value() ? *head_b : at::Tensor());  // absent: an undefined key
  thread_local std::unique_ptr<LoopEngines<T>> cached;
  if (!cached || !cached->matches(cell, K, keys)) {
    cached.reset();  // the old set's packed weights go first
    std::vector<at::Tensor> ws(weights.begin(), weights.end());
    std::vector<Opt> sc(scales.begin(), scales.end());
    if (sc[0].has_value() && K > kCellPackRows) {  // int8 rows as float32 (s * q) GEMMs
      for (size_t i = 0; i < ws.size(); ++i) {
        ws[i] = ws[i].to(at::kFloat).mul_(sc[i]->unsqueeze(1)).contiguous();
        sc[i] = std::nullopt;
      }
    }
    cached = std::make_unique<LoopEngines<T>>(cell, K, H, ws, biases, sc, head_w, head_b,
                                              std::move(keys));
  }
  return *cached;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> generate(
    const at::Tensor& logits, at::TensorList state, const at::Tensor& embedding,
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    const c10::List<std::optional<at::Tensor>>& scales, const at::Tensor& head_w, const Opt& head_b, c10::string_view cell_name, int64_t length,
    double temperature, int64_t top_k, double top_p, std::optional<at::Generator> generator) {
  constexpr const char* OP = "fastchar::generate";
  const std::string cell(cell_name);
  const bool lstm = cell == "lstm", gru = cell == "gru";
  TORCH_CHECK_VALUE(lstm || gru || cell == "rnn_tanh" || cell == "rnn_relu", OP,
                    ": cell must be lstm, gru, rnn_tanh or rnn_relu, got ", cell);
  CHECK_CPU(embedding);
  CHECK_DIM(embedding, 2);
  CHECK_FLOAT(embedding);
  const auto dt = embedding.scalar_type();
  const int64_t L = static_cast<int64_t>(weights.size()) / 2, V = embedding.size(0);
  TORCH_CHECK_VALUE(L >= 1 && weights.size() % 2 == 0 && biases.size() == weights.size() &&
                        scales.size() == weights.size(),
                    OP, ": weights must be [w_ih, w_hh] per layer, and biases [b_ih, b_hh] and "
                    "scales [s_ih, s_hh] (None unless int8) per layer");
  TORCH_CHECK_VALUE(state.size() == (lstm ? 2u : 1u), OP, ": state must be ",
                    lstm ? "[h, c]" : "[h]", " for ", cell);
  const auto& h0 = state[0];
  CHECK_CPU(h0);
  CHECK_DIM(h0, 3);
  const int64_t K = h0.size(1), H = h0.size(2);
  for (const auto& s : state) {
    CHECK_ARG(s, dt, L, K, H);
  }
  TORCH_CHECK_VALUE(V >= 1 && H >= 1 && embedding.size(1) >= 1, OP,
                    ": the vocabulary (embedding rows), the hidden size and the embedding width "
                    "must be >= 1, got ", V, ", ", H, " and ", embedding.size(1));
  CHECK_ARG(logits, at::kFloat, K, V);
  CHECK_ARG(head_w, dt, V, H);
  if (head_b.has_value()) {
    CHECK_ARG(*head_b, dt, V);
  }
  TORCH_CHECK_VALUE(length >= 0, OP, ": length must be >= 0, got ", length);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0.0, OP,
                    ": temperature must be finite and >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, OP, ": top_k must be >= 0 (0: all), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, OP, ": top_p must be in (0, 1], got ", top_p);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());

  static const auto lstm_cell =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastchar::lstm_cell", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&)>();
  static const auto gru_cell =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastchar::gru_cell", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&)>();
  static const auto rnn_cell =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastchar::rnn_cell", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const Opt&, const Opt&, bool, const Opt&,
                            const Opt&)>();

  std::vector<at::Tensor> h, c;  // per layer [K, H]
  for (int64_t l = 0; l < L; ++l) {
    h.push_back(state[0][l].contiguous());
    if (lstm) {
      c.push_back(state[1][l].contiguous());
    }
  }
  const bool q8 = scales.get(0).has_value();
  TORCH_CHECK(!q8 || dt == at::kFloat, OP, ": int8 weights take a float32 model, got ", dt);
  const int64_t G = (lstm ? 4 : gru ? 3 : 1) * H;
  for (int64_t l = 0; l < L; ++l) {  // every layer's weights, biases and scales
    const at::Tensor &w_ih = weights[2 * l], &w_hh = weights[2 * l + 1];
    CHECK_ARG(w_ih, q8 ? at::kChar : dt, G, l == 0 ? embedding.size(1) : H);
    CHECK_ARG(w_hh, q8 ? at::kChar : dt, G, H);
    for (int64_t i = 2 * l; i < 2 * l + 2; ++i) {
      const Opt b = biases.get(i), s = scales.get(i);
      TORCH_CHECK_VALUE(s.has_value() == q8, OP,
                        ": give int8 weights a scale each, or no scales at all");
      if (b.has_value()) {
        const at::Tensor& bias = *b;
        CHECK_ARG(bias, dt, G);
      }
      if (s.has_value()) {
        const at::Tensor& scale = *s;
        CHECK_ARG(scale, at::kFloat, G);
      }
    }
  }
  // float32, bfloat16 and int8 weights in one parallel region (fused_loop), float64
  // through the cell ops. int8 rows run on the int8 row kernel, each thread on its slices'
  // rows; for more samples than its block (kCellPackRows) they are dequantised (s * q,
  // float32, once per engine set) for the step engines: with K rows of A the product is a
  // GEMM, which the step engines run at several times the rate of the int8 row kernel,
  // whose K / 4 passes read every W row again (16 samples ran at 2.4x one sample's chars/s
  // on it, against 8x in float32 on an Intel Xeon).
  if (length > 0 && (dt == at::kFloat || dt == at::kBFloat16)) {
    auto ids = at::empty({K, length}, at::kLong);
    auto current = logits;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "generate_loop", [&] {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
        const auto& eng =
            loop_engines<scalar_t>(cell, K, H, weights, biases, scales, head_w, head_b);
        fused_loop<scalar_t>(eng, embedding.contiguous(), h, c, current, length, temperature,
                             top_k, top_p, gen, ids.data_ptr<int64_t>());
      }
    });
    std::vector<at::Tensor> out_state = {at::stack(h)};
    if (lstm) {
      out_state.push_back(at::stack(c));
    }
    return {ids, out_state, current};
  }
  auto ids = at::empty({K, length}, at::kLong);
  int64_t* idp = ids.data_ptr<int64_t>();
  const auto head_wc = head_w.contiguous();
  auto current = logits.contiguous();
  auto emb = embedding.contiguous();
  std::vector<double> u(K);
  DrawScratch scratch(current.size(1));
  for (int64_t t = 0; t < length; ++t) {
    uniforms(gen, temperature, K, u.data());
    check_logits(
        draw_rows(current, 0, K, temperature, top_k, top_p, u.data(), scratch, idp + t, length));
    auto x = emb.index_select(0, ids.select(1, t));  // [K, E]
    for (int64_t l = 0; l < L; ++l) {
      const auto &w_ih = weights[2 * l], &w_hh = weights[2 * l + 1];
      const Opt b_ih = biases.get(2 * l), b_hh = biases.get(2 * l + 1);
      const Opt s_ih = q8 ? scales.get(2 * l) : Opt(), s_hh = q8 ? scales.get(2 * l + 1) : Opt();
      if (lstm) {
        std::tie(h[l], c[l]) = lstm_cell.call(x, h[l], c[l], w_ih, w_hh, b_ih, b_hh, s_ih, s_hh);
      } else if (gru) {
        h[l] = gru_cell.call(x, h[l], w_ih, w_hh, b_ih, b_hh, s_ih, s_hh);
      } else {
        h[l] = rnn_cell.call(x, h[l], w_ih, w_hh, b_ih, b_hh, cell == "rnn_relu", s_ih, s_hh);
      }
      x = h[l];
    }
    current = head(x, head_wc, head_b);
  }
  std::vector<at::Tensor> out_state = {at::stack(h)};
  if (lstm) {
    out_state.push_back(at::stack(c));
  }
  return {ids, out_state, current};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("generate", &generate);
}

}  // namespace fastchar
