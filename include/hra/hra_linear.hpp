// A frozen linear layer adapted by Householder reflections: y = W H x + b.
#pragma once

#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "detail/gemm.hpp"
#include "detail/low_rank_reflector.hpp"
#include "hra_adapter_layer.hpp"
#include "linear_adapter.hpp"

namespace hra {

/// \brief y = W (H_1 ... H_k) x + b: a frozen linear layer with a stack of HRA adapters.
///
/// W is d_out x d_in (owned or viewed, see WeightMatrix), b an optional d_out vector; the
/// adapters, merge and unmerge are HraAdapterLayer's (D = d_in).
///
/// Training applies H in one of two forms (both agree to rounding; the tests check it). Per
/// step (forward + backward with dX) with one adapter of rank r and a batch of n, their extra
/// flops over the frozen layer, the model estimated_flops() implements, are:
///
///   chain     X' = H X (SPEC 2), Y = W X'; backward from X' and G = W^T dY (SPEC 3):
///             12 r d_in n + 6 r^2 n + 3 d_in r^2.
///   low_rank  Y = W X - (W V) K, dX = W^T dY - V Z, dU from W^T (dY K^T), X Z^T, Z K^T
///             (SPEC 10; V = U, or Q for Gram-Schmidt), W V once per step:
///             4 d_in d_out r + 6 r n (d_in + d_out) + 6 r^2 n + 3 d_in r^2.
///
/// So the chain form is cheaper unless 3 n (d_in - d_out) > 2 d_in d_out: only a layer that
/// narrows (d_in > d_out) with a batch larger than about (2/3) d_in d_out / (d_in - d_out)
/// (910 at 4096 -> 1024) prefers the low-rank form, which then does LoRA's work plus two
/// d_out x d_in x r products. HraForm::automatic (the default) picks per batch;
/// set_form() forces one; last_form() says which the last forward() used. The low-rank form
/// serves one applied adapter (stacked ones use the chain form); predict() always uses the
/// chain form (its W U would cost more than the chain at any batch a merge does not serve
/// better).
///
/// Kept between forward and backward: chain form H x (d_in x n, needed for W H x anyway) and
/// per adapter r x n coefficients; low-rank form x and W V (d_out x r); both Y (d_out x n, the
/// returned output) and the factors of U (O(r d)). Nothing d x d is ever formed.
/// predict_mixed() serves a batch whose columns use different adapters over one frozen product.
/// The products with W run on hra's thread pool when large (see hra/parallel.hpp).
template <typename Scalar_>
class HraLinear final : public detail::LinearAdapter<HraAdapterLayer<Scalar_>> {
  using Base = detail::LinearAdapter<HraAdapterLayer<Scalar_>>;

 public:
  using typename Base::Adapter;
  using typename Base::Chain;
  HRA_LAYER_TYPES(Base);

  /// HraLinear(weight, bias, options, bias_mode = BiasMode::none) and HraLinear(W, options):
  /// see detail::LinearAdapter.
  using Base::Base;

  /// The form a forward() with a batch of n uses (never automatic); set_form() chooses it.
  HraForm form_for_batch(Index n) const;

  /// The cost model of the class comment: extra flops of one training step with a batch of n in
  /// `form` (automatic: the form form_for_batch() picks) over the frozen layer, summed over the
  /// applied adapters (0 when there are none). The low-rank form serves one adapter: with
  /// several it is not available and its cost is infinite.
  double estimated_flops(HraForm form, Index n) const;

  /// Y = W H X + b for X (d_in x n).
  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dU of every unmerged adapter and db (when trainable); returns dX = H^T W^T dY.
  /// Without the input gradient and with at most one unmerged adapter, dU comes from
  /// ReflectorChain::backward_through: W^T dY (d_in x n, as costly as the forward) is never
  /// formed, and dU equals the other path's up to rounding.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

  /// \brief Inference where column j of X (d_in x n) uses adapter adapters()[column_adapter[j]]
  /// alone over the frozen W, or none (the base layer) for -1: Y = W H_{a(j)} x_j + b.
  ///
  /// Each adapter's chain acts on its own columns only and the product with W stays one product
  /// over the whole batch (H acts on the input side), as PEFT's adapter_names does for LoRA.
  /// Active flags do not matter here. std::invalid_argument for a list of the wrong length or an
  /// index out of range, std::logic_error while an adapter is merged (W is then not the base).
  void predict_mixed(const ConstRef& x, const std::vector<Index>& column_adapter, Matrix& y) const;

  /// predict_mixed() with adapter names per column ("" for the base layer).
  void predict_mixed(const ConstRef& x, const std::vector<std::string>& column_adapter,
                     Matrix& y) const;

  std::size_t saved_bytes() const override;

 private:
  using Op = detail::Op;

  static constexpr HraForm forms[] = {HraForm::chain, HraForm::low_rank};
  std::pair<const HraForm*, const HraForm*> available_forms() const override {
    return {std::begin(forms), std::end(forms)};
  }
  // The form automatic compares the low-rank form with.
  static constexpr HraForm chain_form = HraForm::chain;

