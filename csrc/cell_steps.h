// One time step of a layer for one unit slice, with the input projection inside: the
// slice's step GEMMs (x_t @ W_ih^T, then += h_{t-1} @ W_hh^T, W packed once for the slice
// at construction) and the cell's gate pass over its units. The *_seq ops' time loops run
// it for every step and slice; fastchar::generate runs it for every layer of every
// sampling step in one parallel region (generate.cpp). Each class is defined in its cell's
// file (lstm.cpp, gru.cpp, rnn.cpp), for float, double and bfloat16.
//
// Pointers are to row 0 and unit 0 of full rows (the step adds the slice's offset): x
// [m, ldx], h_prev and h_new [m, H] (an LSTM projection: see LstmSteps), gates [m, G] (saved for backward, or scratch),
// states of the accumulation type. Biases are accumulation-type vectors. With scales s_ih,
// s_hh (float32 [G]) the weights are int8 rows (w = s * q) and T is float.
#pragma once

#include "common.h"

namespace fastchar {

// What every cell's steps share: the slice products x_t @ W_ih[slice]^T and h_{t-1} @
// W_hh[slice]^T (SliceProducts, packed once) and an accumulation buffer [B, n_gates * n]
// per slice. H is the units (w_hh's rows / n_gates), P the width of h (w_hh's columns:
// an LSTM projection's proj_size, else H).
template <typename T>
struct StepProducts {
  using A = acc_t<T>;
  StepProducts(const UnitSlices& slices_, int64_t B, const at::Tensor& w_ih,
               const at::Tensor& w_hh, const std::optional<at::Tensor>& s_ih,
               const std::optional<at::Tensor>& s_hh)
      : slices(slices_),
        H(w_hh.size(0) / slices_.n_gates()),
        P(w_hh.size(1)),
        input(slices_, w_ih, B, s_ih),
        hidden(slices_, w_hh, B, s_hh) {
    const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
    for (int64_t s = 0; s < slices.count; ++s) {
      accs.push_back(at::empty({B, slices.n_gates() * slices.size(s)}, acc));
    }
  }

  // Slice s's accumulator for m rows: x @ W_ih[slice]^T + h_prev @ W_hh[slice]^T, in two
  // halves: the input one needs no other slice's h_{t-1}, so a time loop can run it
  // while the other threads finish step t-1 (UnitSlices::run's `ahead`).
  A* both(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev) const {
    input_half(s, m, x, ldx);
    return hidden_half(s, m, h_prev);
  }
  void input_half(int64_t s, int64_t m, const T* x, int64_t ldx) const {
    input.rows(s, m, x, ldx, A(0), accs[s].template data_ptr<A>(), ld(s));
  }
  A* hidden_half(int64_t s, int64_t m, const T* h_prev) const {
    A* acc = accs[s].template data_ptr<A>();
    hidden.rows(s, m, h_prev, P, A(1), acc, ld(s));
    return acc;
  }
  int64_t ld(int64_t s) const {
    return slices.n_gates() * slices.size(s);
  }

  UnitSlices slices;
  int64_t H, P;
  SliceProducts<T> input, hidden;
  std::vector<at::Tensor> accs;
};

template <typename T>
class LstmSteps {
 public:
  using A = acc_t<T>;
  // w_ih [4H, I], w_hh [4H, P] (P = H, or an LSTM projection's proj_size: then h_prev is
  // [m, P] and h_new receives r = o * tanh(c) [m, H]), bias [4H] (b_ih + b_hh), B rows at
  // most.
  LstmSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih, const at::Tensor& w_hh,
            const at::Tensor& bias, const std::optional<at::Tensor>& s_ih = std::nullopt,
            const std::optional<at::Tensor>& s_hh = std::nullopt);
  // c_prev and c_new [m, H] may be the same buffer.
  void step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, const A* c_prev,
            T* gates, A* c_new, T* h_new) const {
    input_half(s, m, x, ldx);
    hidden_half(s, m, h_prev, c_prev, gates, c_new, h_new);
  }
  // step() in its two halves (StepProducts): x_t's product, then h_{t-1}'s and the gates.
  void input_half(int64_t s, int64_t m, const T* x, int64_t ldx) const {
    p_.input_half(s, m, x, ldx);
  }
  void hidden_half(int64_t s, int64_t m, const T* h_prev, const A* c_prev, T* gates, A* c_new,
                   T* h_new) const;

 private:
  StepProducts<T> p_;
  at::Tensor bias_;
};

// GRU biases as the steps take them, accumulation type: b_x = b_ih + [b_hr, b_hz, 0] [3H]
// (the input side) and b_hn [H], which stays inside the reset product.
std::pair<at::Tensor, at::Tensor> gru_biases(const std::optional<at::Tensor>& b_ih,
                                             const std::optional<at::Tensor>& b_hh, int64_t H,
                                             at::ScalarType acc);

template <typename T>
class GruSteps {
 public:
  using A = acc_t<T>;
  // w_ih [3H, I], w_hh [3H, H], b_x and b_hn from gru_biases.
  GruSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih, const at::Tensor& w_hh,
           const at::Tensor& b_x, const at::Tensor& b_hn,
           const std::optional<at::Tensor>& s_ih = std::nullopt,
           const std::optional<at::Tensor>& s_hh = std::nullopt);
  // hn [m, H]: W_hn h_{t-1} + b_hn, saved for backward (or scratch).
  void step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, T* gates, T* hn,
            T* h_new) const;

 private:
  StepProducts<T> p_;
  at::Tensor b_x_, b_hn_;
  std::vector<at::Tensor> x_accs_;  // the input side of each slice, apart from the hidden
};

template <typename T>
class RnnSteps {
 public:
  using A = acc_t<T>;
  // w_ih [H, I], w_hh [H, H], bias [H] (b_ih + b_hh); relu or tanh.
  RnnSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih, const at::Tensor& w_hh,
           const at::Tensor& bias, bool relu,
           const std::optional<at::Tensor>& s_ih = std::nullopt,
           const std::optional<at::Tensor>& s_hh = std::nullopt);
  void step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, T* h_new) const;

 private:
  StepProducts<T> p_;
  at::Tensor bias_;
  bool relu_;
};

}  // namespace fastchar
