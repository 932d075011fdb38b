// The shape of a 2-D convolution: channels, image size, kernel, stride, padding, dilation, groups.
#pragma once

#include <Eigen/Core>
#include <limits>
#include <string>

#include "detail/checks.hpp"

namespace hra {

/// \brief Geometry of a 2-D convolution over C_in x H x W images (PyTorch's `nn.Conv2d` with
/// zero padding), as a value type.
///
/// Built as `nn.Conv2d` is, in its argument order (in_channels, out_channels, kernel_size), with
/// the image size PyTorch reads off the input, then refined by chained setters that mirror
/// `nn.Conv2d`'s keyword arguments, each per axis:
///
///     auto g = hra::Conv2dGeometry::conv2d(64, 64, 3).image(56, 56).padding(1);  // ResNet block
///     auto s = hra::Conv2dGeometry::conv2d(16, 32, 3).image(28, 28).stride(2).padding(1);
///     auto a = hra::Conv2dGeometry::conv2d(4, 6, 3, 2).image(9, 8).dilation(2, 1).groups(2)
///                  .pad(1, 0, 0, 2);  // F.pad(x, (1, 0, 0, 2)), then the convolution
///
/// padding(p) and padding(ph, pw) are nn.Conv2d's symmetric padding; pad(left, right, top,
/// bottom) is the fully asymmetric one in `F.pad(x, (left, right, top, bottom))`'s order, the way
/// PyTorch expresses it (F.pad followed by a convolution without padding). The constructor
/// Conv2dGeometry(C_in, H, W, C_out, kh, kw) is the image-first form of the same. Output size
/// per axis (PyTorch's formula):
///
///     H_out = floor((H + top + bottom - dh (kh - 1) - 1) / sh) + 1
///
/// and likewise for W with (left, right, dw, kw, sw). The layers view the weight
/// (C_out, C_in/groups, kh, kw) as the C_out x D matrix `weight.view(C_out, -1)`, D = fan_in() =
/// C_in/groups kh kw, column c kh kw + i kw + j for channel c (within its group) and tap (i, j).
/// A batch of n images is a input_size() x n matrix (each column one image in C,H,W order, the
/// memory of an NCHW tensor); outputs are output_size() x n.
///
/// The setters do not check; validate() (called by every layer that takes a geometry) throws
/// std::invalid_argument naming the values for: a size, stride or dilation < 1, a negative
/// padding, channels not divisible by groups, a dilated kernel larger than the padded input
/// (whose output would be empty), and sizes whose products or sums overflow a 64-bit index
/// (C_in H W, D, L, C_out L, a padded or dilated extent, one image's patches).
class Conv2dGeometry {
 public:
  using Index = Eigen::Index;

  /// C_in x H x W images, C_out output channels, a kh x kw kernel; stride 1, no padding,
  /// dilation 1, one group.
  Conv2dGeometry(Index in_channels, Index height, Index width, Index out_channels, Index kernel_h,
                 Index kernel_w)
      : in_channels_(in_channels),
        height_(height),
        width_(width),
        out_channels_(out_channels),
        kernel_h_(kernel_h),
        kernel_w_(kernel_w) {}

  /// nn.Conv2d(in_channels, out_channels, kernel_size): a square kernel. The image size is set
  /// with image(H, W) (validate() refuses a geometry without one).
  static Conv2dGeometry conv2d(Index in_channels, Index out_channels, Index kernel_size) {
    return conv2d(in_channels, out_channels, kernel_size, kernel_size);
  }
  /// nn.Conv2d(in_channels, out_channels, kernel_size=(kh, kw)).
  static Conv2dGeometry conv2d(Index in_channels, Index out_channels, Index kernel_h,
                               Index kernel_w) {
    return Conv2dGeometry(in_channels, 0, 0, out_channels, kernel_h, kernel_w);
  }
  /// The H x W of the input images (PyTorch reads it off the input tensor).
  Conv2dGeometry& image(Index h, Index w) {
    height_ = h;
    width_ = w;
    return *this;
  }

