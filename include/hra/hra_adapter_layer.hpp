// What every HRA-adapted layer shares (dense or convolution): a stack of named adapters over
// the weight's input side, their parameters, regulariser, control, merge and unmerge.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "affine_layer.hpp"
#include "detail/gemm.hpp"
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
  /// With Init::given: the initial U (D x rank; double holds a float U exactly). The layer
  /// checks it as set_reflectors() does; the other inits ignore it.
  Eigen::MatrixXd reflectors;

  /// Options whose adapter starts from the caller's U (D x r): rank r, Init::given, any r and
  /// either variant (the symmetric init needs an even r and the chain variant). One line where
  /// a check against PyTorch or a loaded U would otherwise need three:
  ///
  ///     hra::HraLinearf layer(W, hra::HraOptions::given(U));
  template <typename Derived>
  static HraOptions given(const Eigen::MatrixBase<Derived>& u, Variant variant = Variant::chain) {
    HraOptions o;
    o.rank = u.cols();
    o.variant = variant;
    o.init = Init::given;
    o.reflectors = u.template cast<double>();
    return o;
  }
};

/// \brief How an HRA layer applies H in training: one vocabulary for the dense and the
/// convolution layers (each layer's class comment gives the cost of the forms it has; its
/// set_form() refuses the others with std::invalid_argument). All forms agree to rounding.
enum class HraForm {
  automatic,  ///< the cheapest form the layer has, by its estimated_flops(), per batch size
  chain,      ///< HraLinear: H applied to the batch (SPEC 2-3), X' = H X, then W X'
  low_rank,   ///< W X - (W V) K (SPEC 10), LoRA's shape of work: HraLinear on the batch,
              ///< HraConv2d on every im2col patch (which it called the patch form)
  weight,     ///< HraConv2d: W' = W H once per step; dU from the full weight gradient dW'
  hybrid,     ///< HraConv2d: W' = W H once per step; dU from the low-rank form's r-sized sums
  patch [[deprecated("use HraForm::low_rank")]] = low_rank
};

inline const char* to_string(HraForm f) {
  static constexpr const char* names[] = {"automatic", "chain", "low_rank", "weight", "hybrid"};
  return detail::enum_name(f, names);
}

/// The names of one release ago (HraLinearForm {automatic, chain, low_rank}, HraConvForm
/// {automatic, patch, weight, hybrid}).
using HraLinearForm [[deprecated("use hra::HraForm")]] = HraForm;
using HraConvForm [[deprecated("use hra::HraForm (patch is HraForm::low_rank)")]] = HraForm;

namespace detail {
/// std::invalid_argument unless `form` is automatic or one of the layer's forms [first, last).
inline void check_form(HraForm form, const HraForm* first, const HraForm* last, const char* layer) {
  if (form == HraForm::automatic) return;
  std::string have;
  for (const HraForm* f = first; f != last; ++f) {
    if (*f == form) return;
    have += std::string(", ") + to_string(*f);
  }
  throw_invalid(layer, "::set_form: ", layer, " has no ", to_string(form),
                " form (its forms: automatic", have, ")");
}
}  // namespace detail

