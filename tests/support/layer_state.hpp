// A bit-for-bit record of a layer's state, to prove that a call that throws changed nothing.
#pragma once

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "hra/affine_layer.hpp"
#include "matrices.hpp"

namespace hra_test {

/// Everything a user can observe of an AffineLayer: its weight, bias, parameter names, values
/// and gradients, and whether it is merged.
template <typename T>
struct LayerState {
  Mat<T> weight;
  bool has_bias = false;
  Vec<T> bias;
  std::vector<std::string> names;
  std::vector<Mat<T>> values, grads;
  bool merged = false;

  explicit LayerState(hra::AffineLayer<T>& layer)
      : weight(layer.weight()), has_bias(layer.bias().has_value()), merged(layer.merged()) {
    if (has_bias) bias = *layer.bias();
    for (const auto& p : layer.parameters()) {
      names.push_back(p.name);
      values.emplace_back(p.value);
      grads.emplace_back(p.grad);
    }
  }

  /// Requires `layer` to be exactly as recorded (every bit of every value).
  void require_same(hra::AffineLayer<T>& layer) const {
    const LayerState now(layer);
    CHECK(bitwise_equal(now.weight, weight));
    CHECK(now.has_bias == has_bias);
    if (has_bias && now.has_bias) CHECK(bitwise_equal(now.bias, bias));
    CHECK(now.merged == merged);
    REQUIRE(now.names == names);
    for (std::size_t k = 0; k < names.size(); ++k) {
      INFO("parameter " << names[k]);
      CHECK(bitwise_equal(now.values[k], values[k]));
      CHECK(bitwise_equal(now.grads[k], grads[k]));
    }
  }
};

}  // namespace hra_test
