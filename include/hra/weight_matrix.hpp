// The weight matrix of a layer, owned by the layer or viewed in the caller's memory.
#pragma once

#include <Eigen/Core>
#include <utility>

#include "detail/checks.hpp"

namespace hra {

/// \brief The d_out x d_in weight W of a layer, owned or viewed.
///
/// `WeightMatrix<S>::owned(std::move(w))` takes the matrix; `WeightMatrix<S>::view(w)` keeps a
/// view of caller-owned memory (any column-major block with unit inner stride), so a large
/// pretrained weight is never copied. A viewed matrix must outlive the layer. Whether the layer
/// trains W (Linear with LinearOptions::train_weight) or keeps it frozen and adapts it (HRA,
/// LoRA) is the layer's business; merge() of an adapter writes into W, which is how a merged
/// adapter reaches the caller's model when W is a view.
template <typename Scalar>
class WeightMatrix : detail::ScalarCheck<Scalar> {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using MapType = Eigen::Map<Matrix, 0, Eigen::OuterStride<>>;
  using ConstMapType = Eigen::Map<const Matrix, 0, Eigen::OuterStride<>>;

  static WeightMatrix owned(Matrix w) {
    WeightMatrix f;
    f.owned_ = std::move(w);
    f.is_view_ = false;
    f.rows_ = f.owned_.rows();
    f.cols_ = f.owned_.cols();
    f.stride_ = f.rows_;
    return f;
  }

  static WeightMatrix view(Eigen::Ref<Matrix> w) {
    WeightMatrix f;
    f.is_view_ = true;
    f.data_ = w.data();
    f.rows_ = w.rows();
    f.cols_ = w.cols();
    f.stride_ = w.outerStride();
    return f;
  }

  bool is_view() const { return is_view_; }
  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  /// Distance between the starts of two columns (rows() unless a view of a larger matrix).
  Eigen::Index outer_stride() const { return stride_; }

  MapType map() { return MapType(data(), rows_, cols_, Eigen::OuterStride<>(stride_)); }
  ConstMapType map() const {
    return ConstMapType(data(), rows_, cols_, Eigen::OuterStride<>(stride_));
  }

 private:
  WeightMatrix() = default;
  // The owned buffer's address moves with the object, so it is looked up on every access.
  Scalar* data() { return is_view_ ? data_ : owned_.data(); }
  const Scalar* data() const { return is_view_ ? data_ : owned_.data(); }

  Matrix owned_;
  Scalar* data_ = nullptr;
  bool is_view_ = false;
  Eigen::Index rows_ = 0, cols_ = 0, stride_ = 0;
};

}  // namespace hra