/// \brief Base of the HRA layers: W (rows x D) adapted as W H_a H_b ... by a stack of named
/// adapters, each a ReflectorChain on R^D (D = d_in for a dense layer, C_in/groups kh kw for a
/// convolution).
///
/// The layer starts with one adapter named "default"; add_adapter() stacks more, applied as PEFT
/// does (W H_a H_b ...: the last adapter touches x first). Control, as in PEFT:
/// - set_active_adapters() chooses which unmerged adapters forward() applies and backward()
///   trains (the others are kept, not applied, and not in parameters());
///   set_adapters_enabled(false) runs the frozen base alone; delete_adapter() removes one.
/// - merge() folds every applied adapter into W in stacking order (W <- W H_a H_b ..., each chain
///   factorised once, O(rows D r)); merge(names) folds a chosen subset, which must be the first
///   applied adapters, so that forward() still computes W H_a H_b ...; unmerge() undoes the most
///   recent merge of one adapter (last in, first out) with the U that was merged, whatever an
///   optimiser wrote into that U's memory since. With safe=true the merged weight is computed
///   aside and refused (exception, W untouched) if it is not finite.
/// Every verb that throws leaves the layer as it was. Derived layers implement forward, backward
/// and predict with applied() and the factor-level ReflectorChain API.
template <typename Scalar_>
class HraAdapterLayer : public AffineLayer<Scalar_> {
  using Base = AffineLayer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);
  using Chain = ReflectorChain<Scalar>;

  /// One named adapter: its chain (U), gradient, regulariser and state. Read-only outside the
  /// layer: U changes through set_reflectors() or an optimiser step on parameters(), the rest
  /// through the layer's verbs.
  class Adapter {
   public:
    const std::string& name() const { return name_; }
    const Chain& chain() const { return chain_; }
    Index rank() const { return chain_.rank(); }
    Variant variant() const { return chain_.variant(); }
    /// dL/dU (D x r) assigned by the last backward() (and add_regularizer()).
    const Matrix& gradient() const { return grad_; }
    /// Folded into W.
    bool merged() const { return merged_; }
    /// Chosen by set_active_adapters() (new adapters are active). An unmerged active adapter
    /// is applied while the layer's adapters are enabled.
    bool active() const { return active_; }
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
    bool active_ = true;
    std::optional<Chain> merged_chain_;   // the chain W holds while merged (unmerge uses it)
    typename Chain::ForwardCache cache_;  // what the last forward kept for backward
  };

  /// The exact LoRA form of adapters (SPEC §11): W H_a H_b ... = W + B A, A (R x D) and
  /// B (rows x R), R the summed rank, for the current W, in the scalar T they were computed in.
  template <typename T>
  struct BasicLoraFactors {
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>
        a;  ///< R x D, the adapters' A stacked in order
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> b;  ///< rows x R
    std::vector<std::pair<std::string, Index>> ranks;    ///< adapter names and ranks, in order
  };
  using LoraFactors = BasicLoraFactors<Scalar>;

  // --- Forms ---------------------------------------------------------------------------------

  /// The form of the next forward()/predict(): HraForm::automatic (the default) lets the
  /// layer's cost model choose per batch size (the derived layer's form_for_batch()); any other
  /// must be one of the layer's forms (HraLinear: chain, low_rank; HraConv2d: low_rank, weight,
  /// hybrid), else std::invalid_argument and the layer is unchanged.
  void set_form(HraForm form) {
    const auto forms = available_forms();
    detail::check_form(form, forms.first, forms.second, this->layer_name());
    form_ = form;
    this->forget_forward();
  }
  HraForm form() const { return form_; }
  /// The form the last forward() used (automatic before the first forward()).
  HraForm last_form() const { return last_form_; }

  // --- Adapters ------------------------------------------------------------------------------

  /// Stacks a new, active adapter (applied after the existing ones, i.e. W H_old H_new).
  /// Throws for an empty or duplicate name or bad options; the layer is unchanged on error.
  const Adapter& add_adapter(const std::string& name, const HraOptions& options);

  /// Removes adapter `name`. std::invalid_argument if there is none, std::logic_error if it is
  /// merged (W holds it: unmerge() it first).
  void delete_adapter(const std::string& name);

  /// The adapter called `name`; throws std::invalid_argument if there is none.
  const Adapter& adapter(const std::string& name = "default") const {
    return adapters_[index_of(name)];
  }
  const std::vector<Adapter>& adapters() const { return adapters_; }

  /// Replaces the U of adapter `name` (D x r, finite, usable by its variant: non-zero columns
  /// whose squared norms neither over- nor underflow, and independent ones for Gram-Schmidt).
  /// std::invalid_argument otherwise, and std::logic_error for a merged adapter (W holds it:
  /// unmerge() first); the layer is unchanged on error.
  void set_reflectors(const std::string& name, const ConstRef& u);
  /// set_reflectors() of the adapter "default".
  void set_reflectors(const ConstRef& u) { set_reflectors("default", u); }

  // --- Control -------------------------------------------------------------------------------

  /// Makes exactly the adapters `names` active (the others are kept but not applied). Every
  /// name must exist (std::invalid_argument) and every merged adapter must stay active, and no
  /// active unmerged adapter may precede a merged one in the stack, since W already holds the
  /// merged ones (std::logic_error). The layer is unchanged on error.
  void set_active_adapters(const std::vector<std::string>& names);

  /// The names of the active adapters, in stacking order.
  std::vector<std::string> active_adapters() const;

  /// With false, forward() and predict() compute the frozen base W x + b alone and nothing
  /// trains but a trainable bias; no adapter is deleted or changed. Disabling needs a W without
  /// merged adapters (std::logic_error otherwise: unmerge() first).
  void set_adapters_enabled(bool enabled);
  bool adapters_enabled() const { return enabled_; }

  // --- Training ------------------------------------------------------------------------------

  /// "hra_u.<adapter>" (D x r) for every applied adapter, then "bias" when trainable.
  std::vector<ParameterView<Scalar>> parameters() override;

  /// The regulariser of every applied adapter, summed. std::invalid_argument for a column an
  /// optimiser made zero or non-finite (its direction is undefined).
  Scalar regularizer() const override { return regularize(nullptr); }

  Scalar add_regularizer() override;

  // --- Merge ---------------------------------------------------------------------------------

  /// Folds every applied adapter into W (W <- W H_a H_b ..., O(rows D r)). With
  /// MergeCheck::safe the result is computed aside and W is left untouched if it is not finite.
  /// Throws std::logic_error when there is nothing to merge. merge() is merge(in_place).
  void merge(MergeCheck check);
  void merge() override { merge(MergeCheck::in_place); }
  [[deprecated("use merge(MergeCheck::safe) or merge(MergeCheck::in_place)")]] void merge(
      bool safe) {
    merge(safe ? MergeCheck::safe : MergeCheck::in_place);
  }

  /// Folds the adapters `names` into W, in stacking order. They must be active, unmerged and the
  /// first applied adapters (merging a later one first would change what forward() computes):
  /// std::invalid_argument for an unknown name, std::logic_error otherwise.
  void merge(const std::vector<std::string>& names, MergeCheck check = MergeCheck::in_place);
  [[deprecated("use merge(names, MergeCheck::safe) or merge(names, MergeCheck::in_place)")]] void
  merge(const std::vector<std::string>& names, bool safe) {
    merge(names, safe ? MergeCheck::safe : MergeCheck::in_place);
  }

  /// Undoes the most recent merge of one adapter (W <- W H^T with the U that was merged, which
  /// the adapter gets back); throws std::logic_error when no adapter is merged.
  void unmerge() override;

  /// Undoes every merge, most recent first.
  void unmerge_all();

  /// True when forward() applies no adapter on top of W (all merged, inactive or disabled).
  bool merged() const override { return applied().empty(); }

  // --- Export --------------------------------------------------------------------------------

  /// \brief The adapters `names` (default: the applied ones) as one exact LoRA over the current
  /// W: W H_a H_b ... = W + B A (SPEC §11). Per adapter, with W_j the weight after the ones
  /// before it: chain A_j = U^T, B_j = -(W_j U) S^{-1} (S over the whole chain);
  /// Gram-Schmidt A_j = Q^T, B_j = -2 W_j Q; A and B stack them, so R = sum of the ranks.
  /// B depends on W: the LoRA is exact for this base weight only. Computed in T from W and U as
  /// stored (lora_factors<double>() of a float layer: the rounding of float arithmetic is then
  /// not in the factors, only that of W and U). std::invalid_argument for an unknown name,
  /// std::logic_error for a merged adapter or an empty list.
  template <typename T = Scalar>
  BasicLoraFactors<T> lora_factors(std::vector<std::string> names = {}) const {
    using MatrixT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    if (names.empty())
      for (std::size_t i : applied()) names.push_back(adapters_[i].name_);
    if (names.empty())
      throw std::logic_error(std::string(this->layer_name()) +
                             "::lora_factors: no adapter to export (none is applied)");
    std::vector<std::size_t> order;
    for (const auto& n : names) {
      const std::size_t i = index_of(n);
      if (adapters_[i].merged_)
        throw std::logic_error(detail::concat(this->layer_name(), "::lora_factors: adapter '", n,
                                              "' is merged into W; a merged adapter has no "
                                              "separate LoRA form (unmerge() it first)"));
      if (std::find(order.begin(), order.end(), i) != order.end())
        detail::throw_invalid(this->layer_name(), "::lora_factors: adapter '", n,
                              "' is named twice");
      order.push_back(i);
    }
    std::sort(order.begin(), order.end());  // composed in stacking order
    Index total = 0;
    for (std::size_t i : order) total += adapters_[i].rank();
    BasicLoraFactors<T> out;
    out.a.resize(total, adapter_dim());
    out.b.resize(this->weight().rows(), total);
    // W in T, converted once for all the adapters (for T = Scalar, a view of W itself).
    const auto weight = this->weight();
    const std::conditional_t<std::is_same<T, Scalar>::value, decltype(weight), MatrixT> w =
        weight.template cast<T>();
    Index at = 0;
    for (std::size_t i : order) {
      const Chain& stored = adapters_[i].chain_;
      const ReflectorChain<T> chain(stored.reflectors().template cast<T>(), stored.variant(),
                                    stored.block_size());
      const Index r = chain.rank();
      const typename ReflectorChain<T>::Factors f = chain.factorize();
      // W_j V with W_j = W + B_{<j} A_{<j} (V = U, or Q for Gram-Schmidt).
      const MatrixT& v = chain.variant() == Variant::chain ? chain.reflectors() : f.q;
      MatrixT wu;
      detail::serial_product(wu, w, detail::Op::n, v, detail::Op::n);
      if (at > 0) {
        MatrixT av;
        detail::serial_product(av, out.a.topRows(at), detail::Op::n, v, detail::Op::n);
        detail::serial_product(wu, out.b.leftCols(at), detail::Op::n, av, detail::Op::n, T(1),
                               true);
      }
      if (chain.variant() == Variant::chain) {
        out.a.middleRows(at, r) = chain.reflectors().transpose();
        const MatrixT s = whole_chain_s(chain.reflectors());
        detail::Kernels<T>::solve_right_upper(detail::Op::n, s, wu);
        out.b.middleCols(at, r) = -wu;
      } else {
        out.a.middleRows(at, r) = f.q.transpose();
        out.b.middleCols(at, r) = T(-2) * wu;
      }
      out.ranks.emplace_back(adapters_[i].name_, r);
      at += r;
    }
    return out;
  }

 protected:
  HraAdapterLayer(WeightMatrix<Scalar> weight, std::optional<Vector> bias,
                  const HraOptions& options, BiasMode bias_mode, const char* layer_name)
      : Base(std::move(weight), std::move(bias), bias_mode, layer_name, /*adapter_layer=*/true) {
    add_adapter("default", options);
  }

  /// The derived layer's forms [first, last): set_form() accepts these and automatic.
  virtual std::pair<const HraForm*, const HraForm*> available_forms() const = 0;
  HraForm form_ = HraForm::automatic;
  HraForm last_form_ = HraForm::automatic;

  /// D: the weight's columns, the dimension every chain acts on.
  Index adapter_dim() const { return this->weight().cols(); }

  std::vector<Adapter>& adapter_list() { return adapters_; }
  /// Indices (into adapters()) of the adapters forward() applies and backward() trains, in
  /// stacking order: the product is W H_{a_0} H_{a_1} ..., so the last one touches x first.
  std::vector<std::size_t> applied() const;
  /// Number of adapters forward() applies.
  Index unmerged_count() const { return static_cast<Index>(applied().size()); }
  /// The factors of every applied adapter (indexed like adapters(); empty for the others),
  /// computed before anything is written so that an unusable U throws with the layer intact.
  std::vector<typename Chain::Factors> factorize_applied() const;
  /// Index of `name` in adapters(); std::invalid_argument naming the adapters when unknown.
  std::size_t index_of(const std::string& name) const;
  static typename Chain::ForwardCache& cache(Adapter& a) { return a.cache_; }
  static const typename Chain::ForwardCache& cache(const Adapter& a) { return a.cache_; }
  static Matrix& adapter_gradient(Adapter& a) { return a.grad_; }

 private:
  // S = striu(U^T U) + diag(U^T U) / 2 over all r columns (SPEC §2), upper triangular.
  template <typename M>
  static M whole_chain_s(const M& u) {
    M s;
    detail::serial_product(s, u, detail::Op::t, u, detail::Op::n);
    for (Index j = 0; j < s.cols(); ++j) {
      s(j, j) *= typename M::Scalar(0.5);
      for (Index i = j + 1; i < s.rows(); ++i) s(i, j) = 0;
    }
    return s;
  }

  // The chain add_adapter() starts from: drawn by options.init, or U as given (checked as
  // set_reflectors() checks it).
  Chain initial_chain(const std::string& name, const HraOptions& options) const;

  // No active unmerged adapter may come before a merged one: W holds the merged ones, so the
  // unmerged ones act after them whatever their place in the stack.
  void check_merged_prefix(const std::vector<bool>& active, const char* verb) const;

  // The regulariser of every applied adapter; adds its gradient into grads[k] when given.
  Scalar regularize(const std::vector<Matrix*>* grads) const;

  std::vector<Adapter> adapters_;
  std::vector<std::size_t> merge_order_;
  bool enabled_ = true;
};

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::add_adapter(const std::string& name, const HraOptions& options)
    -> const Adapter& {
  if (name.empty())
    detail::throw_invalid(this->layer_name(),
                          ": an adapter name must not be empty (\"\" names the base layer in "
                          "predict_mixed, so such an adapter could never be served)");
  for (const auto& a : adapters_)
    if (a.name() == name)
      detail::throw_invalid(this->layer_name(), ": adapter '", name, "' already exists");
  if (!(options.lambda >= 0.0) || !std::isfinite(options.lambda))
    detail::throw_invalid(this->layer_name(),
                          ": regulariser weight lambda must be finite and >= 0, got ",
                          options.lambda);
  adapters_.push_back(Adapter(name, initial_chain(name, options), options));
  this->forget_forward();
  return adapters_.back();
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::initial_chain(const std::string& name,
                                             const HraOptions& options) const -> Chain {
  if (options.init != Init::given)
    return Chain::initialized(adapter_dim(), options.rank, options.init, options.seed,
                              options.variant, options.block_size);
  const Eigen::MatrixXd& u = options.reflectors;
  if (u.rows() != adapter_dim() || u.cols() != options.rank)
    detail::throw_invalid(this->layer_name(), ": adapter '", name, "': Init::given needs U of ",
                          detail::shape(adapter_dim(), options.rank), " (D x rank) in ",
                          "HraOptions::reflectors, got ", detail::shape(u.rows(), u.cols()));
  Chain chain(u.template cast<Scalar>(), options.variant, options.block_size);
  chain.factorize();  // the checks a forward would make (zero or dependent columns)
  return chain;
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::delete_adapter(const std::string& name) {
  const std::size_t i = index_of(name);
  if (adapters_[i].merged_)
    throw std::logic_error(detail::concat(this->layer_name(), "::delete_adapter: adapter '", name,
                                          "' is merged into W; unmerge() it first"));
  adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
  for (auto& m : merge_order_)
    if (m > i) --m;
  this->forget_forward();
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::set_reflectors(const std::string& name, const ConstRef& u) {
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

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::set_active_adapters(const std::vector<std::string>& names) {
  std::vector<bool> active(adapters_.size(), false);
  for (const auto& n : names) active[index_of(n)] = true;
  for (std::size_t i = 0; i < adapters_.size(); ++i)
    if (adapters_[i].merged_ && !active[i])
      throw std::logic_error(detail::concat(this->layer_name(), "::set_active_adapters: adapter '",
                                            adapters_[i].name_,
                                            "' is merged into W and cannot be deactivated; "
                                            "unmerge() it first"));
  check_merged_prefix(active, "set_active_adapters");
  for (std::size_t i = 0; i < adapters_.size(); ++i) adapters_[i].active_ = active[i];
  this->forget_forward();
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::active_adapters() const -> std::vector<std::string> {
  std::vector<std::string> out;
  for (const auto& a : adapters_)
    if (a.active_) out.push_back(a.name_);
  return out;
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::set_adapters_enabled(bool enabled) {
  if (!enabled && !merge_order_.empty())
    throw std::logic_error(detail::concat(this->layer_name(),
                                          "::set_adapters_enabled(false): W holds merged "
                                          "adapters, so it is not the base weight; unmerge() "
                                          "them first"));
  enabled_ = enabled;
  this->forget_forward();
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::parameters() -> std::vector<ParameterView<Scalar>> {
  std::vector<ParameterView<Scalar>> out;
  for (std::size_t i : applied()) {
    Adapter& a = adapters_[i];
    auto u = a.chain_.reflector_values();
    out.push_back({"hra_u." + a.name_,
                   {u.data(), u.rows(), u.cols()},
                   {a.grad_.data(), a.grad_.rows(), a.grad_.cols()}});
  }
  this->append_bias_parameter(out);
  return out;
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::add_regularizer() -> Scalar {
  std::vector<Matrix*> grads;
  for (std::size_t i : applied()) grads.push_back(&adapters_[i].grad_);
  return regularize(&grads);
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::merge(MergeCheck check) {
  std::vector<std::string> names;
  for (std::size_t i : applied()) names.push_back(adapters_[i].name_);
  if (names.empty())
    throw std::logic_error(detail::concat(
        this->layer_name(), "::merge: ",
        merge_order_.size() == adapters_.size()
            ? "every adapter is already merged"
            : "no adapter to merge (every unmerged adapter is inactive or disabled)"));
  merge(names, check);
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::merge(const std::vector<std::string>& names, MergeCheck check) {
  if (!enabled_)
    throw std::logic_error(std::string(this->layer_name()) +
                           "::merge: adapters are disabled (set_adapters_enabled(true) first)");
  std::vector<bool> chosen(adapters_.size(), false);
  for (const auto& n : names) {
    const std::size_t i = index_of(n);
    if (adapters_[i].merged_)
      throw std::logic_error(
          detail::concat(this->layer_name(), "::merge: adapter '", n, "' is already merged"));
    if (!adapters_[i].active_)
      throw std::logic_error(
          detail::concat(this->layer_name(), "::merge: adapter '", n, "' is not active"));
    chosen[i] = true;
  }
  if (names.empty())
    throw std::logic_error(std::string(this->layer_name()) + "::merge: no adapter named");
  const std::vector<std::size_t> order = applied();
  std::size_t k = 0;
  while (k < order.size() && chosen[order[k]]) ++k;
  for (std::size_t j = k; j < order.size(); ++j)
    if (chosen[order[j]])
      throw std::logic_error(detail::concat(
          this->layer_name(), "::merge: adapter '", adapters_[order[j]].name_,
          "' comes after the unmerged adapter '", adapters_[order[k]].name_,
          "' in the stack; merge that one first (W H_a H_b needs H_a folded in before H_b)"));
  // Every factorisation first: a zero or non-finite column must not leave W half-merged.
  std::vector<typename Chain::Factors> factors;
  for (std::size_t j = 0; j < k; ++j) factors.push_back(adapters_[order[j]].chain_.factorize());
  const auto fold = [&](Eigen::Ref<Matrix> w) {
    for (std::size_t j = 0; j < k; ++j)
      adapters_[order[j]].chain_.apply_right(factors[j], w, Apply::h);
  };
  if (check == MergeCheck::safe) {
    Matrix w = this->weight();
    fold(w);
    if (!detail::all_finite(w))
      throw std::runtime_error(
          detail::concat(this->layer_name(),
                         "::merge: the merged weight has non-finite values; W is left unchanged"));
    this->weight_storage().map() = w;
  } else {
    fold(this->weight_storage().map());
  }
  for (std::size_t j = 0; j < k; ++j) {
    Adapter& a = adapters_[order[j]];
    a.merged_ = true;
    a.merged_chain_ = a.chain_;
    merge_order_.push_back(order[j]);
  }
  this->forget_forward();
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::unmerge() {
  if (merge_order_.empty())
    throw std::logic_error(detail::concat(this->layer_name(), "::unmerge: no adapter is merged"));
  Adapter& a = adapters_[merge_order_.back()];
  const Chain& merged = *a.merged_chain_;
  merged.apply_right(merged.factorize(), this->weight_storage().map(), Apply::transpose);
  // The values go back into U's own memory, so views of it taken earlier stay valid.
  a.chain_.reflector_values() = merged.reflectors();
  a.merged_chain_.reset();
  a.merged_ = false;
  merge_order_.pop_back();
  this->forget_forward();
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::unmerge_all() {
  while (!merge_order_.empty()) unmerge();
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::applied() const -> std::vector<std::size_t> {
  std::vector<std::size_t> out;
  if (!enabled_) return out;
  for (std::size_t i = 0; i < adapters_.size(); ++i)
    if (!adapters_[i].merged_ && adapters_[i].active_) out.push_back(i);
  return out;
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::factorize_applied() const -> std::vector<typename Chain::Factors> {
  std::vector<typename Chain::Factors> f(adapters_.size());
  for (std::size_t i : applied()) f[i] = adapters_[i].chain_.factorize();
  return f;
}

template <typename Scalar_>
std::size_t HraAdapterLayer<Scalar_>::index_of(const std::string& name) const {
  for (std::size_t i = 0; i < adapters_.size(); ++i)
    if (adapters_[i].name() == name) return i;
  std::string known;
  for (const auto& a : adapters_) known += (known.empty() ? "" : ", ") + a.name_;
  detail::throw_invalid(this->layer_name(), ": no adapter named '", name, "' (adapters: ", known,
                        ")");
}

template <typename Scalar_>
void HraAdapterLayer<Scalar_>::check_merged_prefix(const std::vector<bool>& active,
                                                   const char* verb) const {
  std::optional<std::size_t> unmerged_active;
  for (std::size_t i = 0; i < adapters_.size(); ++i) {
    if (adapters_[i].merged_ && unmerged_active)
      throw std::logic_error(detail::concat(
          this->layer_name(), "::", verb, ": adapter '", adapters_[*unmerged_active].name_,
          "' would be applied before the merged adapter '", adapters_[i].name_,
          "', but W already holds the merged one; unmerge() first"));
    if (!adapters_[i].merged_ && active[i] && !unmerged_active) unmerged_active = i;
  }
}

template <typename Scalar_>
auto HraAdapterLayer<Scalar_>::regularize(const std::vector<Matrix*>* grads) const -> Scalar {
  Scalar total = 0;
  std::size_t k = 0;
  for (std::size_t i : applied()) {
    const Adapter& a = adapters_[i];
    Matrix* g = grads ? (*grads)[k++] : nullptr;
    if (a.lambda_ == 0.0) continue;
    const auto norms = a.chain_.reflectors().colwise().norm();
    for (Index j = 0; j < norms.size(); ++j)
      if (!(norms(j) > Scalar(0)) || !std::isfinite(norms(j)) ||
          !std::isfinite(Scalar(1) / norms(j)))
        detail::throw_invalid(this->layer_name(), "::regularizer: adapter '", a.name_,
                              "': reflector column ", j, " has norm ",
                              static_cast<double>(norms(j)),
                              ", so its direction (all the regulariser sees) is undefined");
    total += orthogonality_regularizer<Scalar>(a.chain_.reflectors(),
                                               static_cast<Scalar>(a.lambda_), a.form_, g);
  }
  return total;
}

}  // namespace hra
