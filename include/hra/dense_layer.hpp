// What the layers without an adapter (Linear, Conv2d) share: a weight that trains or stays
// frozen, no merge, and the input and output kept between forward and backward.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "affine_layer.hpp"

namespace hra {

/// Options of a dense layer and of a dense convolution (WeightOptions::train_weight).
using LinearOptions = WeightOptions;
using Conv2dOptions = WeightOptions;

/// \brief Base of the dense layers y = W (...) + b that carry no adapter: Linear and Conv2d.
///
/// W trains when WeightOptions::train_weight says so ("weight"), the bias with BiasMode::all
/// ("bias"; adapter_only leaves it frozen, as PEFT's bias="hra_only" does for layers without an
/// adapter). merge() and unmerge() do nothing and merged() is always true. The derived layer
/// keeps its forward input in x_ (only when W trains: dW needs it) and its output in y_;
/// saved_bytes() counts both.
template <typename Scalar_>
class DenseLayer : public AffineLayer<Scalar_> {
  using Base = AffineLayer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);

  /// "weight" when it trains, then "bias" when it trains.
  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    this->append_weight_parameter(out);
    this->append_bias_parameter(out);
    return out;
  }

  void merge() override {}
  void unmerge() override {}
  bool merged() const override { return true; }

  std::size_t saved_bytes() const override {
    return static_cast<std::size_t>(x_.size() + y_.size()) * sizeof(Scalar);
  }

 protected:
  DenseLayer(WeightMatrix<Scalar> weight, std::optional<Vector> bias, const WeightOptions& options,
             BiasMode bias_mode, const char* layer_name)
      : Base(std::move(weight), std::move(bias), bias_mode, layer_name, /*adapter_layer=*/false,
             options.train_weight) {}

  Matrix x_, y_, dx_;  ///< forward input (when W trains), output, input gradient
};

}  // namespace hra
