// The LoRA baseline: y = W x + (alpha/r) B A dropout(x) + b, with the same interface as HRA.
#pragma once

#include <Eigen/Core>

#include "linear_adapter.hpp"
#include "lora_adapter_layer.hpp"
#include "parallel.hpp"

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

  const Matrix& forward(const ConstRef& x) override {
    this->check_input(x, "forward");
    this->forget_forward();
    if (!this->merged()) xd_ = x;  // before y_ is written: x may be the last output
    const ConstRef in = this->merged() ? this->unaliased(x, y_, xd_) : ConstRef(xd_);
    detail::product(y_, this->weight(), in, Scalar(1));
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
      ax_.noalias() = this->lora_a() * xd_;
      y_.noalias() += (this->scaling() * this->lora_b()) * ax_;
    } else {
      xd_.resize(0, x.cols());
    }
    return this->finish_forward(y_, x.cols());
  }

  /// Assigns dA, dB (when unmerged) and db (when trainable); returns dX.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    const ConstRef g = this->begin_dense_backward(dy, dx_, dy_copy_);  // dY may be the last dX
    if (compute_input_gradient) detail::product(dx_, this->weight().transpose(), g, Scalar(1));
    if (!this->merged()) {
      const Scalar s = this->scaling();
      this->gradient_b().noalias() = s * g * ax_.transpose();
      dax_.noalias() = s * this->lora_b().transpose() * g;  // r x n
      this->gradient_a().noalias() = dax_ * xd_.transpose();
      if (compute_input_gradient) {
        const double dropout = this->options().dropout;
        if (dropout > 0.0) {
          Matrix dxd = this->lora_a().transpose() * dax_;
          const Scalar keep_scale = Scalar(1) / Scalar(1 - dropout);
          dxd = keep_.select(dxd * keep_scale, Matrix::Zero(dxd.rows(), dxd.cols()));
          dx_ += dxd;
        } else {
          // Accumulated in place: a d_in x n temporary and a second pass over dX cost 3-10 %
          // of the layer at n = 512-2048 (4096 -> 1024, r = 8).
          dx_.noalias() += this->lora_a().transpose() * dax_;
        }
      }
    }
    if (!compute_input_gradient) dx_.resize(0, 0);
    return dx_;
  }

  void predict(const ConstRef& x, Matrix& y) const override {
    this->check_input(x, "predict");
    this->write_unaliased(x, y, [&](Matrix& out) {
      detail::product(out, this->weight(), x, Scalar(1));
      if (!this->merged()) {
        Matrix ax = this->lora_a() * x;
        out.noalias() += (this->scaling() * this->lora_b()) * ax;
      }
      this->add_bias(out);
    });
  }

  /// While set, forward() reuses the last dropout mask (same batch shape) instead of drawing a
  /// new one: makes the loss a deterministic function of the parameters, for gradient checks.
  void set_reuse_dropout_mask(bool reuse) { reuse_mask_ = reuse; }

  std::size_t saved_bytes() const override {
    return static_cast<std::size_t>(xd_.size() + ax_.size() + y_.size()) * sizeof(Scalar) +
           static_cast<std::size_t>(this->options().dropout > 0.0 ? keep_.size() : 0);
  }

 private:
  Matrix xd_, ax_, dax_, y_, dx_, dy_copy_;
  Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic> keep_;  // dropout mask of the last forward
  bool reuse_mask_ = false;
};

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

}  // namespace hra
