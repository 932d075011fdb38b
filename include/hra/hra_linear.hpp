// A frozen linear layer adapted by Householder reflections: y = W H x + b.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "frozen_weight.hpp"
#include "layer.hpp"
#include "reflector_chain.hpp"

namespace hra {

/// Form of the orthogonality regulariser (SPEC §6), C = Û^T Û with unit columns Û.
enum class RegularizerForm {
  squared,   ///< lambda |I - C|_F^2, the paper's eq. 6 (default)
  unsquared  ///< lambda |I - C|_F, as in the authors' LLaMA script
};

/// Options of one HRA adapter.
struct HraOptions {
  Eigen::Index rank = 8;             ///< r, 1 <= r <= d_in
  Variant variant = Variant::chain;  ///< chain, or Gram-Schmidt (PEFT apply_GS)
  Init init = Init::symmetric;       ///< symmetric (H = I at start) needs an even r
  std::uint64_t seed = 0;            ///< seeds the initialisation
  double lambda = 0.0;               ///< regulariser weight, 0 = plain HRA
  RegularizerForm regularizer = RegularizerForm::squared;
  Eigen::Index block_size = ReflectorChain<double>::default_block_size;
};

/// \brief Value and gradient of the orthogonality regulariser of U (d x r), SPEC §6.
///
/// R = lambda |I - C|_F^2 (or lambda |I - C|_F), C = Û^T Û, Û = U diag(1/|u_i|).
/// Adds dR/dU into `grad` (d x r) when it is non-null; returns R. The unsquared form's gradient
/// at C = I (where it is not differentiable) is taken as 0.
template <typename Scalar>
Scalar orthogonality_regularizer(
    const Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>& u, Scalar lambda,
    RegularizerForm form, Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>* grad = nullptr) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  if (lambda == Scalar(0)) return Scalar(0);
  const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> norms = u.colwise().norm();
  const Matrix unit = u * norms.cwiseInverse().asDiagonal();
  Matrix c_minus_i = unit.transpose() * unit;
  c_minus_i.diagonal().array() -= Scalar(1);
  const Scalar fro2 = c_minus_i.squaredNorm();
  const Scalar fro = std::sqrt(fro2);
  const Scalar value = form == RegularizerForm::squared ? lambda * fro2 : lambda * fro;
  if (grad) {
    // dR/dÛ = 4 lambda Û (C - I) for the squared form; the unsquared one scales it by 1/(2|.|).
    Scalar scale = Scalar(4) * lambda;
    if (form == RegularizerForm::unsquared) scale = fro > Scalar(0) ? Scalar(2) * lambda / fro : 0;
    Matrix g_unit = scale * (unit * c_minus_i);
    // Through the normalisation: dR/du_i = (I - û_i û_i^T) dR/dû_i / |u_i|.
    const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> radial =
        (unit.array() * g_unit.array()).colwise().sum();
    g_unit -= unit * radial.asDiagonal();
    *grad += g_unit * norms.cwiseInverse().asDiagonal();
  }
  return value;
}

/// \brief y = W (H_1 ... H_k) x + b: a frozen linear layer with a stack of HRA adapters.
///
/// W is d_out x d_in (owned or viewed, see FrozenWeight), b an optional d_out vector. The layer
/// starts with one adapter named "default"; add_adapter() stacks more, applied as PEFT does
/// (W H_a H_b ...: the last adapter touches x first). Each unmerged adapter is trainable.
///
/// Kept between forward and backward: H x (d_in x n, needed for W H x anyway), Y (d_out x n,
/// the returned output), and per adapter r x n coefficients plus the factors of U (O(r d)).
/// backward() rebuilds every adapter's input from those, so nothing d x d is ever formed.
///
/// merge() folds every unmerged adapter into W in order (W <- W H_a H_b ...); unmerge() undoes
/// the most recent merge (last in, first out). With safe=true the merged weight is computed
/// aside and refused (exception, W untouched) if it is not finite.
template <typename Scalar_>
class HraLinear final : public Layer<Scalar_> {
  using Base = Layer<Scalar_>;

 public:
  using typename Base::ConstRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;
  using Chain = ReflectorChain<Scalar>;

  /// One named adapter: its chain (U), gradient, options and whether it is folded into W.
  struct Adapter {
    std::string name;
    Chain chain;
    Matrix grad;
    HraOptions options;
    bool merged = false;
    typename Chain::ForwardCache cache;
  };

