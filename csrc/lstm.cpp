// LSTM CPU kernels: lstm_fwd, lstm_bwd (whole sequence, time loop here) and
// lstm_cell (one step, for sampling). Gate order i, f, g, o; G = 4H.
// Per step and thread: one GEMM against the thread's slice of W_hh into an
// accumulation-type buffer, then one fused pointwise pass over its units.
#include "cell_steps.h"

namespace fastchar {
namespace {

// One step's pointwise pass for rows [b0, b1) and hidden units [0, n) of a
// slice (pointers start at the slice's first unit). `acc` is h @ W_hh^T for the
// slice: row stride `acc_ld`, gate q at column q * `acc_gs`. `x` holds the
// input side of the gates (gate q at q * H) with row stride `xs` (G for a
// projected sequence, 0 for a broadcast bias vector). gates: rows of G; states
// and outputs: rows of H.
template <typename T, typename X>
FASTCHAR_CLONES void fwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const acc_t<T>* acc,
                              int64_t acc_ld, int64_t acc_gs, const X* x, int64_t xs,
                              const acc_t<T>* c_prev, T* gates, acc_t<T>* c_new, T* h_new) {
  using A = acc_t<T>;
  const int64_t G = 4 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const A* a = acc + b * acc_ld;
    const X* xr = x + b * xs;
    const A* cp = c_prev + b * H;
    T* g = gates + b * G;
    A* cn = c_new + b * H;
    T* h = h_new + b * H;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A gi = sigmoid_act(a[j] + to_acc(xr[j]));
      A gf = sigmoid_act(a[acc_gs + j] + to_acc(xr[H + j]));
      A gg = tanh_act(a[2 * acc_gs + j] + to_acc(xr[2 * H + j]));
      A go = sigmoid_act(a[3 * acc_gs + j] + to_acc(xr[3 * H + j]));
      A c = gf * cp[j] + gi * gg;
      g[j] = from_acc<T>(gi);
      g[H + j] = from_acc<T>(gf);
      g[2 * H + j] = from_acc<T>(gg);
      g[3 * H + j] = from_acc<T>(go);
      cn[j] = c;
      h[j] = from_acc<T>(go * tanh_act(c));
    }
  }
}

// One backward step for rows [b0, b1) and units [0, n) of a slice: dh (in:
// gradient from step t+1, before grad_out is added) and dc (in/out) are
// accumulation-type; writes dgates. Without kGradOut (grad_out unused) dh is the whole
// gradient of o * tanh(c): an LSTM projection's dr = dh_t @ W_hr. With kBias, db (gate q
// at q * H, accumulation type) gets every row's dgates as stored: the bias gradient, summed
// while the rows are in registers instead of in a pass of its own over [T, B, G] (one
// running sum over the T * B rows, where torch's sum adds in a cascade: the same to
// float32 rounding per add, a little less accurate over very many rows).
template <typename T, bool kGradOut = true, bool kBias = false>
FASTCHAR_CLONES void bwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const T* grad_out,
                              const T* gates, const acc_t<T>* c, const acc_t<T>* c_prev,
                              const acc_t<T>* dh, acc_t<T>* dc, T* dgates,
                              acc_t<T>* db = nullptr) {
  using A = acc_t<T>;
  const int64_t G = 4 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* go_ = kGradOut ? grad_out + b * H : nullptr;
    const T* g = gates + b * G;
    const A* cr = c + b * H;
    const A* cp = c_prev + b * H;
    const A* dhr = dh + b * H;
    A* dcr = dc + b * H;
    T* d = dgates + b * G;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A gi = to_acc(g[j]), gf = to_acc(g[H + j]), gg = to_acc(g[2 * H + j]), go = to_acc(g[3 * H + j]);
      A dht = dhr[j];
      if constexpr (kGradOut) {
        dht += to_acc(go_[j]);
      }
      A tc = tanh_act(cr[j]);
      A dcv = dcr[j] + dht * go * (A(1) - tc * tc);
      d[j] = from_acc<T>(dcv * gg * gi * (A(1) - gi));
      d[H + j] = from_acc<T>(dcv * cp[j] * gf * (A(1) - gf));
      d[2 * H + j] = from_acc<T>(dcv * gi * (A(1) - gg * gg));
      d[3 * H + j] = from_acc<T>(dht * tc * go * (A(1) - go));
      dcr[j] = dcv * gf;
      if constexpr (kBias) {
        for (int64_t q = 0; q < 4; ++q) {
          db[q * H + j] += to_acc(d[q * H + j]);
        }
      }
    }
  }
}

