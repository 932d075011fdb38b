// What the experiments' networks (hra::Sequential) need beside the library: their weights
// (MlpWeights), softmax cross-entropy, accuracy, a hash of their outputs and a comparison of
// predictions.
#pragma once

#include <hra/hash.hpp>
#include <hra/hra.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace hra::experiments {

/// \brief The weights of an MLP: weights[k] is d_{k+1} x d_k, biases[k] has length d_{k+1}.
template <typename Scalar>
struct MlpWeights {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  std::vector<Matrix> weights;
  std::vector<Vector> biases;

  /// Layer sizes d_0 (input) ... d_L (classes).
  std::vector<Eigen::Index> sizes() const {
    std::vector<Eigen::Index> out;
    if (weights.empty()) return out;
    out.push_back(weights.front().cols());
    for (const auto& w : weights) out.push_back(w.rows());
    return out;
  }

  /// PyTorch's nn.Linear initialisation: W and b uniform in +-1/sqrt(fan_in).
  static MlpWeights initialized(const std::vector<Eigen::Index>& sizes, std::uint64_t seed) {
    if (sizes.size() < 2) throw std::invalid_argument("MlpWeights: need at least two layer sizes");
    std::mt19937_64 rng(seed);
    MlpWeights out;
    for (std::size_t k = 0; k + 1 < sizes.size(); ++k) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(sizes[k]));
      std::uniform_real_distribution<double> uniform(-bound, bound);
      Matrix w(sizes[k + 1], sizes[k]);
      for (Eigen::Index i = 0; i < w.size(); ++i) w(i) = static_cast<Scalar>(uniform(rng));
      Vector b(sizes[k + 1]);
      for (Eigen::Index i = 0; i < b.size(); ++i) b(i) = static_cast<Scalar>(uniform(rng));
      out.weights.push_back(std::move(w));
      out.biases.push_back(std::move(b));
    }
    return out;
  }
};

/// \brief Mean softmax cross-entropy of logits (classes x n) against labels[j].
///
/// When grad is non-null it receives dL/dlogits = (softmax - onehot) / n.
template <typename Scalar>
Scalar softmax_cross_entropy(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& logits,
                             const std::vector<int>& labels,
                             Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>* grad) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Eigen::Index n = logits.cols();
  if (static_cast<Eigen::Index>(labels.size()) != n)
    throw std::invalid_argument("softmax_cross_entropy: " + std::to_string(labels.size()) +
                                " labels for " + std::to_string(n) + " columns");
  // Shifted by the column maximum so exp() cannot overflow.
  Matrix p = logits.rowwise() - logits.colwise().maxCoeff();
  p = p.array().exp();
  const Eigen::Matrix<Scalar, 1, Eigen::Dynamic> sums = p.colwise().sum();
  p = p.array().rowwise() / sums.array();
  double loss = 0;
  for (Eigen::Index j = 0; j < n; ++j)
    loss -= std::log(std::max(static_cast<double>(p(labels[j], j)), 1e-30));
  if (grad) {
    *grad = p;
    for (Eigen::Index j = 0; j < n; ++j) (*grad)(labels[j], j) -= Scalar(1);
    *grad /= static_cast<Scalar>(n);
  }
  return static_cast<Scalar>(loss / static_cast<double>(n));
}

/// Fraction of columns whose largest logit is at the label.
template <typename Scalar>
double accuracy(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& logits,
                const std::vector<int>& labels) {
  Eigen::Index correct = 0;
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    Eigen::Index best = 0;
    logits.col(j).maxCoeff(&best);
    correct += best == labels[j];
  }
  return static_cast<double>(correct) / static_cast<double>(logits.cols());
}

/// hra::fnv1a64 of a matrix's bytes (e.g. logits): equal hashes for bit-for-bit equal values.
template <typename Derived>
std::uint64_t bytes_hash(const Eigen::DenseBase<Derived>& m) {
  const Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> plain = m;
  return hra::fnv1a64(plain.data(), static_cast<std::size_t>(plain.size()) * sizeof(*plain.data()));
}

/// Whether `other` predicts the class `logits` predicts for every column, except where a
/// difference of at most `margin` between the two classes' scores in `logits` could break the tie
/// (a merged network's rounding flips such near-ties, not others).
template <typename Scalar>
bool same_predictions(const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& logits,
                      const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>& other,
                      double margin) {
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    Eigen::Index a = 0, b = 0;
    logits.col(j).maxCoeff(&a);
    other.col(j).maxCoeff(&b);
    if (a != b && static_cast<double>(logits(a, j) - logits(b, j)) > margin) return false;
  }
  return true;
}

}  // namespace hra::experiments
