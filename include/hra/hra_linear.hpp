// A frozen linear layer adapted by Householder reflections: y = W H x + b.
#pragma once

#include <Eigen/Core>
#include <optional>
#include <utility>
#include <vector>

#include "hra_adapter_layer.hpp"

namespace hra {

/// \brief y = W (H_1 ... H_k) x + b: a frozen linear layer with a stack of HRA adapters.
///
/// W is d_out x d_in (owned or viewed, see WeightMatrix), b an optional d_out vector; the
/// adapters, merge and unmerge are HraAdapterLayer's (D = d_in).
///
/// Kept between forward and backward: H x (d_in x n, needed for W H x anyway), Y (d_out x n,
/// the returned output), and per adapter r x n coefficients plus the factors of U (O(r d)).
/// backward() rebuilds every adapter's input from those, so nothing d x d is ever formed.
template <typename Scalar_>
class HraLinear final : public HraAdapterLayer<Scalar_> {
  using Base = HraAdapterLayer<Scalar_>;

 public:
  using typename Base::Adapter;
  using typename Base::Chain;
  using typename Base::ConstRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;

  /// Wraps W (and the optional bias b, d_out) with one adapter "default" made from `options`.
  /// Throws std::invalid_argument for a non-finite W or b, a bias of the wrong length, or bad
  /// adapter options (r = 0, r > d_in, odd r with symmetric init, ...).
  HraLinear(WeightMatrix<Scalar> weight, std::optional<Vector> bias, const HraOptions& options,
            BiasMode bias_mode = BiasMode::none)
      : Base(std::move(weight), std::move(bias), options, bias_mode, "HraLinear") {}

  /// Convenience: own a copy of W.
  HraLinear(Matrix weight, const HraOptions& options)
      : HraLinear(WeightMatrix<Scalar>::owned(std::move(weight)), std::nullopt, options) {}

  /// Y = W H X + b for X (d_in x n).
  const Matrix& forward(const ConstRef& x) override {
    this->check_input(x, "forward");
    this->forget_forward();
    // Every U is validated before anything is written: a column an optimiser made unusable
    // throws here and leaves the caches as they were.
    std::vector<typename Chain::Factors> factors = this->factorize_applied();
    const std::vector<std::size_t> applied = this->applied();
    auto& adapters = this->adapter_list();
    hx_ = x;
    for (auto it = applied.rbegin(); it != applied.rend(); ++it) {
      auto& cache = this->cache(adapters[*it]);
      adapters[*it].chain().apply(factors[*it], hx_, Apply::h, &cache.coeffs);
      cache.factors = std::move(factors[*it]);
    }
    y_.noalias() = this->weight() * hx_;
    this->add_bias(y_);
    this->remember_forward(x.cols());
    return y_;
  }

  /// Assigns dU of every unmerged adapter and db (when trainable); returns dX = H^T W^T dY.
  /// Without the input gradient and with at most one unmerged adapter, dU comes from
  /// ReflectorChain::backward_through: W^T dY (d_in x n, as costly as the forward) is never
  /// formed, and dU equals the other path's up to rounding.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    this->begin_backward(dy);
    this->bias_backward(dy);
    auto& adapters = this->adapter_list();
    const std::vector<std::size_t> applied = this->applied();
    if (!compute_input_gradient && applied.size() <= 1) {
      // No dX wanted and at most one chain: dU needs W^T dY only through r-dimensional
      // projections, so the d_in x n product W^T dY (as costly as the forward) is skipped.
      for (std::size_t i : applied) {
        auto& a = adapters[i];
        a.chain().backward_through(this->cache(a).factors, this->cache(a).coeffs, this->weight(),
                                   dy, hx_, this->gradient(a));
      }
      empty_.resize(0, 0);
      return empty_;
    }
    dx_.noalias() = this->weight().transpose() * dy;
    for (std::size_t i : applied) {
      auto& a = adapters[i];
      a.chain().backward(this->cache(a).factors, this->cache(a).coeffs, hx_, dx_, this->gradient(a),
                         Chain::State::output);
    }
    if (!compute_input_gradient) {
      empty_.resize(0, 0);
      return empty_;
    }
    return dx_;
  }

  void predict(const ConstRef& x, Matrix& y) const override {
    this->check_input(x, "predict");
    const std::vector<typename Chain::Factors> factors = this->factorize_applied();
    const std::vector<std::size_t> applied = this->applied();
    Matrix hx = x;
    for (auto it = applied.rbegin(); it != applied.rend(); ++it)
      this->adapters()[*it].chain().apply(factors[*it], hx, Apply::h);
    y.noalias() = this->weight() * hx;
    this->add_bias(y);
  }

  std::size_t saved_bytes() const override {
    std::size_t bytes = static_cast<std::size_t>(hx_.size() + y_.size()) * sizeof(Scalar);
    for (std::size_t i : this->applied()) bytes += this->cache(this->adapters()[i]).bytes();
    return bytes;
  }

 private:
  Matrix hx_, y_, dx_, empty_;
};

using HraLinearf = HraLinear<float>;
using HraLineard = HraLinear<double>;

}  // namespace hra