// The forward time loop over `st`'s steps (rows of the sequence buffers: [T, B, ...] or
// packed [N, ...]). Without w_ih, `in` is the projected input xp [T, B, G] (biases
// included). With w_ih [G, I], `in` is x [T, B, I] and each step first runs
// x_t @ W_ih^T for its slice on the step engines, then adds h_{t-1} @ W_hh^T and the
// bias [G] (accumulation type) in the gate pass: the input projection at the step
// engines' rate (2x MKL's at K = I = 64..128 on an AMD EPYC Zen 4) and no [T, B, G]
// buffer for it.
template <typename T>
void fwd_loop(const SeqSteps& st, const at::Tensor& in, const at::Tensor& h0,
              const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor* w_ih,
              const at::Tensor* bias, at::Tensor& out, at::Tensor& gates, at::Tensor& cs) {
  using A = acc_t<T>;
  const int64_t B = st.B, G = w_hh.size(0), H = G / 4, K = in.size(-1);
  const T* in_p = in.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  T* gates_p = gates.data_ptr<T>();
  A* cs_p = cs.data_ptr<A>();
  const UnitSlices slices(H, 4);
  const T* h0_p = h0.const_data_ptr<T>();
  const A* c0_p = c0.const_data_ptr<A>();
  if (w_ih != nullptr) {  // the input projection in the loop: LstmSteps
    const LstmSteps<T> steps(slices, B, *w_ih, w_hh, *bias);
    auto input_half = [&](int64_t s, int64_t t) {
      steps.input_half(s, st.rows[t], in_p + st.off[t] * K, K);
    };
    auto step = [&](int64_t s, int64_t t) {
      const int64_t m = st.rows[t], r = st.off[t];
      const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
      const A* c_prev = t > 0 ? cs_p + st.off[t - 1] * H : c0_p;
      if (t == 0) {
        input_half(s, 0);
      }
      steps.hidden_half(s, m, h_prev, c_prev, gates_p + r * G, cs_p + r * H, out_p + r * H);
    };
    // x_{t+1}'s product runs while the other threads finish step t.
    auto next_input = [&](int64_t s, int64_t t) {
      if (t + 1 < st.T) {
        input_half(s, t + 1);
      }
    };
    slices.run(st.T, step, kNoWork, false, next_input);
    return;
  }
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/true);
  std::vector<at::Tensor> accs;
  for (int64_t s = 0; s < slices.count; ++s) {
    const int64_t n = slices.size(s);
    accs.push_back(at::empty({B, 4 * n}, in.options().dtype(c10::CppTypeToScalarType<A>::value)));
  }
  auto step = [&](int64_t s, int64_t t) {
    const int64_t j0 = slices.begin(s), n = slices.size(s), m = st.rows[t], r = st.off[t];
    const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
    const A* c_prev = t > 0 ? cs_p + st.off[t - 1] * H : c0_p;
    A* acc = accs[s].template data_ptr<A>();
    slice_gemms.gemms[s].rows(m, h_prev, H, A(0), acc, 4 * n);  // [m, 4 n]
    fwd_rows<T, T>(0, m, n, H, acc, 4 * n, n, in_p + r * G + j0, G, c_prev + j0,
                   gates_p + r * G + j0, cs_p + r * H + j0, out_p + r * H + j0);
  };
  slices.run(st.T, step, kNoWork);
}

