// The LoRA baseline: y = W x + (alpha/r) B A dropout(x) + b, with the same interface as HRA.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "detail/random.hpp"
#include "frozen_weight.hpp"
#include "layer.hpp"

namespace hra {

/// Options of a LoRA adapter, with PEFT's defaults.
struct LoraOptions {
  Eigen::Index rank = 8;   ///< r >= 1
  double alpha = 8.0;      ///< scaling alpha / r (PEFT's lora_alpha; 8 keeps PEFT's default 1)
  double dropout = 0.0;    ///< probability of zeroing an input entry on the LoRA path
  std::uint64_t seed = 0;  ///< seeds A's initialisation and the dropout masks
};

/// \brief y = W x + s B A D(x) + b, s = alpha / r: the LoRA baseline (Hu et al. 2021; PEFT).
///
/// A is r x d_in, drawn as PEFT does (kaiming-uniform with a = sqrt(5): uniform in
/// +-1/sqrt(d_in)); B is d_out x r and starts at zero, so the layer starts equal to the frozen
/// one. D is inverted dropout on the adapter path only (identity in predict()).
/// Kept between forward and backward: D(x) (d_in x n; the input when dropout is 0), A D(x)
/// (r x n), Y, and with dropout the d_in x n keep mask (one byte per entry). merge(): W <- W + s B
/// A; unmerge(): W <- W - s B A.
template <typename Scalar_>
class LoraLinear final : public Layer<Scalar_> {
  using Base = Layer<Scalar_>;

 public:
  using typename Base::ConstRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;

  LoraLinear(FrozenWeight<Scalar> weight, std::optional<Vector> bias, const LoraOptions& options,
             BiasMode bias_mode = BiasMode::none)
      : weight_(std::move(weight)),
        bias_(std::move(bias)),
        bias_mode_(bias_mode),
        options_(options),
        rng_(options.seed ^ 0x9e3779b97f4a7c15ULL) {
    detail::check_finite(weight_.map(), "LoraLinear: frozen weight W");
    if (weight_.rows() < 1 || weight_.cols() < 1)
      detail::throw_invalid("LoraLinear: the weight is empty (",
                            detail::shape(weight_.rows(), weight_.cols()), ")");
    if (options.rank < 1)
      detail::throw_invalid("LoraLinear: rank r must be >= 1, got r=", options.rank);
    if (options.rank > std::min(weight_.rows(), weight_.cols()))
      detail::throw_invalid("LoraLinear: rank r=", options.rank,
                            " exceeds min(d_out, d_in)=", std::min(weight_.rows(), weight_.cols()));
    if (!(options.dropout >= 0.0 && options.dropout < 1.0))
      detail::throw_invalid("LoraLinear: dropout must be in [0, 1), got ", options.dropout);
    if (!std::isfinite(options.alpha))
      detail::throw_invalid("LoraLinear: alpha must be finite, got ", options.alpha);
    if (bias_) {
      detail::check_shape(*bias_, weight_.rows(), 1, "LoraLinear: bias (length must be d_out)");
      detail::check_finite(*bias_, "LoraLinear: bias");
      bias_grad_.setZero(weight_.rows());
    } else if (bias_mode_ != BiasMode::none) {
      detail::throw_invalid("LoraLinear: bias mode trains the bias but the layer has none");
    }
    detail::Random init(options.seed);
    const double bound = 1.0 / std::sqrt(static_cast<double>(input_dim()));
    a_.resize(options.rank, input_dim());
    for (Index j = 0; j < a_.cols(); ++j)
      for (Index i = 0; i < a_.rows(); ++i) a_(i, j) = static_cast<Scalar>(init.uniform(bound));
    b_.setZero(output_dim(), options.rank);
    grad_a_.setZero(a_.rows(), a_.cols());
    grad_b_.setZero(b_.rows(), b_.cols());
  }

  LoraLinear(Matrix weight, const LoraOptions& options)
      : LoraLinear(FrozenWeight<Scalar>::owned(std::move(weight)), std::nullopt, options) {}

  Index input_dim() const override { return weight_.cols(); }
  Index output_dim() const override { return weight_.rows(); }
  Scalar scaling() const { return static_cast<Scalar>(options_.alpha / options_.rank); }
  const LoraOptions& options() const { return options_; }

  Matrix& lora_a() { return a_; }  ///< A, r x d_in (PEFT lora_A.weight)
  Matrix& lora_b() { return b_; }  ///< B, d_out x r (PEFT lora_B.weight)
  const Matrix& lora_a() const { return a_; }
  const Matrix& lora_b() const { return b_; }
  typename FrozenWeight<Scalar>::MapType weight() { return weight_.map(); }
  typename FrozenWeight<Scalar>::ConstMapType weight() const { return weight_.map(); }
  const std::optional<Vector>& bias() const { return bias_; }
  BiasMode bias_mode() const { return bias_mode_; }

