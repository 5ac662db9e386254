// Elman RNN CPU kernels (tanh or relu): rnn_fwd, rnn_bwd (whole sequence, time
// loop here) and rnn_cell (one step, for sampling). G = H.
#include "cell_steps.h"

namespace fastchar {
namespace {

// h = act(acc + x) for rows [b0, b1) and units [0, n) of a slice (pointers
// start at the slice's first unit); `acc` has row stride `acc_ld`, `x` row
// stride `xs` (H, or 0 for a broadcast bias vector), h rows of H.
template <typename T, typename X, bool RELU>
FASTCHAR_CLONES void fwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const acc_t<T>* acc,
                              int64_t acc_ld, const X* x, int64_t xs, T* h_new) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    const A* a = acc + b * acc_ld;
    const X* xr = x + b * xs;
    T* h = h_new + b * H;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A pre = a[j] + to_acc(xr[j]);
      h[j] = from_acc<T>(RELU ? relu_act(pre) : tanh_act(pre));
    }
  }
}

// dpre = (dh + grad_out) * act'(pre), with act' taken from the output h; rows
// [b0, b1), units [0, n) of a slice.
template <typename T, bool RELU>
FASTCHAR_CLONES void bwd_rows(int64_t b0, int64_t b1, int64_t n, int64_t H, const T* grad_out,
                              const T* out, const acc_t<T>* dh, T* dpre) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; ++b) {
    const T* go = grad_out + b * H;
    const T* h = out + b * H;
    const A* dhr = dh + b * H;
    T* d = dpre + b * H;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A dht = dhr[j] + to_acc(go[j]);
      A hv = to_acc(h[j]);
      // relu': torch's threshold_backward, 0 where h <= 0 (a NaN h passes the gradient on)
      d[j] = from_acc<T>(RELU ? (hv <= A(0) ? A(0) : dht) : dht * (A(1) - hv * hv));
    }
  }
}

// The forward time loop over `st`'s steps ([T, B, ...] or packed [N, ...] buffers, as
// lstm.cpp's). Without w_ih, `in` is the projected input xp [T, B, H] (biases
// included); with w_ih [H, I], `in` is x [T, B, I], projected step by step inside the
// loop with the bias [H] (accumulation type) added in the pass, as lstm.cpp's fwd_loop.
template <typename T, bool RELU>
void fwd_loop(const SeqSteps& st, const at::Tensor& in, const at::Tensor& h0,
              const at::Tensor& w_hh, const at::Tensor* w_ih, const at::Tensor* bias,
              at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t B = st.B, H = w_hh.size(0), K = in.size(-1);
  const T* in_p = in.const_data_ptr<T>();
  const T* h0_p = h0.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  const UnitSlices slices(H, 1);
  if (w_ih != nullptr) {  // the input projection in the loop: RnnSteps
    const RnnSteps<T> steps(slices, B, *w_ih, w_hh, *bias, RELU);
    auto step = [&](int64_t s, int64_t t) {
      const int64_t m = st.rows[t], r = st.off[t];
      const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
      steps.step(s, m, in_p + r * K, K, h_prev, out_p + r * H);
    };
    slices.run(st.T, step, kNoWork);
    return;
  }
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/true);
  std::vector<at::Tensor> accs;
  for (int64_t s = 0; s < slices.count; ++s) {
    const int64_t n = slices.size(s);
    accs.push_back(at::empty({B, n}, in.options().dtype(c10::CppTypeToScalarType<A>::value)));
  }
  auto step = [&](int64_t s, int64_t t) {
    const int64_t j0 = slices.begin(s), n = slices.size(s), m = st.rows[t], r = st.off[t];
    const T* h_prev = t > 0 ? out_p + st.off[t - 1] * H : h0_p;
    A* acc = accs[s].template data_ptr<A>();
    slice_gemms.gemms[s].rows(m, h_prev, H, A(0), acc, n);  // [m, n]
    fwd_rows<T, T, RELU>(0, m, n, H, acc, n, in_p + r * H + j0, H, out_p + r * H + j0);
  };
  slices.run(st.T, step, kNoWork);
}

