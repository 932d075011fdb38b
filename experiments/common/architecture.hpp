// The shapes of the experiments' networks (an MLP and a small CNN) as a list of layers, with their
// PyTorch-style initialisation and their safetensors layout. The network itself is
// an hra::Sequential, which chains any hra::Layer (dense, convolutional, adapted) with ReLUs.
#pragma once

#include <hra/hra.hpp>
#include <hra/io/safetensors.hpp>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlp.hpp"

namespace hra::experiments {

/// \brief One layer of a network: a convolution (its geometry) or a linear map.
///
/// Either way the layer maps inputs() x n batches to outputs() x n (a convolution's batch is
/// C H W x n, each column one image in PyTorch's C,H,W order), and its weight is the
/// weight_rows() x weight_cols() matrix hra's layers take: d_out x d_in for a linear map,
/// C_out x D (PyTorch's `weight.view(C_out, -1)`, D = C_in/groups kh kw) for a convolution.
struct LayerSpec {
  std::optional<Conv2dGeometry> conv;  ///< empty: a linear layer
  Eigen::Index linear_in = 0, linear_out = 0;

  static LayerSpec linear(Eigen::Index in, Eigen::Index out) { return {std::nullopt, in, out}; }
  static LayerSpec convolution(const Conv2dGeometry& g) { return {g, 0, 0}; }

  Eigen::Index inputs() const { return conv ? conv->input_size() : linear_in; }
  Eigen::Index outputs() const { return conv ? conv->output_size() : linear_out; }
  Eigen::Index weight_rows() const { return conv ? conv->out_channels() : linear_out; }
  /// The fan-in: the dimension HRA's reflections act on (so the largest HRA rank).
  Eigen::Index weight_cols() const { return conv ? conv->fan_in() : linear_in; }
  /// PyTorch's shape of the weight: (out, in) or (C_out, C_in/groups, kh, kw).
  std::vector<std::int64_t> torch_weight_shape() const {
    if (!conv) return {linear_out, linear_in};
    return {conv->out_channels(), conv->group_in_channels(), conv->kernel_h(), conv->kernel_w()};
  }
  /// "linear 784->10" or "conv 1->8 3x3/2 28x28->14x14".
  std::string describe() const {
    if (!conv) return "linear " + std::to_string(linear_in) + "->" + std::to_string(linear_out);
    const Conv2dGeometry& g = *conv;
    return "conv " + std::to_string(g.in_channels()) + "->" + std::to_string(g.out_channels()) +
           " " + std::to_string(g.kernel_h()) + "x" + std::to_string(g.kernel_w()) + "/" +
           std::to_string(g.stride_h()) + " " + std::to_string(g.height()) + "x" +
           std::to_string(g.width()) + "->" + std::to_string(g.out_height()) + "x" +
           std::to_string(g.out_width());
  }
};

/// An MLP sizes[0] -> sizes[1] -> ... -> sizes.back().
inline std::vector<LayerSpec> mlp_layers(const std::vector<Eigen::Index>& sizes) {
  std::vector<LayerSpec> out;
  for (std::size_t k = 0; k + 1 < sizes.size(); ++k)
    out.push_back(LayerSpec::linear(sizes[k], sizes[k + 1]));
  return out;
}

/// \brief The experiments' CNN on 1 x 28 x 28 images: conv 1->c1 3x3 stride 2 padding 1 (14 x 14),
/// ReLU, conv c1->c2 3x3 stride 2 padding 1 (7 x 7), ReLU, linear c2*49 -> classes.
///
/// PyTorch: nn.Sequential(nn.Conv2d(1, c1, 3, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 3, 2, 1),
/// nn.ReLU(), nn.Flatten(), nn.Linear(c2 * 49, classes)); the flatten is free here, since a
/// C H W x n batch already is the flattened one.
inline std::vector<LayerSpec> cnn_layers(Eigen::Index c1, Eigen::Index c2, Eigen::Index classes) {
  const auto first = Conv2dGeometry(1, 28, 28, c1, 3, 3).stride(2).padding(1);
  const auto second =
      Conv2dGeometry(c1, first.out_height(), first.out_width(), c2, 3, 3).stride(2).padding(1);
  return {LayerSpec::convolution(first), LayerSpec::convolution(second),
          LayerSpec::linear(second.output_size(), classes)};
}

/// "conv 1->8 3x3/2 28x28->14x14, conv 8->16 3x3/2 14x14->7x7, linear 784->10".
inline std::string describe(const std::vector<LayerSpec>& layers) {
  std::string out;
  for (const auto& l : layers) out += (out.empty() ? "" : ", ") + l.describe();
  return out;
}

/// PyTorch's default initialisation of nn.Linear and nn.Conv2d: W and b uniform in
/// +-1/sqrt(fan_in), drawn layer by layer (W, then b) from one mt19937_64(seed). For an MLP this
/// is exactly MlpWeights::initialized(sizes, seed).
template <typename Scalar>
MlpWeights<Scalar> initialized_weights(const std::vector<LayerSpec>& layers, std::uint64_t seed) {
  using W = MlpWeights<Scalar>;
  std::mt19937_64 rng(seed);
  W out;
  for (const auto& l : layers) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(l.weight_cols()));
    std::uniform_real_distribution<double> uniform(-bound, bound);
    typename W::Matrix w(l.weight_rows(), l.weight_cols());
    for (Eigen::Index i = 0; i < w.size(); ++i) w(i) = static_cast<Scalar>(uniform(rng));
    typename W::Vector b(l.weight_rows());
    for (Eigen::Index i = 0; i < b.size(); ++i) b(i) = static_cast<Scalar>(uniform(rng));
    out.weights.push_back(std::move(w));
    out.biases.push_back(std::move(b));
  }
  return out;
}

