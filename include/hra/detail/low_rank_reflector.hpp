// Internal: one adapter's H = I - V C V^T in the form the low-rank products of SPEC section 10
// need (shared by the layers that apply H through r-dimensional projections only).
#pragma once

#include <Eigen/Core>

#include "../reflector_chain.hpp"
#include "checks.hpp"
#include "gemm.hpp"

namespace hra {
namespace detail {

/// \brief H = I - V C V^T for one ReflectorChain, with the r x r factor C applied, never formed.
///
/// - chain: V = U (d x r) and C = S^{-1}, S = striu(U^T U) + diag(U^T U)/2 over the *whole*
///   chain (one block, SPEC section 10; blocking is only an efficiency choice for the d x n
///   kernels of ReflectorChain, and here the work on n is in the callers' products);
/// - Gram-Schmidt: V = Q (d x r) and C = 2 I, with R kept for the backward through the QR.
///
/// With it the layer y = W H x (W frozen) is, per batch X (d x n) and upstream gradient dY:
///
///     K = C V^T X (r x n),   Y = W X - (W V) K,
///     Z = C^T (W V)^T dY,    dX = W^T dY - V Z,
///     dU from the three r-sized sums  G K^T = W^T (dY K^T),  X Z^T,  Z K^T    (G = W^T dY)
///
/// (SPEC sections 3, 4 and 10), which are sums over the columns of X, so callers can accumulate
/// them over chunks (a convolution: over images and patches) and call gradient() once. The
/// "row" entry points serve batches stored one sample per row (a convolution's patch matrix
/// T = P^T): K^T = T V C^T and Z^T = dY^T (W V) C.
template <typename Scalar>
class LowRankReflector : ScalarCheck<Scalar> {
 public:
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Chain = ReflectorChain<Scalar>;

  LowRankReflector() = default;

  /// From a chain and the Factors of its current U (chain.factorize(), which validated U).
  LowRankReflector(const Chain& chain, const typename Chain::Factors& f)
      : variant_(chain.variant()) {
    HRA_ASSERT(f.layout == chain.layout());
    if (variant_ == Variant::gram_schmidt) {
      v_ = f.q;
      r_ = f.r;
      return;
    }
    v_ = chain.reflectors();
    Matrix s;
    serial_product(s, v_, Op::t, v_, Op::n);  // upper_inverse reads its upper half
    s.diagonal() *= Scalar(0.5);
    t_ = upper_inverse(s);
  }

  Variant variant() const { return variant_; }
  Index dim() const { return v_.rows(); }
  Index rank() const { return v_.cols(); }
  /// V: U (chain) or Q (Gram-Schmidt), d x r.
  const Matrix& v() const { return v_; }

  // C = S^{-1} is held as T (detail::upper_inverse) and applied by products, which are several
  // times faster than triangular solves for r x n blocks (see ReflectorChain).

  /// k <- C k (k: r x m), e.g. K = C (V^T X).
  template <typename M>
  void apply_c(M&& k) const {
    if (variant_ == Variant::gram_schmidt) {
      k *= Scalar(2);
    } else {
      const Matrix in = k;
      serial_product(k, t_, Op::n, in, Op::n);
    }
  }
  /// z <- C^T z (z: r x m), e.g. Z = C^T ((W V)^T dY).
  template <typename M>
  void apply_ct(M&& z) const {
    if (variant_ == Variant::gram_schmidt) {
      z *= Scalar(2);
    } else {
      const Matrix in = z;
      serial_product(z, t_, Op::t, in, Op::n);
    }
  }
  /// kt <- kt C^T (kt: m x r), e.g. K^T = (T V) C^T for patches stored as rows.
  template <typename M>
  void apply_ct_right(M&& kt) const {
    if (variant_ == Variant::gram_schmidt) {
      kt *= Scalar(2);
    } else {
      const Matrix in = kt;
      serial_product(kt, in, Op::n, t_, Op::t);
    }
  }
  /// zt <- zt C (zt: m x r), e.g. Z^T = (dY^T W V) C.
  template <typename M>
  void apply_c_right(M&& zt) const {
    if (variant_ == Variant::gram_schmidt) {
      zt *= Scalar(2);
    } else {
      const Matrix in = zt;
      serial_product(zt, in, Op::n, t_, Op::n);
    }
  }

  /// *Assigns* dU (d x r) from the sums gk = G K^T (d x r), xz = X Z^T (d x r) and zk = Z K^T
  /// (r x r) of one batch:
  /// chain (SPEC 3):  dU = -gk - xz + U (striu(M) + striu(M)^T + diag(M)),  M = zk;
  /// Gram-Schmidt (SPEC 4):  dQ = -gk - xz,  dU = (dQ - Q sym(Q^T dQ)) R^{-T}  (zk unused).
  /// dU includes the normalisation of every column: u_i^T dU_i = 0.
  void gradient(const Matrix& gk, const Matrix& xz, const Matrix& zk, Matrix& du) const {
    HRA_ASSERT(gk.rows() == dim() && gk.cols() == rank() && xz.rows() == dim());
    if (variant_ == Variant::gram_schmidt) {
      du = -gk - xz;
      Matrix mm;
      serial_product(mm, v_, Op::t, du, Op::n);
      const Matrix sym = upper_symmetrised(mm);
      serial_product(du, v_, Op::n, sym, Op::n, Scalar(-1), true);
      Kernels<Scalar>::solve_right_upper(Op::t, r_, du);
      return;
    }
    HRA_ASSERT(zk.rows() == rank() && zk.cols() == rank());
    Matrix sym(zk.rows(), zk.cols());  // striu(M) + striu(M)^T + diag(M)
    for (Index j = 0; j < zk.cols(); ++j)
      for (Index i = 0; i < zk.rows(); ++i)
        sym(i, j) = i < j ? zk(i, j) : i > j ? zk(j, i) : zk(i, i);
    serial_product(du, v_, Op::n, sym, Op::n);
    du -= gk;
    du -= xz;
  }

  /// Bytes held: V, and T or R.
  std::size_t bytes() const {
    return static_cast<std::size_t>(v_.size() + t_.size() + r_.size()) * sizeof(Scalar);
  }

 private:
  Variant variant_ = Variant::chain;
  Matrix v_;  // U or Q
  Matrix t_;  // chain: T = S^{-1} for the whole chain's S (upper triangular)
  Matrix r_;  // Gram-Schmidt: R (upper triangular, positive diagonal)
};

}  // namespace detail
}  // namespace hra