template <typename T, bool RELU>
void bwd_loop(const SeqSteps& st, const at::Tensor& grad_out, const at::Tensor& w_hh,
              const at::Tensor& out, at::Tensor& dh, at::Tensor& grad_xp) {
  using A = acc_t<T>;
  const int64_t T_ = st.T, B = st.B, H = out.size(-1);
  const T* go_p = grad_out.const_data_ptr<T>();
  const T* out_p = out.const_data_ptr<T>();
  A* dh_p = dh.data_ptr<A>();
  T* dx_p = grad_xp.data_ptr<T>();
  const UnitSlices slices(H, 1);
  const SliceGemms<T> slice_gemms(slices, w_hh, B, /*forward=*/false);
  auto pointwise = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s), n = slices.size(s), r = st.off[t];
    bwd_rows<T, RELU>(0, st.rows[t], n, H, go_p + r * H + j0, out_p + r * H + j0, dh_p + j0,
                      dx_p + r * H + j0);
  };
  auto gemm = [&](int64_t s, int64_t i) {
    const int64_t t = T_ - 1 - i, j0 = slices.begin(s);
    // dh_{t-1}[:, slice]; a packed sequence's later rows keep grad_h_n until their last step
    slice_gemms.gemms[s].rows(st.rows[t], dx_p + st.off[t] * H, H, A(0), dh_p + j0, H);
  };
  slices.run(T_, pointwise, gemm);
}

// rnn_fwd and rnn_seq after their checks: the output, the time loop (with w_ih and the
// accumulation-type bias for rnn_seq, else nullptr) and the final state.
std::tuple<at::Tensor, at::Tensor> forward(const SeqSteps& steps, const at::Tensor& in,
                                           const at::Tensor& h0, const at::Tensor& w_hh,
                                           const at::Tensor* w_ih, const at::Tensor* bias,
                                           bool relu) {
  const int64_t H = w_hh.size(0);
  auto out = empty_seq(steps.shape(H), in.options());  // [T, B, H] or [N, H]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.scalar_type(), "rnn_fwd", [&] {
    auto xc = in.contiguous(), hc = h0.contiguous(), wc = w_hh.contiguous();
    if (relu) {
      fwd_loop<scalar_t, true>(steps, xc, hc, wc, w_ih, bias, out);
    } else {
      fwd_loop<scalar_t, false>(steps, xc, hc, wc, w_ih, bias, out);
    }
  });
  return {out, steps.T > 0 ? steps.finals(out) : h0.clone()};
}

std::tuple<at::Tensor, at::Tensor> rnn_fwd(const at::Tensor& xp, const at::Tensor& h0,
                                           const at::Tensor& w_hh, bool relu) {
  constexpr const char* OP = "fastchar::rnn_fwd";
  CHECK_CPU(xp);
  CHECK_DIM(xp, 3);
  CHECK_FLOAT(xp);
  const auto dt = xp.scalar_type();
  const int64_t B = xp.size(1), H = xp.size(2);
  check_sizes(OP, H);
  CHECK_ARG(h0, dt, B, H);
  CHECK_ARG(w_hh, dt, H, H);
  return forward(SeqSteps(xp.size(0), B), xp, h0, w_hh, nullptr, nullptr, relu);
}

// rnn_fwd with the input projection inside the time loop: x [T, B, I] (or packed [N, I]
// with batch_sizes), w_ih [H, I], bias [H] (b_ih + b_hh) or none. Same outputs; backward
// is rnn_bwd.
std::tuple<at::Tensor, at::Tensor> rnn_seq(const at::Tensor& x, const at::Tensor& h0,
                                           const at::Tensor& w_ih,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& w_hh, bool relu,
                                           const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::rnn_seq";
  const SeqSteps steps = seq_steps(OP, "x", x, batch_sizes);
  const int64_t H = check_seq_args(OP, 1, x, steps, h0, w_ih, bias, w_hh);
  const auto w = w_ih.contiguous();
  const auto b = bias_acc(bias, std::nullopt, H, state_type(x.scalar_type()));  // [H]
  return forward(steps, x, h0, w_hh, &w, &b, relu);
}

