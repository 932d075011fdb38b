// The orthogonality regulariser of HRA's reflector columns (paper eq. 6, SPEC section 6).
#pragma once

#include <Eigen/Core>
#include <cmath>

#include "detail/gemm.hpp"

namespace hra {

/// Form of the orthogonality regulariser (SPEC §6), C = Û^T Û with unit columns Û.
enum class RegularizerForm {
  squared,   ///< lambda |I - C|_F^2, the paper's eq. 6 (default)
  unsquared  ///< lambda |I - C|_F, as in the authors' LLaMA script
};

/// \brief Value and gradient of the orthogonality regulariser of U (d x r), SPEC §6.
///
/// R = lambda |I - C|_F^2 (or lambda |I - C|_F), C = Û^T Û, Û = U diag(1/|u_i|).
/// Adds dR/dU into `grad` (d x r) when it is non-null; returns R. The unsquared form's gradient
/// at C = I (where it is not differentiable) is taken as 0.
template <typename Scalar>
Scalar orthogonality_regularizer(
    const Eigen::Ref<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>& u, Scalar lambda,
    RegularizerForm form, Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>* grad = nullptr) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  if (lambda == Scalar(0)) return Scalar(0);
  const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> norms = u.colwise().norm();
  const Matrix unit = u * norms.cwiseInverse().asDiagonal();
  Matrix c_minus_i;
  detail::serial_product(c_minus_i, unit, detail::Op::t, unit, detail::Op::n);
  c_minus_i.diagonal().array() -= Scalar(1);
  const Scalar fro2 = c_minus_i.squaredNorm();
  const Scalar fro = std::sqrt(fro2);
  const Scalar value = form == RegularizerForm::squared ? lambda * fro2 : lambda * fro;
  if (grad) {
    // dR/dÛ = 4 lambda Û (C - I) for the squared form; the unsquared one scales it by 1/(2|.|).
    Scalar scale = Scalar(4) * lambda;
    if (form == RegularizerForm::unsquared) scale = fro > Scalar(0) ? Scalar(2) * lambda / fro : 0;
    Matrix g_unit;
    detail::serial_product(g_unit, unit, detail::Op::n, c_minus_i, detail::Op::n, scale);
    // Through the normalisation: dR/du_i = (I - û_i û_i^T) dR/dû_i / |u_i|.
    const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> radial =
        (unit.array() * g_unit.array()).colwise().sum();
    g_unit -= unit * radial.asDiagonal();
    *grad += g_unit * norms.cwiseInverse().asDiagonal();
  }
  return value;
}

}  // namespace hra
