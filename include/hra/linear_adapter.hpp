// What HraLinear and LoraLinear share: their constructors over an adapter base.
#pragma once

#include <optional>
#include <type_traits>
#include <utility>

#include "affine_layer.hpp"
#include "weight_matrix.hpp"

namespace hra {

template <typename Scalar>
class HraAdapterLayer;
struct HraOptions;
struct LoraOptions;

namespace detail {

/// \brief An adapter layer on a dense W (d_out x d_in): the base of HraLinear (over
/// HraAdapterLayer, made from HraOptions) and LoraLinear (LoraAdapterLayer, LoraOptions).
///
/// Holds their two constructors, which they inherit. Each throws std::invalid_argument for a
/// non-finite W or b, a bias of the wrong length, or bad adapter options (as the adapter base
/// checks them: r = 0, r > d_in, odd r with symmetric init, ...), naming the layer.
template <typename AdapterBase>
class LinearAdapter : public AdapterBase {
  static constexpr bool hra =
      std::is_same_v<AdapterBase, HraAdapterLayer<typename AdapterBase::Scalar>>;

 public:
  HRA_LAYER_TYPES(AdapterBase);
  using Options = std::conditional_t<hra, HraOptions, LoraOptions>;

  /// Wraps W (and the optional bias b, d_out) with one adapter "default" made from `options`.
  LinearAdapter(WeightMatrix<Scalar> weight, std::optional<Vector> bias, const Options& options,
                BiasMode bias_mode = BiasMode::none)
      : AdapterBase(std::move(weight), std::move(bias), options, bias_mode,
                    hra ? "HraLinear" : "LoraLinear") {}

  /// Convenience: own a copy of W, no bias.
  LinearAdapter(Matrix weight, const Options& options)
      : LinearAdapter(WeightMatrix<Scalar>::owned(std::move(weight)), std::nullopt, options) {}
};

}  // namespace detail
}  // namespace hra
