// Test data and comparisons shared by the test programs (tests only).
#pragma once

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

namespace hra_test {

using Index = Eigen::Index;
template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <typename T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
using MatD = Mat<double>;
using VecD = Vec<double>;

/// Uniform in [-1, 1) from raw mt19937_64 output (a sequence the standard fixes), so every
/// platform sees the same matrices.
inline MatD random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  MatD m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i)
      m(i, j) = 2.0 * (static_cast<double>(gen() >> 11) * 0x1.0p-53) - 1.0;
  return m;
}

/// random_matrix() rounded to T.
template <typename T>
Mat<T> random_as(Index rows, Index cols, std::uint64_t seed) {
  return random_matrix(rows, cols, seed).cast<T>();
}

template <typename T>
Vec<T> random_vec(Index n, std::uint64_t seed) {
  return random_matrix(n, 1, seed).cast<T>();
}

template <typename Derived>
MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

inline double max_abs(const MatD& m) {
  return m.size() == 0 ? 0.0 : m.cwiseAbs().maxCoeff();
}

/// max|a - b| / max|b|, b the reference; the shapes must agree.
template <typename DA, typename DB>
double rel_err(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  const MatD ad = to_double(a), bd = to_double(b);
  REQUIRE(ad.rows() == bd.rows());
  REQUIRE(ad.cols() == bd.cols());
  return max_abs(ad - bd) / std::max(max_abs(bd), std::numeric_limits<double>::min());
}

/// max|a - b| over two matrices of the same shape.
template <typename DA, typename DB>
double abs_err(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  const MatD ad = to_double(a), bd = to_double(b);
  REQUIRE(ad.rows() == bd.rows());
  REQUIRE(ad.cols() == bd.cols());
  return max_abs(ad - bd);
}

/// Same shape and the same bits in every entry (so equal NaNs compare equal).
template <typename DA, typename DB>
bool bitwise_equal(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index j = 0; j < a.cols(); ++j)
    for (Index i = 0; i < a.rows(); ++i) {
      const auto x = a(i, j);
      const auto y = b(i, j);
      if (std::memcmp(&x, &y, sizeof(x)) != 0) return false;
    }
  return true;
}

template <typename T>
constexpr double eps() {
  return static_cast<double>(std::numeric_limits<T>::epsilon());
}

/// Rounding tolerance for results that agree up to rounding: a few ulps per reflection and per
/// term of a d-term sum (observed errors are about 10x smaller).
template <typename T>
double tol(Index d, Index r) {
  return 8.0 * eps<T>() * static_cast<double>(d + r);
}

}  // namespace hra_test
