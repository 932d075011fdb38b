// Internal: products of a tall column-major matrix with a thin one (a few columns), streamed
// over the tall matrix once, without the packing Eigen's GEMM does for them. The kernels of
// merge (RightUpdate) and of the convolutions' projections of an image's patches on U.
#pragma once

#include <Eigen/Core>
#include <algorithm>

// Prefetching a few cache lines ahead: the panel kernels walk 16 columns at once, 64 to 128
// bytes per column and step, more streams than the hardware prefetchers follow (merge at 4096^2
// float, r = 8, 2 threads, AVX-512: 5.8 ms without, 3.4 ms with).
#if defined(__GNUC__) || defined(__clang__)
#define HRA_PREFETCH_WRITE(p) __builtin_prefetch((p), 1)
#define HRA_PREFETCH_READ(p) __builtin_prefetch((p), 0)
#else
#define HRA_PREFETCH_WRITE(p) ((void)(p))
#define HRA_PREFETCH_READ(p) ((void)(p))
#endif

namespace hra {
namespace detail {

/// \brief Register-blocked kernels for A (n x d, column-major, leading dimension ld) with a thin
/// V (d x b), written with Eigen's packet primitives (ploadu, pset1, pmadd, pstoreu: the
/// interface of Eigen's own kernels; hra requires Eigen 3.4; without vectorisation the packet
/// is the scalar):
///
/// - project:  P (n x bp) += A V           over panels of KC columns of A, MR rows by NR columns
///                                          of V in registers;
/// - update:   A += Q V^T                  the same blocking, A read and written once per panel.
///
/// V is passed row-major with bp columns (vt, d x bp, row_major() zero-pads) and Q, P
/// column-major with bp columns, bp a multiple of NR: zero columns cost flops, not correctness.
/// Eigen's GEMM packs A for these products: in L2, A V ran at 81 GFLOP/s there against 228 here
/// (AVX-512, one core); for one image's patches of a 64 -> 64 3x3 conv (3136 x 576, r = 8),
/// A V took 316 us there against 158 us here. The arithmetic of an entry depends only on the
/// shapes, never on the thread that computes it.
template <typename Scalar>
struct ThinKernels {
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;

  static constexpr int PS = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr int MP = 2;        // packets per row chunk
  static constexpr int MR = MP * PS;  // rows per chunk
  // Columns of V per register block: NR x MP accumulators plus the A packets and a broadcast
  // fit in 32 vector registers (AVX-512, NEON) or 16 (SSE, AVX).
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_ARCH_ARM64)
  static constexpr int NR = 8;
#else
  static constexpr int NR = 4;
#endif
  static constexpr Index KC = 16;  // columns of A per panel
  // Prefetch distance, and scalars per 64-byte cache line (every line of a chunk is prefetched).
  static constexpr Index ahead = 256 / static_cast<Index>(sizeof(Scalar));
  static constexpr Index line = std::max<Index>(1, 64 / static_cast<Index>(sizeof(Scalar)));

  /// b rounded up to whole register blocks.
  static Index padded(Index b) {
    return (b + NR - 1) / NR * NR;
  }

  /// V (d x b) as the row-major d x padded(b) operand of project() and update().
  template <typename Derived>
  static RowMajor row_major(const Eigen::MatrixBase<Derived>& v) {
    RowMajor vt = RowMajor::Zero(v.rows(), padded(v.cols()));
    vt.leftCols(v.cols()) = v;
    return vt;
  }

  /// P (n x bp, leading dimension ldp) += A(0:n, 0:kc) V(0:kc, :).
  static void project(const Scalar* a, Index ld, Index n, Index kc, const Scalar* vt, Index bp,
                      Scalar* p, Index ldp) {
    Index i = 0;
    for (; i + MR <= n; i += MR) project_rows<MP>(a + i, ld, kc, vt, bp, p + i, ldp);
    // The last rows: one packet at a time, then scalars (a patch matrix of a small image has
    // 49 or 196 rows).
    for (; i + PS <= n; i += PS) project_rows<1>(a + i, ld, kc, vt, bp, p + i, ldp);
    for (; i < n; ++i)
      for (Index c = 0; c < bp; ++c) {
        Scalar s = p[c * ldp + i];
        for (Index j = 0; j < kc; ++j) s += a[j * ld + i] * vt[j * bp + c];
        p[c * ldp + i] = s;
      }
  }

