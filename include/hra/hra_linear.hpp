// A frozen linear layer adapted by Householder reflections: y = W H x + b.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "hra_adapter_layer.hpp"
#include "linear_adapter.hpp"
#include "parallel.hpp"

namespace hra {

/// \brief y = W (H_1 ... H_k) x + b: a frozen linear layer with a stack of HRA adapters.
///
/// W is d_out x d_in (owned or viewed, see WeightMatrix), b an optional d_out vector; the
/// adapters, merge and unmerge are HraAdapterLayer's (D = d_in).
///
/// Kept between forward and backward: H x (d_in x n, needed for W H x anyway), Y (d_out x n,
/// the returned output), and per adapter r x n coefficients plus the factors of U (O(r d)).
/// backward() rebuilds every adapter's input from those, so nothing d x d is ever formed.
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
    detail::product(y_, this->weight(), hx_, Scalar(1));
    return this->finish_forward(y_, x.cols());
  }

  /// Assigns dU of every unmerged adapter and db (when trainable); returns dX = H^T W^T dY.
  /// Without the input gradient and with at most one unmerged adapter, dU comes from
  /// ReflectorChain::backward_through: W^T dY (d_in x n, as costly as the forward) is never
  /// formed, and dU equals the other path's up to rounding.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override {
    const ConstRef g = this->begin_dense_backward(dy, dx_, dy_copy_);  // dY may be the last dX
    auto& adapters = this->adapter_list();
    const std::vector<std::size_t> applied = this->applied();
    if (!compute_input_gradient && applied.size() <= 1) {
      // No dX wanted and at most one chain: dU needs W^T dY only through r-dimensional
      // projections, so the d_in x n product W^T dY (as costly as the forward) is skipped.
      for (std::size_t i : applied) {
        auto& a = adapters[i];
        a.chain().backward_through(this->cache(a).factors, this->cache(a).coeffs, this->weight(), g,
                                   hx_, this->gradient(a), /*restore_input=*/false);
      }
      empty_.resize(0, 0);
      return empty_;
    }
    detail::product(dx_, this->weight().transpose(), g, Scalar(1));
    // hx_ is walked back from H X through every adapter's input; the input X itself is never
    // needed, which saves the last adapter's d_in x n x r rebuild.
    for (std::size_t k = 0; k < applied.size(); ++k) {
      auto& a = adapters[applied[k]];
      a.chain().backward(this->cache(a).factors, this->cache(a).coeffs, hx_, dx_, this->gradient(a),
                         Chain::State::output, /*restore_input=*/k + 1 < applied.size());
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
    detail::product(y, this->weight(), hx, Scalar(1));  // hx is a copy: y may alias x
    this->add_bias(y);
  }

  /// \brief Inference where column j of X (d_in x n) uses adapter adapters()[column_adapter[j]]
  /// alone over the frozen W, or none (the base layer) for -1: Y = W H_{a(j)} x_j + b.
  ///
  /// Each adapter's chain acts on its own columns only and the product with W stays one product
  /// over the whole batch (H acts on the input side), as PEFT's adapter_names does for LoRA.
  /// Active flags do not matter here. std::invalid_argument for a list of the wrong length or an
  /// index out of range, std::logic_error while an adapter is merged (W is then not the base).
  void predict_mixed(const ConstRef& x, const std::vector<Index>& column_adapter, Matrix& y) const {
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
      for (std::size_t c = 0; c < cols.size(); ++c)
        part.col(static_cast<Index>(c)) = hx.col(cols[c]);
      chain.apply(f, part, Apply::h);
      for (std::size_t c = 0; c < cols.size(); ++c)
        hx.col(cols[c]) = part.col(static_cast<Index>(c));
    }
    detail::product(y, this->weight(), hx, Scalar(1));
    this->add_bias(y);
  }

  /// predict_mixed() with adapter names per column ("" for the base layer).
  void predict_mixed(const ConstRef& x, const std::vector<std::string>& column_adapter,
                     Matrix& y) const {
    std::vector<Index> index(column_adapter.size());
    for (std::size_t j = 0; j < column_adapter.size(); ++j)
      index[j] =
          column_adapter[j].empty() ? -1 : static_cast<Index>(this->index_of(column_adapter[j]));
    predict_mixed(x, index, y);
  }

  std::size_t saved_bytes() const override {
    std::size_t bytes = static_cast<std::size_t>(hx_.size() + y_.size()) * sizeof(Scalar);
    for (std::size_t i : this->applied()) bytes += this->cache(this->adapters()[i]).bytes();
    return bytes;
  }

 private:
  Matrix hx_, y_, dx_, dy_copy_, empty_;
};

using HraLinearf = HraLinear<float>;
using HraLineard = HraLinear<double>;

}  // namespace hra