  Conv2dGeometry& stride(Index s) { return stride(s, s); }
  Conv2dGeometry& stride(Index sh, Index sw) {
    stride_h_ = sh;
    stride_w_ = sw;
    return *this;
  }
  /// Symmetric padding, the same on both axes.
  Conv2dGeometry& padding(Index p) { return padding(p, p); }
  /// PyTorch's padding=(ph, pw): ph rows above and below, pw columns left and right.
  Conv2dGeometry& padding(Index ph, Index pw) { return pad(pw, pw, ph, ph); }
  /// Fully asymmetric zero padding in F.pad's order: `F.pad(x, (left, right, top, bottom))`,
  /// then the convolution without padding.
  Conv2dGeometry& pad(Index left, Index right, Index top, Index bottom) {
    pad_top_ = top;
    pad_bottom_ = bottom;
    pad_left_ = left;
    pad_right_ = right;
    return *this;
  }
  [[deprecated("use pad(left, right, top, bottom), F.pad's order")]] Conv2dGeometry& padding(
      Index top, Index bottom, Index left, Index right) {
    return pad(left, right, top, bottom);
  }
  Conv2dGeometry& dilation(Index d) { return dilation(d, d); }
  Conv2dGeometry& dilation(Index dh, Index dw) {
    dilation_h_ = dh;
    dilation_w_ = dw;
    return *this;
  }
  Conv2dGeometry& groups(Index g) {
    groups_ = g;
    return *this;
  }

  Index in_channels() const { return in_channels_; }
  Index height() const { return height_; }
  Index width() const { return width_; }
  Index out_channels() const { return out_channels_; }
  Index kernel_h() const { return kernel_h_; }
  Index kernel_w() const { return kernel_w_; }
  Index stride_h() const { return stride_h_; }
  Index stride_w() const { return stride_w_; }
  Index pad_top() const { return pad_top_; }
  Index pad_bottom() const { return pad_bottom_; }
  Index pad_left() const { return pad_left_; }
  Index pad_right() const { return pad_right_; }
  Index dilation_h() const { return dilation_h_; }
  Index dilation_w() const { return dilation_w_; }
  Index groups() const { return groups_; }

  /// C_in / groups and C_out / groups.
  Index group_in_channels() const { return in_channels_ / groups_; }
  Index group_out_channels() const { return out_channels_ / groups_; }
  /// Rows and columns the dilated kernel spans: dh (kh - 1) + 1 and dw (kw - 1) + 1.
  Index kernel_extent_h() const { return dilation_h_ * (kernel_h_ - 1) + 1; }
  Index kernel_extent_w() const { return dilation_w_ * (kernel_w_ - 1) + 1; }
  Index padded_height() const { return height_ + pad_top_ + pad_bottom_; }
  Index padded_width() const { return width_ + pad_left_ + pad_right_; }
  /// H_out and W_out (0 or less when the kernel does not fit; validate() refuses that).
  Index out_height() const { return out_size(padded_height(), kernel_extent_h(), stride_h_); }
  Index out_width() const { return out_size(padded_width(), kernel_extent_w(), stride_w_); }
  /// L = H_out W_out, the patches (output positions) per image and channel.
  Index out_positions() const { return out_height() * out_width(); }
  /// D = C_in/groups kh kw: the weight's columns, the dimension HRA's reflections act on.
  Index fan_in() const { return group_in_channels() * kernel_h_ * kernel_w_; }
  /// kh kw: the taps of one channel.
  Index taps() const { return kernel_h_ * kernel_w_; }
  /// Rows of an input batch: C_in H W.
  Index input_size() const { return in_channels_ * height_ * width_; }
  /// Rows of an output batch: C_out H_out W_out.
  Index output_size() const { return out_channels_ * out_positions(); }

  /// True for the 1x1, stride 1, unpadded convolution, whose patches are the image itself.
  bool is_pointwise() const {
    return kernel_h_ == 1 && kernel_w_ == 1 && stride_h_ == 1 && stride_w_ == 1 && pad_top_ == 0 &&
           pad_bottom_ == 0 && pad_left_ == 0 && pad_right_ == 0;
  }