  /// A(0:n, 0:kc) += Q V(0:kc, :)^T, Q (n x bp, leading dimension ldq).
  static void update(Scalar* a, Index ld, Index n, Index kc, const Scalar* vt, Index bp,
                     const Scalar* q, Index ldq) {
    Index i = 0;
    for (; i + MR <= n; i += MR) update_rows<MP>(a + i, ld, kc, vt, bp, q + i, ldq);
    for (; i + PS <= n; i += PS) update_rows<1>(a + i, ld, kc, vt, bp, q + i, ldq);
    for (; i < n; ++i)
      for (Index j = 0; j < kc; ++j) {
        Scalar s = a[j * ld + i];
        for (Index c = 0; c < bp; ++c) s += q[c * ldq + i] * vt[j * bp + c];
        a[j * ld + i] = s;
      }
  }

 private:
  // P(0:R, :) += A(0:R, 0:kc) V for R = P_ * PS rows (one register block of rows).
  template <int P_>
  static void project_rows(const Scalar* a, Index ld, Index kc, const Scalar* vt, Index bp,
                           Scalar* p, Index ldp) {
    using namespace Eigen::internal;
    constexpr Index R = P_ * PS;
    for (Index c0 = 0; c0 < bp; c0 += NR) {
      Packet acc[NR][P_];
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) acc[c][m] = ploadu<Packet>(p + (c0 + c) * ldp + m * PS);
      for (Index j = 0; j < kc; ++j) {
        const Scalar* col = a + j * ld;
        if (c0 == 0)
          for (Index l = 0; l < R; l += line) HRA_PREFETCH_READ(col + ahead + l);
        Packet x[P_];
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) x[m] = ploadu<Packet>(col + m * PS);
        const Scalar* u = vt + j * bp + c0;
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c) {
          const Packet uc = pset1<Packet>(u[c]);
#pragma GCC unroll 4
          for (int m = 0; m < P_; ++m) acc[c][m] = pmadd(x[m], uc, acc[c][m]);
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) pstoreu(p + (c0 + c) * ldp + m * PS, acc[c][m]);
    }
  }

  // A(0:R, 0:kc) += Q(0:R, :) V^T for R = P_ * PS rows.
  template <int P_>
  static void update_rows(Scalar* a, Index ld, Index kc, const Scalar* vt, Index bp,
                          const Scalar* q, Index ldq) {
    using namespace Eigen::internal;
    constexpr Index R = P_ * PS;
    for (Index c0 = 0; c0 < bp; c0 += NR) {
      Packet qc[NR][P_];
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c)
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) qc[c][m] = ploadu<Packet>(q + (c0 + c) * ldq + m * PS);
      for (Index j = 0; j < kc; ++j) {
        Scalar* col = a + j * ld;
        if (c0 == 0)
          for (Index l = 0; l < R; l += line) HRA_PREFETCH_WRITE(col + ahead + l);
        Packet x[P_];
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) x[m] = ploadu<Packet>(col + m * PS);
        const Scalar* u = vt + j * bp + c0;
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c) {
          const Packet uc = pset1<Packet>(u[c]);
#pragma GCC unroll 4
          for (int m = 0; m < P_; ++m) x[m] = pmadd(qc[c][m], uc, x[m]);
        }
#pragma GCC unroll 4
        for (int m = 0; m < P_; ++m) pstoreu(col + m * PS, x[m]);
      }
    }
  }
};

}  // namespace detail
}  // namespace hra

#undef HRA_PREFETCH_WRITE
#undef HRA_PREFETCH_READ
