// Independent definitions the tests compare the library with: dense products of explicit
// reflections and Eigen's Householder QR, in double (tests only).
#pragma once

#include <Eigen/Core>
#include <Eigen/QR>

#include "hra/reflector_chain.hpp"

namespace hra_test {

/// H_1 H_2 ... H_r (reverse: H_r ... H_1), each H_i = I - 2 u_i u_i^T / (u_i^T u_i) formed as a
/// dense d x d matrix and multiplied in: PEFT's order, written out.
inline Eigen::MatrixXd explicit_chain(const Eigen::MatrixXd& u, bool reverse = false) {
  const Eigen::Index d = u.rows(), r = u.cols();
  Eigen::MatrixXd h = Eigen::MatrixXd::Identity(d, d);
  for (Eigen::Index step = 0; step < r; ++step) {
    const Eigen::Index i = reverse ? r - 1 - step : step;
    const Eigen::VectorXd v = u.col(i);
    const Eigen::MatrixXd reflection =
        Eigen::MatrixXd::Identity(d, d) - (2.0 / v.squaredNorm()) * v * v.transpose();
    h = (h * reflection).eval();
  }
  return h;
}

/// An orthonormal basis of span(U) from Eigen's Householder QR. Its signs may differ from those
/// of Gram-Schmidt, but Q Q^T (all that H depends on) does not.
inline Eigen::MatrixXd orthonormal_basis(const Eigen::MatrixXd& u) {
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(u);
  return qr.householderQ() * Eigen::MatrixXd::Identity(u.rows(), u.cols());
}

/// The Gram-Schmidt variant by its definition: I - 2 Q Q^T.
inline Eigen::MatrixXd explicit_gram_schmidt(const Eigen::MatrixXd& u) {
  const Eigen::MatrixXd q = orthonormal_basis(u);
  return Eigen::MatrixXd::Identity(u.rows(), u.rows()) - 2.0 * q * q.transpose();
}

inline Eigen::MatrixXd explicit_h(const Eigen::MatrixXd& u, hra::Variant v) {
  return v == hra::Variant::chain ? explicit_chain(u) : explicit_gram_schmidt(u);
}

}  // namespace hra_test