  /// Throws std::invalid_argument, the message starting with `who`, unless the geometry
  /// describes a convolution with a non-empty output (see the class comment).
  void validate(const char* who) const {
    const auto positive = [&](Index v, const char* name) {
      if (v < 1) detail::throw_invalid(who, ": ", name, "=", v, " must be >= 1");
    };
    positive(in_channels_, "C_in");
    if (height_ == 0 && width_ == 0)
      detail::throw_invalid(who,
                            ": the image size is not set (Conv2dGeometry::conv2d(...) needs "
                            ".image(H, W))");
    positive(height_, "H");
    positive(width_, "W");
    if (out_channels_ < 1)
      detail::throw_invalid(who, ": C_out=", out_channels_,
                            " must be >= 1 (the output would be empty)");
    positive(kernel_h_, "kernel_h");
    positive(kernel_w_, "kernel_w");
    positive(stride_h_, "stride_h");
    positive(stride_w_, "stride_w");
    positive(dilation_h_, "dilation_h");
    positive(dilation_w_, "dilation_w");
    positive(groups_, "groups");
    if (pad_top_ < 0 || pad_bottom_ < 0 || pad_left_ < 0 || pad_right_ < 0)
      detail::throw_invalid(who, ": padding must be >= 0, got top=", pad_top_,
                            " bottom=", pad_bottom_, " left=", pad_left_, " right=", pad_right_);
    if (in_channels_ % groups_ != 0)
      detail::throw_invalid(who, ": C_in=", in_channels_, " is not divisible by groups=", groups_);
    if (out_channels_ % groups_ != 0)
      detail::throw_invalid(who, ": C_out=", out_channels_,
                            " is not divisible by groups=", groups_);
    check_sizes(who);
    // The kernel must fit the padded input along each axis.
    const auto fits = [&](const char* unit, const char* axis, const char* size, Index extent,
                          Index kernel, Index dilation, Index padded, Index input_size,
                          const char* low, Index pad_low, const char* high, Index pad_high) {
      if (extent > padded)
        detail::throw_invalid(who, ": the kernel spans ", extent, " ", unit, " (kernel_", axis, "=",
                              kernel, ", dilation_", axis, "=", dilation,
                              ") but the padded input has ", padded, " (", size, "=", input_size,
                              ", padding ", low, "=", pad_low, " ", high, "=", pad_high,
                              "): the output would be empty (", size, "_out=0)");
    };
    fits("rows", "h", "H", kernel_extent_h(), kernel_h_, dilation_h_, padded_height(), height_,
         "top", pad_top_, "bottom", pad_bottom_);
    fits("columns", "w", "W", kernel_extent_w(), kernel_w_, dilation_w_, padded_width(), width_,
         "left", pad_left_, "right", pad_right_);
  }

  /// "C_in=.. HxW -> C_out=.. H_outxW_out, kernel khxkw, ..." for messages and benchmark labels.
  std::string describe() const {
    // A geometry whose sizes overflow (validate() refuses it) is described without its output
    // size, which cannot be computed.
    const bool sizes = in_channels_ >= 1 && height_ >= 1 && width_ >= 1 && kernel_h_ >= 1 &&
                       kernel_w_ >= 1 && stride_h_ >= 1 && stride_w_ >= 1 && dilation_h_ >= 1 &&
                       dilation_w_ >= 1 && groups_ >= 1 && pad_top_ >= 0 && pad_bottom_ >= 0 &&
                       pad_left_ >= 0 && pad_right_ >= 0 && size_error().empty();
    const std::string out =
        sizes ? detail::concat(out_height(), "x", out_width()) : std::string("(too large)");
    return detail::concat(
        "C_in=", in_channels_, " ", height_, "x", width_, " -> C_out=", out_channels_, " ", out,
        ", kernel ", kernel_h_, "x", kernel_w_, ", stride ", stride_h_, "x", stride_w_,
        ", padding (top ", pad_top_, ", bottom ", pad_bottom_, ", left ", pad_left_, ", right ",
        pad_right_, "), dilation ", dilation_h_, "x", dilation_w_, ", groups ", groups_);
  }

