// A plain dense linear layer y = W x + b, trainable or frozen (heads, full fine-tuning).
#pragma once

#include <Eigen/Core>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

#include "frozen_weight.hpp"
#include "layer.hpp"

namespace hra {

/// \brief y = W x + b with W (d_out x d_in) and b (d_out) owned or viewed.
///
/// With train_weight the layer is an ordinary trainable linear layer (full fine-tuning, a new
/// head); without it W is frozen and only the bias may train. It has no adapter, so merge() and
/// unmerge() do nothing and merged() is always true. Kept between forward and backward: the
/// input X (d_in x n, only when W trains) and Y.
template <typename Scalar_>
class Linear final : public Layer<Scalar_> {
  using Base = Layer<Scalar_>;

 public:
  using typename Base::ConstRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;

  Linear(FrozenWeight<Scalar> weight, std::optional<Vector> bias, bool train_weight,
         bool train_bias)
      : weight_(std::move(weight)),
        bias_(std::move(bias)),
        train_weight_(train_weight),
        train_bias_(train_bias) {
    detail::check_finite(weight_.map(), "Linear: weight W");
    if (weight_.rows() < 1 || weight_.cols() < 1)
      detail::throw_invalid("Linear: the weight is empty (",
                            detail::shape(weight_.rows(), weight_.cols()), ")");
    if (bias_) {
      detail::check_shape(*bias_, weight_.rows(), 1, "Linear: bias (length must be d_out)");
      detail::check_finite(*bias_, "Linear: bias");
      bias_grad_.setZero(weight_.rows());
    } else if (train_bias_) {
      detail::throw_invalid("Linear: train_bias is set but the layer has no bias");
    }
    if (train_weight_) weight_grad_.setZero(weight_.rows(), weight_.cols());
  }

  Index input_dim() const override { return weight_.cols(); }
  Index output_dim() const override { return weight_.rows(); }
  typename FrozenWeight<Scalar>::MapType weight() { return weight_.map(); }
  typename FrozenWeight<Scalar>::ConstMapType weight() const { return weight_.map(); }
  std::optional<Vector>& bias() { return bias_; }
  const std::optional<Vector>& bias() const { return bias_; }

  const Matrix& forward(const ConstRef& x) override {
    detail::check_batch(x, input_dim(), "Linear::forward input");
    state_ = State::idle;
    if (train_weight_) x_ = x;
    y_.noalias() = weight_.map() * x;
    if (bias_) y_.colwise() += *bias_;
    batch_ = x.cols();
    state_ = State::forwarded;
    return y_;
  }

  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    detail::check_backward(state_ == State::forwarded, dy, output_dim(), batch_, "Linear");
    state_ = State::idle;
    if (train_weight_) weight_grad_.noalias() = dy * x_.transpose();
    if (train_bias_) bias_grad_ = dy.rowwise().sum();
    if (compute_input_gradient)
      dx_.noalias() = weight_.map().transpose() * dy;
    else
      dx_.resize(0, 0);
    return dx_;
  }

  void predict(const ConstRef& x, Matrix& y) const override {
    detail::check_batch(x, input_dim(), "Linear::predict input");
    y.noalias() = weight_.map() * x;
    if (bias_) y.colwise() += *bias_;
  }

  /// "weight" (d_out x d_in) when it trains, "bias" when it trains.
  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    if (train_weight_) {
      auto w = weight_.map();
      if (w.outerStride() != w.rows())
        throw std::logic_error("Linear::parameters: a trainable weight view must be contiguous");
      out.push_back({"weight",
                     {w.data(), w.rows(), w.cols()},
                     {weight_grad_.data(), weight_grad_.rows(), weight_grad_.cols()}});
    }
    if (train_bias_)
      out.push_back(
          {"bias", {bias_->data(), bias_->rows(), 1}, {bias_grad_.data(), bias_grad_.rows(), 1}});
    return out;
  }

  void merge() override {}
  void unmerge() override {}
  bool merged() const override { return true; }

  std::size_t saved_bytes() const override {
    return static_cast<std::size_t>(x_.size() + y_.size()) * sizeof(Scalar);
  }

 private:
  enum class State { idle, forwarded };

  FrozenWeight<Scalar> weight_;
  std::optional<Vector> bias_;
  Matrix weight_grad_;
  Vector bias_grad_;
  bool train_weight_, train_bias_;
  Matrix x_, y_, dx_;
  Index batch_ = 0;
  State state_ = State::idle;
};

using Linearf = Linear<float>;
using Lineard = Linear<double>;

}  // namespace hra
