// Prototypes of proposed changes to hra::ReflectorChain, timed by bench/bench_proto.cpp against
// the library. Not part of the library: they take the chain's own factors (factorize()) and
// reproduce its forward, backward and apply_right with the memory traffic fused.
//
// 1. Column panels (forward/backward): the library applies each block of reflectors to the whole
//    d x n batch with separate GEMMs (X^T-side products, the triangular solve, the update, and
//    in the backward seven d x n passes), so the batch streams from memory ~10 times for r <= 32.
//    Doing all of them on a panel of w columns while it sits in L2 streams it once (read + write);
//    the r x r and d x r results are sums over panels. With OpenMP the panels are split between
//    threads (private dU / M accumulators, reduced at the end).
// 2. Row panels (merge/unmerge): W <- W - (W U) S^{-1} U^T reads W for W U and reads and writes it
//    again for the update (3 passes over d_out x d_in); on a panel of h rows kept in L2 it is one
//    read and one write.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <vector>

#include "hra/reflector_chain.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hra_bench {
namespace proto {

template <typename Scalar>
using Mat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

/// Columns per panel so that one d-row panel of the batch takes about `bytes` (>= 8 columns).
template <typename Scalar>
Eigen::Index panel_width(Eigen::Index d, Eigen::Index bytes = 128 * 1024) {
  return std::max<Eigen::Index>(8, bytes / (d * static_cast<Eigen::Index>(sizeof(Scalar))));
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Y = H X (chain variant), keeping coeffs (r x n) as ReflectorChain::forward does. Y may not
/// alias X: the copy of X the layer makes today is fused into the first block's update.
template <typename Scalar>
void forward(const hra::ReflectorChain<Scalar>& chain,
             const typename hra::ReflectorChain<Scalar>::Factors& f, const Mat<Scalar>& x,
             Mat<Scalar>& y, Mat<Scalar>& coeffs, Eigen::Index width) {
  const auto& u = chain.reflectors();
  const Eigen::Index n = x.cols(), bsz = chain.block_size();
  const auto m = static_cast<Eigen::Index>(f.blocks.size());
  y.resize(x.rows(), n);
  coeffs.resize(chain.rank(), n);
  const Eigen::Index panels = (n + width - 1) / width;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (panels > 1 && omp_get_max_threads() > 1)
#endif
  for (Eigen::Index p = 0; p < panels; ++p) {
    const Eigen::Index c0 = p * width, w = std::min(width, n - c0);
    auto yp = y.middleCols(c0, w);
    Mat<Scalar> k;
    for (Eigen::Index j = m - 1; j >= 0; --j) {
      const auto& s = f.blocks[static_cast<std::size_t>(j)];
      const auto ub = u.middleCols(j * bsz, s.rows());
      if (j == m - 1) {
        k.noalias() = ub.transpose() * x.middleCols(c0, w);
        s.template triangularView<Eigen::Upper>().solveInPlace(k);
        yp = x.middleCols(c0, w);
      } else {
        k.noalias() = ub.transpose() * yp;
        s.template triangularView<Eigen::Upper>().solveInPlace(k);
      }
      yp.noalias() -= ub * k;
      coeffs.block(j * bsz, c0, s.rows(), w) = k;
    }
  }
}

/// ReflectorChain::backward_in_place (chain variant) panel by panel: on entry y = H X and
/// g = dL/dY; on return y = X, g = dL/dX, du = dL/dU.
template <typename Scalar>
void backward_in_place(const hra::ReflectorChain<Scalar>& chain,
                       const typename hra::ReflectorChain<Scalar>::Factors& f,
                       const Mat<Scalar>& coeffs, Mat<Scalar>& y, Mat<Scalar>& g, Mat<Scalar>& du,
                       Eigen::Index width) {
  const auto& u = chain.reflectors();
  const Eigen::Index n = y.cols(), d = y.rows(), r = chain.rank(), bsz = chain.block_size();
  const auto m = static_cast<Eigen::Index>(f.blocks.size());
  const Eigen::Index panels = (n + width - 1) / width;
  const int threads = static_cast<int>(std::min<Eigen::Index>(max_threads(), panels));
  // Per thread: its share of -G K^T - X Z^T (d x r) and of M = Z K^T (block-diagonal, r x r).
  std::vector<Mat<Scalar>> du_t(static_cast<std::size_t>(threads), Mat<Scalar>::Zero(d, r));
  std::vector<Mat<Scalar>> mm_t(static_cast<std::size_t>(threads), Mat<Scalar>::Zero(r, r));
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
  for (Eigen::Index p = 0; p < panels; ++p) {
    const Eigen::Index c0 = p * width, w = std::min(width, n - c0);
    auto& dut = du_t[static_cast<std::size_t>(thread_id())];
    auto& mmt = mm_t[static_cast<std::size_t>(thread_id())];
    auto xp = y.middleCols(c0, w);
    auto gp = g.middleCols(c0, w);
    Mat<Scalar> z;
    for (Eigen::Index j = 0; j < m; ++j) {
      const auto& s = f.blocks[static_cast<std::size_t>(j)];
      const Eigen::Index b = s.rows(), j0 = j * bsz;
      const auto ub = u.middleCols(j0, b);
      const auto kb = coeffs.block(j0, c0, b, w);
      xp.noalias() += ub * kb;
      z.noalias() = ub.transpose() * gp;
      s.transpose().template triangularView<Eigen::Lower>().solveInPlace(z);
      mmt.block(j0, j0, b, b).noalias() += z * kb.transpose();
      auto dub = dut.middleCols(j0, b);
      dub.noalias() -= gp * kb.transpose();
      dub.noalias() -= xp * z.transpose();
      gp.noalias() -= ub * z;
    }
  }
  du = du_t[0];
  Mat<Scalar> mm = mm_t[0];
  for (int t = 1; t < threads; ++t) {
    du += du_t[static_cast<std::size_t>(t)];
    mm += mm_t[static_cast<std::size_t>(t)];
  }
  Mat<Scalar> sym;
  for (Eigen::Index j = 0; j < m; ++j) {
    const Eigen::Index b = f.blocks[static_cast<std::size_t>(j)].rows(), j0 = j * bsz;
    const auto mb = mm.block(j0, j0, b, b);
    sym = mb.template triangularView<Eigen::StrictlyUpper>();
    sym += mb.template triangularView<Eigen::StrictlyUpper>().transpose();
    sym.diagonal() = mb.diagonal();
    du.middleCols(j0, b).noalias() += u.middleCols(j0, b) * sym;
  }
}

/// W <- W H (transpose = false) or W H^T, row panel by row panel (`rows` rows at a time).
template <typename Scalar>
void apply_right(const hra::ReflectorChain<Scalar>& chain,
                 const typename hra::ReflectorChain<Scalar>::Factors& f, Mat<Scalar>& w,
                 bool transpose, Eigen::Index rows) {
  const auto& u = chain.reflectors();
  const Eigen::Index bsz = chain.block_size();
  const auto m = static_cast<Eigen::Index>(f.blocks.size());
  const Eigen::Index panels = (w.rows() + rows - 1) / rows;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (panels > 1 && omp_get_max_threads() > 1)
#endif
  for (Eigen::Index p = 0; p < panels; ++p) {
    const Eigen::Index r0 = p * rows, h = std::min(rows, w.rows() - r0);
    auto wp = w.middleRows(r0, h);
    Mat<Scalar> t;
    for (Eigen::Index step = 0; step < m; ++step) {
      const Eigen::Index j = transpose ? m - 1 - step : step;
      const auto& s = f.blocks[static_cast<std::size_t>(j)];
      const auto ub = u.middleCols(j * bsz, s.rows());
      t.noalias() = wp * ub;
      if (transpose)
        s.transpose()
            .template triangularView<Eigen::Lower>()
            .template solveInPlace<Eigen::OnTheRight>(t);
      else
        s.template triangularView<Eigen::Upper>().template solveInPlace<Eigen::OnTheRight>(t);
      wp.noalias() -= t * ub.transpose();
    }
  }
}

}  // namespace proto
}  // namespace hra_bench
