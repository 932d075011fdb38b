// Internal: the one typed entry every matrix product of hra goes through, BLAS-style (operands
// as strided views plus transpose flags, per scalar), split over hra's pool when large.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../parallel.hpp"
#include "checks.hpp"

namespace hra {
namespace detail {

/// How an operand enters a product: as stored or transposed (BLAS's TRANS argument).
enum class Op { n, t };

/// \brief C = alpha op(A) op(B), or C += alpha op(A) op(B), for column-major strided views.
///
/// The only place hra instantiates Eigen's matrix products: four per scalar type (one per pair
/// of transpose flags), whatever the number of call sites, instead of one set per call site and
/// operand expression (a layer's file compiled in 81 s that way, issue #27). The members are
/// defined below the class, not inline, so that extern_templates.hpp declares them compiled
/// elsewhere. Each computes exactly what Eigen's `c.noalias() (+)= alpha * op(a) * op(b)`
/// computes (Eigen's own choice of GEMM, GEMV or a coefficient-wise product for tiny shapes).
template <typename Scalar>
struct Kernels : ScalarCheck<Scalar> {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  /// An operand: any column-major block with unit inner stride (a Matrix, a block of one, a
  /// WeightMatrix's map). A transposed expression would be copied: pass Op::t instead.
  using In = Eigen::Ref<const Matrix, 0, Eigen::OuterStride<>>;
  /// The result: a Matrix or a block of one, already of its final shape.
  using Out = Eigen::Ref<Matrix, 0, Eigen::OuterStride<>>;

  /// C (+)= alpha op(A) op(B) on the calling thread.
  static void gemm(Op op_a, const In& a, Op op_b, const In& b, Scalar alpha, bool accumulate,
                   Out c);

  /// gemm() split into fixed slices of C on hra's pool when it has at least `min_madds`
  /// multiply-adds. The slices depend on the shape only (never on the thread count), so the
  /// result is bitwise the same for any number of threads: up to 16, each at least
  /// parallel_product_min_cols rows or columns. A tall C (rows >= columns, e.g. W X for a
  /// 4096 x 4096 W and 512 columns) is split into row slices, each packing only its rows of
  /// op(A); a wide one into column slices, each packing only its columns of op(B). Column
  /// slices of a tall product made every task pack all of W: at 4096^2 by 512 columns on 2
  /// threads, 83 ms against 62 ms for row slices (one thread: 124 ms). A sliced result can
  /// differ in the last bits from one unsplit product: Eigen's blocking depends on the slice's
  /// shape and the cache sizes it reads from the CPU. When Eigen runs its own OpenMP threads
  /// (Eigen::nbThreads() > 1) the product is left to Eigen.
  static void split(Op op_a, const In& a, Op op_b, const In& b, Scalar alpha, bool accumulate,
                    Out c, double min_madds);

