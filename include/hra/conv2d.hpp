// A plain 2-D convolution y = conv(x, W) + b, trainable or frozen (heads, full fine-tuning, the
// frozen baseline of the adapted convolutions).
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "conv_layer.hpp"
#include "dense_layer.hpp"

namespace hra {

/// \brief y = conv(x, W) + b: PyTorch's `F.conv2d(x, weight, bias, stride, padding, dilation,
/// groups)` with zero padding, on batches of images in hra's layout.
///
/// The geometry (Conv2dGeometry) fixes C_in x H x W, C_out, the kernel, stride, padding (per axis
/// or fully asymmetric), dilation and groups. W is the C_out x D matrix of PyTorch's
/// `weight.view(C_out, -1)` (D = C_in/groups kh kw, owned or viewed, see WeightMatrix), b an
/// optional C_out vector (one value per output channel). A batch is C_in H W x n (each column one
/// image, C,H,W order: the memory of an NCHW tensor); the output is C_out H_out W_out x n.
///
/// Per image and group g, with the patches T (L x C_in kh kw, see detail::im2col) and L = H_out
/// W_out: Y_g^T = T_g W_g^T (+ b), dT_g = dY_g^T W_g (then col2im), dW_g += (dY_g^T)^T T_g.
/// Images are processed one at a time, in up to 8 chunks of the batch run on hra's pool (see
/// detail::conv_workers; set_batch_chunks() overrides the chunk count), so memory stays bounded by
/// one image's patches per chunk, never the batch's, and results do not depend on the thread count.
///
/// With Conv2dOptions::train_weight the layer trains W ("weight", C_out x D); without it W is
/// frozen (see DenseLayer for the bias, merge() and what is kept: backward rebuilds the patches
/// from X).
template <typename Scalar_>
class Conv2d final : public detail::ConvLayer<DenseLayer<Scalar_>> {
  using Base = detail::ConvLayer<DenseLayer<Scalar_>>;

 public:
  HRA_LAYER_TYPES(Base);

  /// Throws std::invalid_argument for a bad geometry (Conv2dGeometry::validate), a weight that is
  /// not C_out x D or not finite, or a bias that is not C_out long or not finite.
  Conv2d(const Conv2dGeometry& geometry, WeightMatrix<Scalar> weight, std::optional<Vector> bias,
         const Conv2dOptions& options = {}, BiasMode bias_mode = BiasMode::none)
      : Base("Conv2d", geometry, std::move(weight), std::move(bias), options, bias_mode) {}

  /// Convenience: own a copy of W, no bias.
  Conv2d(const Conv2dGeometry& geometry, Matrix weight, const Conv2dOptions& options = {})
      : Conv2d(geometry, WeightMatrix<Scalar>::owned(std::move(weight)), std::nullopt, options) {}

  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dW (when W trains) and db (when b trains); returns dX (the transposed convolution
  /// of dY).
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

 private:
  using Base::x_, Base::y_, Base::dx_, Base::geometry_, Base::chunks_;
  struct Workspace {
    Matrix patches, patch_grad, weight_grad;
  };

  std::vector<Workspace> workspaces_;
  Matrix scratch_;  // a copy of an argument that aliases the buffer being written
};

template <typename Scalar_>
auto Conv2d<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_conv_input(x, "forward");
  this->forget_forward();
  // x is read while y_ is written: a copy when x is (part of) y_, the layer's last output.
  if (this->weight_trainable()) x_ = x;
  const ConstRef in = this->weight_trainable() ? ConstRef(x_) : this->unaliased(x, y_, scratch_);
  this->frozen_forward(in, y_, workspaces_);
  this->remember_forward(x.cols());
  return y_;
}

template <typename Scalar_>
auto Conv2d<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient) -> const Matrix& {
  const Index n = this->begin_backward(dy);
  const ConstRef dyv = this->unaliased(dy, dx_, scratch_);  // dY may be the last dX
  const Conv2dGeometry& g = geometry_;
  const Index l = g.out_positions(), co = g.out_channels();
  const bool train_w = this->weight_trainable();
  if (compute_input_gradient)
    dx_.resize(g.input_size(), n);
  else
    dx_.resize(0, 0);
  if (this->bias_trainable()) this->bias_backward(detail::channel_sums<Scalar>(g, dyv));
  if (!train_w && !compute_input_gradient) return dx_;
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces_, workers);
  for (auto& ws : workspaces_)
    if (train_w) ws.weight_grad.setZero(co, g.fan_in());
  const auto w = this->weight();
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    const auto dyt = detail::image_rows(dyv.col(b).data(), l, co);
    if (train_w) {
      const auto t = detail::image_patches(g, x_.col(b).data(), ws.patches);
      detail::grouped_weight_gradient_add<Scalar>(g, dyt, t, ws.weight_grad);
    }
    if (compute_input_gradient)
      detail::grouped_input_gradient<Scalar>(g, dyt, w, dx_.col(b).data(), ws.patch_grad);
  });
  if (train_w)
    detail::sum_over_workers(workspaces_, workers, &Workspace::weight_grad,
                             this->weight_gradient());
  return dx_;
}

template <typename Scalar_>
void Conv2d<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  std::vector<Workspace> ws;
  this->predict_conv(x, y, [&](Matrix& out) { this->frozen_forward(x, out, ws); });
}

using Conv2df = Conv2d<float>;
using Conv2dd = Conv2d<double>;

}  // namespace hra
