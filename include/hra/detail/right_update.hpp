// Internal: W <- W - (W V) C V^T in place for a column-major W, at close to the speed of a copy
// (the kernel of merge and unmerge, ReflectorChain::apply_right).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

#include "../parallel.hpp"
#include "checks.hpp"
#include "gemm.hpp"
#include "thin_kernels.hpp"

namespace hra {
namespace detail {

/// \brief W <- W - (W V) C V^T for W (rows x d, column-major, any outer stride), V (d x b) and
/// C (b x b): the right-hand update of merge (W H) and unmerge (W H^T).
///
/// Rows of W are independent, so the work is split into at most 4 fixed row ranges (by shape
/// only: the result does not depend on the thread count), each one task on hra's pool when the
/// update is large. Per range: P = W V streamed over W's columns (ThinKernels::project), then
/// Q = -P C, then W += Q V^T, again streamed (ThinKernels::update). At 4096^2 float, r = 8,
/// 2 threads: 9.1 ms with Eigen's products on row blocks, 3.7-4.2 ms here (a copy of W: 2.1 ms).
template <typename Scalar>
class RightUpdate {
  using K = ThinKernels<Scalar>;

 public:
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// W <- W - (W V) C V^T.
  static void run(Eigen::Ref<Matrix> w, const Eigen::Ref<const Matrix>& v, const Matrix& c);

 private:
  // Rows [r0, r0 + n) of W: P = W V, Q = -P C (padded to bp columns), W += Q V^T.
  static void update_rows(Eigen::Ref<Matrix>& w, Index r0, Index n, const typename K::RowMajor& vt,
                          const Matrix& c, Index b);
};

template <typename Scalar>
void RightUpdate<Scalar>::run(Eigen::Ref<Matrix> w, const Eigen::Ref<const Matrix>& v,
                              const Matrix& c) {
  HRA_ASSERT(w.cols() == v.rows() && c.rows() == v.cols() && c.cols() == v.cols());
  const Index rows = w.rows(), b = v.cols();
  if (rows == 0 || w.cols() == 0 || b == 0) return;
  const typename K::RowMajor vt = K::row_major(v);
  // At most 4 fixed ranges of whole MR-row chunks, so that every row takes the same path
  // whatever the number of threads. Long ranges stream W best: at 4096^2, r = 8, 2 threads,
  // 4 ranges took 3.6-4.2 ms, 8 ranges 4.1-4.5 ms, 16 ranges 5.5-5.9 ms.
  const Index chunks = (rows + K::MR - 1) / K::MR;
  const Index per_range = std::max<Index>(1, (chunks + 3) / 4) * K::MR;
  const Index count = (rows + per_range - 1) / per_range;
  const auto range = [&](std::int64_t t) {
    const Index r0 = static_cast<Index>(t) * per_range;
    update_rows(w, r0, std::min(per_range, rows - r0), vt, c, b);
  };
  const double madds =
      2.0 * static_cast<double>(rows) * static_cast<double>(w.cols()) * static_cast<double>(b);
  if (madds < parallel_product_min_madds || count < 2) {
    for (Index t = 0; t < count; ++t) range(t);
  } else {
    ThreadPool::instance().run(count, range);
  }
}

template <typename Scalar>
void RightUpdate<Scalar>::update_rows(Eigen::Ref<Matrix>& w, Index r0, Index n,
                                      const typename K::RowMajor& vt, const Matrix& c, Index b) {
  const Index d = w.cols(), ld = w.outerStride(), bp = vt.cols();
  Scalar* base = w.data() + r0;
  Matrix p = Matrix::Zero(n, bp);
  for (Index j0 = 0; j0 < d; j0 += K::KC)
    K::project(base + j0 * ld, ld, n, std::min(K::KC, d - j0), vt.data() + j0 * bp, bp, p.data(),
               n);
  Matrix q = Matrix::Zero(n, bp);
  serial_product(q.leftCols(b), p.leftCols(b), Op::n, c, Op::n, Scalar(-1));
  for (Index j0 = 0; j0 < d; j0 += K::KC)
    K::update(base + j0 * ld, ld, n, std::min(K::KC, d - j0), vt.data() + j0 * bp, bp, q.data(), n);
}

}  // namespace detail
}  // namespace hra
