// The LoRA baseline on a 2-D convolution: y = conv(x, W) + s conv1x1(conv(D(x), A), B) + b.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "conv_layer.hpp"
#include "lora_adapter_layer.hpp"

namespace hra {

/// \brief PEFT's LoRA on a convolution: y = conv(x, W) + s B (A * D(x)) + b, s = alpha / r, i.e.
/// the weight W + s B A in the C_out x D view of `weight.view(C_out, -1)`.
///
/// A (r x D) is a convolution with the base layer's kernel, stride, padding and dilation (r
/// output channels), B (C_out x r) a 1x1 convolution; D is inverted dropout on the adapter
/// path's input x, as in PEFT (identity in predict()). A, B, init (A kaiming-uniform, B = 0),
/// merge (W <- W + s B A) and unmerge are LoraAdapterLayer's. For groups = 1 and dilation 1 this
/// is exactly PEFT's `lora.Conv2d`: `lora_A.weight` (r, C_in, kh, kw) is A viewed as r x D and
/// `lora_B.weight` (C_out, r, 1, 1) is B.
///
/// Where PEFT differs: its lora_A is built from the base layer's kernel, stride and padding but
/// not its dilation (so a dilated base layer gets an undilated A), and for groups > 1 its A sees
/// all C_in channels while B is a grouped 1x1 conv with r/groups inputs per group (r must be
/// divisible by groups) — an update that is not a change of the grouped weight, which is why
/// PEFT refuses to merge it. Here ΔW = s B A is the exact low-rank update of the grouped weight
/// (C_out x D, D = C_in/groups kh kw): A is applied to every group's patches and group g's
/// output channels read their own r coefficients through their rows of B. It merges like any
/// LoRA; its A (r, C_in/groups, kh, kw) and B (C_out, r, 1, 1) have PEFT's shapes only for
/// groups = 1.
///
/// Per image and group, with the patches T_g (L x D) of x (and of D(x) for the adapter path):
/// K_g^T = T_g A^T (L x r), Y_g^T = T_g W_g^T + s K_g^T B_g^T; backward Z_g^T = s dY_g^T B_g,
/// dB = s sum dY_g K_g, dA = sum Z_g T_g, dT_g = dY_g^T W_g + Z_g^T A (then col2im).
/// Kept between forward and backward: D(x) (C_in H W x n; the input itself when dropout is 0:
/// backward rebuilds the patches from it), K (r x G n L), Y, and with dropout the keep mask (one
/// byte per input entry).
template <typename Scalar_>
class LoraConv2d final : public detail::ConvLayer<LoraAdapterLayer<Scalar_>> {
  using Base = detail::ConvLayer<LoraAdapterLayer<Scalar_>>;
  using typename Base::Op;

 public:
  HRA_LAYER_TYPES(Base);

  /// Throws std::invalid_argument for a bad geometry, a W that is not C_out x D or not finite, a
  /// bad bias, r > min(C_out, D), or bad LoRA options (as LoraLinear).
  LoraConv2d(const Conv2dGeometry& geometry, WeightMatrix<Scalar> weight,
             std::optional<Vector> bias, const LoraOptions& options,
             BiasMode bias_mode = BiasMode::none)
      : Base("LoraConv2d", geometry, checked(geometry, std::move(weight), options), std::move(bias),
             options, bias_mode) {}

  /// Convenience: own a copy of W, no bias.
  LoraConv2d(const Conv2dGeometry& geometry, Matrix weight, const LoraOptions& options)
      : LoraConv2d(geometry, WeightMatrix<Scalar>::owned(std::move(weight)), std::nullopt,
                   options) {}

  /// While set, forward() reuses the last dropout mask (same batch shape) instead of drawing a
  /// new one (see LoraLinear::set_reuse_dropout_mask).
  void set_reuse_dropout_mask(bool reuse) { reuse_mask_ = reuse; }

  /// Y = conv(X, W) + s conv(dropout(X), B A) + b for X (C_in H W x n); conv(X, W) + b alone
  /// while merged (W holds B A then).
  const Matrix& forward(const ConstRef& x) override;

  /// Assigns dA, dB (when unmerged) and db (when trainable); returns dX.
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;

  void predict(const ConstRef& x, Matrix& y) const override;

  std::size_t saved_bytes() const override;

 private:
  struct Workspace {
    Matrix patches, adapter_patches, patch_grad, zt, grad_a, grad_b, adapter_grad;
  };

  static WeightMatrix<Scalar> checked(const Conv2dGeometry& g, WeightMatrix<Scalar> w,
                                      const LoraOptions& o) {
    g.validate("LoraConv2d");  // before fan_in() is used; the base checks W
    if (o.rank > std::min(g.out_channels(), g.fan_in()))
      detail::throw_invalid("LoraConv2d: rank r=", o.rank, " exceeds min(C_out, D) = min(",
                            g.out_channels(), ", ", g.fan_in(),
                            ") (D = C_in/groups*kh*kw = ", g.group_in_channels(), "*", g.kernel_h(),
                            "*", g.kernel_w(), ")");
    return w;
  }

