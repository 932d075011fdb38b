// A plain dense linear layer y = W x + b, trainable or frozen (heads, full fine-tuning).
#pragma once

#include <optional>
#include <utility>

#include "dense_layer.hpp"
#include "detail/gemm.hpp"

namespace hra {

/// \brief y = W x + b with W (d_out x d_in) and b (d_out) owned or viewed.
///
/// With LinearOptions::train_weight the layer is an ordinary trainable linear layer; without it
/// W is frozen (see DenseLayer for the bias, merge() and what is kept: X is d_in x n).
template <typename Scalar_>
class Linear final : public DenseLayer<Scalar_> {
  using Base = DenseLayer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);

  Linear(WeightMatrix<Scalar> weight, std::optional<Vector> bias, const LinearOptions& options = {},
         BiasMode bias_mode = BiasMode::none)
      : Base(std::move(weight), std::move(bias), options, bias_mode, "Linear") {}

  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dW (when W trains) and db (when b trains); returns dX = W^T dY.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

 private:
  using Op = detail::Op;
  using Base::x_, Base::y_, Base::dx_;
  Matrix scratch_;
};

template <typename Scalar_>
auto Linear<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_input(x, "forward");
  this->forget_forward();
  if (this->weight_trainable()) x_ = x;
  const ConstRef in = this->weight_trainable() ? ConstRef(x_) : this->unaliased(x, y_, scratch_);
  detail::product(y_, this->weight(), Op::n, in, Op::n);
  return this->finish_forward(y_, x.cols());
}

template <typename Scalar_>
auto Linear<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient) -> const Matrix& {
  const ConstRef g = this->begin_dense_backward(dy, dx_, scratch_);  // dY may be the last dX
  if (this->weight_trainable()) detail::product(this->weight_gradient(), g, Op::n, x_, Op::t);
  if (compute_input_gradient)
    detail::product(dx_, this->weight(), Op::t, g, Op::n);
  else
    dx_.resize(0, 0);
  return dx_;
}

template <typename Scalar_>
void Linear<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  this->predict_dense(x, y, [](Matrix&) {});
}

using Linearf = Linear<float>;
using Lineard = Linear<double>;

}  // namespace hra