  friend bool operator==(const Conv2dGeometry& a, const Conv2dGeometry& b) {
    return a.in_channels_ == b.in_channels_ && a.height_ == b.height_ && a.width_ == b.width_ &&
           a.out_channels_ == b.out_channels_ && a.kernel_h_ == b.kernel_h_ &&
           a.kernel_w_ == b.kernel_w_ && a.stride_h_ == b.stride_h_ && a.stride_w_ == b.stride_w_ &&
           a.pad_top_ == b.pad_top_ && a.pad_bottom_ == b.pad_bottom_ &&
           a.pad_left_ == b.pad_left_ && a.pad_right_ == b.pad_right_ &&
           a.dilation_h_ == b.dilation_h_ && a.dilation_w_ == b.dilation_w_ &&
           a.groups_ == b.groups_;
  }
  friend bool operator!=(const Conv2dGeometry& a, const Conv2dGeometry& b) { return !(a == b); }

 private:
  // Every size the layers derive from the geometry, computed with overflow checks: a product or
  // sum beyond Eigen::Index (64 bits) throws, naming the quantity and its factors, before any
  // layer computes it unchecked. The values are already known to be >= 1 (padding >= 0).
  void check_sizes(const char* who) const {
    const std::string error = size_error();
    if (!error.empty()) detail::throw_invalid(who, ": ", error);
  }
  // The first size that overflows, as "<what> = a * b overflows ...", or "" when none does.
  std::string size_error() const {
    constexpr Index max = std::numeric_limits<Index>::max();
    std::string error;
    const auto mul = [&](Index a, Index b, const char* what) -> Index {
      if (!error.empty()) return 1;
      if (a != 0 && b > max / a) {
        error = detail::concat(what, " = ", a, " * ", b,
                               " overflows a 64-bit index; the geometry is too large");
        return 1;
      }
      return a * b;
    };
    const auto add = [&](Index a, Index b, const char* what) -> Index {
      if (!error.empty()) return 1;
      if (b > max - a) {
        error = detail::concat(what, " = ", a, " + ", b,
                               " overflows a 64-bit index; the geometry is too large");
        return 1;
      }
      return a + b;
    };
    add(mul(dilation_h_, kernel_h_ - 1, "dilation_h (kernel_h - 1)"), 1, "the kernel's rows");
    add(mul(dilation_w_, kernel_w_ - 1, "dilation_w (kernel_w - 1)"), 1, "the kernel's columns");
    add(add(height_, pad_top_, "H + top"), pad_bottom_, "the padded height H + top + bottom");
    add(add(width_, pad_left_, "W + left"), pad_right_, "the padded width W + left + right");
    const Index taps = mul(kernel_h_, kernel_w_, "the taps kernel_h kernel_w");
    mul(group_in_channels(), taps, "D = C_in/groups kernel_h kernel_w");
    const Index patch_columns = mul(in_channels_, taps, "the patch columns C_in kernel_h kernel_w");
    mul(mul(in_channels_, height_, "C_in H"), width_, "C_in H W");
    // Only a kernel that fits has an output; validate() refuses the others.
    if (!error.empty() || kernel_extent_h() > padded_height() || kernel_extent_w() > padded_width())
      return error;
    const Index positions = mul(out_height(), out_width(), "L = H_out W_out");
    mul(out_channels_, positions, "C_out H_out W_out");
    mul(positions, patch_columns, "one image's patches L C_in kernel_h kernel_w");
    mul(out_channels_, group_in_channels() * taps, "the weight C_out D");
    return error;
  }

  static Index out_size(Index padded, Index extent, Index stride) {
    if (stride < 1 || extent > padded) return 0;
    return (padded - extent) / stride + 1;
  }

  Index in_channels_, height_, width_, out_channels_, kernel_h_, kernel_w_;
  Index stride_h_ = 1, stride_w_ = 1;
  Index pad_top_ = 0, pad_bottom_ = 0, pad_left_ = 0, pad_right_ = 0;
  Index dilation_h_ = 1, dilation_w_ = 1;
  Index groups_ = 1;
};

}  // namespace hra
