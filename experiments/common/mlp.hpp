// A small multi-layer perceptron for the examples, built from hra's layers: any hra::Layer
// (dense, LoRA- or HRA-adapted) per linear map, a ReLU between them, softmax cross-entropy on top.
#pragma once

#include <hra/hra.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace hra::examples {

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

/// \brief logits = L_K(relu(... relu(L_1(x)))) for any hra::Layer L_k, batches of columns.
///
/// forward() keeps what backward() needs; backward() stops at the first layer that has
/// trainable parameters (nothing below it needs a gradient), so a frozen body costs nothing.
template <typename Scalar>
class Mlp {
 public:
  using Layer = hra::Layer<Scalar>;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using ConstRef = Eigen::Ref<const Matrix>;

  explicit Mlp(std::vector<std::unique_ptr<Layer>> layers) : layers_(std::move(layers)) {
    if (layers_.empty()) throw std::invalid_argument("Mlp: no layers");
    for (std::size_t k = 1; k < layers_.size(); ++k)
      if (layers_[k]->input_dim() != layers_[k - 1]->output_dim())
        throw std::invalid_argument("Mlp: layer " + std::to_string(k) + " takes " +
                                    std::to_string(layers_[k]->input_dim()) + " inputs but layer " +
                                    std::to_string(k - 1) + " gives " +
                                    std::to_string(layers_[k - 1]->output_dim()));
    hidden_.resize(layers_.size() - 1);
  }

  std::size_t size() const { return layers_.size(); }
  Layer& layer(std::size_t k) { return *layers_[k]; }

  /// Logits (classes x n) of the batch x (inputs x n); valid until the next forward().
  const Matrix& forward(const ConstRef& x) {
    const Matrix* input = nullptr;
    for (std::size_t k = 0; k < layers_.size(); ++k) {
      const Matrix& z = k == 0 ? layers_[k]->forward(x) : layers_[k]->forward(*input);
      if (k + 1 == layers_.size()) return z;
      hidden_[k] = z.cwiseMax(Scalar(0));
      input = &hidden_[k];
    }
    return *input;  // unreachable: the loop returns at the last layer
  }

  /// Assigns the gradients of every trainable parameter from dL/dlogits.
  void backward(const ConstRef& dlogits) {
    std::size_t first = 0;
    while (first < layers_.size() && layers_[first]->num_trainable_parameters() == 0) ++first;
    if (first == layers_.size()) return;
    grad_ = dlogits;
    for (std::size_t k = layers_.size(); k-- > first;) {
      const bool need_input_grad = k > first;
      const Matrix& dx = layers_[k]->backward(grad_, need_input_grad);
      if (!need_input_grad) break;
      // Through the ReLU: hidden_[k-1] > 0 exactly where its pre-activation was positive.
      grad_ = (hidden_[k - 1].array() > Scalar(0)).select(dx, Scalar(0));
    }
  }

  /// Logits without keeping anything (inference).
  void predict(const ConstRef& x, Matrix& logits) const {
    Matrix a = x, z;
    for (std::size_t k = 0; k < layers_.size(); ++k) {
      layers_[k]->predict(a, z);
      if (k + 1 < layers_.size()) a = z.cwiseMax(Scalar(0));
    }
    logits = std::move(z);
  }

  /// Every trainable parameter of every layer, layer by layer.
  std::vector<hra::ParameterView<Scalar>> parameters() {
    std::vector<hra::ParameterView<Scalar>> out;
    for (auto& l : layers_)
      for (auto& p : l->parameters()) out.push_back(p);
    return out;
  }

  Eigen::Index num_trainable_parameters() {
    Eigen::Index n = 0;
    for (auto& l : layers_) n += l->num_trainable_parameters();
    return n;
  }

  /// Adds every layer's regulariser gradient into its parameter gradients; returns the sum.
  Scalar add_regularizer() {
    Scalar total = 0;
    for (auto& l : layers_) total += l->add_regularizer();
    return total;
  }

  /// Folds every layer's adapters into its weight (layers without adapters are unchanged).
  void merge() {
    merged_layers_.clear();
    for (std::size_t k = 0; k < layers_.size(); ++k)
      if (!layers_[k]->merged()) {
        layers_[k]->merge();
        merged_layers_.push_back(k);
      }
  }
  /// Undoes the last merge() on the layers it changed.
  void unmerge() {
    for (auto it = merged_layers_.rbegin(); it != merged_layers_.rend(); ++it)
      layers_[*it]->unmerge();
    merged_layers_.clear();
  }

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<Matrix> hidden_;
  std::vector<std::size_t> merged_layers_;
  Matrix grad_;
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

/// 64-bit FNV-1a of a matrix's bytes (e.g. logits): equal hashes for bit-for-bit equal values.
template <typename Derived>
std::uint64_t bytes_hash(const Eigen::DenseBase<Derived>& m) {
  const Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> plain = m;
  const auto* p = reinterpret_cast<const unsigned char*>(plain.data());
  std::uint64_t h = 14695981039346656037ull;
  for (std::size_t i = 0; i < static_cast<std::size_t>(plain.size()) * sizeof(*plain.data()); ++i)
    h = (h ^ p[i]) * 1099511628211ull;
  return h;
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

}  // namespace hra::examples
