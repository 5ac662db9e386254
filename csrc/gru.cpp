// GRU CPU kernels: gru_fwd, gru_bwd (whole sequence, time loop here) and
// gru_cell (one step, for sampling). Gate order r, z, n; G = 3H, with b_hn
// inside the reset product: n = tanh(x_n + r * (W_hn h + b_hn)).
#include "cell_steps.h"

namespace fastchar {
namespace {

// One step's pointwise pass for rows [b0, b1) and units [0, n) of a slice
// (pointers start at the slice's first unit). `acc` is h_{t-1} @ W_hh^T for the
// slice: row stride `acc_ld`, gate q at column q * `acc_gs`. `x` is the input
// side of the gates (x W_ih^T + b_ih + [b_hr, b_hz, 0]): gate q at column q * `x_gs`,
// rows of 3 * x_gs (x_gs = H for a projected sequence, the slice width n for a slice's
// own projection).
template <typename T, typename X>
FASTCHAR_CLONES void fwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const acc_t<T>* acc,
                              int64_t acc_ld, int64_t acc_gs, const X* x, int64_t x_gs,
                              const acc_t<T>* b_hn, const T* h_prev, T* gates, T* hn_out,
                              T* h_new) {
  using A = acc_t<T>;
  const int64_t G = 3 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const A* a = acc + b * acc_ld;
    const X* xr = x + b * 3 * x_gs;
    const T* hp = h_prev + b * H;
    T* g = gates + b * G;
    T* hnr = hn_out + b * H;
    T* h = h_new + b * H;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A r = sigmoid_act(a[j] + to_acc(xr[j]));
      A z = sigmoid_act(a[acc_gs + j] + to_acc(xr[x_gs + j]));
      A hn = a[2 * acc_gs + j] + b_hn[j];
      A nn = tanh_act(to_acc(xr[2 * x_gs + j]) + r * hn);
      g[j] = from_acc<T>(r);
      g[H + j] = from_acc<T>(z);
      g[2 * H + j] = from_acc<T>(nn);
      hnr[j] = from_acc<T>(hn);
      h[j] = from_acc<T>((A(1) - z) * nn + z * to_acc(hp[j]));
    }
  }
}

// One backward step for rows [b0, b1) and units [0, n) of a slice: reads dh
// (gradient from step t+1) and overwrites it with the direct path dh * z; the
// GEMM adds dgh @ W_hh after. dgh (rows of G) is the step's hidden-side
// gradient for that GEMM; only its n block differs from dxp (the reset gate
// scales it), so that block alone is also kept for the weight gradient, in
// dghn (rows of H).
template <typename T>
FASTCHAR_CLONES void bwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const T* grad_out,
                              const T* gates, const T* hn, const T* h_prev, acc_t<T>* dh,
                              T* dxp, T* dgh, T* dghn) {
  using A = acc_t<T>;
  const int64_t G = 3 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* go = grad_out + b * H;
    const T* g = gates + b * G;
    const T* hnr = hn + b * H;
    const T* hp = h_prev + b * H;
    A* dhr = dh + b * H;
    T* dx = dxp + b * G;
    T* dg = dgh + b * G;
    T* dgn = dghn + b * H;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A r = to_acc(g[j]), z = to_acc(g[H + j]), nn = to_acc(g[2 * H + j]);
      A dht = dhr[j] + to_acc(go[j]);
      A dn = dht * (A(1) - z) * (A(1) - nn * nn);
      A dz = dht * (to_acc(hp[j]) - nn) * z * (A(1) - z);
      A dr = dn * to_acc(hnr[j]) * r * (A(1) - r);
      dx[j] = from_acc<T>(dr);
      dx[H + j] = from_acc<T>(dz);
      dx[2 * H + j] = from_acc<T>(dn);
      dg[j] = from_acc<T>(dr);
      dg[H + j] = from_acc<T>(dz);
      dg[2 * H + j] = from_acc<T>(dn * r);
      dgn[j] = from_acc<T>(dn * r);
      dhr[j] = dht * z;
    }
  }
}

