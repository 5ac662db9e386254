// fastchar::generate: a CharRNN's sampling loop in one op, for all samples at once
// (fastchar/generator.py). Per step: a draw from the current logits (argmax at
// temperature 0, else temperature, top-k, then top-p, from the caller's generator), the
// embedding rows of the drawn ids, every layer's *_cell op (int8 weights where scales are
// given), and the head on the planned cell GEMM. No Python per character; the caller asks for the ids in chunks and passes
// the returned state and logits back in, so text can stream.
//
// Shape letters: K samples, V vocabulary, E embedding, L layers, H hidden.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "common.h"

namespace fastchar {
namespace {

using Opt = std::optional<at::Tensor>;

// One id per row of float32 logits [K, V] into out[k * stride].
void draw_rows(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
               at::CPUGeneratorImpl* gen, int64_t* out, int64_t stride) {
  const int64_t K = logits.size(0), V = logits.size(1);
  const float* L = logits.const_data_ptr<float>();
  std::vector<double> p(V);
  std::vector<int64_t> order(V);
  at::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int64_t k = 0; k < K; ++k) {
    const float* row = L + k * V;
    const int64_t best = std::max_element(row, row + V) - row;  // the first of the largest
    if (temperature == 0.0) {
      out[k * stride] = best;
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      p[v] = std::exp((double(row[v]) - double(row[best])) / temperature);
    }
    std::iota(order.begin(), order.end(), 0);
    const bool truncated = (top_k > 0 && top_k < V) || top_p < 1.0;
    if (truncated) {  // likeliest first; without truncation any order draws alike
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return p[a] > p[b]; });
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
    double u;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      u = uniform(gen) * total;
    }
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

// Every layer weight and the head packed for K samples (PackedCellWeights, gemm.h).
template <typename T>
void pack_weights(std::optional<PackedCellScope<T>>& scope, int64_t K, at::TensorList weights,
                  const at::Tensor& head_w) {
  scope.emplace();
  for (const auto& w : weights) {
    if (w.is_contiguous()) {  // the cell ops read a contiguous w in place
      scope->weights.add(K, w.size(0), w.size(1), w.const_data_ptr<T>(), w.size(1));
    }
  }
  scope->weights.add(K, head_w.size(0), head_w.size(1), head_w.const_data_ptr<T>(),
                     head_w.size(1));
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
  check_float_dtype(OP, embedding);
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
  CHECK_ARG(logits, at::kFloat, K, V);
  CHECK_ARG(head_w, dt, V, H);
  if (head_b.has_value()) {
    CHECK_ARG(*head_b, dt, V);
  }
  TORCH_CHECK_VALUE(length >= 0, OP, ": length must be >= 0, got ", length);
  TORCH_CHECK_VALUE(temperature >= 0.0, OP, ": temperature must be >= 0, got ", temperature);
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
  // More samples than the cell kernels' row block: every weight packed once for this call.
  // int8 weights are dequantised for it (s * q, in float32, once per call): with K rows of
  // A the product is a GEMM, which the step engines run at several times the rate of the
  // int8 row kernel, whose K / 4 passes read every W row again (16 samples ran at 2.4x one
  // sample's chars/s on it, against 8x in float32 on an Intel Xeon).
  std::optional<PackedCellScope<float>> packed_f32;
  std::optional<PackedCellScope<at::BFloat16>> packed_bf16;
  const auto head_wc = head_w.contiguous();
  bool q8 = scales.get(0).has_value();
  std::vector<at::Tensor> dequantised;
  if (K > kCellPackRows && q8 && dt == at::kFloat) {
    for (size_t i = 0; i < weights.size(); ++i) {
      const auto s = scales.get(i);
      TORCH_CHECK_VALUE(s.has_value(), OP, ": int8 weights need a scale for every weight");
      dequantised.push_back(weights[i].to(at::kFloat).mul_(s->unsqueeze(1)).contiguous());
    }
    q8 = false;
  }
  const at::TensorList ws = dequantised.empty() ? weights : at::TensorList(dequantised);
  if (K > kCellPackRows && !q8) {
    if (dt == at::kFloat) {
      pack_weights(packed_f32, K, ws, head_wc);
    } else if (dt == at::kBFloat16) {
      pack_weights(packed_bf16, K, ws, head_wc);
    }
  }
  auto ids = at::empty({K, length}, at::kLong);
  int64_t* idp = ids.data_ptr<int64_t>();
  auto current = logits.contiguous();
  auto emb = embedding.contiguous();
  for (int64_t t = 0; t < length; ++t) {
    draw_rows(current, temperature, top_k, top_p, gen, idp + t, length);
    auto x = emb.index_select(0, ids.select(1, t));  // [K, E]
    for (int64_t l = 0; l < L; ++l) {
      const auto &w_ih = ws[2 * l], &w_hh = ws[2 * l + 1];
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