  // Y = conv(X, W) + s B (A * X_a) + b with X_a = *xa (dropout) or X. With `k`, the
  // coefficients K^T of every image (G L x r) are kept there for backward.
  void run_forward(const ConstRef& x, const Matrix* xa, Matrix& y, Matrix* k,
                   std::vector<Workspace>& workspaces) const;

  // Where one image's patch gradient dT (L x C_in kh kw) is built: the image gradient itself for
  // a pointwise geometry (dT is dX), else `buffer`.
  Eigen::Map<Matrix> patch_gradient_target(Scalar* image, Matrix& buffer) const {
    const Index l = geometry_.out_positions(), cols = geometry_.in_channels() * geometry_.taps();
    if (geometry_.is_pointwise()) return {image, l, cols};
    buffer.resize(l, cols);
    return {buffer.data(), l, cols};
  }

  // dT_g += Z_g^T A for every group (zt: G L x r).
  void add_adapter_patch_gradient(const Matrix& zt, const Matrix& a, Eigen::Map<Matrix>& dt) const;

  using Base::geometry_, Base::chunks_;
  Matrix xd_, k_, y_, dx_;
  Matrix scratch_;  // a copy of an argument that aliases the buffer being written
  Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic> keep_;  // dropout mask of the last forward
  bool reuse_mask_ = false;
  std::vector<Workspace> workspaces_;
};

template <typename Scalar_>
auto LoraConv2d<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  this->check_conv_input(x, "forward");
  this->forget_forward();
  const Index n = x.cols();
  // x is read while y_ is written: a copy when x is (part of) y_, the layer's last output.
  const ConstRef in = this->unaliased(x, y_, scratch_);
  if (this->merged()) {
    xd_.resize(0, 0);
    k_.resize(0, 0);
    this->frozen_forward(in, y_, workspaces_);
    this->remember_forward(n);
    return y_;
  }
  const double dropout = this->options().dropout;
  xd_ = in;
  if (dropout > 0.0) {
    if (!reuse_mask_ || keep_.rows() != xd_.rows() || keep_.cols() != xd_.cols()) {
      keep_.resize(xd_.rows(), xd_.cols());
      for (Index i = 0; i < keep_.size(); ++i)
        keep_(i) = this->dropout_rng().uniform01() >= dropout;
    }
    const Scalar keep_scale = Scalar(1) / Scalar(1 - dropout);
    xd_ = keep_.select(xd_ * keep_scale, Matrix::Zero(xd_.rows(), xd_.cols()));
  }
  k_.resize(geometry_.groups() * geometry_.out_positions() * this->options().rank, n);
  run_forward(dropout > 0.0 ? in : ConstRef(xd_), dropout > 0.0 ? &xd_ : nullptr, y_, &k_,
              workspaces_);
  this->remember_forward(n);
  return y_;
}

template <typename Scalar_>
auto LoraConv2d<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient)
    -> const Matrix& {
  const Index n = this->begin_backward(dy);
  const ConstRef dyv = this->unaliased(dy, dx_, scratch_);  // dY may be the last dX
  const Conv2dGeometry& g = geometry_;
  const Index l = g.out_positions(), co = g.out_channels(), d = g.fan_in();
  const Index cg = g.group_out_channels(), groups = g.groups(), r = this->options().rank;
  if (this->bias_trainable()) this->bias_backward(detail::channel_sums<Scalar>(g, dyv));
  dx_.resize(compute_input_gradient ? g.input_size() : 0, compute_input_gradient ? n : 0);
  const auto w = this->weight();
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces_, workers);
  if (this->merged()) {
    if (compute_input_gradient)
      detail::for_each_image(n, workers, [&](int wk, Index b) {
        detail::grouped_input_gradient<Scalar>(
            g, detail::image_rows(dyv.col(b).data(), l, co), w, dx_.col(b).data(),
            workspaces_[static_cast<std::size_t>(wk)].patch_grad);
      });
    return dx_;
  }
  const bool dropout = this->options().dropout > 0.0;
  const Matrix sb = this->scaling() * this->lora_b();
  const Matrix& a = this->lora_a();
  for (int wk = 0; wk < workers; ++wk) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    ws.grad_a.setZero(r, d);
    ws.grad_b.setZero(co, r);
  }
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces_[static_cast<std::size_t>(wk)];
    const auto dyt = detail::image_rows(dyv.col(b).data(), l, co);
    const Eigen::Map<const Matrix> kt(k_.col(b).data(), groups * l, r);
    const auto t = detail::image_patches(g, xd_.col(b).data(), ws.patches);
    ws.zt.resize(groups * l, r);
    for (Index q = 0; q < groups; ++q) {
      const auto dyq = dyt.middleCols(q * cg, cg);
      detail::serial_product(ws.grad_b.middleRows(q * cg, cg), dyq, Op::t, kt.middleRows(q * l, l),
                             Op::n, Scalar(1), true);
      detail::serial_product(ws.zt.middleRows(q * l, l), dyq, Op::n, sb.middleRows(q * cg, cg),
                             Op::n);
      detail::serial_product(ws.grad_a, ws.zt.middleRows(q * l, l), Op::t, t.middleCols(q * d, d),
                             Op::n, Scalar(1), true);
    }
    if (!compute_input_gradient) return;
    Scalar* dx = dx_.col(b).data();
    // dT = dY^T W, plus Z^T A when the adapter path saw x itself (no dropout).
    Eigen::Map<Matrix> dt = patch_gradient_target(dx, ws.patch_grad);
    detail::grouped_patch_gradient<Scalar>(g, dyt, w, dt);
    if (!dropout) add_adapter_patch_gradient(ws.zt, a, dt);
    if (!g.is_pointwise()) detail::col2im(g, dt.data(), dx);
    if (dropout) {
      ws.adapter_grad.resize(g.input_size(), 1);
      Eigen::Map<Matrix> dta = patch_gradient_target(ws.adapter_grad.data(), ws.patch_grad);
      dta.setZero();
      add_adapter_patch_gradient(ws.zt, a, dta);
      if (!g.is_pointwise()) detail::col2im(g, dta.data(), ws.adapter_grad.data());
      const Scalar keep_scale = Scalar(1) / Scalar(1 - this->options().dropout);
      auto dxb = dx_.col(b);
      dxb += keep_.col(b).select(ws.adapter_grad * keep_scale, Matrix::Zero(dxb.rows(), 1));
    }
  });
  detail::sum_over_workers(workspaces_, workers, &Workspace::grad_a, this->gradient_a());
  detail::sum_over_workers(workspaces_, workers, &Workspace::grad_b, this->gradient_b());
  this->gradient_b() *= this->scaling();
  return dx_;
}

