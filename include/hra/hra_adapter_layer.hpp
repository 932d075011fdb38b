// What every HRA-adapted layer shares (dense or convolution): a stack of named adapters over
// the weight's input side, their parameters, regulariser, merge and unmerge.
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
#include "orthogonality.hpp"
#include "reflector_chain.hpp"

namespace hra {

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

/// \brief Base of the HRA layers: W (rows x D) adapted as W H_a H_b ... by a stack of named
/// adapters, each a ReflectorChain on R^D (D = d_in for a dense layer, C_in/groups kh kw for a
/// convolution).
///
/// The layer starts with one adapter named "default"; add_adapter() stacks more, applied as PEFT
/// does (W H_a H_b ...: the last adapter touches x first). Each unmerged adapter is trainable
/// ("hra_u.<name>", D x r). merge() folds every unmerged adapter into W in order
/// (W <- W H_a H_b ..., each chain factorised once, O(rows D r)); unmerge() undoes the most
/// recent merge (last in, first out). With safe=true the merged weight is computed aside and
/// refused (exception, W untouched) if it is not finite. Derived layers implement forward,
/// backward and predict with the factor-level ReflectorChain API.
template <typename Scalar_>
class HraAdapterLayer : public AffineLayer<Scalar_> {
  using Base = AffineLayer<Scalar_>;

 public:
  using typename Base::ConstRef;
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Scalar;
  using typename Base::Vector;
  using Chain = ReflectorChain<Scalar>;

  /// One named adapter: its chain (U), gradient, regulariser and whether it is folded into W.
  /// Read-only outside the layer: U changes through set_reflectors() or an optimiser step on
  /// parameters(), the rest through the layer's verbs.
  class Adapter {
   public:
    const std::string& name() const { return name_; }
    const Chain& chain() const { return chain_; }
    Index rank() const { return chain_.rank(); }
    Variant variant() const { return chain_.variant(); }
    /// dL/dU (D x r) assigned by the last backward() (and add_regularizer()).
    const Matrix& gradient() const { return grad_; }
    bool merged() const { return merged_; }
    double lambda() const { return lambda_; }
    RegularizerForm regularizer_form() const { return form_; }
    /// How U was first drawn (informational once trained; PEFT's init_weights).
    Init init() const { return init_; }
    std::uint64_t seed() const { return seed_; }
    /// The options this adapter was made with, rank, variant and block size read off its chain.
    HraOptions options() const {
      HraOptions o;
      o.rank = chain_.rank();
      o.variant = chain_.variant();
      o.init = init_;
      o.seed = seed_;
      o.lambda = lambda_;
      o.regularizer = form_;
      o.block_size = chain_.block_size();
      return o;
    }

   private:
    friend class HraAdapterLayer;
    Adapter(std::string name, Chain chain, const HraOptions& o)
        : name_(std::move(name)),
          chain_(std::move(chain)),
          grad_(Matrix::Zero(chain_.dim(), chain_.rank())),
          lambda_(o.lambda),
          form_(o.regularizer),
          init_(o.init),
          seed_(o.seed) {}

    std::string name_;
    Chain chain_;
    Matrix grad_;
    double lambda_;
    RegularizerForm form_;
    Init init_;
    std::uint64_t seed_;
    bool merged_ = false;
    typename Chain::ForwardCache cache_;  // what the last forward kept for backward
  };

  /// Stacks a new adapter (applied after the existing ones, i.e. W H_old H_new).
  /// Throws for a duplicate name or bad options; the layer is unchanged on error.
  const Adapter& add_adapter(const std::string& name, const HraOptions& options) {
    for (const auto& a : adapters_)
      if (a.name() == name)
        detail::throw_invalid(this->layer_name(), ": adapter '", name, "' already exists");
    if (!(options.lambda >= 0.0) || !std::isfinite(options.lambda))
      detail::throw_invalid(this->layer_name(),
                            ": regulariser weight lambda must be finite and >= 0, got ",
                            options.lambda);
    adapters_.push_back(
        Adapter(name,
                Chain::initialized(adapter_dim(), options.rank, options.init, options.seed,
                                   options.variant, options.block_size),
                options));
    this->forget_forward();
    return adapters_.back();
  }

  /// The adapter called `name`; throws std::invalid_argument if there is none.
  const Adapter& adapter(const std::string& name = "default") const {
    return adapters_[index_of(name)];
  }
  const std::vector<Adapter>& adapters() const { return adapters_; }

  /// Replaces the U of adapter `name` (D x r, finite, usable by its variant: non-zero columns,
  /// and independent ones for Gram-Schmidt). std::invalid_argument otherwise, and
  /// std::logic_error for a merged adapter (W holds it: unmerge() first); the layer is
  /// unchanged on error.
  void set_reflectors(const std::string& name, const ConstRef& u) {
    Adapter& a = adapters_[index_of(name)];
    if (a.merged_)
      throw std::logic_error(detail::concat(this->layer_name(), "::set_reflectors: adapter '", name,
                                            "' is merged into W; unmerge() it first"));
    Chain candidate = a.chain_;
    candidate.set_reflectors(u);
    candidate.factorize();  // the checks a forward would make (dependent columns for GS)
    a.chain_ = std::move(candidate);
    this->forget_forward();
  }

