// Internal: W <- W - (W V) C V^T in place for a column-major W, at close to the speed of a copy
// (the kernel of merge and unmerge, ReflectorChain::apply_right).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../parallel.hpp"
#include "checks.hpp"

// Prefetching W a few cache lines ahead of the kernels below: they walk 16 columns at once, 64 to
// 128 bytes per column and step, more streams than the hardware prefetchers follow. Measured at
// 4096^2 float, r = 8, 2 threads (AVX-512): 5.8 ms without, 3.4 ms with.
#if defined(__GNUC__) || defined(__clang__)
#define HRA_PREFETCH_WRITE(p) __builtin_prefetch((p), 1)
#define HRA_PREFETCH_READ(p) __builtin_prefetch((p), 0)
#else
#define HRA_PREFETCH_WRITE(p) ((void)(p))
#define HRA_PREFETCH_READ(p) ((void)(p))
#endif

namespace hra {
namespace detail {

/// \brief W <- W - (W V) C V^T for W (rows x d, column-major, any outer stride), V (d x b) and
/// C (b x b): the right-hand update of merge (W H) and unmerge (W H^T).
///
/// Rows of W are independent, so the work is split into fixed row ranges (by shape only: the
/// result does not depend on the thread count), each one task on hra's pool when the update is
/// large. Per range: P = W V streamed over W's columns, then Q = -P C, then W += Q V^T, again
/// streamed. Both passes are register-blocked kernels written with Eigen's packet primitives
/// (MR rows, two packets, by NR columns of V held in registers, over panels of 16 columns of W):
/// Eigen's GEMM packs W for the thin product W V (d x b) and ran it at 81 GFLOP/s in L2 where
/// this kernel runs at 228 (AVX-512, one core). The whole update at 4096^2 float, r = 8,
/// 2 threads: 9.1 ms with Eigen's products on row blocks, 3.7-4.2 ms here (a copy of W: 2.1 ms).
///
/// Eigen::internal's packet functions (ploadu, pset1, pmadd, pstoreu) are the interface Eigen's
/// own kernels use; hra requires Eigen 3.4. Without vectorisation the packet is the scalar.
template <typename Scalar>
class RightUpdate {
 public:
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// W <- W - (W V) C V^T.
  static void run(Eigen::Ref<Matrix> w, const Eigen::Ref<const Matrix>& v, const Matrix& c) {
    HRA_ASSERT(w.cols() == v.rows() && c.rows() == v.cols() && c.cols() == v.cols());
    const Index rows = w.rows(), d = w.cols(), b = v.cols();
    if (rows == 0 || d == 0 || b == 0) return;
    const Index bp = (b + NR - 1) / NR * NR;  // V's columns padded with zeros to whole NR blocks
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> vt =
        Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Zero(d, bp);
    vt.leftCols(b) = v;
    // At most 4 fixed ranges of whole MR-row chunks, so that every row takes the same path
    // whatever the number of threads. Long ranges stream W best: at 4096^2, r = 8, 2 threads,
    // 4 ranges took 3.6-4.2 ms, 8 ranges 4.1-4.5 ms, 16 ranges 5.5-5.9 ms.
    const Index chunks = (rows + MR - 1) / MR;
    const Index per_range = std::max<Index>(1, (chunks + 3) / 4) * MR;
    const Index count = (rows + per_range - 1) / per_range;
    const auto range = [&](std::int64_t t) {
      const Index r0 = static_cast<Index>(t) * per_range;
      update_rows(w, r0, std::min(per_range, rows - r0), vt, c, b);
    };
    const double madds =
        2.0 * static_cast<double>(rows) * static_cast<double>(d) * static_cast<double>(b);
    if (madds < parallel_product_min_madds || count < 2) {
      for (Index t = 0; t < count; ++t) range(t);
    } else {
      ThreadPool::instance().run(count, range);
    }
  }