  // Backward of the low-rank form (SPEC 10), hx_ holding X: Z = C^T (W V)^T dY, dX = W^T dY -
  // V Z, and dU from the sums G K^T = W^T (dY K^T), X Z^T and Z K^T.
  void low_rank_backward(const ConstRef& g, Adapter& a, bool compute_input_gradient);

  Matrix hx_, y_, dx_, dy_copy_, empty_;
  Matrix wv_;                                  // low-rank form: W V (d_out x r)
  detail::LowRankReflector<Scalar> low_rank_;  // low-rank form: V and C of the adapter
  using Base::form_, Base::last_form_;
};

template <typename Scalar_>
auto HraLinear<Scalar_>::form_for_batch(Index n) const -> HraForm {
  if (form_ != HraForm::automatic) return this->unmerged_count() == 1 ? form_ : chain_form;
  return estimated_flops(HraForm::low_rank, n) < estimated_flops(chain_form, n) ? HraForm::low_rank
                                                                                : chain_form;
}

template <typename Scalar_>
double HraLinear<Scalar_>::estimated_flops(HraForm form, Index n) const {
  if (form == HraForm::automatic) form = form_for_batch(n);
  const std::vector<std::size_t> applied = this->applied();
  if (form == HraForm::low_rank && applied.size() > 1)
    return std::numeric_limits<double>::infinity();
  const double din = double(this->weight().cols()), dout = double(this->weight().rows());
  const double nn = double(n);
  double total = 0;
  for (std::size_t i : applied) {
    const double r = double(this->adapters()[i].rank());
    total += 6 * r * r * nn + 3 * din * r * r;
    if (form == HraForm::low_rank)
      total += 4 * din * dout * r + 6 * r * nn * (din + dout);
    else
      total += 12 * r * din * nn;
  }
  return total;
}

template <typename Scalar_>
auto HraLinear<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_input(x, "forward");
  this->forget_forward();
  // Every U is validated before anything is written: a column an optimiser made unusable
  // throws here and leaves the caches as they were.
  std::vector<typename Chain::Factors> factors = this->factorize_applied();
  const std::vector<std::size_t> applied = this->applied();
  auto& adapters = this->adapter_list();
  last_form_ = form_for_batch(x.cols());
  if (last_form_ == HraForm::low_rank) {
    // Y = W X - (W V) K with K = C V^T X (SPEC 10); x is copied first (it may alias y_).
    auto& a = adapters[applied.front()];
    auto& cache = this->cache(a);
    low_rank_ = detail::LowRankReflector<Scalar>(a.chain(), factors[applied.front()]);
    hx_ = x;
    detail::thin_product(wv_, this->weight(), Op::n, low_rank_.v(), Op::n);
    detail::thin_product(cache.coeffs, low_rank_.v(), Op::t, hx_, Op::n);
    low_rank_.apply_c(cache.coeffs);
    cache.factors = std::move(factors[applied.front()]);
    detail::product(y_, this->weight(), Op::n, hx_, Op::n);
    detail::thin_product(y_, wv_, Op::n, cache.coeffs, Op::n, Scalar(-1), true);
    return this->finish_forward(y_, x.cols());
  }
  wv_.resize(0, 0);
  hx_ = x;
  for (auto it = applied.rbegin(); it != applied.rend(); ++it) {
    auto& cache = this->cache(adapters[*it]);
    adapters[*it].chain().apply(factors[*it], hx_, Apply::h, &cache.coeffs);
    cache.factors = std::move(factors[*it]);
  }
  detail::product(y_, this->weight(), Op::n, hx_, Op::n);
  return this->finish_forward(y_, x.cols());
}

template <typename Scalar_>
auto HraLinear<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient)
    -> const Matrix& {
  const ConstRef g = this->begin_dense_backward(dy, dx_, dy_copy_);  // dY may be the last dX
  auto& adapters = this->adapter_list();
  const std::vector<std::size_t> applied = this->applied();
  if (last_form_ == HraForm::low_rank) {
    low_rank_backward(g, adapters[applied.front()], compute_input_gradient);
    return compute_input_gradient ? dx_ : empty_;
  }
  if (!compute_input_gradient && applied.size() <= 1) {
    // No dX wanted and at most one chain: dU needs W^T dY only through r-dimensional
    // projections, so the d_in x n product W^T dY (as costly as the forward) is skipped.
    for (std::size_t i : applied) {
      auto& a = adapters[i];
      a.chain().backward_through(this->cache(a).factors, this->cache(a).coeffs, this->weight(), g,
                                 hx_, this->adapter_gradient(a), /*restore_input=*/false);
    }
    empty_.resize(0, 0);
    return empty_;
  }
  detail::product(dx_, this->weight(), Op::t, g, Op::n);
  // hx_ is walked back from H X through every adapter's input; the input X itself is never
  // needed, which saves the last adapter's d_in x n x r rebuild.
  for (std::size_t k = 0; k < applied.size(); ++k) {
    auto& a = adapters[applied[k]];
    a.chain().backward(this->cache(a).factors, this->cache(a).coeffs, hx_, dx_,
                       this->adapter_gradient(a), Chain::State::output,
                       /*restore_input=*/k + 1 < applied.size());
  }
  if (!compute_input_gradient) {
    empty_.resize(0, 0);
    return empty_;
  }
  return dx_;
}

