// What every layer y = W (...) + b shares: the weight, the optional bias and which of them
// trains, their gradients and parameter views, and the forward-then-backward call order.
#pragma once

#include <Eigen/Core>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "detail/checks.hpp"
#include "detail/gemm.hpp"
#include "layer.hpp"
#include "weight_matrix.hpp"

namespace hra {

/// Which biases are trainable, with PEFT's meaning ("none", "all", "hra_only"/"lora_only").
/// For a single adapted layer "all" and "hra_only" both train that layer's bias; they differ for
/// the layers of a model that carry no adapter (Linear, Conv2d), which only "all" makes
/// trainable.
enum class BiasMode { none, all, adapter_only };

/// Options of a layer whose weight may itself train (Linear, Conv2d).
struct WeightOptions {
  bool train_weight = true;  ///< W is a parameter (full fine-tuning, a new layer); else frozen
};

/// \brief Base of the layers whose output is W (...) + b: Linear, HraLinear, LoraLinear and the
/// convolutions.
///
/// Holds W (WeightMatrix: d_out x d_in, owned or viewed; for a convolution C_out x D) and an
/// optional bias b (length rows(W)), checks both once at construction (non-empty, finite, b of
/// the right length, a BiasMode that trains a bias only where there is one), and gives the
/// derived layers the pieces they would otherwise each write again:
/// - the "weight" and "bias" parameter views and their gradients (the weight trains only when
///   the derived layer says so: dense layers in full fine-tuning; adapters keep it frozen);
/// - the call-order state: backward() needs a forward() of its own, consumed by it (merging,
///   unmerging or changing adapters also invalidates it), and its entry checks (dY shape and
///   values) run before anything is written.
/// Error messages name the derived layer (`layer_name`).
template <typename Scalar_>
class AffineLayer : public Layer<Scalar_> {
  using Base = Layer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);
  using WeightMap = typename WeightMatrix<Scalar>::ConstMapType;

  Index input_dim() const override { return weight_.cols(); }
  Index output_dim() const override { return weight_.rows(); }

  /// W, read-only (dense layers train it through parameters(); adapters write it on merge()).
  WeightMap weight() const { return weight_.map(); }
  const std::optional<Vector>& bias() const { return bias_; }
  BiasMode bias_mode() const { return bias_mode_; }
  /// Whether "bias" is among parameters(): a bias exists and the mode trains it here.
  bool bias_trainable() const {
    return bias_ && (bias_mode_ == BiasMode::all ||
                     (bias_mode_ == BiasMode::adapter_only && adapter_layer_));
  }
  /// Whether "weight" is among parameters().
  bool weight_trainable() const { return train_weight_; }

  /// Replaces the values of b (the layer must have a bias; b finite, of length rows(W)).
  /// std::invalid_argument otherwise, the layer unchanged.
  void set_bias(const ConstRef& b) {
    if (!bias_)
      detail::throw_invalid(layer_name_, "::set_bias: the layer was built without a bias");
    const std::string what = std::string(layer_name_) + "::set_bias";
    detail::check_shape(b, weight_.rows(), 1, what.c_str());
    detail::check_finite(b, what.c_str());
    *bias_ = b;
  }

 protected:
  /// Checks W and b (see the class comment). `adapter_layer`: BiasMode::adapter_only trains
  /// the bias of this layer. `train_weight`: W is a trainable parameter.
  AffineLayer(WeightMatrix<Scalar> weight, std::optional<Vector> bias, BiasMode bias_mode,
              const char* layer_name, bool adapter_layer, bool train_weight = false)
      : weight_(std::move(weight)),
        bias_(std::move(bias)),
        bias_mode_(bias_mode),
        layer_name_(layer_name),
        adapter_layer_(adapter_layer),
        train_weight_(train_weight) {
    if (weight_.rows() < 1 || weight_.cols() < 1)
      detail::throw_invalid(layer_name_, ": the weight is empty (",
                            detail::shape(weight_.rows(), weight_.cols()), ")");
    const char* w_name = adapter_layer_ ? ": frozen weight W" : ": weight W";
    detail::check_finite(weight_.map(), (std::string(layer_name_) + w_name).c_str());
    if (bias_) {
      detail::check_shape(*bias_, weight_.rows(), 1,
                          (std::string(layer_name_) + ": bias (length must be d_out)").c_str());
      detail::check_finite(*bias_, (std::string(layer_name_) + ": bias").c_str());
      bias_grad_.setZero(weight_.rows());
    } else if (bias_mode_ != BiasMode::none) {
      detail::throw_invalid(layer_name_, ": bias mode trains the bias but the layer has none");
    }
    if (train_weight_) weight_grad_.setZero(weight_.rows(), weight_.cols());
  }

  const char* layer_name() const { return layer_name_; }
  WeightMatrix<Scalar>& weight_storage() { return weight_; }
  const WeightMatrix<Scalar>& weight_storage() const { return weight_; }
  Matrix& weight_gradient() { return weight_grad_; }