template <typename T>
void bwd_loop(const SeqSteps& st, const at::Tensor& grad_out, const at::Tensor& w_hh,
              const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cs,
              at::Tensor& dh, at::Tensor& dc, at::Tensor& grad_xp, at::Tensor* db) {
  using A = acc_t<T>;
  const int64_t T_ = st.T, B = st.B, G = gates.size(-1), H = G / 4;
  const T* go_p = grad_out.const_data_ptr<T>();
  const T* g_p = gates.const_data_ptr<T>();
  const A* cs_p = cs.const_data_ptr<A>();
  const A* c0_p = c0.const_data_ptr<A>();
  A* dh_p = dh.data_ptr<A>();
  A* dc_p = dc.data_ptr<A>();
  T* dx_p = grad_xp.data_ptr<T>();
  A* db_p = db != nullptr ? db->data_ptr<A>() : nullptr;  // [G]: slice s owns its columns
  const UnitSlices slices(H, 4);
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/false);
  // Step t's pointwise pass needs only the slice's own columns of dh; the GEMM for
  // dh_{t-1}[:, slice] needs every slice's dgates_t, hence the barrier. A packed
  // sequence's rows past step t's own keep dh and dc as they came in (grad_h_n, grad_c_n)
  // until the step that is their last.
  auto pointwise = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s), n = slices.size(s), r = st.off[t];
    const A* cp_t = t > 0 ? cs_p + st.off[t - 1] * H : c0_p;
    auto rows = [&](auto bias) {  // bias: std::bool_constant, whether db is summed
      bwd_rows<T, true, decltype(bias)::value>(
          0, st.rows[t], n, H, go_p + r * H + j0, g_p + r * G + j0, cs_p + r * H + j0,
          cp_t + j0, dh_p + j0, dc_p + j0, dx_p + r * G + j0, bias ? db_p + j0 : nullptr);
    };
    db_p != nullptr ? rows(std::true_type{}) : rows(std::false_type{});
  };
  auto gemm = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s);
    // dh_{t-1}[:, slice]
    slice_gemms.gemms[s].rows(st.rows[t], dx_p + st.off[t] * G, G, A(0), dh_p + j0, H);
  };
  slices.run(T_, pointwise, gemm);
}

// An LSTM with a projection (torch.nn.LSTM's proj_size P): r_t = o_t * tanh(c_t) [B, H],
// h_t = r_t @ W_hr^T [B, P], and the gates read h_{t-1} through W_hh [G, P]. Each step
// runs in two halves, each split over the threads: the gates of the thread's H units
// (x_t @ W_ih^T + h_{t-1} @ W_hh^T and the gate pass, writing r_t), a barrier, then the
// thread's P columns of h_t = r_t @ W_hr^T, and a barrier. `rs` keeps every r_t for
// dW_hr. Buffers are rows of `st` as in fwd_loop; x is the raw input [.., I].
template <typename T>
void fwd_loop_proj(const SeqSteps& st, const at::Tensor& x, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& bias,
                   const at::Tensor& w_hh, const at::Tensor& w_hr, at::Tensor& out,
                   at::Tensor& gates, at::Tensor& cs, at::Tensor& rs) {
  using A = acc_t<T>;
  const int64_t B = st.B, G = w_hh.size(0), H = G / 4, P = w_hr.size(0), K = x.size(-1);
  const T* x_p = x.const_data_ptr<T>();
  const T* h0_p = h0.const_data_ptr<T>();
  const A* c0_p = c0.const_data_ptr<A>();
  T* out_p = out.data_ptr<T>();
  T* gates_p = gates.data_ptr<T>();
  A* cs_p = cs.data_ptr<A>();
  T* rs_p = rs.data_ptr<T>();
  const UnitSlices slices(H, 4);
  const UnitSlices cols(P, 1, slices.count);
  const LstmSteps<T> steps(slices, B, w_ih, w_hh, bias);  // h_{t-1} [., P] in, r_t [., H] out
  const SliceGemms<T> proj_gemms(cols, w_hr, B, /*forward=*/true);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  std::vector<at::Tensor> proj_accs;
  for (int64_t s = 0; s < cols.count; ++s) {
    proj_accs.push_back(at::empty({B, cols.size(s)}, acc_options));
  }
  auto gate_half = [&](int64_t s, int64_t t) {
    const int64_t m = st.rows[t], r = st.off[t];
    const T* h_prev = t > 0 ? out_p + st.off[t - 1] * P : h0_p;
    const A* c_prev = t > 0 ? cs_p + st.off[t - 1] * H : c0_p;
    steps.step(s, m, x_p + r * K, K, h_prev, c_prev, gates_p + r * G, cs_p + r * H,
               rs_p + r * H);
  };
  auto proj_half = [&](int64_t s, int64_t t) {
    if (s >= cols.count) {
      return;
    }
    const int64_t p0 = cols.begin(s), np = cols.size(s), m = st.rows[t], r = st.off[t];
    A* acc = proj_accs[s].template data_ptr<A>();
    proj_gemms.gemms[s].rows(m, rs_p + r * H, H, A(0), acc, np);  // r_t @ W_hr[cols]^T
    for (int64_t b = 0; b < m; ++b) {
      T* h = out_p + (r + b) * P + p0;
      const A* a = acc + b * np;
#pragma omp simd
      for (int64_t j = 0; j < np; ++j) {
        h[j] = from_acc<T>(a[j]);
      }
    }
  };
  slices.run(st.T, gate_half, proj_half, /*sync_after=*/true);
}

