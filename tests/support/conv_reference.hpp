// The convolution written out as loops over every index, in double: the independent definition
// the convolution layers are compared with (tests only).
#pragma once

#include <Eigen/Core>

#include "hra/conv_geometry.hpp"

namespace hra_test {

/// y = conv(x, W) + b straight from PyTorch's definition (zero padding, cross-correlation):
///   y[o, oh, ow] = b[o] + sum_{c, i, j} W[o, c, i, j] x[g C_in/G + c, oh sh - top + i dh,
///                                                      ow sw - left + j dw]
/// with g = o / (C_out/G) the group of output channel o, W (C_out x D) indexed c kh kw + i kw + j,
/// x (C_in H W x n) and y (C_out H_out W_out x n) in C,H,W order. `bias` may be empty.
inline Eigen::MatrixXd conv_reference(const hra::Conv2dGeometry& g, const Eigen::MatrixXd& w,
                                      const Eigen::MatrixXd& x,
                                      const Eigen::VectorXd& bias = Eigen::VectorXd()) {
  using Eigen::Index;
  const Index ho = g.out_height(), wo = g.out_width(), h = g.height(), wd = g.width();
  const Index cig = g.group_in_channels(), cog = g.group_out_channels();
  Eigen::MatrixXd y = Eigen::MatrixXd::Zero(g.output_size(), x.cols());
  for (Index b = 0; b < x.cols(); ++b)
    for (Index o = 0; o < g.out_channels(); ++o) {
      const Index grp = o / cog;
      for (Index oh = 0; oh < ho; ++oh)
        for (Index ow = 0; ow < wo; ++ow) {
          double acc = bias.size() ? bias(o) : 0.0;
          for (Index c = 0; c < cig; ++c)
            for (Index i = 0; i < g.kernel_h(); ++i)
              for (Index j = 0; j < g.kernel_w(); ++j) {
                const Index ih = oh * g.stride_h() - g.pad_top() + i * g.dilation_h();
                const Index iw = ow * g.stride_w() - g.pad_left() + j * g.dilation_w();
                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                const Index ch = grp * cig + c;
                acc +=
                    w(o, (c * g.kernel_h() + i) * g.kernel_w() + j) * x((ch * h + ih) * wd + iw, b);
              }
          y((o * ho + oh) * wo + ow, b) = acc;
        }
    }
  return y;
}

}  // namespace hra_test
