// A reusable gradient checker: any Layer against central differences.
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

/// \brief Checks a layer's backward() against central differences in double.
///
/// Loss L = <G, forward(X)> (+ regularizer()), with X (d_in x n) and G (d_out x n) drawn from a
/// standard normal. The analytic gradients come from backward(G) (+ add_regularizer()) after
/// every gradient buffer was filled with NaN, so an entry backward() forgets to assign shows up
/// as NaN. Each checked entry is compared with (L(theta + h) - L(theta - h)) / 2h; parameter
/// values are restored exactly afterwards.
inline GradientCheckReport check_gradients(Layer<double>& layer,
                                           const GradientCheckOptions& o = {}) {
  using Matrix = Eigen::MatrixXd;
  detail::Random rng(o.seed);
  Matrix x(layer.input_dim(), o.batch), g(layer.output_dim(), o.batch);
  for (Eigen::Index i = 0; i < x.size(); ++i) x(i) = rng.normal();
  for (Eigen::Index i = 0; i < g.size(); ++i) g(i) = rng.normal();

  auto loss = [&](const Matrix& input) {
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
  std::vector<Matrix> analytic;
  for (const auto& p : params) analytic.emplace_back(p.grad);

  GradientCheckReport report;
  for (std::size_t k = 0; k < params.size(); ++k) {
    GradientCheckReport::Row row{params[k].name};
    for (Eigen::Index i : pick(params[k].value.size())) {
      double& v = params[k].value(i);
      const double saved = v;
      v = saved + o.step;
      const double lp = loss(x);
      v = saved - o.step;
      const double lm = loss(x);
      v = saved;
      const double numeric = (lp - lm) / (2 * o.step);
      const double err = std::abs(analytic[k](i) - numeric);
      row.max_abs_error = std::isnan(err) ? err : std::max(row.max_abs_error, err);
      row.scale = std::max(row.scale, std::abs(numeric));
      ++row.checked;
    }
    report.rows.push_back(row);
  }
  if (o.check_input) {
    GradientCheckReport::Row row{"input"};
    Matrix xp = x;
    for (Eigen::Index i : pick(x.size())) {
      xp(i) = x(i) + o.step;
      const double lp = loss(xp);
      xp(i) = x(i) - o.step;
      const double lm = loss(xp);
      xp(i) = x(i);
      const double numeric = (lp - lm) / (2 * o.step);
      const double err = std::abs(dx(i) - numeric);
      row.max_abs_error = std::isnan(err) ? err : std::max(row.max_abs_error, err);
      row.scale = std::max(row.scale, std::abs(numeric));
      ++row.checked;
    }
    report.rows.push_back(row);
  }
  return report;
}

}  // namespace hra