// The backward of fwd_loop_proj, step by step from the last: dhs_t (the whole gradient of
// h_t [.., P], kept for dW_hr) gives dr_t = dhs_t @ W_hr for the thread's H units and
// their gate pass (dgates_t), a barrier, then the thread's P columns of dhs_{t-1} =
// dgates_t @ W_hh + grad_out_{t-1} (+ grad_h_n on a packed sequence's rows whose last
// step is t-1), and a barrier. dc [B, H] starts as grad_c_n; dh0 [B, P] gets dgates_0 @ W_hh.
template <typename T>
void bwd_loop_proj(const SeqSteps& st, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                   const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& c0,
                   const at::Tensor& gates, const at::Tensor& cs, at::Tensor& dc,
                   at::Tensor& dh0, at::Tensor& grad_xp, at::Tensor& dhs) {
  using A = acc_t<T>;
  const int64_t T_ = st.T, B = st.B, G = gates.size(-1), H = G / 4, P = w_hr.size(0);
  const T* go_p = grad_out.const_data_ptr<T>();
  const T* ghn_p = grad_h_n.const_data_ptr<T>();
  const T* g_p = gates.const_data_ptr<T>();
  const A* cs_p = cs.const_data_ptr<A>();
  const A* c0_p = c0.const_data_ptr<A>();
  A* dc_p = dc.data_ptr<A>();
  A* dh0_p = dh0.data_ptr<A>();
  T* dx_p = grad_xp.data_ptr<T>();
  T* dhs_p = dhs.data_ptr<T>();
  const UnitSlices slices(H, 4);
  const UnitSlices cols(P, 1, slices.count);
  const SliceGemms<T> dr_gemms(slices, w_hr, B, /*forward=*/false);  // [., P] @ W_hr[:, units]
  const SliceGemms<T> dh_gemms(cols, w_hh, B, /*forward=*/false);  // [., G] @ W_hh[:, cols]
  const auto acc_options = gates.options().dtype(c10::CppTypeToScalarType<A>::value);
  auto dr = at::empty({B, H}, acc_options);
  A* dr_p = dr.template data_ptr<A>();
  std::vector<at::Tensor> accs;
  for (int64_t s = 0; s < cols.count; ++s) {
    accs.push_back(at::empty({B, cols.size(s)}, acc_options));
  }
  // dhs_{T-1} = grad_out_{T-1} + grad_h_n for the rows of the last step
  {
    const int64_t r = st.off[T_ - 1];
    for (int64_t b = 0; b < st.rows[T_ - 1]; ++b) {
      for (int64_t j = 0; j < P; ++j) {
        dhs_p[(r + b) * P + j] = from_acc<T>(to_acc(go_p[(r + b) * P + j]) + to_acc(ghn_p[b * P + j]));
      }
    }
  }
  auto gate_half = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s), n = slices.size(s), m = st.rows[t];
    const int64_t r = st.off[t];
    const A* cp_t = t > 0 ? cs_p + st.off[t - 1] * H : c0_p;
    dr_gemms.gemms[s].rows(m, dhs_p + r * P, P, A(0), dr_p + j0, H);  // dr_t[:, units]
    bwd_rows<T, false>(0, m, n, H, nullptr, g_p + r * G + j0, cs_p + r * H + j0, cp_t + j0,
                       dr_p + j0, dc_p + j0, dx_p + r * G + j0);
  };
  auto state_half = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i;
    if (s >= cols.count) {
      return;
    }
    const int64_t p0 = cols.begin(s), np = cols.size(s), m = st.rows[t];
    A* acc = accs[s].template data_ptr<A>();
    dh_gemms.gemms[s].rows(m, dx_p + st.off[t] * G, G, A(0), acc, np);  // dgates_t @ W_hh[:, cols]
    if (t == 0) {  // every sequence has step 0: m = B
      for (int64_t b = 0; b < m; ++b) {
        std::copy_n(acc + b * np, np, dh0_p + b * P + p0);
      }
      return;
    }
    const int64_t r = st.off[t - 1];
    for (int64_t b = 0; b < st.rows[t - 1]; ++b) {
      T* d = dhs_p + (r + b) * P + p0;
      const T* go = go_p + (r + b) * P + p0;
      const T* ghn = ghn_p + b * P + p0;
      const A* a = acc + b * np;
      if (b < m) {
#pragma omp simd
        for (int64_t j = 0; j < np; ++j) {
          d[j] = from_acc<T>(a[j] + to_acc(go[j]));
        }
      } else {  // sequence b's last step is t - 1
        for (int64_t j = 0; j < np; ++j) {
          d[j] = from_acc<T>(to_acc(ghn[j]) + to_acc(go[j]));
        }
      }
    }
  };
  slices.run(T_, gate_half, state_half, /*sync_after=*/true);
}

