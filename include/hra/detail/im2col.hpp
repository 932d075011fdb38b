// Internal: im2col and col2im for one image, in the layout the convolution layers multiply with.
#pragma once

#include <Eigen/Core>
#include <algorithm>

#include "../conv_geometry.hpp"
#include "checks.hpp"

namespace hra {
namespace detail {

/// The patch matrix of one image: T = P^T, L x (C_in kh kw), column-major, L = H_out W_out.
///
/// Row l = oh W_out + ow is the output position, column c kh kw + i kw + j (c the input channel,
/// global over the groups) is one tap of one channel, so group g's patches are the contiguous
/// column block [g D, (g + 1) D), D = C_in/groups kh kw, in exactly the order of
/// `weight.view(C_out, -1)`'s columns. Entry (l, c kh kw + i kw + j) is
///
///     x[c, oh sh - top + i dh, ow sw - left + j dw]   (0 outside the image: zero padding).
///
/// This is Caffe's im2col layout: every (channel, tap) column is filled by contiguous runs of
/// W_out values (a plain copy when sw = 1), and a group's output, Y_g^T = T_g W_g^T (L x C_out/G),
/// lands in the C,H,W memory of the output image without a transpose; for a pointwise 1x1 the
/// image itself is T. The other layout, P (D x L, one patch per column, Y = W P then transposed
/// into C,H,W), was slower at every benchmark shape (hra_bench_conv's `layout` cases, im2col +
/// product for one image on one thread: T took 0.7-0.9x P's CPU time, 0.3x for C_in = 1).
struct PatchRuns {
  // For tap column offset `off` (j dw - left) the output columns ow whose input column
  // ow sw + off lies inside [0, W): [lo, hi).
  Eigen::Index lo, hi;
  PatchRuns(Eigen::Index off, Eigen::Index stride, Eigen::Index width, Eigen::Index out_width) {
    lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
    const Eigen::Index last = width - 1 - off;  // largest ow sw allowed
    hi = last < 0 ? 0 : std::min(out_width, last / stride + 1);
    lo = std::min(lo, out_width);
    hi = std::max(hi, lo);
  }
};

/// Calls f(tap_column, src_row, oh, run, off) for every input channel c, tap (i, j) and output
/// row oh: tap_column = (c kh + i) kw + j (the column of T), src_row = c H + ih the input row
/// the tap reads (ih = oh sh - top + i dh, or -1 when ih is padding), `run` the output columns
/// whose input column ow sw + off (off = j dw - left) is inside the image.
template <typename F>
void for_each_patch_row(const Conv2dGeometry& g, F&& f) {
  using Index = Eigen::Index;
  const Index h = g.height(), kh = g.kernel_h(), kw = g.kernel_w();
  for (Index c = 0; c < g.in_channels(); ++c)
    for (Index i = 0; i < kh; ++i)
      for (Index j = 0; j < kw; ++j) {
        const Index off = j * g.dilation_w() - g.pad_left();
        const PatchRuns run(off, g.stride_w(), g.width(), g.out_width());
        for (Index oh = 0; oh < g.out_height(); ++oh) {
          const Index ih = oh * g.stride_h() - g.pad_top() + i * g.dilation_h();
          f((c * kh + i) * kw + j, ih < 0 || ih >= h ? Index(-1) : c * h + ih, oh, run, off);
        }
      }
}

/// Writes T (L x C_in kh kw, leading dimension L) for the image at `image` (C_in H W values,
/// C,H,W order) into `patches`.
template <typename Scalar>
void im2col(const Conv2dGeometry& g, const Scalar* image, Scalar* patches) {
  using Index = Eigen::Index;
  const Index w = g.width(), wo = g.out_width(), l = g.out_positions(), sw = g.stride_w();
  HRA_ASSERT(l > 0);
  for_each_patch_row(g, [&](Index col, Index src_row, Index oh, const PatchRuns& run, Index off) {
    Scalar* d = patches + col * l + oh * wo;
    if (src_row < 0) {
      std::fill(d, d + wo, Scalar(0));
      return;
    }
    const Scalar* s = image + src_row * w;  // input column of output column ow: ow sw + off
    std::fill(d, d + run.lo, Scalar(0));
    if (sw == 1)
      std::copy(s + run.lo + off, s + run.hi + off, d + run.lo);
    else
      for (Index ow = run.lo; ow < run.hi; ++ow) d[ow] = s[ow * sw + off];
    std::fill(d + run.hi, d + wo, Scalar(0));
  });
}

/// The adjoint of im2col: *assigns* the image gradient (C_in H W values at `image`) from the
/// patch gradient dT (L x C_in kh kw, leading dimension L): every patch entry is added back to
/// the input pixel it was copied from; padding positions are dropped.
template <typename Scalar>
void col2im(const Conv2dGeometry& g, const Scalar* patches, Scalar* image) {
  using Index = Eigen::Index;
  const Index w = g.width(), wo = g.out_width(), l = g.out_positions(), sw = g.stride_w();
  std::fill(image, image + g.input_size(), Scalar(0));
  for_each_patch_row(g, [&](Index col, Index src_row, Index oh, const PatchRuns& run, Index off) {
    if (src_row < 0) return;
    const Scalar* s = patches + col * l + oh * wo;
    Scalar* d = image + src_row * w;
    for (Index ow = run.lo; ow < run.hi; ++ow) d[ow * sw + off] += s[ow];
  });
}

}  // namespace detail
}  // namespace hra
