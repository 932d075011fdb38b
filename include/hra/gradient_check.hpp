// A reusable gradient checker: any Layer, or any scalar function of a matrix, against central
// differences.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "detail/random.hpp"
#include "layer.hpp"

namespace hra {

/// Result of check_gradients(): one row per parameter plus one for the input ("input").
struct GradientCheckReport {
  struct Row {
    std::string name;
    Eigen::Index checked = 0;  ///< entries compared
    double max_abs_error = 0;  ///< max |analytic - numeric|
    double scale = 0;          ///< max |numeric| over the checked entries
    double relative_error() const { return max_abs_error / std::max(scale, 1e-30); }
  };
  std::vector<Row> rows;
  /// Largest relative error over all rows (NaN if any analytic entry was not written).
  double worst_relative_error() const {
    double w = 0;
    for (const auto& r : rows) {
      if (std::isnan(r.max_abs_error)) return r.max_abs_error;
      w = std::max(w, r.relative_error());
    }
    return w;
  }
};

struct GradientCheckOptions {
  Eigen::Index batch = 3;           ///< n, columns of the random input
  double step = 1e-6;               ///< central-difference step h
  Eigen::Index max_entries = 400;   ///< per tensor; a random subset when larger
  bool include_regularizer = true;  ///< adds the layer's regulariser to the loss
  bool check_input = true;
  std::uint64_t seed = 1;
};

/// \brief Compares `analytic` (the claimed dL/d(arg), same shape as `arg`) with central
/// differences (L(arg + h e_k) - L(arg - h e_k)) / 2h at the column-major positions `entries`.
///
/// `loss()` evaluates L at the current value of `arg`, which is perturbed in place; every entry
/// is restored exactly afterwards, also when `loss` throws. A NaN in `analytic` makes the row's
/// max_abs_error NaN.
template <typename Loss, typename Arg>
GradientCheckReport::Row check_entries(const std::string& name, Loss&& loss, Arg& arg,
                                       const Eigen::MatrixXd& analytic,
                                       const std::vector<Eigen::Index>& entries, double step) {
  GradientCheckReport::Row row{name};
  for (Eigen::Index i : entries) {
    double& v = arg(i);
    const double saved = v;
    struct Restore {
      double& v;
      double saved;
      ~Restore() { v = saved; }
    } restore{v, saved};
    v = saved + step;
    const double lp = loss();
    v = saved - step;
    const double lm = loss();
    v = saved;
    const double numeric = (lp - lm) / (2 * step);
    const double err = std::abs(analytic(i) - numeric);
    row.max_abs_error = std::isnan(err) ? err : std::max(row.max_abs_error, err);
    row.scale = std::max(row.scale, std::abs(numeric));
    ++row.checked;
  }
  return row;
}

/// \brief Checks a layer's backward() against central differences in double.
///
/// Loss L = <G, forward(X)> (+ regularizer()), with X (d_in x n) and G (d_out x n) drawn from a
/// standard normal. The analytic gradients come from backward(G) (+ add_regularizer()) after
/// every gradient buffer was filled with NaN, so an entry backward() forgets to assign shows up
/// as NaN. Each checked entry is compared with (L(theta + h) - L(theta - h)) / 2h; parameter
/// values are restored exactly afterwards, also when the layer throws.
inline GradientCheckReport check_gradients(Layer<double>& layer,
                                           const GradientCheckOptions& o = {}) {
  using Matrix = Eigen::MatrixXd;
  detail::Random rng(o.seed);
  Matrix x(layer.input_dim(), o.batch), g(layer.output_dim(), o.batch);
  for (Eigen::Index i = 0; i < x.size(); ++i) x(i) = rng.normal();
  for (Eigen::Index i = 0; i < g.size(); ++i) g(i) = rng.normal();

  auto loss_at = [&](const Matrix& input) {
    double l = (g.array() * layer.forward(input).array()).sum();
    if (o.include_regularizer) l += layer.regularizer();
    return l;
  };
  auto pick = [&](Eigen::Index size) {
    std::vector<Eigen::Index> idx;
    if (size <= o.max_entries) {
      for (Eigen::Index i = 0; i < size; ++i) idx.push_back(i);
    } else {
      for (Eigen::Index k = 0; k < o.max_entries; ++k)
        idx.push_back(static_cast<Eigen::Index>(rng.below(static_cast<std::uint64_t>(size))));
    }
    return idx;
  };

  layer.fill_gradients();
  layer.forward(x);
  const Matrix dx = layer.backward(g, o.check_input);
  if (o.include_regularizer) layer.add_regularizer();
  auto params = layer.parameters();

  GradientCheckReport report;
  for (auto& p : params) {
    const Matrix analytic = p.grad;
    report.rows.push_back(check_entries(
        p.name, [&] { return loss_at(x); }, p.value, analytic, pick(p.value.size()), o.step));
  }
  if (o.check_input) {
    Matrix xp = x;
    report.rows.push_back(check_entries(
        "input", [&] { return loss_at(xp); }, xp, dx, pick(x.size()), o.step));
  }
  return report;
}

}  // namespace hra