std::tuple<at::Tensor, at::Tensor> rnn_bwd(const at::Tensor& grad_out,
                                           const at::Tensor& grad_h_n,
                                           const at::Tensor& w_hh, const at::Tensor& out,
                                           bool relu,
                                           const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* OP = "fastchar::rnn_bwd";
  CHECK_CPU(out);
  CHECK_FLOAT(out);
  const SeqSteps steps = seq_steps(OP, "out", out, batch_sizes);
  const auto dt = out.scalar_type();
  const int64_t B = steps.B, H = out.size(-1);
  check_sizes(OP, H);
  check_seq_shape(OP, "grad_out", grad_out, steps, H, dt);
  CHECK_ARG(grad_h_n, dt, B, H);
  CHECK_ARG(w_hh, dt, H, H);

  auto dh = at::empty({B, H}, out.options().dtype(state_type(dt))).copy_(grad_h_n);  // [B, H]
  auto grad_xp = empty_seq(steps.shape(H), out.options());  // [T, B, H] or [N, H]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "rnn_bwd", [&] {
    auto gc = grad_out.contiguous(), wc = w_hh.contiguous(), oc = out.contiguous();
    if (relu) {
      bwd_loop<scalar_t, true>(steps, gc, wc, oc, dh, grad_xp);
    } else {
      bwd_loop<scalar_t, false>(steps, gc, wc, oc, dh, grad_xp);
    }
  });
  return {grad_xp, dh.to(dt)};
}

at::Tensor rnn_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                    const std::optional<at::Tensor>& b_hh, bool relu,
                    const std::optional<at::Tensor>& s_ih, const std::optional<at::Tensor>& s_hh) {
  constexpr const char* OP = "fastchar::rnn_cell";
  const int64_t H = check_cell_args(OP, 1, x, h, w_ih, w_hh, b_ih, b_hh, s_ih, s_hh);
  const auto dt = x.scalar_type();
  const int64_t B = x.size(0);

  const auto st = state_type(dt);
  auto bias = bias_acc(b_ih, b_hh, H, st);  // [H]
  auto acc = at::empty({B, H}, x.options().dtype(st));  // [B, H]
  auto h_new = at::empty({B, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "rnn_cell", [&] {
    using A = acc_t<scalar_t>;
    A* a = acc.data_ptr<A>();
    cell_products<scalar_t>(x, w_ih, s_ih, a, h, w_hh, s_hh, a, true, H);
    const A* bp = bias.const_data_ptr<A>();
    scalar_t* hp = h_new.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      if (relu) {
        fwd_rows<scalar_t, A, true>(b0, b1, H, H, a, H, bp, 0, hp);
      } else {
        fwd_rows<scalar_t, A, false>(b0, b1, H, H, a, H, bp, 0, hp);
      }
    });
  });
  return h_new;
}

}  // namespace

template <typename T>
RnnSteps<T>::RnnSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, const at::Tensor& bias, bool relu,
                      const std::optional<at::Tensor>& s_ih,
                      const std::optional<at::Tensor>& s_hh)
    : p_(slices, B, w_ih, w_hh, s_ih, s_hh), bias_(bias), relu_(relu) {}

template <typename T>
void RnnSteps<T>::step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev,
                       T* h_new) const {
  const int64_t j0 = p_.slices.begin(s), n = p_.slices.size(s);
  const A* acc = p_.both(s, m, x, ldx, h_prev);  // [m, n]
  const A* b = bias_.const_data_ptr<A>() + j0;
  if (relu_) {
    fwd_rows<T, A, true>(0, m, n, p_.H, acc, n, b, 0, h_new + j0);
  } else {
    fwd_rows<T, A, false>(0, m, n, p_.H, acc, n, b, 0, h_new + j0);
  }
}

template class RnnSteps<float>;
template class RnnSteps<double>;
template class RnnSteps<at::BFloat16>;

TORCH_LIBRARY_IMPL(fastchar, CPU, m) {
  m.impl("rnn_fwd", &rnn_fwd);
  m.impl("rnn_seq", &rnn_seq);
  m.impl("rnn_bwd", &rnn_bwd);
  m.impl("rnn_cell", &rnn_cell);
}

}  // namespace fastchar