  /// y += b broadcast over the columns (nothing without a bias).
  void add_bias(Matrix& y) const {
    if (bias_) y.colwise() += *bias_;
  }
  /// db = dY 1 when the bias trains (dy: rows(W) x anything).
  template <typename Derived>
  void bias_backward(const Eigen::MatrixBase<Derived>& dy) {
    if (bias_trainable()) bias_grad_.noalias() = dy.rowwise().sum();
  }
  /// Appends "weight" (when it trains) to `out`; derived layers call it where it belongs.
  /// std::logic_error for a strided view, which one parameter view cannot show.
  void append_weight_parameter(std::vector<ParameterView<Scalar>>& out) {
    if (!train_weight_) return;
    auto w = weight_.map();
    if (w.outerStride() != w.rows())
      throw std::logic_error(detail::concat(layer_name_,
                                            "::parameters: a trainable weight view must be "
                                            "contiguous"));
    out.push_back({"weight",
                   {w.data(), w.rows(), w.cols()},
                   {weight_grad_.data(), weight_grad_.rows(), weight_grad_.cols()}});
  }
  /// Appends "bias" (when it trains) to `out`.
  void append_bias_parameter(std::vector<ParameterView<Scalar>>& out) {
    if (!bias_trainable()) return;
    out.push_back(
        {"bias", {bias_->data(), bias_->rows(), 1}, {bias_grad_.data(), bias_grad_.rows(), 1}});
  }

  /// `x`, or a copy of it in `scratch` when it shares memory with `out`, a buffer the caller is
  /// about to write (a layer given its own output or gradient buffer as an argument).
  static ConstRef unaliased(const ConstRef& x, const Matrix& out, Matrix& scratch) {
    if (!detail::overlaps(x, out)) return x;
    scratch = x;
    return scratch;
  }

  /// Runs `compute(target)` into y, or into a fresh matrix then moved into y when y shares
  /// memory with x (predict(m, m)): the result is the same either way.
  template <typename Compute>
  static void write_unaliased(const ConstRef& x, Matrix& y, Compute&& compute) {
    if (!detail::overlaps(x, y)) {
      compute(y);
      return;
    }
    Matrix out;
    compute(out);
    y = std::move(out);
  }

  /// predict() of a dense layer: checks x, then writes y = W x, plus what `add(out)` adds to it,
  /// plus b (through write_unaliased, so predict(m, m) is allowed).
  template <typename Add>
  void predict_dense(const ConstRef& x, Matrix& y, Add&& add) const {
    check_input(x, "predict");
    write_unaliased(x, y, [&](Matrix& out) {
      detail::product(out, weight(), detail::Op::n, x, detail::Op::n);
      add(out);
      add_bias(out);
    });
  }

  /// Entry check of forward() and predict(): x is input_dim() x n (n >= 1) and finite.
  void check_input(const ConstRef& x, const char* method) const {
    detail::check_batch(x, this->input_dim(),
                        (std::string(layer_name_) + "::" + method + " input").c_str());
  }

  /// The call order. A forward() starts by forgetting any pending one (so a forward that throws
  /// leaves none behind) and ends by recording its batch size.
  void forget_forward() { pending_batch_ = -1; }
  void remember_forward(Index batch) { pending_batch_ = batch; }
  /// Entry of backward(): a forward() must be pending and dY finite, output_dim() x n. Consumes
  /// the pending forward and returns its n. Throws (std::logic_error for the call order,
  /// std::invalid_argument for dY) before anything is changed.
  Index begin_backward(const ConstRef& dy) {
    if (pending_batch_ < 0)
      throw std::logic_error(detail::concat(layer_name_,
                                            "::backward: no forward() to differentiate (call "
                                            "forward() before each backward())"));
    const std::string what = detail::concat(layer_name_, "::backward gradient dY");
    detail::check_shape(dy, this->output_dim(), pending_batch_, what.c_str());
    detail::check_finite(dy, what.c_str());
    const Index n = pending_batch_;
    pending_batch_ = -1;
    return n;
  }
  /// The same for a dense layer, which also trains the bias from dY: returns dY, or a copy of it
  /// in `scratch` when it shares memory with `dx`, the buffer the layer is about to write.
  ConstRef begin_dense_backward(const ConstRef& dy, const Matrix& dx, Matrix& scratch) {
    begin_backward(dy);
    const ConstRef g = unaliased(dy, dx, scratch);
    bias_backward(g);
    return g;
  }
  /// The end of a dense forward(): y += b, and the batch recorded for backward(); returns y.
  const Matrix& finish_forward(Matrix& y, Index batch) {
    add_bias(y);
    remember_forward(batch);
    return y;
  }

 private:
  WeightMatrix<Scalar> weight_;
  std::optional<Vector> bias_;
  Vector bias_grad_;
  Matrix weight_grad_;
  BiasMode bias_mode_;
  const char* layer_name_;
  bool adapter_layer_;
  bool train_weight_;
  Index pending_batch_ = -1;  // n of the forward() a backward() may consume, -1 for none
};

}  // namespace hra