template <typename Scalar_>
void HraLinear<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  this->check_input(x, "predict");
  const std::vector<typename Chain::Factors> factors = this->factorize_applied();
  const std::vector<std::size_t> applied = this->applied();
  Matrix hx = x;
  for (auto it = applied.rbegin(); it != applied.rend(); ++it)
    this->adapters()[*it].chain().apply(factors[*it], hx, Apply::h);
  detail::product(y, this->weight(), Op::n, hx, Op::n);  // hx is a copy: y may alias x
  this->add_bias(y);
}

template <typename Scalar_>
void HraLinear<Scalar_>::predict_mixed(const ConstRef& x, const std::vector<Index>& column_adapter,
                                       Matrix& y) const {
  this->check_input(x, "predict_mixed");
  const auto& adapters = this->adapters();
  if (static_cast<Index>(column_adapter.size()) != x.cols())
    detail::throw_invalid("HraLinear::predict_mixed: ", column_adapter.size(),
                          " adapter indices for ", x.cols(), " columns");
  for (std::size_t j = 0; j < column_adapter.size(); ++j)
    if (column_adapter[j] < -1 || column_adapter[j] >= static_cast<Index>(adapters.size()))
      detail::throw_invalid("HraLinear::predict_mixed: column ", j, " names adapter index ",
                            column_adapter[j], ", but the layer has ", adapters.size(),
                            " adapters (valid: -1 for none, 0..", adapters.size() - 1, ")");
  for (const auto& a : adapters)
    if (a.merged())
      throw std::logic_error(
          "HraLinear::predict_mixed: adapter '" + a.name() +
          "' is merged into W, so W is not the base weight; unmerge_all() first");
  Matrix hx = x;
  Matrix part;
  std::vector<Index> cols;
  for (std::size_t a = 0; a < adapters.size(); ++a) {
    cols.clear();
    for (std::size_t j = 0; j < column_adapter.size(); ++j)
      if (column_adapter[j] == static_cast<Index>(a)) cols.push_back(static_cast<Index>(j));
    if (cols.empty()) continue;
    const Chain& chain = adapters[a].chain();
    const typename Chain::Factors f = chain.factorize();
    part.resize(hx.rows(), static_cast<Index>(cols.size()));
    for (std::size_t c = 0; c < cols.size(); ++c) part.col(static_cast<Index>(c)) = hx.col(cols[c]);
    chain.apply(f, part, Apply::h);
    for (std::size_t c = 0; c < cols.size(); ++c) hx.col(cols[c]) = part.col(static_cast<Index>(c));
  }
  detail::product(y, this->weight(), Op::n, hx, Op::n);
  this->add_bias(y);
}

template <typename Scalar_>
void HraLinear<Scalar_>::predict_mixed(const ConstRef& x,
                                       const std::vector<std::string>& column_adapter,
                                       Matrix& y) const {
  std::vector<Index> index(column_adapter.size());
  for (std::size_t j = 0; j < column_adapter.size(); ++j)
    index[j] =
        column_adapter[j].empty() ? -1 : static_cast<Index>(this->index_of(column_adapter[j]));
  predict_mixed(x, index, y);
}

template <typename Scalar_>
std::size_t HraLinear<Scalar_>::saved_bytes() const {
  std::size_t bytes =
      static_cast<std::size_t>(hx_.size() + y_.size() + wv_.size()) * sizeof(Scalar);
  for (std::size_t i : this->applied()) bytes += this->cache(this->adapters()[i]).bytes();
  return bytes;
}

template <typename Scalar_>
void HraLinear<Scalar_>::low_rank_backward(const ConstRef& g, Adapter& a,
                                           bool compute_input_gradient) {
  const Matrix& k = this->cache(a).coeffs;
  Matrix z, ek, gk, xz, zk;
  detail::thin_product(z, wv_, Op::t, g, Op::n);
  low_rank_.apply_ct(z);
  detail::thin_product(ek, g, Op::n, k, Op::t);
  detail::thin_product(gk, this->weight(), Op::t, ek, Op::n);
  detail::thin_product(xz, hx_, Op::n, z, Op::t);
  detail::serial_product(zk, z, Op::n, k, Op::t);
  low_rank_.gradient(gk, xz, zk, this->adapter_gradient(a));
  empty_.resize(0, 0);
  if (!compute_input_gradient) return;
  detail::product(dx_, this->weight(), Op::t, g, Op::n);
  detail::thin_product(dx_, low_rank_.v(), Op::n, z, Op::n, Scalar(-1), true);
}

using HraLinearf = HraLinear<float>;
using HraLineard = HraLinear<double>;

}  // namespace hra