  /// X <- X op(R)^{-1} for an upper-triangular R (b x b; its strictly lower part is not read),
  /// X of b columns (a triangular solve on the right, TRSM, by columns).
  static void solve_right_upper(Op op, const In& r, Out x);
};

template <typename Scalar>
void Kernels<Scalar>::gemm(Op op_a, const In& a, Op op_b, const In& b, Scalar alpha,
                           bool accumulate, Out c) {
  // Eigen assigns a GEMM or GEMV product as C = 0, then C += alpha op(A) op(B): the same here,
  // so that an assignment costs no instantiation of its own.
  if (!accumulate) c.setZero();
  if (op_a == Op::n) {
    if (op_b == Op::n)
      c.noalias() += alpha * a * b;
    else
      c.noalias() += alpha * a * b.transpose();
  } else {
    if (op_b == Op::n)
      c.noalias() += alpha * a.transpose() * b;
    else
      c.noalias() += alpha * a.transpose() * b.transpose();
  }
}

template <typename Scalar>
void Kernels<Scalar>::split(Op op_a, const In& a, Op op_b, const In& b, Scalar alpha,
                            bool accumulate, Out c, double min_madds) {
  const Index m = c.rows(), n = c.cols(), k = op_a == Op::n ? a.cols() : a.rows();
  HRA_ASSERT((op_a == Op::n ? a.rows() : a.cols()) == m);
  HRA_ASSERT((op_b == Op::n ? b.rows() : b.cols()) == k &&
             (op_b == Op::n ? b.cols() : b.rows()) == n);
  const double madds = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const bool by_rows = m >= n;
  const Index extent = by_rows ? m : n;
  const Index count = std::min<Index>(16, extent / parallel_product_min_cols);
  if (madds < min_madds || Eigen::nbThreads() > 1 || count < 2) {
    gemm(op_a, a, op_b, b, alpha, accumulate, c);
    return;
  }
  ThreadPool::instance().run(count, [&](std::int64_t s) {
    const Index c0 = extent * s / count, len = extent * (s + 1) / count - c0;
    if (by_rows)  // rows [c0, c0 + len) of op(A)
      gemm(op_a, op_a == Op::n ? In(a.middleRows(c0, len)) : In(a.middleCols(c0, len)), op_b, b,
           alpha, accumulate, c.middleRows(c0, len));
    else  // columns [c0, c0 + len) of op(B)
      gemm(op_a, a, op_b, op_b == Op::n ? In(b.middleCols(c0, len)) : In(b.middleRows(c0, len)),
           alpha, accumulate, c.middleCols(c0, len));
  });
}

template <typename Scalar>
void Kernels<Scalar>::solve_right_upper(Op op, const In& r, Out x) {
  HRA_ASSERT(r.rows() == r.cols() && x.cols() == r.rows());
  // Column by column (b is a rank, at most a few dozen): Y op(R) = X gives, for op n,
  // X_j = sum_{k <= j} Y_k R_kj (first column first) and, for op t, X_j = sum_{k >= j} Y_k R_jk
  // (last column first); each step is an axpy over the rows of X.
  const Index b = r.rows();
  for (Index step = 0; step < b; ++step) {
    const Index j = op == Op::n ? step : b - 1 - step;
    auto xj = x.col(j);
    if (op == Op::n) {
      for (Index k = 0; k < j; ++k) xj -= r(k, j) * x.col(k);
    } else {
      for (Index k = j + 1; k < b; ++k) xj -= r(j, k) * x.col(k);
    }
    xj /= r(j, j);
  }
}

/// The scalar type of a product's destination.
template <typename Dst>
using ScalarOf = typename std::decay_t<Dst>::Scalar;
/// An operand of a product into `Dst` (a non-deduced parameter: any block converts to it).
template <typename Dst>
using InOf = typename Kernels<ScalarOf<Dst>>::In;

/// \brief dst = alpha op_a(a) op_b(b), or dst += ... with `accumulate`; `dst` must not alias the
/// operands. A Matrix `dst` is resized when assigning; a block must have its final shape.
/// Products of at least `min_madds` multiply-adds are split over hra's pool (Kernels::split).
template <typename Dst>
void product(Dst&& dst, const InOf<Dst>& a, Op op_a, const InOf<Dst>& b, Op op_b,
             ScalarOf<Dst> alpha = ScalarOf<Dst>(1), bool accumulate = false,
             double min_madds = parallel_product_min_madds) {
  using K = Kernels<ScalarOf<Dst>>;
  if constexpr (std::is_same_v<std::decay_t<Dst>, typename K::Matrix>) {
    if (!accumulate)
      dst.resize(op_a == Op::n ? a.rows() : a.cols(), op_b == Op::n ? b.cols() : b.rows());
  }
  K::split(op_a, a, op_b, b, alpha, accumulate, typename K::Out(dst), min_madds);
}

/// product() for a thin product (one dimension of r: the chain's U, d x r, with a d x n batch;
/// HraLinear's low-rank form's W V, V and K with a batch), split from parallel_thin_min_madds.
template <typename Dst>
void thin_product(Dst&& dst, const InOf<Dst>& a, Op op_a, const InOf<Dst>& b, Op op_b,
                  ScalarOf<Dst> alpha = ScalarOf<Dst>(1), bool accumulate = false) {
  product(std::forward<Dst>(dst), a, op_a, b, op_b, alpha, accumulate, parallel_thin_min_madds);
}

/// product() on the calling thread, never split: r x r factors, r x n coefficients, and the
/// products a layer deliberately keeps on one thread.
template <typename Dst>
void serial_product(Dst&& dst, const InOf<Dst>& a, Op op_a, const InOf<Dst>& b, Op op_b,
                    ScalarOf<Dst> alpha = ScalarOf<Dst>(1), bool accumulate = false) {
  using K = Kernels<ScalarOf<Dst>>;
  if constexpr (std::is_same_v<std::decay_t<Dst>, typename K::Matrix>) {
    if (!accumulate)
      dst.resize(op_a == Op::n ? a.rows() : a.cols(), op_b == Op::n ? b.cols() : b.rows());
  }
  K::gemm(op_a, a, op_b, b, alpha, accumulate, typename K::Out(dst));
}

}  // namespace detail
}  // namespace hra