  const Matrix& forward(const ConstRef& x) override {
    detail::check_batch(x, input_dim(), "LoraLinear::forward input");
    state_ = State::idle;
    y_.noalias() = weight_.map() * x;
    if (!merged_) {
      xd_ = x;
      if (options_.dropout > 0.0) {
        const Scalar keep_scale = Scalar(1) / Scalar(1 - options_.dropout);
        if (!reuse_mask_ || keep_.rows() != xd_.rows() || keep_.cols() != xd_.cols()) {
          keep_.resize(xd_.rows(), xd_.cols());
          for (Index i = 0; i < keep_.size(); ++i) keep_(i) = rng_.uniform01() >= options_.dropout;
        }
        xd_ = keep_.select(xd_ * keep_scale, Matrix::Zero(xd_.rows(), xd_.cols()));
      }
      ax_.noalias() = a_ * xd_;
      y_.noalias() += (scaling() * b_) * ax_;
    } else {
      xd_.resize(0, x.cols());
    }
    if (bias_) y_.colwise() += *bias_;
    state_ = State::forwarded;
    return y_;
  }

  /// Assigns dA, dB (when unmerged) and db (when trainable); returns dX.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    detail::check_backward(state_ == State::forwarded, dy, output_dim(), xd_.cols(), "LoraLinear");
    state_ = State::idle;
    if (bias_ && bias_mode_ != BiasMode::none) bias_grad_ = dy.rowwise().sum();
    if (compute_input_gradient) dx_.noalias() = weight_.map().transpose() * dy;
    if (!merged_) {
      const Scalar s = scaling();
      grad_b_.noalias() = s * dy * ax_.transpose();
      dax_.noalias() = s * b_.transpose() * dy;  // r x n
      grad_a_.noalias() = dax_ * xd_.transpose();
      if (compute_input_gradient) {
        Matrix dxd = a_.transpose() * dax_;
        if (options_.dropout > 0.0) {
          const Scalar keep_scale = Scalar(1) / Scalar(1 - options_.dropout);
          dxd = keep_.select(dxd * keep_scale, Matrix::Zero(dxd.rows(), dxd.cols()));
        }
        dx_ += dxd;
      }
    }
    if (!compute_input_gradient) dx_.resize(0, 0);
    return dx_;
  }

  void predict(const ConstRef& x, Matrix& y) const override {
    detail::check_batch(x, input_dim(), "LoraLinear::predict input");
    y.noalias() = weight_.map() * x;
    if (!merged_) {
      Matrix ax = a_ * x;
      y.noalias() += (scaling() * b_) * ax;
    }
    if (bias_) y.colwise() += *bias_;
  }

  /// "lora_A" (r x d_in) and "lora_B" (d_out x r) while unmerged, then "bias" when trainable.
  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    if (!merged_) {
      out.push_back({"lora_A",
                     {a_.data(), a_.rows(), a_.cols()},
                     {grad_a_.data(), grad_a_.rows(), grad_a_.cols()}});
      out.push_back({"lora_B",
                     {b_.data(), b_.rows(), b_.cols()},
                     {grad_b_.data(), grad_b_.rows(), grad_b_.cols()}});
    }
    if (bias_ && bias_mode_ != BiasMode::none)
      out.push_back(
          {"bias", {bias_->data(), bias_->rows(), 1}, {bias_grad_.data(), bias_grad_.rows(), 1}});
    return out;
  }

  /// W <- W + s B A (safe=true: computed aside and refused if not finite, W untouched).
  void merge(bool safe) {
    if (merged_) throw std::logic_error("LoraLinear::merge: the adapter is already merged");
    detail::check_finite(a_, "LoraLinear::merge: lora_A");
    detail::check_finite(b_, "LoraLinear::merge: lora_B");
    const Matrix delta = (scaling() * b_) * a_;
    if (safe) {
      Matrix w = weight_.map() + delta;
      if (!w.allFinite())
        throw std::runtime_error(
            "LoraLinear::merge: the merged weight has non-finite values; W is left unchanged");
      weight_.map() = w;
    } else {
      weight_.map() += delta;
    }
    merged_ = true;
    state_ = State::idle;
  }
  void merge() override { merge(false); }

  void unmerge() override {
    if (!merged_) throw std::logic_error("LoraLinear::unmerge: the adapter is not merged");
    weight_.map().noalias() -= (scaling() * b_) * a_;
    merged_ = false;
    state_ = State::idle;
  }

  bool merged() const override { return merged_; }

  /// While set, forward() reuses the last dropout mask (same batch shape) instead of drawing a
  /// new one: makes the loss a deterministic function of the parameters, for gradient checks.
  void set_reuse_dropout_mask(bool reuse) { reuse_mask_ = reuse; }

  std::size_t saved_bytes() const override {
    return static_cast<std::size_t>(xd_.size() + ax_.size() + y_.size()) * sizeof(Scalar) +
           static_cast<std::size_t>(options_.dropout > 0.0 ? keep_.size() : 0);
  }

 private:
  enum class State { idle, forwarded };

  FrozenWeight<Scalar> weight_;
  std::optional<Vector> bias_;
  Vector bias_grad_;
  BiasMode bias_mode_;
  LoraOptions options_;
  detail::Random rng_;
  Matrix a_, b_, grad_a_, grad_b_;
  Matrix xd_, ax_, dax_, y_, dx_;
  Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic> keep_;  // dropout mask of the last forward
  bool merged_ = false;
  bool reuse_mask_ = false;
  State state_ = State::idle;
};

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

}  // namespace hra