  /// "hra_u.<adapter>" (D x r) for every unmerged adapter, then "bias" when trainable.
  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    for (auto& a : adapters_) {
      if (a.merged_) continue;
      auto u = a.chain_.reflector_values();
      out.push_back({"hra_u." + a.name_,
                     {u.data(), u.rows(), u.cols()},
                     {a.grad_.data(), a.grad_.rows(), a.grad_.cols()}});
    }
    this->append_bias_parameter(out);
    return out;
  }

  Scalar regularizer() const override {
    Scalar total = 0;
    for (const auto& a : adapters_)
      if (!a.merged_)
        total += orthogonality_regularizer<Scalar>(a.chain_.reflectors(),
                                                   static_cast<Scalar>(a.lambda_), a.form_);
    return total;
  }

  Scalar add_regularizer() override {
    Scalar total = 0;
    for (auto& a : adapters_)
      if (!a.merged_)
        total += orthogonality_regularizer<Scalar>(
            a.chain_.reflectors(), static_cast<Scalar>(a.lambda_), a.form_, &a.grad_);
    return total;
  }

  /// Folds every unmerged adapter into W (W <- W H_a H_b ..., O(rows D r)). With safe=true
  /// the result is computed aside and W is left untouched if it is not finite. Throws
  /// std::logic_error when there is nothing left to merge.
  void merge(bool safe) {
    const auto first = std::find_if(adapters_.begin(), adapters_.end(),
                                    [](const Adapter& a) { return !a.merged_; });
    if (first == adapters_.end())
      throw std::logic_error(
          detail::concat(this->layer_name(), "::merge: every adapter is already merged"));
    // Every factorisation first: a zero or non-finite column must not leave W half-merged.
    std::vector<typename Chain::Factors> factors;
    for (auto it = first; it != adapters_.end(); ++it) factors.push_back(it->chain_.factorize());
    const auto fold = [&](Eigen::Ref<Matrix> w) {
      for (auto it = first; it != adapters_.end(); ++it)
        it->chain_.apply_right(factors[static_cast<std::size_t>(it - first)], w, Apply::h);
    };
    if (safe) {
      Matrix w = this->weight();
      fold(w);
      if (!w.allFinite())
        throw std::runtime_error(detail::concat(
            this->layer_name(),
            "::merge: the merged weight has non-finite values; W is left unchanged"));
      this->weight_storage().map() = w;
    } else {
      fold(this->weight_storage().map());
    }
    for (auto it = first; it != adapters_.end(); ++it) {
      it->merged_ = true;
      merge_order_.push_back(static_cast<std::size_t>(it - adapters_.begin()));
    }
    this->forget_forward();
  }
  void merge() override { merge(false); }

  /// Undoes the most recent merge of one adapter (W <- W H^T); throws std::logic_error when no
  /// adapter is merged.
  void unmerge() override {
    if (merge_order_.empty())
      throw std::logic_error(detail::concat(this->layer_name(), "::unmerge: no adapter is merged"));
    Adapter& a = adapters_[merge_order_.back()];
    a.chain_.apply_transpose_right(this->weight_storage().map());
    a.merged_ = false;
    merge_order_.pop_back();
    this->forget_forward();
  }

  bool merged() const override { return merge_order_.size() == adapters_.size(); }

 protected:
  /// `adapter_dim` is D, the dimension the adapters act on (the weight's columns).
  HraAdapterLayer(WeightMatrix<Scalar> weight, std::optional<Vector> bias,
                  const HraOptions& options, BiasMode bias_mode, const char* layer_name)
      : Base(std::move(weight), std::move(bias), bias_mode, layer_name, /*adapter_layer=*/true) {
    add_adapter("default", options);
  }

  /// D: the weight's columns, the dimension every chain acts on.
  Index adapter_dim() const { return this->weight().cols(); }

  std::vector<Adapter>& adapter_list() { return adapters_; }
  /// Indices (into adapters()) of the adapters forward() applies and backward() trains, in
  /// stacking order: the product is W H_{a_0} H_{a_1} ..., so the last one touches x first.
  std::vector<std::size_t> applied() const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (!adapters_[i].merged_) out.push_back(i);
    return out;
  }
  /// Number of adapters forward() applies.
  Index unmerged_count() const { return static_cast<Index>(applied().size()); }
  /// The factors of every applied adapter (indexed like adapters(); empty for the others),
  /// computed before anything is written so that an unusable U throws with the layer intact.
  std::vector<typename Chain::Factors> factorize_applied() const {
    std::vector<typename Chain::Factors> f(adapters_.size());
    for (std::size_t i : applied()) f[i] = adapters_[i].chain_.factorize();
    return f;
  }
  static typename Chain::ForwardCache& cache(Adapter& a) { return a.cache_; }
  static const typename Chain::ForwardCache& cache(const Adapter& a) { return a.cache_; }
  static Matrix& gradient(Adapter& a) { return a.grad_; }

 private:
  std::size_t index_of(const std::string& name) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i].name() == name) return i;
    detail::throw_invalid(this->layer_name(), ": no adapter named '", name, "'");
  }

  std::vector<Adapter> adapters_;
  std::vector<std::size_t> merge_order_;
};

}  // namespace hra