// lstm_fwd and lstm_seq after their checks: the outputs, the time loop (with w_ih and the
// accumulation-type bias for lstm_seq, else nullptr) and the final states.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const SeqSteps& steps, const at::Tensor& in, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const at::Tensor* w_ih, const at::Tensor* bias) {
  const auto dt = in.scalar_type(), st = state_type(dt);
  const int64_t G = w_hh.size(0), H = w_hh.size(1);
  auto out = empty_seq(steps.shape(H), in.options());  // [T, B, H] or [N, H]
  auto gates = empty_seq(steps.shape(G), in.options());  // [T, B, G] or [N, G]
  auto cs = empty_seq(steps.shape(H), in.options().dtype(st));  // [T, B, H] or [N, H]
  auto c0s = c0.to(st).contiguous();  // [B, H]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstm_fwd", [&] {
    fwd_loop<scalar_t>(steps, in.contiguous(), h0.contiguous(), c0s, w_hh.contiguous(), w_ih,
                       bias, out, gates, cs);
  });
  if (steps.T == 0) {
    return {out, h0.clone(), c0.clone(), gates, cs};
  }
  return {out, steps.finals(out), steps.finals(cs).to(dt), gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_fwd(
    const at::Tensor& xp, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh) {
  constexpr const char* OP = "fastchar::lstm_fwd";
  CHECK_CPU(xp);
  CHECK_DIM(xp, 3);
  CHECK_FLOAT(xp);
  const auto dt = xp.scalar_type();
  const int64_t B = xp.size(1), G = xp.size(2), H = G / 4;
  TORCH_CHECK_VALUE(G % 4 == 0, OP, ": xp must be [T, B, 4H], got shape ", xp.sizes());
  check_sizes(OP, H);
  CHECK_ARG(h0, dt, B, H);
  CHECK_ARG(c0, dt, B, H);
  CHECK_ARG(w_hh, dt, G, H);
  return forward(SeqSteps(xp.size(0), B), xp, h0, c0, w_hh, nullptr, nullptr);
}

// lstm_fwd with the input projection inside the time loop: x [T, B, I] (or packed [N, I]
// with batch_sizes), w_ih [G, I], bias [G] (b_ih + b_hh) or none. Same outputs (packed
// [N, ...] for a packed x; h_n, c_n each sequence's state after its own last step);
// backward is lstm_bwd, whose grad_xp is the gradient of x @ W_ih^T + bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_seq(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const std::optional<at::Tensor>& bias, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::lstm_seq";
  const SeqSteps steps = seq_steps(OP, "x", x, batch_sizes);
  const int64_t H = check_seq_args(OP, 4, x, steps, h0, w_ih, bias, w_hh);
  CHECK_ARG(c0, x.scalar_type(), steps.B, H);
  const auto w = w_ih.contiguous();
  const auto b = bias_acc(bias, std::nullopt, 4 * H, state_type(x.scalar_type()));  // [G]
  return forward(steps, x, h0, c0, w_hh, &w, &b);
}

