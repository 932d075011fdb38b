// What every LoRA-adapted layer shares (dense or convolution): A, B, the scaling, their
// parameters, merge and unmerge.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "affine_layer.hpp"
#include "detail/gemm.hpp"
#include "detail/random.hpp"

namespace hra {

/// Options of a LoRA adapter, with PEFT's defaults.
struct LoraOptions {
  Eigen::Index rank = 8;   ///< r >= 1
  double alpha = 8.0;      ///< scaling alpha / r (PEFT's lora_alpha; 8 keeps PEFT's default 1)
  double dropout = 0.0;    ///< probability of zeroing an input entry on the LoRA path
  std::uint64_t seed = 0;  ///< seeds A's initialisation and the dropout masks
};

/// \brief Base of the LoRA layers: W (rows x D) adapted as W + s B A, s = alpha / r, with A
/// (r x D) and B (rows x r) (Hu et al. 2021; PEFT).
///
/// A is drawn as PEFT does (kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(D)); B starts
/// at zero, so the layer starts equal to the frozen one. merge(): W <- W + s B A; unmerge():
/// W <- W - s B A. Parameters "lora_A.default" and "lora_B.default" while unmerged (PEFT's
/// names: one adapter, "default"), then "bias" when trainable.
/// Derived layers implement forward, backward and predict (and dropout, which is applied to the
/// adapter path's input).
template <typename Scalar_>
class LoraAdapterLayer : public AffineLayer<Scalar_> {
  using Base = AffineLayer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);

  Scalar scaling() const { return static_cast<Scalar>(options_.alpha / options_.rank); }
  const LoraOptions& options() const { return options_; }

  const Matrix& lora_a() const { return a_; }  ///< A, r x D (PEFT lora_A.weight)
  const Matrix& lora_b() const { return b_; }  ///< B, rows x r (PEFT lora_B.weight)

  /// Replaces A (r x D) and B (rows x r) after checking both shapes and values (finite);
  /// std::invalid_argument otherwise, std::logic_error while merged (W holds s B A: unmerge()
  /// first). The layer is unchanged on error.
  void set_lora_weights(const ConstRef& a, const ConstRef& b);
  /// Replaces A alone (r x D), with the checks of set_lora_weights().
  void set_lora_a(const ConstRef& a) { set_lora_weights(a, b_); }
  /// Replaces B alone (rows x r), with the checks of set_lora_weights().
  void set_lora_b(const ConstRef& b) { set_lora_weights(a_, b); }

  /// The name of the layer's one adapter, as in its parameters ("lora_A.default").
  static const char* adapter_name() { return "default"; }

  /// "lora_A.default" (r x D) and "lora_B.default" (rows x r) while unmerged, then "bias" when
  /// trainable.
  std::vector<ParameterView<Scalar>> parameters() override;

  /// W <- W + s B A. Refused (std::runtime_error, W untouched) when the merged weight would not
  /// be finite, whichever the check (s B A is computed aside either way: MergeCheck::safe and
  /// in_place do the same here).
  void merge(MergeCheck check);
  void merge() override { merge(MergeCheck::in_place); }
  [[deprecated("use merge(MergeCheck::safe) or merge(MergeCheck::in_place)")]] void merge(
      bool safe) {
    merge(safe ? MergeCheck::safe : MergeCheck::in_place);
  }

  void unmerge() override;

  bool merged() const override { return merged_; }

  /// The generator of the dropout masks. It is training state when dropout > 0: a checkpoint
  /// saves and restores it (`checkpoint::Writer::rng`, `Reader::rng`) so that a resumed run
  /// draws the masks an uninterrupted one would.
  std::mt19937_64& dropout_engine() { return rng_.engine(); }