  /// Wraps W (and the optional bias b, d_out) with one adapter "default" made from `options`.
  /// Throws std::invalid_argument for a non-finite W or b, a bias of the wrong length, or bad
  /// adapter options (r = 0, r > d_in, odd r with symmetric init, ...).
  HraLinear(FrozenWeight<Scalar> weight, std::optional<Vector> bias, const HraOptions& options,
            BiasMode bias_mode = BiasMode::none)
      : weight_(std::move(weight)), bias_(std::move(bias)), bias_mode_(bias_mode) {
    detail::check_finite(weight_.map(), "HraLinear: frozen weight W");
    if (weight_.rows() < 1 || weight_.cols() < 1)
      detail::throw_invalid("HraLinear: the weight is empty (",
                            detail::shape(weight_.rows(), weight_.cols()), ")");
    if (bias_) {
      detail::check_shape(*bias_, weight_.rows(), 1, "HraLinear: bias (length must be d_out)");
      detail::check_finite(*bias_, "HraLinear: bias");
      bias_grad_.setZero(weight_.rows());
    } else if (bias_mode_ != BiasMode::none) {
      detail::throw_invalid("HraLinear: bias mode trains the bias but the layer has none");
    }
    add_adapter("default", options);
  }

  /// Convenience: own a copy of W.
  HraLinear(Matrix weight, const HraOptions& options)
      : HraLinear(FrozenWeight<Scalar>::owned(std::move(weight)), std::nullopt, options) {}

  Index input_dim() const override { return weight_.cols(); }
  Index output_dim() const override { return weight_.rows(); }

  /// Stacks a new adapter (applied after the existing ones, i.e. W H_old H_new).
  /// Throws for a duplicate name or bad options; the layer is unchanged on error.
  Adapter& add_adapter(const std::string& name, const HraOptions& options) {
    for (const auto& a : adapters_)
      if (a.name == name) detail::throw_invalid("HraLinear: adapter '", name, "' already exists");
    if (!(options.lambda >= 0.0) || !std::isfinite(options.lambda))
      detail::throw_invalid("HraLinear: regulariser weight lambda must be finite and >= 0, got ",
                            options.lambda);
    Adapter a{name,
              Chain::initialized(input_dim(), options.rank, options.init, options.seed,
                                 options.variant, options.block_size),
              Matrix::Zero(input_dim(), options.rank),
              options,
              false,
              {}};
    adapters_.push_back(std::move(a));
    state_ = State::idle;
    return adapters_.back();
  }

  /// The adapter called `name`; throws std::invalid_argument if there is none.
  Adapter& adapter(const std::string& name = "default") {
    for (auto& a : adapters_)
      if (a.name == name) return a;
    detail::throw_invalid("HraLinear: no adapter named '", name, "'");
  }
  const Adapter& adapter(const std::string& name = "default") const {
    return const_cast<HraLinear*>(this)->adapter(name);
  }
  const std::vector<Adapter>& adapters() const { return adapters_; }

  typename FrozenWeight<Scalar>::MapType weight() { return weight_.map(); }
  typename FrozenWeight<Scalar>::ConstMapType weight() const { return weight_.map(); }
  const std::optional<Vector>& bias() const { return bias_; }
  BiasMode bias_mode() const { return bias_mode_; }

  /// Y = W H X + b for X (d_in x n).
  const Matrix& forward(const ConstRef& x) override {
    detail::check_batch(x, input_dim(), "HraLinear::forward input");
    state_ = State::idle;  // a failure below leaves no half-made state behind
    hx_ = x;
    for (auto it = adapters_.rbegin(); it != adapters_.rend(); ++it)
      if (!it->merged) it->chain.forward_in_place(hx_, it->cache);
    y_.noalias() = weight_.map() * hx_;
    if (bias_) y_.colwise() += *bias_;
    state_ = State::forwarded;
    return y_;
  }

