// One time step of a layer for one unit slice, with the input projection inside: the
// slice's step GEMMs (x_t @ W_ih^T, then += h_{t-1} @ W_hh^T, W packed once for the slice
// at construction) and the cell's gate pass over its units. The *_seq ops' time loops run
// it for every step and slice; fastchar::generate runs it for every layer of every
// sampling step in one parallel region (generate.cpp). Each class is defined in its cell's
// file (lstm.cpp, gru.cpp, rnn.cpp), for float, double and bfloat16.
//
// Pointers are to row 0 and unit 0 of full rows (the step adds the slice's offset): x
// [m, ldx], h_prev and h_new [m, H], gates [m, G] (saved for backward, or scratch),
// states of the accumulation type. Biases are accumulation-type vectors. With scales s_ih,
// s_hh (float32 [G]) the weights are int8 rows (w = s * q) and T is float.
#pragma once

#include "common.h"

namespace fastchar {

template <typename T>
class LstmSteps {
 public:
  using A = acc_t<T>;
  // w_ih [4H, I], w_hh [4H, H], bias [4H] (b_ih + b_hh), B rows at most.
  LstmSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih, const at::Tensor& w_hh,
            const at::Tensor& bias, const std::optional<at::Tensor>& s_ih = std::nullopt,
            const std::optional<at::Tensor>& s_hh = std::nullopt);
  // c_prev and c_new [m, H] may be the same buffer.
  void step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, const A* c_prev,
            T* gates, A* c_new, T* h_new) const;

 private:
  UnitSlices slices_;
  int64_t H_;
  SliceProducts<T> input_, hidden_;
  at::Tensor bias_;
  std::vector<at::Tensor> accs_;
};

template <typename T>
class GruSteps {
 public:
  using A = acc_t<T>;
  // w_ih [3H, I], w_hh [3H, H], b_x [3H] (b_ih + [b_hr, b_hz, 0]), b_hn [H].
  GruSteps(const UnitSlices& slices, int64_t B, const at::Tensor& w_ih, const at::Tensor& w_hh,
           const at::Tensor& b_x, const at::Tensor& b_hn,
           const std::optional<at::Tensor>& s_ih = std::nullopt,
           const std::optional<at::Tensor>& s_hh = std::nullopt);
  // hn [m, H]: W_hn h_{t-1} + b_hn, saved for backward (or scratch).
  void step(int64_t s, int64_t m, const T* x, int64_t ldx, const T* h_prev, T* gates, T* hn,
            T* h_new) const;

 private:
  UnitSlices slices_;
  int64_t H_;
  SliceProducts<T> input_, hidden_;
  at::Tensor b_x_, b_hn_;
  std::vector<at::Tensor> accs_, x_accs_;
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
  UnitSlices slices_;
  int64_t H_;
  SliceProducts<T> input_, hidden_;
  at::Tensor bias_;
  bool relu_;
  std::vector<at::Tensor> accs_;
};

}  // namespace fastchar
