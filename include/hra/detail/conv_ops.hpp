// Internal: the pieces every convolution layer is made of: the per-image work loop (in chunks
// on hra's pool), the patches of one image, the grouped products with a C_out x D weight,
// the bias, and the input check.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../conv_geometry.hpp"
#include "../parallel.hpp"
#include "checks.hpp"
#include "gemm.hpp"
#include "im2col.hpp"

namespace hra {
namespace detail {

template <typename Scalar>
using ConvMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
/// A C_out x D weight, owned (Matrix) or viewed (WeightMatrix's strided map).
template <typename Scalar>
using ConvWeightRef = Eigen::Ref<const ConvMatrix<Scalar>, 0, Eigen::OuterStride<>>;
/// A column-major block with unit inner stride (patches, one image's rows).
template <typename Scalar>
using ConvBlockRef = Eigen::Ref<const ConvMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Chunks of images a per-image loop over n images is split into. `requested` = 0: n / 2
/// chunks, at most kConvChunks: a function of n only, so that the partial sums (and therefore
/// the results) do not depend on the thread count; the chunks run on hra's pool (parallel.hpp).
/// `requested` >= 1: min(requested, n) chunks. Each chunk holds one workspace.
inline constexpr Eigen::Index kConvChunks = 8;
inline int conv_workers(Eigen::Index n, int requested) {
  if (requested >= 1) return static_cast<int>(std::min<Eigen::Index>(requested, n));
  return static_cast<int>(std::max<Eigen::Index>(1, std::min<Eigen::Index>(kConvChunks, n / 2)));
}

/// Calls f(chunk, image) for every image in [0, n), chunk w taking the w-th of `workers`
/// contiguous ranges (in order); the chunks run concurrently on hra's pool, whose threads run
/// Eigen's products single-threaded (in an OpenMP build, one after the other, each product on
/// Eigen's threads: see ThreadPool). `f` must not throw.
template <typename F>
void for_each_image(Eigen::Index n, int workers, F&& f) {
  ThreadPool::instance().run(workers, [&](std::int64_t w) {
    const Eigen::Index begin = n * w / workers, end = n * (w + 1) / workers;
    for (Eigen::Index b = begin; b < end; ++b) f(static_cast<int>(w), b);
  });
}

/// The L x C values of one image's column as a matrix (C,H,W memory: channel c is column c).
template <typename Scalar>
Eigen::Map<ConvMatrix<Scalar>> image_rows(Scalar* column, Eigen::Index positions,
                                          Eigen::Index channels) {
  return {column, positions, channels};
}
template <typename Scalar>
Eigen::Map<const ConvMatrix<Scalar>> image_rows(const Scalar* column, Eigen::Index positions,
                                                Eigen::Index channels) {
  return {column, positions, channels};
}

/// Patches of one image (T, see im2col), in a buffer owned by the caller's workspace; for a
/// pointwise geometry (1x1, stride 1, no padding) T is the image itself and nothing is copied.
template <typename Scalar>
Eigen::Map<const ConvMatrix<Scalar>> image_patches(const Conv2dGeometry& g, const Scalar* image,
                                                   ConvMatrix<Scalar>& buffer) {
  const Eigen::Index l = g.out_positions(), cols = g.in_channels() * g.taps();
  if (g.is_pointwise()) return {image, l, cols};
  buffer.resize(l, cols);
  im2col(g, image, buffer.data());
  return {buffer.data(), l, cols};
}

/// Y^T = T W^T group by group: Y_g^T (L x C_out/G, columns g C_out/G ...) = T_g W_g^T, with T
/// (L x C_in kh kw) and W (C_out x D). Assigns `yt` (L x C_out).
template <typename Scalar, typename Out>
void grouped_product(const Conv2dGeometry& g, const ConvBlockRef<Scalar>& t,
                     const ConvWeightRef<Scalar>& w, Out&& yt) {
  const Eigen::Index d = g.fan_in(), co = g.group_out_channels();
  if (g.groups() == 1) {
    serial_product(yt, t, Op::n, w, Op::t);
    return;
  }
  for (Eigen::Index k = 0; k < g.groups(); ++k)
    serial_product(yt.middleCols(k * co, co), t.middleCols(k * d, d), Op::n,
                   w.middleRows(k * co, co), Op::t);
}

/// dT = dY^T W group by group: dT_g (L x D) = dY_g^T W_g. Assigns `dt` (L x C_in kh kw).
template <typename Scalar, typename Out>
void grouped_patch_gradient(const Conv2dGeometry& g, const ConvBlockRef<Scalar>& dyt,
                            const ConvWeightRef<Scalar>& w, Out&& dt) {
  const Eigen::Index d = g.fan_in(), co = g.group_out_channels();
  if (g.groups() == 1) {
    serial_product(dt, dyt, Op::n, w, Op::n);
    return;
  }
  for (Eigen::Index k = 0; k < g.groups(); ++k)
    serial_product(dt.middleCols(k * d, d), dyt.middleCols(k * co, co), Op::n,
                   w.middleRows(k * co, co), Op::n);
}

/// E += dY^T^T T group by group: E_g (C_out/G x D) += (dY_g^T)^T T_g, the weight gradient of one
/// image.
template <typename Scalar>
void grouped_weight_gradient_add(const Conv2dGeometry& g, const ConvBlockRef<Scalar>& dyt,
                                 const ConvBlockRef<Scalar>& t, ConvMatrix<Scalar>& e) {
  const Eigen::Index d = g.fan_in(), co = g.group_out_channels();
  if (g.groups() == 1) {
    serial_product(e, dyt, Op::t, t, Op::n, Scalar(1), true);
    return;
  }
  for (Eigen::Index k = 0; k < g.groups(); ++k)
    serial_product(e.middleRows(k * co, co), dyt.middleCols(k * co, co), Op::t,
                   t.middleCols(k * d, d), Op::n, Scalar(1), true);
}

/// dX of one image from dY: dT = dY^T W group by group, then col2im into `dx` (C_in H W values,
/// assigned). For a pointwise geometry dT is dX itself and `buffer` is not used.
template <typename Scalar>
void grouped_input_gradient(const Conv2dGeometry& g, const ConvBlockRef<Scalar>& dyt,
                            const ConvWeightRef<Scalar>& w, Scalar* dx,
                            ConvMatrix<Scalar>& buffer) {
  const Eigen::Index l = g.out_positions(), cols = g.in_channels() * g.taps();
  if (g.is_pointwise()) {
    grouped_patch_gradient<Scalar>(g, dyt, w, image_rows(dx, l, cols));
    return;
  }
  buffer.resize(l, cols);
  grouped_patch_gradient<Scalar>(g, dyt, w, buffer);
  col2im(g, buffer.data(), dx);
}

/// Per image and output channel, the sum of dY over the output positions (C_out x n): the
/// bias gradient is its row sums.
template <typename Scalar>
ConvMatrix<Scalar> channel_sums(const Conv2dGeometry& g,
                                const Eigen::Ref<const ConvMatrix<Scalar>>& dy) {
  const Eigen::Index l = g.out_positions(), co = g.out_channels();
  ConvMatrix<Scalar> sums(co, dy.cols());
  for (Eigen::Index b = 0; b < dy.cols(); ++b)
    sums.col(b) = image_rows(dy.col(b).data(), l, co).colwise().sum().transpose();
  return sums;
}

/// Y = conv(X, W) + b for a batch, image by image: Y_g^T = T_g W_g^T, then the bias. `w` is any
/// C_out x D weight (a layer's own, or W H); `workspaces` holds one entry per worker, each with
/// a `patches` buffer (Matrix).
template <typename Scalar, typename Workspace, typename Bias>
void conv_forward(const Conv2dGeometry& g, const Eigen::Ref<const ConvMatrix<Scalar>>& x,
                  const ConvWeightRef<Scalar>& w, const Bias& bias, ConvMatrix<Scalar>& y,
                  int threads, std::vector<Workspace>& workspaces) {
  const Eigen::Index n = x.cols(), l = g.out_positions(), co = g.out_channels();
  y.resize(g.output_size(), n);
  const int workers = conv_workers(n, threads);
  if (workspaces.size() < static_cast<std::size_t>(workers))
    workspaces.resize(static_cast<std::size_t>(workers));
  for_each_image(n, workers, [&](int wk, Eigen::Index b) {
    Workspace& ws = workspaces[static_cast<std::size_t>(wk)];
    const auto t = image_patches(g, x.col(b).data(), ws.patches);
    auto yt = image_rows(y.col(b).data(), l, co);
    grouped_product<Scalar>(g, t, w, yt);
    if (bias) yt.rowwise() += bias->transpose();
  });
}

/// out = the sum of `part` (a member pointer, or a callable taking a workspace) over the first
/// `workers` workspaces (the per-worker partial sums of a per-image loop), added in worker
/// order so the result does not depend on timing.
template <typename Workspace, typename Part, typename Out>
void sum_over_workers(const std::vector<Workspace>& ws, int workers, const Part& part, Out& out) {
  const auto get = [&](std::size_t k) -> decltype(auto) {
    if constexpr (std::is_member_object_pointer_v<Part>)
      return (ws[k].*part);
    else
      return part(ws[k]);
  };
  out = get(0);
  for (std::size_t k = 1; k < static_cast<std::size_t>(workers); ++k) out += get(k);
}

/// The check every convolution's forward() and predict() make: x is C_in H W x n (n >= 1) and
/// finite. The message names the layer, the method and the geometry's sizes.
template <typename Derived>
void check_conv_input(const Eigen::MatrixBase<Derived>& x, const Conv2dGeometry& g,
                      const char* layer, const char* method) {
  if (x.rows() != g.input_size())
    throw_invalid(layer, "::", method, " input: expected C*H*W = ", g.in_channels(), "*",
                  g.height(), "*", g.width(), " = ", g.input_size(),
                  " rows (one image per column, C,H,W order), got a ", shape(x.rows(), x.cols()),
                  " matrix");
  if (x.cols() < 1) throw_invalid(layer, "::", method, " input: empty batch (0 columns)");
  if (g.output_size() > std::numeric_limits<Eigen::Index>::max() / x.cols())
    throw_invalid(layer, "::", method, ": the output of ", x.cols(), " images (", g.output_size(),
                  " values each) has more entries than a 64-bit index can count");
  check_finite(x, concat(layer, "::", method, " input").c_str());
}

/// The check of a convolution layer's weight against its geometry: C_out x D.
inline void check_conv_weight(Eigen::Index rows, Eigen::Index cols, const Conv2dGeometry& g,
                              const char* layer) {
  if (rows != g.out_channels() || cols != g.fan_in())
    throw_invalid(layer, ": the weight is ", shape(rows, cols),
                  " but the geometry needs C_out x D = ", g.out_channels(), "x", g.fan_in(),
                  " (D = C_in/groups*kh*kw = ", g.group_in_channels(), "*", g.kernel_h(), "*",
                  g.kernel_w(), "; PyTorch's weight.view(C_out, -1))");
}

}  // namespace detail
}  // namespace hra
