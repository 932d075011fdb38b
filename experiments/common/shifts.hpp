// Fixed transformations of 28 x 28 images that turn Fashion-MNIST into a shifted task.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace hra::experiments {

/// Names accepted by apply_shift(), with what each does.
inline const char* shift_help() {
  return "rot90 (rotate by 90 degrees clockwise), flip (upside down), invert (x -> 1 - x), "
         "jigsaw (the 16 7x7 tiles in a fixed random order), permute (all 784 pixels in a fixed "
         "random order), none";
}

/// \brief For the pixel-moving shifts, src with out(p) = in(src[p]) (p = row * 28 + col);
/// empty for shifts that do not move pixels ("none", "invert"). Throws std::invalid_argument
/// for an unknown name. The random orders are fixed (they do not depend on any seed), so a
/// task is the same in every run.
inline std::vector<int> shift_source_pixels(const std::string& shift) {
  constexpr int side = 28;
  std::vector<int> src(side * side);
  if (shift == "none" || shift == "invert") return {};
  if (shift == "rot90") {
    // Clockwise: the new row i, column j shows the old row 27 - j, column i.
    for (int i = 0; i < side; ++i)
      for (int j = 0; j < side; ++j) src[i * side + j] = (side - 1 - j) * side + i;
  } else if (shift == "flip") {
    for (int i = 0; i < side; ++i)
      for (int j = 0; j < side; ++j) src[i * side + j] = (side - 1 - i) * side + j;
  } else if (shift == "jigsaw") {
    constexpr int tile = 7, tiles = side / tile;
    std::vector<int> order(tiles * tiles);
    std::iota(order.begin(), order.end(), 0);
    std::mt19937 rng(20240607u);
    // Fisher-Yates written out: std::shuffle's algorithm is unspecified, and the task must be
    // the same with every standard library (std::mt19937's output is specified exactly).
    for (int k = static_cast<int>(order.size()) - 1; k > 0; --k)
      std::swap(order[k], order[static_cast<int>(rng() % static_cast<unsigned>(k + 1))]);
    for (int t = 0; t < tiles * tiles; ++t) {
      const int ti = t / tiles, tj = t % tiles, si = order[t] / tiles, sj = order[t] % tiles;
      for (int a = 0; a < tile; ++a)
        for (int b = 0; b < tile; ++b)
          src[(ti * tile + a) * side + tj * tile + b] = (si * tile + a) * side + sj * tile + b;
    }
  } else if (shift == "permute") {
    std::iota(src.begin(), src.end(), 0);
    std::mt19937 rng(20240608u);
    for (int k = static_cast<int>(src.size()) - 1; k > 0; --k)
      std::swap(src[k], src[static_cast<int>(rng() % static_cast<unsigned>(k + 1))]);
  } else {
    throw std::invalid_argument("unknown shift '" + shift + "'; expected one of: " + shift_help());
  }
  return src;
}

/// The images (784 x n, one per column, values in [0, 1]) after the shift called `shift`.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> apply_shift(
    const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& images, const std::string& shift) {
  if (images.rows() != 28 * 28)
    throw std::invalid_argument("apply_shift: expected 784-pixel columns, got " +
                                std::to_string(images.rows()) + " rows");
  if (shift == "invert") return (Scalar(1) - images.array()).matrix();
  const std::vector<int> src = shift_source_pixels(shift);
  if (src.empty()) return images;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> out(images.rows(), images.cols());
  for (Eigen::Index j = 0; j < images.cols(); ++j)
    for (Eigen::Index p = 0; p < images.rows(); ++p) out(p, j) = images(src[p], j);
  return out;
}

}  // namespace hra::experiments