// The forward time loop over `st`'s steps ([T, B, ...] or packed [N, ...] buffers, as
// lstm.cpp's). Without w_ih, `in` is the projected input xp [T, B, G]. With
// w_ih [G, I], `in` is x [T, B, I]: each step projects x_t for its slice into a buffer of
// its own, started from the bias b_x [G] (b_ih + [b_hr, b_hz, 0], accumulation type),
// as lstm.cpp's fwd_loop does (the n gate needs x_n apart from the hidden side).
template <typename T>
void fwd_loop(const SeqSteps& st, const at::Tensor& in, const at::Tensor& h0,
              const at::Tensor& w_hh, const at::Tensor& b_hn, const at::Tensor* w_ih,
              const at::Tensor* b_x, at::Tensor& out, at::Tensor& gates, at::Tensor& hn) {
  using A = acc_t<T>;
  const int64_t B = st.B, G = w_hh.size(0), H = G / 3, K = in.size(-1);
  const T* in_p = in.const_data_ptr<T>();
  const A* bhn = b_hn.const_data_ptr<A>();
  const T* h0_p = h0.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  T* gates_p = gates.data_ptr<T>();
  T* hn_p = hn.data_ptr<T>();
  const UnitSlices slices(H, 3);
  if (w_ih != nullptr) {  // the input projection in the loop: GruSteps
    const GruSteps<T> steps(slices, B, *w_ih, w_hh, *b_x, b_hn);
    auto step = [&](int64_t s, int64_t t) {
      const int64_t m = st.rows[t], r = st.off[t];
      const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
      steps.step(s, m, in_p + r * K, K, h_prev, gates_p + r * G, hn_p + r * H, out_p + r * H);
    };
    slices.run(st.T, step, kNoWork);
    return;
  }
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/true);
  const auto acc_type = in.options().dtype(c10::CppTypeToScalarType<A>::value);
  std::vector<at::Tensor> accs;
  for (int64_t s = 0; s < slices.count; ++s) {
    accs.push_back(at::empty({B, 3 * slices.size(s)}, acc_type));
  }
  auto step = [&](int64_t s, int64_t t) {
    const int64_t j0 = slices.begin(s), n = slices.size(s), m = st.rows[t], r = st.off[t];
    const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
    A* acc = accs[s].template data_ptr<A>();
    slice_gemms.gemms[s].rows(m, h_prev, H, A(0), acc, 3 * n);  // [m, 3 n]
    fwd_rows<T, T>(0, m, n, H, acc, 3 * n, n, in_p + r * G + j0, H, bhn + j0, h_prev + j0,
                   gates_p + r * G + j0, hn_p + r * H + j0, out_p + r * H + j0);
  };
  slices.run(st.T, step, kNoWork);
}

template <typename T>
void bwd_loop(const SeqSteps& st, const at::Tensor& grad_out, const at::Tensor& w_hh,
              const at::Tensor& h0, const at::Tensor& out, const at::Tensor& gates,
              const at::Tensor& hn, at::Tensor& dh, at::Tensor& grad_xp, at::Tensor& grad_ghn) {
  using A = acc_t<T>;
  const int64_t T_ = st.T, B = st.B, G = gates.size(-1), H = G / 3;
  const T* go_p = grad_out.const_data_ptr<T>();
  const T* g_p = gates.const_data_ptr<T>();
  const T* hn_p = hn.const_data_ptr<T>();
  const T* out_p = out.const_data_ptr<T>();
  const T* h0_p = h0.const_data_ptr<T>();
  A* dh_p = dh.data_ptr<A>();
  T* dx_p = grad_xp.data_ptr<T>();
  T* dgn_p = grad_ghn.data_ptr<T>();
  // The step GEMM's input dgh_t [B, G], in two buffers that alternate by step:
  // a slice's pointwise pass for step t-1 may run while another thread's GEMM
  // still reads step t's (the barrier only separates pointwise from GEMM).
  auto dgh = at::empty({2, B, G}, grad_xp.options());  // [2, B, G]
  T* dg_p = dgh.data_ptr<T>();
  const UnitSlices slices(H, 3);
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/false);
  auto pointwise = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s), n = slices.size(s), r = st.off[t];
    const T* hp_t = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
    bwd_rows<T>(0, st.rows[t], n, H, go_p + r * H + j0, g_p + r * G + j0, hn_p + r * H + j0,
                hp_t + j0, dh_p + j0, dx_p + r * G + j0, dg_p + (t % 2) * B * G + j0,
                dgn_p + r * H + j0);
  };
  auto gemm = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s);
    // dh_{t-1}[:, slice] += dgh @ W_hh; a packed sequence's later rows keep grad_h_n
    slice_gemms.gemms[s].rows(st.rows[t], dg_p + (t % 2) * B * G, G, A(1), dh_p + j0, H);
  };
  slices.run(T_, pointwise, gemm);
}