 protected:
  LoraAdapterLayer(WeightMatrix<Scalar> weight, std::optional<Vector> bias,
                   const LoraOptions& options, BiasMode bias_mode, const char* layer_name)
      : Base(std::move(weight), std::move(bias), bias_mode, layer_name, /*adapter_layer=*/true),
        options_(options),
        rng_(options.seed ^ 0x9e3779b97f4a7c15ULL) {
    const Index rows = this->weight().rows(), dim = this->weight().cols();
    if (options.rank < 1)
      detail::throw_invalid(layer_name, ": rank r must be >= 1, got r=", options.rank);
    if (options.rank > std::min(rows, dim))
      detail::throw_invalid(layer_name, ": rank r=", options.rank,
                            " exceeds min(d_out, d_in)=", std::min(rows, dim));
    if (!(options.dropout >= 0.0 && options.dropout < 1.0))
      detail::throw_invalid(layer_name, ": dropout must be in [0, 1), got ", options.dropout);
    if (!std::isfinite(options.alpha))
      detail::throw_invalid(layer_name, ": alpha must be finite, got ", options.alpha);
    detail::Random init(options.seed);
    const double bound = 1.0 / std::sqrt(static_cast<double>(dim));
    a_.resize(options.rank, dim);
    for (Index j = 0; j < a_.cols(); ++j)
      for (Index i = 0; i < a_.rows(); ++i) a_(i, j) = static_cast<Scalar>(init.uniform(bound));
    b_.setZero(rows, options.rank);
    grad_a_.setZero(a_.rows(), a_.cols());
    grad_b_.setZero(b_.rows(), b_.cols());
  }

  Matrix& gradient_a() { return grad_a_; }
  Matrix& gradient_b() { return grad_b_; }
  /// The generator of the dropout masks.
  detail::Random& dropout_rng() { return rng_; }

 private:
  LoraOptions options_;
  detail::Random rng_;
  Matrix a_, b_, grad_a_, grad_b_;
  bool merged_ = false;
};

template <typename Scalar_>
void LoraAdapterLayer<Scalar_>::set_lora_weights(const ConstRef& a, const ConstRef& b) {
  if (merged_)
    throw std::logic_error(detail::concat(this->layer_name(),
                                          "::set_lora_weights: the adapter is merged into W; "
                                          "unmerge() it first"));
  const std::string name = this->layer_name();
  detail::check_shape(a, a_.rows(), a_.cols(), (name + "::set_lora_weights A").c_str());
  detail::check_shape(b, b_.rows(), b_.cols(), (name + "::set_lora_weights B").c_str());
  detail::check_finite(a, (name + "::set_lora_weights A").c_str());
  detail::check_finite(b, (name + "::set_lora_weights B").c_str());
  Matrix a_new = a, b_new = b;  // a or b may be a_ or b_ themselves (set_lora_a/b)
  a_ = std::move(a_new);
  b_ = std::move(b_new);
  this->forget_forward();
}

template <typename Scalar_>
auto LoraAdapterLayer<Scalar_>::parameters() -> std::vector<ParameterView<Scalar>> {
  std::vector<ParameterView<Scalar>> out;
  if (!merged_) {
    out.push_back({"lora_A.default",
                   {a_.data(), a_.rows(), a_.cols()},
                   {grad_a_.data(), grad_a_.rows(), grad_a_.cols()}});
    out.push_back({"lora_B.default",
                   {b_.data(), b_.rows(), b_.cols()},
                   {grad_b_.data(), grad_b_.rows(), grad_b_.cols()}});
  }
  this->append_bias_parameter(out);
  return out;
}

template <typename Scalar_>
void LoraAdapterLayer<Scalar_>::merge(MergeCheck check) {
  const std::string name = this->layer_name();
  if (merged_) throw std::logic_error(name + "::merge: the adapter is already merged");
  detail::check_finite(a_, (name + "::merge: lora_A").c_str());
  detail::check_finite(b_, (name + "::merge: lora_B").c_str());
  // s B A is computed aside whichever the check, so W + s B A is checked before W is written
  // (finite A and B can still overflow: 1e30 entries): W never receives non-finite values.
  (void)check;
  Matrix delta;
  detail::serial_product(delta, b_, detail::Op::n, a_, detail::Op::n, scaling());
  if (!detail::all_finite(this->weight() + delta))
    throw std::runtime_error(
        name + "::merge: the merged weight has non-finite values; W is left unchanged");
  this->weight_storage().map() += delta;
  merged_ = true;
  this->forget_forward();
}

template <typename Scalar_>
void LoraAdapterLayer<Scalar_>::unmerge() {
  if (!merged_)
    throw std::logic_error(std::string(this->layer_name()) +
                           "::unmerge: the adapter is not merged");
  detail::serial_product(this->weight_storage().map(), b_, detail::Op::n, a_, detail::Op::n,
                         -scaling(), true);
  merged_ = false;
  this->forget_forward();
}

}  // namespace hra