// bias_grad: also the gradient of the bias [G] (of x @ W_ih^T + bias: grad_xp summed over
// its rows), accumulated inside the time loop; else grad_bias is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cs,
    const std::optional<at::Tensor>& batch_sizes, bool bias_grad) {
  constexpr const char* OP = "fastchar::lstm_bwd";
  CHECK_CPU(gates);
  CHECK_FLOAT(gates);
  const SeqSteps steps = seq_steps(OP, "gates", gates, batch_sizes);
  const auto dt = gates.scalar_type();
  const int64_t B = steps.B, G = gates.size(-1), H = G / 4;
  TORCH_CHECK_VALUE(G % 4 == 0, OP, ": gates must be [T, B, 4H], got shape ", gates.sizes());
  check_sizes(OP, H);
  const auto st = state_type(dt);
  check_seq_shape(OP, "grad_out", grad_out, steps, H, dt);
  check_seq_shape(OP, "cs", cs, steps, H, st);
  CHECK_ARG(grad_h_n, dt, B, H);
  CHECK_ARG(grad_c_n, dt, B, H);
  CHECK_ARG(w_hh, dt, G, H);
  CHECK_ARG(c0, dt, B, H);

  auto dh = at::empty({B, H}, gates.options().dtype(st)).copy_(grad_h_n);  // [B, H]
  auto dc = at::empty({B, H}, gates.options().dtype(st)).copy_(grad_c_n);  // [B, H]
  auto grad_xp = empty_seq(steps.shape(G), gates.options());  // [T, B, G] or [N, G]
  auto c0s = c0.to(st).contiguous();
  auto db = at::zeros({bias_grad ? G : 0}, gates.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstm_bwd", [&] {
    bwd_loop<scalar_t>(steps, grad_out.contiguous(), w_hh.contiguous(), c0s, gates.contiguous(),
                       cs.contiguous(), dh, dc, grad_xp, bias_grad ? &db : nullptr);
  });
  return {grad_xp, dh.to(dt), dc.to(dt), db.to(dt)};
}

// lstm_seq with a projection w_hr [P, H] (torch.nn.LSTM's proj_size): x [T, B, I] or
// packed [N, I], h0 [B, P], c0 [B, H], w_hh [G, P]. Returns lstm_seq's outputs (out and
// h_n P wide) and rs [.., H], every r_t = o_t * tanh(c_t), for dW_hr; backward is lstmp_bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstmp_seq(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const std::optional<at::Tensor>& bias, const at::Tensor& w_hh, const at::Tensor& w_hr,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::lstmp_seq";
  const SeqSteps steps = seq_steps(OP, "x", x, batch_sizes);
  const int64_t H = check_seq_args(OP, 4, x, steps, h0, w_ih, bias, w_hh, &w_hr);
  const auto dt = x.scalar_type(), st = state_type(dt);
  CHECK_ARG(c0, dt, steps.B, H);
  const int64_t G = 4 * H, P = w_hr.size(0);
  auto out = empty_seq(steps.shape(P), x.options());  // [T, B, P] or [N, P]
  auto gates = empty_seq(steps.shape(G), x.options());
  auto cs = empty_seq(steps.shape(H), x.options().dtype(st));
  auto rs = empty_seq(steps.shape(H), x.options());
  const auto b = bias_acc(bias, std::nullopt, G, st);  // [G]
  auto c0s = c0.to(st).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstmp_seq", [&] {
    fwd_loop_proj<scalar_t>(steps, x.contiguous(), h0.contiguous(), c0s, w_ih.contiguous(), b,
                            w_hh.contiguous(), w_hr.contiguous(), out, gates, cs, rs);
  });
  if (steps.T == 0) {
    return {out, h0.clone(), c0.clone(), gates, cs, rs};
  }
  return {out, steps.finals(out), steps.finals(cs).to(dt), gates, cs, rs};
}