// gru_fwd and gru_seq after their checks: the outputs, the time loop (with w_ih and the
// accumulation-type b_x for gru_seq, else nullptr) and the final state.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const SeqSteps& steps, const at::Tensor& in, const at::Tensor& h0, const at::Tensor& w_hh,
    const at::Tensor& b_hn, const at::Tensor* w_ih, const at::Tensor* b_x) {
  const auto dt = in.scalar_type();
  const int64_t G = w_hh.size(0), H = w_hh.size(1);
  auto out = empty_seq(steps.shape(H), in.options());  // [T, B, H] or [N, H]
  auto gates = empty_seq(steps.shape(G), in.options());  // [T, B, G] or [N, G]
  auto hn = empty_seq(steps.shape(H), in.options());  // [T, B, H] or [N, H]
  auto bhn = b_hn.to(state_type(dt)).contiguous();  // [H]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "gru_fwd", [&] {
    fwd_loop<scalar_t>(steps, in.contiguous(), h0.contiguous(), w_hh.contiguous(), bhn, w_ih,
                       b_x, out, gates, hn);
  });
  return {out, steps.T > 0 ? steps.finals(out) : h0.clone(), gates, hn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_fwd(const at::Tensor& xp,
                                                                   const at::Tensor& h0,
                                                                   const at::Tensor& w_hh,
                                                                   const at::Tensor& b_hn) {
  constexpr const char* OP = "fastchar::gru_fwd";
  CHECK_CPU(xp);
  CHECK_DIM(xp, 3);
  CHECK_FLOAT(xp);
  const auto dt = xp.scalar_type();
  const int64_t B = xp.size(1), G = xp.size(2), H = G / 3;
  TORCH_CHECK_VALUE(G % 3 == 0, OP, ": xp must be [T, B, 3H], got shape ", xp.sizes());
  check_sizes(OP, H);
  CHECK_ARG(h0, dt, B, H);
  CHECK_ARG(w_hh, dt, G, H);
  CHECK_ARG(b_hn, dt, H);
  return forward(SeqSteps(xp.size(0), B), xp, h0, w_hh, b_hn, nullptr, nullptr);
}

// gru_fwd with the input projection inside the time loop: x [T, B, I] (or packed [N, I]
// with batch_sizes), w_ih [G, I], b_x [G] (b_ih + [b_hr, b_hz, 0]) or none, b_hn [H]. Same
// outputs; backward is gru_bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_seq(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
    const std::optional<at::Tensor>& b_x, const at::Tensor& w_hh, const at::Tensor& b_hn,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::gru_seq";
  const SeqSteps steps = seq_steps(OP, "x", x, batch_sizes);
  const int64_t H = check_seq_args(OP, 3, x, steps, h0, w_ih, b_x, w_hh);
  CHECK_ARG(b_hn, x.scalar_type(), H);
  const auto w = w_ih.contiguous();
  const auto bx = bias_acc(b_x, std::nullopt, 3 * H, state_type(x.scalar_type()));  // [G]
  return forward(steps, x, h0, w_hh, b_hn, &w, &bx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_bwd(
    const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& out, const at::Tensor& gates, const at::Tensor& hn,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::gru_bwd";
  CHECK_CPU(gates);
  CHECK_FLOAT(gates);
  const SeqSteps steps = seq_steps(OP, "gates", gates, batch_sizes);
  const auto dt = gates.scalar_type();
  const int64_t B = steps.B, G = gates.size(-1), H = G / 3;
  TORCH_CHECK_VALUE(G % 3 == 0, OP, ": gates must be [T, B, 3H], got shape ", gates.sizes());
  check_sizes(OP, H);
  check_seq_shape(OP, "grad_out", grad_out, steps, H, dt);
  check_seq_shape(OP, "out", out, steps, H, dt);
  check_seq_shape(OP, "hn", hn, steps, H, dt);
  CHECK_ARG(grad_h_n, dt, B, H);
  CHECK_ARG(w_hh, dt, G, H);
  CHECK_ARG(h0, dt, B, H);

  auto dh = at::empty({B, H}, gates.options().dtype(state_type(dt))).copy_(grad_h_n);  // [B, H]
  auto grad_xp = empty_seq(steps.shape(G), gates.options());  // [T, B, G] or [N, G]
  auto grad_ghn = empty_seq(steps.shape(H), gates.options());  // [T, B, H] or [N, H]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "gru_bwd", [&] {
    bwd_loop<scalar_t>(steps, grad_out.contiguous(), w_hh.contiguous(), h0.contiguous(),
                       out.contiguous(), gates.contiguous(), hn.contiguous(), dh, grad_xp,
                       grad_ghn);
  });
  return {grad_xp, grad_ghn, dh.to(dt)};
}

