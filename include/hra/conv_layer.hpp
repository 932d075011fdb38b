// What Conv2d, HraConv2d and LoraConv2d share: the geometry over their base layer.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "affine_layer.hpp"
#include "conv_geometry.hpp"
#include "detail/conv_ops.hpp"
#include "weight_matrix.hpp"

namespace hra {
namespace detail {

/// \brief A layer on a convolution `Conv2dGeometry`: the base of Conv2d (over DenseLayer),
/// HraConv2d (HraAdapterLayer) and LoraConv2d (LoraAdapterLayer), as LinearAdapter is of the
/// dense adapters.
///
/// Holds the geometry, checked with W (C_out x D) before the base layer sees W; the input and
/// output sizes it gives (C_in H W and C_out H_out W_out); the conv_geometry() query; the chunk
/// count of the per-image loops; and the entry check of forward() and predict(). Threads come
/// from hra's pool (hra::set_num_threads); set_batch_chunks() only fixes how a batch is split,
/// which orders the weight-gradient sums (rounding only, see detail::conv_workers).
template <typename Base>
class ConvLayer : public Base {
 public:
  HRA_LAYER_TYPES(Base);

  const Conv2dGeometry& geometry() const { return geometry_; }
  const Conv2dGeometry* conv_geometry() const override { return &geometry_; }
  Index input_dim() const override { return geometry_.input_size(); }
  Index output_dim() const override { return geometry_.output_size(); }

  /// Chunks of the per-image loops: 0 (default) chooses from n alone (see detail::conv_workers),
  /// c >= 1 uses min(c, n). The chunk count changes the order of the weight-gradient sums
  /// (rounding only); the thread count changes nothing.
  void set_batch_chunks(int chunks) { chunks_ = chunks; }
  int batch_chunks() const { return chunks_; }
  [[deprecated("use set_batch_chunks(); threads are hra::set_num_threads()")]] void set_threads(
      int chunks) {
    set_batch_chunks(chunks);
  }

 protected:
  using Op = detail::Op;

  /// Checks the geometry (Conv2dGeometry::validate) and that W is C_out x D, naming `layer`,
  /// then builds the base layer from W, b, its options and bias mode.
  template <typename Options>
  ConvLayer(const char* layer, const Conv2dGeometry& geometry, WeightMatrix<Scalar> weight,
            std::optional<Vector> bias, const Options& options, BiasMode bias_mode)
      : Base(checked(layer, geometry, std::move(weight)), std::move(bias), options, bias_mode,
             layer),
        geometry_(geometry) {}

  /// The entry check of forward() and predict() (detail::check_conv_input).
  void check_conv_input(const ConstRef& x, const char* method) const {
    detail::check_conv_input(x, geometry_, this->layer_name(), method);
  }

  /// Y = conv(X, W) + b with the layer's weight (frozen, or holding the merged adapters).
  template <typename Workspace>
  void frozen_forward(const ConstRef& x, Matrix& y, std::vector<Workspace>& ws) const {
    detail::conv_forward<Scalar>(geometry_, x, this->weight(), this->bias(), y, chunks_, ws);
  }

  /// predict()'s frame: checks x, then runs compute(out) into y (through write_unaliased, so
  /// predict(m, m) is allowed).
  template <typename Compute>
  void predict_conv(const ConstRef& x, Matrix& y, Compute&& compute) const {
    check_conv_input(x, "predict");
    this->write_unaliased(x, y, std::forward<Compute>(compute));
  }

  /// At least `workers` workspaces in `ws` (the per-worker buffers of a per-image loop).
  template <typename Workspace>
  static void prepare(std::vector<Workspace>& ws, int workers) {
    if (ws.size() < static_cast<std::size_t>(workers)) ws.resize(static_cast<std::size_t>(workers));
  }

  Conv2dGeometry geometry_;
  int chunks_ = 0;

 private:
  static WeightMatrix<Scalar> checked(const char* layer, const Conv2dGeometry& g,
                                      WeightMatrix<Scalar> w) {
    g.validate(layer);
    detail::check_conv_weight(w.rows(), w.cols(), g, layer);
    return w;
  }
};

}  // namespace detail
}  // namespace hra