// The backward of lstmp_seq: grad_xp [.., G] (the gradient of x @ W_ih^T + bias), grad_h0
// [B, P], grad_c0 [B, H] and grad_hs [.., P], the whole gradient of every h_t (dW_hr =
// grad_hs^T rs).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstmp_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& w_hr, const at::Tensor& c0, const at::Tensor& gates,
    const at::Tensor& cs, const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::lstmp_bwd";
  CHECK_CPU(gates);
  CHECK_FLOAT(gates);
  const SeqSteps steps = seq_steps(OP, "gates", gates, batch_sizes);
  const auto dt = gates.scalar_type(), st = state_type(dt);
  CHECK_CPU(w_hr);
  CHECK_DIM(w_hr, 2);
  const int64_t B = steps.B, P = w_hr.size(0), H = w_hr.size(1), G = 4 * H;
  check_sizes(OP, H);
  check_seq_shape(OP, "gates", gates, steps, G, dt);
  check_seq_shape(OP, "grad_out", grad_out, steps, P, dt);
  check_seq_shape(OP, "cs", cs, steps, H, st);
  CHECK_ARG(w_hr, dt, P, H);
  CHECK_ARG(w_hh, dt, G, P);
  CHECK_ARG(grad_h_n, dt, B, P);
  CHECK_ARG(grad_c_n, dt, B, H);
  CHECK_ARG(c0, dt, B, H);

  auto dc = at::empty({B, H}, gates.options().dtype(st)).copy_(grad_c_n);
  auto dh0 = at::empty({B, P}, gates.options().dtype(st));
  auto grad_xp = empty_seq(steps.shape(G), gates.options());
  auto dhs = empty_seq(steps.shape(P), gates.options());
  if (steps.T == 0) {  // nothing ran: the final states' gradients are the initial ones'
    return {grad_xp, grad_h_n.clone(), grad_c_n.clone(), dhs};
  }
  auto c0s = c0.to(st).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstmp_bwd", [&] {
    bwd_loop_proj<scalar_t>(steps, grad_out.contiguous(), grad_h_n.contiguous(),
                            w_hh.contiguous(), w_hr.contiguous(), c0s, gates.contiguous(),
                            cs.contiguous(), dc, dh0, grad_xp, dhs);
  });
  return {grad_xp, dh0.to(dt), dc.to(dt), dhs};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell(const at::Tensor& x, const at::Tensor& h,
                                             const at::Tensor& c, const at::Tensor& w_ih,
                                             const at::Tensor& w_hh,
                                             const std::optional<at::Tensor>& b_ih,
                                             const std::optional<at::Tensor>& b_hh,
                    const std::optional<at::Tensor>& s_ih, const std::optional<at::Tensor>& s_hh) {
  constexpr const char* OP = "fastchar::lstm_cell";
  const int64_t H = check_cell_args(OP, 4, x, h, w_ih, w_hh, b_ih, b_hh, s_ih, s_hh);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), G = 4 * H;
  CHECK_ARG(c, dt, B, H);

  const auto st = state_type(dt);
  auto bias = bias_acc(b_ih, b_hh, G, st);  // [G]
  auto acc = at::empty({B, G}, x.options().dtype(st));  // [B, G]
  auto c_old = c.to(st).contiguous();
  auto c_new = at::empty({B, H}, x.options().dtype(st));
  auto h_new = at::empty({B, H}, x.options());
  auto gates = at::empty({B, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstm_cell", [&] {
    using A = acc_t<scalar_t>;
    A* a = acc.data_ptr<A>();
    cell_products<scalar_t>(x, w_ih, s_ih, a, h, w_hh, s_hh, a, true, G);
    const A* bp = bias.const_data_ptr<A>();
    const A* cp = c_old.const_data_ptr<A>();
    scalar_t* gp = gates.data_ptr<scalar_t>();
    A* cn = c_new.data_ptr<A>();
    scalar_t* hn = h_new.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      fwd_rows<scalar_t, A>(b0, b1, H, H, a, G, H, bp, 0, cp, gp, cn, hn);
    });
  });
  return {h_new, c_new.to(dt)};
}

}  // namespace

template <typename T>
LstmSteps<T>::LstmSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const at::Tensor& bias,
                        const std::optional<at::Tensor>& s_ih,
                        const std::optional<at::Tensor>& s_hh)
    : p_(slices, B, w_ih, w_hh, s_ih, s_hh), bias_(bias) {}

template <typename T>
void LstmSteps<T>::hidden_half(int64_t s, int64_t m, const T* h_prev, const A* c_prev, T* gates,
                               A* c_new, T* h_new) const {
  const int64_t j0 = p_.slices.begin(s), n = p_.slices.size(s);
  const A* acc = p_.hidden_half(s, m, h_prev);  // [m, 4 n]
  fwd_rows<T, A>(0, m, n, p_.H, acc, 4 * n, n, bias_.const_data_ptr<A>() + j0, 0, c_prev + j0,
                 gates + j0, c_new + j0, h_new + j0);
}

template class LstmSteps<float>;
template class LstmSteps<double>;
template class LstmSteps<at::BFloat16>;

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("lstm_fwd", &lstm_fwd);
  m.impl("lstm_seq", &lstm_seq);
  m.impl("lstm_bwd", &lstm_bwd);
  m.impl("lstmp_seq", &lstmp_seq);
  m.impl("lstmp_bwd", &lstmp_bwd);
  m.impl("lstm_cell", &lstm_cell);
}

}  // namespace fastchar
