// The LoRA baseline: y = W x + (alpha/r) B A dropout(x) + b, with the same interface as HRA.
#pragma once

#include <Eigen/Core>

#include "detail/gemm.hpp"
#include "linear_adapter.hpp"
#include "lora_adapter_layer.hpp"

namespace hra {

/// \brief y = W x + s B A D(x) + b, s = alpha / r: the LoRA baseline (Hu et al. 2021; PEFT).
///
/// A (r x d_in), B (d_out x r), merge and unmerge are LoraAdapterLayer's. D is inverted dropout
/// on the adapter path only (identity in predict()). Kept between forward and backward: D(x)
/// (d_in x n; the input when dropout is 0), A D(x) (r x n), Y, and with dropout the d_in x n keep
/// mask (one byte per entry).
template <typename Scalar_>
class LoraLinear final : public detail::LinearAdapter<LoraAdapterLayer<Scalar_>> {
  using Base = detail::LinearAdapter<LoraAdapterLayer<Scalar_>>;

 public:
  HRA_LAYER_TYPES(Base);

  /// LoraLinear(weight, bias, options, bias_mode = BiasMode::none) and LoraLinear(W, options):
  /// see detail::LinearAdapter.
  using Base::Base;

  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dA, dB (when unmerged) and db (when trainable); returns dX.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

  /// While set, forward() reuses the last dropout mask (same batch shape) instead of drawing a
  /// new one: makes the loss a deterministic function of the parameters, for gradient checks.
  void set_reuse_dropout_mask(bool reuse) { reuse_mask_ = reuse; }

  std::size_t saved_bytes() const override;

 private:
  using Op = detail::Op;
  Matrix xd_, ax_, dax_, y_, dx_, dy_copy_;
  Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic> keep_;  // dropout mask of the last forward
  bool reuse_mask_ = false;
};

template <typename Scalar_>
auto LoraLinear<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_input(x, "forward");
  this->forget_forward();
  if (!this->merged()) xd_ = x;  // before y_ is written: x may be the last output
  const ConstRef in = this->merged() ? this->unaliased(x, y_, xd_) : ConstRef(xd_);
  detail::product(y_, this->weight(), Op::n, in, Op::n);
  if (!this->merged()) {
    const double dropout = this->options().dropout;
    if (dropout > 0.0) {
      const Scalar keep_scale = Scalar(1) / Scalar(1 - dropout);
      if (!reuse_mask_ || keep_.rows() != xd_.rows() || keep_.cols() != xd_.cols()) {
        keep_.resize(xd_.rows(), xd_.cols());
        for (Index i = 0; i < keep_.size(); ++i)
          keep_(i) = this->dropout_rng().uniform01() >= dropout;
      }
      xd_ = keep_.select(xd_ * keep_scale, Matrix::Zero(xd_.rows(), xd_.cols()));
    }
    detail::serial_product(ax_, this->lora_a(), Op::n, xd_, Op::n);
    detail::serial_product(y_, this->lora_b(), Op::n, ax_, Op::n, this->scaling(), true);
  } else {
    xd_.resize(0, x.cols());
  }
  return this->finish_forward(y_, x.cols());
}

template <typename Scalar_>
auto LoraLinear<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient)
    -> const Matrix& {
  const ConstRef g = this->begin_dense_backward(dy, dx_, dy_copy_);  // dY may be the last dX
  if (compute_input_gradient) detail::product(dx_, this->weight(), Op::t, g, Op::n);
  if (!this->merged()) {
    const Scalar s = this->scaling();
    detail::serial_product(this->gradient_b(), g, Op::n, ax_, Op::t, s);
    detail::serial_product(dax_, this->lora_b(), Op::t, g, Op::n, s);  // r x n
    detail::serial_product(this->gradient_a(), dax_, Op::n, xd_, Op::t);
    if (compute_input_gradient) {
      const double dropout = this->options().dropout;
      if (dropout > 0.0) {
        Matrix dxd;
        detail::serial_product(dxd, this->lora_a(), Op::t, dax_, Op::n);
        const Scalar keep_scale = Scalar(1) / Scalar(1 - dropout);
        dxd = keep_.select(dxd * keep_scale, Matrix::Zero(dxd.rows(), dxd.cols()));
        dx_ += dxd;
      } else {
        // Accumulated in place: a d_in x n temporary and a second pass over dX cost 3-10 %
        // of the layer at n = 512-2048 (4096 -> 1024, r = 8).
        detail::serial_product(dx_, this->lora_a(), Op::t, dax_, Op::n, Scalar(1), true);
      }
    }
  }
  if (!compute_input_gradient) dx_.resize(0, 0);
  return dx_;
}

template <typename Scalar_>
void LoraLinear<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  this->predict_dense(x, y, [&](Matrix& out) {
    if (this->merged()) return;
    Matrix ax;
    detail::serial_product(ax, this->lora_a(), Op::n, x, Op::n);
    detail::serial_product(out, this->lora_b(), Op::n, ax, Op::n, this->scaling(), true);
  });
}

template <typename Scalar_>
std::size_t LoraLinear<Scalar_>::saved_bytes() const {
  return static_cast<std::size_t>(xd_.size() + ax_.size() + y_.size()) * sizeof(Scalar) +
         static_cast<std::size_t>(this->options().dropout > 0.0 ? keep_.size() : 0);
}

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

}  // namespace hra