template <typename Scalar_>
void LoraConv2d<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  std::vector<Workspace> ws;
  this->predict_conv(x, y, [&](Matrix& out) {
    if (this->merged())
      this->frozen_forward(x, out, ws);
    else
      run_forward(x, nullptr, out, nullptr, ws);
  });
}

template <typename Scalar_>
std::size_t LoraConv2d<Scalar_>::saved_bytes() const {
  return static_cast<std::size_t>(xd_.size() + k_.size() + y_.size()) * sizeof(Scalar) +
         static_cast<std::size_t>(this->options().dropout > 0.0 ? keep_.size() : 0);
}

template <typename Scalar_>
void LoraConv2d<Scalar_>::run_forward(const ConstRef& x, const Matrix* xa, Matrix& y, Matrix* k,
                                      std::vector<Workspace>& workspaces) const {
  const Conv2dGeometry& g = geometry_;
  const Index n = x.cols(), l = g.out_positions(), co = g.out_channels(), d = g.fan_in();
  const Index cg = g.group_out_channels(), groups = g.groups(), r = this->options().rank;
  y.resize(g.output_size(), n);
  const int workers = detail::conv_workers(n, chunks_);
  this->prepare(workspaces, workers);
  const auto w = this->weight();
  const Matrix sb = this->scaling() * this->lora_b();
  const Matrix& a = this->lora_a();
  const auto& bias = this->bias();
  detail::for_each_image(n, workers, [&](int wk, Index b) {
    Workspace& ws = workspaces[static_cast<std::size_t>(wk)];
    const auto t = detail::image_patches(g, x.col(b).data(), ws.patches);
    auto yt = detail::image_rows(y.col(b).data(), l, co);
    detail::grouped_product<Scalar>(g, t, w, yt);
    const auto ta = xa ? detail::image_patches(g, xa->col(b).data(), ws.adapter_patches) : t;
    ws.zt.resize(groups * l, r);  // K^T of this image
    for (Index q = 0; q < groups; ++q) {
      auto kq = ws.zt.middleRows(q * l, l);
      detail::serial_product(kq, ta.middleCols(q * d, d), Op::n, a, Op::t);
      detail::serial_product(yt.middleCols(q * cg, cg), kq, Op::n, sb.middleRows(q * cg, cg), Op::t,
                             Scalar(1), true);
    }
    if (k) Eigen::Map<Matrix>(k->col(b).data(), groups * l, r) = ws.zt;
    if (bias) yt.rowwise() += bias->transpose();
  });
}

template <typename Scalar_>
void LoraConv2d<Scalar_>::add_adapter_patch_gradient(const Matrix& zt, const Matrix& a,
                                                     Eigen::Map<Matrix>& dt) const {
  const Index l = geometry_.out_positions(), d = geometry_.fan_in();
  for (Index q = 0; q < geometry_.groups(); ++q)
    detail::serial_product(dt.middleCols(q * d, d), zt.middleRows(q * l, l), Op::n, a, Op::n,
                           Scalar(1), true);
}

using LoraConv2df = LoraConv2d<float>;
using LoraConv2dd = LoraConv2d<double>;

}  // namespace hra