 private:
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr int PS = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int MP = 2;        // packets per row chunk
  static constexpr int MR = MP * PS;  // rows per chunk
  // Columns of V per register block: NR x MP accumulators plus the W packets and a broadcast
  // fit in 32 vector registers (AVX-512, NEON) or 16 (SSE, AVX).
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_ARCH_ARM64)
  static constexpr int NR = 8;
#else
  static constexpr int NR = 4;
#endif
  static constexpr Index KC = 16;  // columns of W per panel
  // Prefetch distance, and scalars per 64-byte cache line (every line of a chunk is prefetched).
  static constexpr Index ahead = 256 / static_cast<Index>(sizeof(Scalar));
  static constexpr Index line = std::max<Index>(1, 64 / static_cast<Index>(sizeof(Scalar)));

  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  // Rows [r0, r0 + n) of W: P = W V, Q = -P C (padded to bp columns), W += Q V^T.
  static void update_rows(Eigen::Ref<Matrix>& w, Index r0, Index n, const RowMajor& vt,
                          const Matrix& c, Index b) {
    const Index d = w.cols(), ld = w.outerStride(), bp = vt.cols();
    Scalar* base = w.data() + r0;
    Matrix p = Matrix::Zero(n, bp);
    for (Index j0 = 0; j0 < d; j0 += KC)
      project(base + j0 * ld, ld, n, std::min(KC, d - j0), vt.data() + j0 * bp, bp, p.data());
    Matrix q = Matrix::Zero(n, bp);
    q.leftCols(b).noalias() = -(p.leftCols(b) * c);
    for (Index j0 = 0; j0 < d; j0 += KC)
      update(base + j0 * ld, ld, n, std::min(KC, d - j0), vt.data() + j0 * bp, bp, q.data());
  }

  // P (n x bp, column-major, ld n) += W(0:n, 0:kc) V(0:kc, :), vt = V row-major with bp columns.
  static void project(const Scalar* w, Index ld, Index n, Index kc, const Scalar* vt, Index bp,
                      Scalar* p) {
    using namespace Eigen::internal;
    Index i = 0;
    for (; i + MR <= n; i += MR) {
      for (Index c0 = 0; c0 < bp; c0 += NR) {
        Packet acc[NR][MP];
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) acc[c][m] = ploadu<Packet>(p + (c0 + c) * n + i + m * PS);
        for (Index j = 0; j < kc; ++j) {
          const Scalar* col = w + j * ld + i;
          if (c0 == 0)
            for (Index l = 0; l < MR; l += line) HRA_PREFETCH_READ(col + ahead + l);
          Packet x[MP];
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) x[m] = ploadu<Packet>(col + m * PS);
          const Scalar* u = vt + j * bp + c0;
#pragma GCC unroll 8
          for (int c = 0; c < NR; ++c) {
            const Packet uc = pset1<Packet>(u[c]);
#pragma GCC unroll 4
            for (int m = 0; m < MP; ++m) acc[c][m] = pmadd(x[m], uc, acc[c][m]);
          }
        }
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) pstoreu(p + (c0 + c) * n + i + m * PS, acc[c][m]);
      }
    }
    for (; i < n; ++i)  // the last rows, fewer than MR
      for (Index c = 0; c < bp; ++c) {
        Scalar s = p[c * n + i];
        for (Index j = 0; j < kc; ++j) s += w[j * ld + i] * vt[j * bp + c];
        p[c * n + i] = s;
      }
  }

  // W(0:n, 0:kc) += Q V(0:kc, :)^T, Q (n x bp, column-major, ld n).
  static void update(Scalar* w, Index ld, Index n, Index kc, const Scalar* vt, Index bp,
                     const Scalar* q) {
    using namespace Eigen::internal;
    Index i = 0;
    for (; i + MR <= n; i += MR) {
      for (Index c0 = 0; c0 < bp; c0 += NR) {
        Packet qc[NR][MP];
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) qc[c][m] = ploadu<Packet>(q + (c0 + c) * n + i + m * PS);
        for (Index j = 0; j < kc; ++j) {
          Scalar* col = w + j * ld + i;
          if (c0 == 0)
            for (Index l = 0; l < MR; l += line) HRA_PREFETCH_WRITE(col + ahead + l);
          Packet x[MP];
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) x[m] = ploadu<Packet>(col + m * PS);
          const Scalar* u = vt + j * bp + c0;
#pragma GCC unroll 8
          for (int c = 0; c < NR; ++c) {
            const Packet uc = pset1<Packet>(u[c]);
#pragma GCC unroll 4
            for (int m = 0; m < MP; ++m) x[m] = pmadd(qc[c][m], uc, x[m]);
          }
#pragma GCC unroll 4
          for (int m = 0; m < MP; ++m) pstoreu(col + m * PS, x[m]);
        }
      }
    }
    for (; i < n; ++i)
      for (Index j = 0; j < kc; ++j) {
        Scalar s = w[j * ld + i];
        for (Index c = 0; c < bp; ++c) s += q[c * n + i] * vt[j * bp + c];
        w[j * ld + i] = s;
      }
  }
};

}  // namespace detail
}  // namespace hra

#undef HRA_PREFETCH_WRITE
#undef HRA_PREFETCH_READ