/// \brief Stores `w` in PyTorch's nn.Sequential layout: "layers.<k>.weight" with the layer's
/// PyTorch shape ((out, in) or (C_out, C_in/groups, kh, kw): the row-major memory of the
/// weight_rows() x weight_cols() matrix is exactly that tensor's) and "layers.<k>.bias".
/// The index k counts hra's layers (PyTorch's Sequential would number the ReLUs too).
template <typename Scalar>
void put_weights(safetensors::TensorFile& file, const std::vector<LayerSpec>& layers,
                 const MlpWeights<Scalar>& w) {
  for (std::size_t k = 0; k < layers.size(); ++k) {
    const std::string name = "layers." + std::to_string(k);
    const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rows =
        w.weights[k];
    file.put_array(name + ".weight", layers[k].torch_weight_shape(),
                   std::vector<Scalar>(rows.data(), rows.data() + rows.size()));
    file.put_vector(name + ".bias", w.biases[k]);
  }
}

/// The weights put_weights() stored; safetensors::tensor_error naming the tensor and both shapes
/// when one is missing or shaped otherwise.
template <typename Scalar>
MlpWeights<Scalar> get_weights(const safetensors::TensorFile& file,
                               const std::vector<LayerSpec>& layers) {
  MlpWeights<Scalar> w;
  for (std::size_t k = 0; k < layers.size(); ++k) {
    const std::string name = "layers." + std::to_string(k);
    const auto& t = file.at(name + ".weight");
    const auto expected = layers[k].torch_weight_shape();
    if (t.shape != expected)
      throw safetensors::tensor_error(file.source() + ": tensor '" + name + ".weight' has shape " +
                                      safetensors::shape_string(t.shape) + ", expected " +
                                      safetensors::shape_string(expected));
    const std::vector<Scalar> values = file.get_array<Scalar>(name + ".weight");
    w.weights.push_back(
        Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            values.data(), layers[k].weight_rows(), layers[k].weight_cols()));
    w.biases.push_back(file.get_vector<Scalar>(name + ".bias", layers[k].weight_rows()));
  }
  return w;
}

}  // namespace hra::experiments