  /// Assigns dU of every unmerged adapter and db (when trainable); returns dX = H^T W^T dY.
  /// Without the input gradient and with at most one unmerged adapter, dU comes from
  /// ReflectorChain::backward_through: W^T dY (d_in x n, as costly as the forward) is never
  /// formed, and dU equals the other path's up to rounding.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    detail::check_backward(state_ == State::forwarded, dy, output_dim(), hx_.cols(), "HraLinear");
    state_ = State::idle;  // hx_ is consumed below
    if (bias_trainable()) bias_grad_ = dy.rowwise().sum();
    const auto unmerged = std::count_if(adapters_.begin(), adapters_.end(),
                                        [](const Adapter& a) { return !a.merged; });
    if (!compute_input_gradient && unmerged <= 1) {
      // No dX wanted and at most one chain: dU needs W^T dY only through r-dimensional
      // projections, so the d_in x n product W^T dY (as costly as the forward) is skipped.
      for (auto& a : adapters_)
        if (!a.merged) a.chain.backward_through(weight_.map(), dy, hx_, a.cache, a.grad);
      empty_.resize(0, 0);
      return empty_;
    }
    dx_.noalias() = weight_.map().transpose() * dy;
    for (auto& a : adapters_)
      if (!a.merged) a.chain.backward_in_place(hx_, dx_, a.cache, a.grad);
    if (!compute_input_gradient) empty_.resize(0, 0);
    return compute_input_gradient ? dx_ : empty_;
  }

  void predict(const ConstRef& x, Matrix& y) const override {
    detail::check_batch(x, input_dim(), "HraLinear::predict input");
    Matrix hx = x;
    for (auto it = adapters_.rbegin(); it != adapters_.rend(); ++it)
      if (!it->merged) it->chain.apply_in_place(hx);
    y.noalias() = weight_.map() * hx;
    if (bias_) y.colwise() += *bias_;
  }

  /// "hra_u.<adapter>" (d_in x r) for every unmerged adapter, then "bias" when trainable.
  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    for (auto& a : adapters_) {
      if (a.merged) continue;
      Matrix& u = a.chain.reflectors();
      out.push_back({"hra_u." + a.name,
                     {u.data(), u.rows(), u.cols()},
                     {a.grad.data(), a.grad.rows(), a.grad.cols()}});
    }
    if (bias_trainable())
      out.push_back(
          {"bias", {bias_->data(), bias_->rows(), 1}, {bias_grad_.data(), bias_grad_.rows(), 1}});
    return out;
  }

  Scalar regularizer() const override {
    Scalar total = 0;
    for (const auto& a : adapters_)
      if (!a.merged)
        total += orthogonality_regularizer<Scalar>(
            a.chain.reflectors(), static_cast<Scalar>(a.options.lambda), a.options.regularizer);
    return total;
  }

  Scalar add_regularizer() override {
    Scalar total = 0;
    for (auto& a : adapters_)
      if (!a.merged)
        total += orthogonality_regularizer<Scalar>(a.chain.reflectors(),
                                                   static_cast<Scalar>(a.options.lambda),
                                                   a.options.regularizer, &a.grad);
    return total;
  }

  /// Folds every unmerged adapter into W (W <- W H_a H_b ..., O(d_out d_in r)). With safe=true
  /// the result is computed aside and W is left untouched if it is not finite. Throws
  /// std::logic_error when there is nothing left to merge.
  void merge(bool safe) {
    const auto first = std::find_if(adapters_.begin(), adapters_.end(),
                                    [](const Adapter& a) { return !a.merged; });
    if (first == adapters_.end())
      throw std::logic_error("HraLinear::merge: every adapter is already merged");
    // Validate every factor first: a zero or non-finite column must not leave W half-merged.
    for (auto it = first; it != adapters_.end(); ++it) it->chain.factorize();
    if (safe) {
      Matrix w = weight_.map();
      for (auto it = first; it != adapters_.end(); ++it) it->chain.apply_right(w);
      if (!w.allFinite())
        throw std::runtime_error(
            "HraLinear::merge: the merged weight has non-finite values; W is left unchanged");
      weight_.map() = w;
    } else {
      for (auto it = first; it != adapters_.end(); ++it) it->chain.apply_right(weight_.map());
    }
    for (auto it = first; it != adapters_.end(); ++it) {
      it->merged = true;
      merge_order_.push_back(static_cast<std::size_t>(it - adapters_.begin()));
    }
    state_ = State::idle;
  }
  void merge() override { merge(false); }

  /// Undoes the most recent merge of one adapter (W <- W H^T); throws std::logic_error when no
  /// adapter is merged.
  void unmerge() override {
    if (merge_order_.empty()) throw std::logic_error("HraLinear::unmerge: no adapter is merged");
    Adapter& a = adapters_[merge_order_.back()];
    a.chain.apply_transpose_right(weight_.map());
    a.merged = false;
    merge_order_.pop_back();
    state_ = State::idle;
  }

  bool merged() const override { return merge_order_.size() == adapters_.size(); }

  std::size_t saved_bytes() const override {
    std::size_t bytes = static_cast<std::size_t>(hx_.size() + y_.size()) * sizeof(Scalar);
    for (const auto& a : adapters_)
      if (!a.merged) bytes += a.cache.bytes();
    return bytes;
  }

 private:
  enum class State { idle, forwarded };
  bool bias_trainable() const { return bias_ && bias_mode_ != BiasMode::none; }

  FrozenWeight<Scalar> weight_;
  std::optional<Vector> bias_;
  Vector bias_grad_;
  BiasMode bias_mode_;
  std::vector<Adapter> adapters_;
  std::vector<std::size_t> merge_order_;
  Matrix hx_, y_, dx_, empty_;
  State state_ = State::idle;
};

using HraLinearf = HraLinear<float>;
using HraLineard = HraLinear<double>;

}  // namespace hra