at::Tensor gru_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                    const std::optional<at::Tensor>& b_hh,
                    const std::optional<at::Tensor>& s_ih, const std::optional<at::Tensor>& s_hh) {
  constexpr const char* OP = "fastchar::gru_cell";
  const int64_t H = check_cell_args(OP, 3, x, h, w_ih, w_hh, b_ih, b_hh, s_ih, s_hh);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0), G = 3 * H;

  const auto st = state_type(dt);
  const auto [b_x, b_hn] = gru_biases(b_ih, b_hh, H, st);  // [G], [H]
  auto gx = at::empty({B, G}, x.options().dtype(st));  // [B, G]
  auto gh = at::empty({B, G}, x.options().dtype(st));  // [B, G]
  auto h_new = at::empty({B, H}, x.options());
  auto gates = at::empty({B, G}, x.options());
  auto hn = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "gru_cell", [&] {
    using A = acc_t<scalar_t>;
    A* gxp = gx.data_ptr<A>();
    A* ghp = gh.data_ptr<A>();
    cell_products<scalar_t>(x, w_ih, s_ih, gxp, h, w_hh, s_hh, ghp, false, G);
    const A* bx = b_x.const_data_ptr<A>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < G; ++j) {
        gxp[b * G + j] += bx[j];
      }
    }
    const A* bhn = b_hn.const_data_ptr<A>();
    auto hc = h.contiguous();
    const scalar_t* hp = hc.const_data_ptr<scalar_t>();
    scalar_t* gp = gates.data_ptr<scalar_t>();
    scalar_t* hnp = hn.data_ptr<scalar_t>();
    scalar_t* hout = h_new.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      fwd_rows<scalar_t, A>(b0, b1, H, H, ghp, G, H, gxp, H, bhn, hp, gp, hnp, hout);
    });
  });
  return h_new;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> gru_biases(const std::optional<at::Tensor>& b_ih,
                                             const std::optional<at::Tensor>& b_hh, int64_t H,
                                             at::ScalarType acc) {
  auto b_x = bias_acc(b_ih, std::nullopt, 3 * H, acc);  // [3H]
  auto b_hn = at::zeros({H}, at::dtype(acc));  // [H]
  if (b_hh.has_value()) {
    b_x.narrow(0, 0, 2 * H).add_(b_hh->narrow(0, 0, 2 * H).to(acc));
    b_hn.add_(b_hh->narrow(0, 2 * H, H).to(acc));
  }
  return {b_x, b_hn};
}

template <typename T>
GruSteps<T>::GruSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const at::Tensor& b_x, const at::Tensor& b_hn,
                      const std::optional<at::Tensor>& s_ih,
                      const std::optional<at::Tensor>& s_hh)
    : p_(slices, B, w_ih, w_hh, s_ih, s_hh), b_x_(b_x), b_hn_(b_hn) {
  for (const auto& acc : p_.accs) {
    x_accs_.push_back(at::empty_like(acc));
  }
}

template <typename T>
void GruSteps<T>::step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, T* gates,
                       T* hn, T* h_new) const {
  const int64_t j0 = p_.slices.begin(s), n = p_.slices.size(s), H = p_.H;
  A* acc = p_.accs[s].template data_ptr<A>();
  A* ax = x_accs_[s].template data_ptr<A>();  // [m, 3 n]: b_x, then += x_t @ W_ih^T
  const A* bx = b_x_.const_data_ptr<A>();
  p_.hidden.rows(s, m, h_prev, H, A(0), acc, 3 * n);  // [m, 3 n]
  for (int64_t b = 0; b < m; ++b) {
    for (int64_t q = 0; q < 3; ++q) {
      std::memcpy(ax + (b * 3 + q) * n, bx + q * H + j0, n * sizeof(A));
    }
  }
  p_.input.rows(s, m, x, ldx, A(1), ax, 3 * n);
  fwd_rows<T, A>(0, m, n, H, acc, 3 * n, n, ax, n, b_hn_.const_data_ptr<A>() + j0, h_prev + j0,
                 gates + j0, hn + j0, h_new + j0);
}

template class GruSteps<float>;
template class GruSteps<double>;
template class GruSteps<at::BFloat16>;

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("gru_fwd", &gru_fwd);
  m.impl("gru_seq", &gru_seq);
  m.impl("gru_bwd", &gru_bwd);
  m.impl("gru_cell", &gru_cell);
}

}  // namespace fastchar
