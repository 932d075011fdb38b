// Straightforward restatements of HRA used as references by tests and benchmarks.
#pragma once

#include <Eigen/Core>

#include "reflector_chain.hpp"

namespace hra {
/// Reference algorithms: deliberately naive, for checking and timing against the fast path.
namespace reference {

/// PEFT's HraLayer.get_delta_weight restated: the dense d x d H built from d x d products of
/// explicit reflections (chain, in order 1..r, or r..1 when `reverse`), or I - 2 Q Q^T with Q
/// from modified Gram-Schmidt (variant gram_schmidt). O(r d^2) time and d^2 memory.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> peft_delta_weight(
    const Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>& u,
    Variant variant, bool reverse = false) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  const Eigen::Index d = u.rows(), r = u.cols();
  Matrix h = Matrix::Identity(d, d);
  if (variant == Variant::gram_schmidt) {
    Matrix q(d, r);
    for (Eigen::Index i = 0; i < r; ++i) {
      Vector ui = u.col(i);
      for (Eigen::Index j = 0; j < i; ++j) ui -= q.col(j).dot(ui) * q.col(j);
      q.col(i) = ui / ui.norm();
    }
    h.noalias() -= Scalar(2) * q * q.transpose();
    return h;
  }
  Matrix next(d, d);
  for (Eigen::Index step = 0; step < r; ++step) {
    const Eigen::Index i = reverse ? r - 1 - step : step;
    const Vector ui = u.col(i) / u.col(i).norm();
    // h <- h (I - 2 u u^T), done as PEFT does: a full d x d product per reflection
    Matrix reflection = Matrix::Identity(d, d);
    reflection.noalias() -= Scalar(2) * ui * ui.transpose();
    next.noalias() = h * reflection;
    h.swap(next);
  }
  return h;
}

/// X <- H X for the chain, one reflection at a time (H_r first): 4 r d n flops, no blocking.
template <typename Scalar>
void apply_one_at_a_time(
    const Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>& u,
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& x) {
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> w;
  for (Eigen::Index i = u.cols() - 1; i >= 0; --i) {
    const Scalar tau = Scalar(2) / u.col(i).squaredNorm();
    w.noalias() = u.col(i).transpose() * x;
    x.noalias() -= (tau * u.col(i)) * w;
  }
}

}  // namespace reference
}  // namespace hra
