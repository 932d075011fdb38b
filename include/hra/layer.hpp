// The one training interface shared by every trainable layer (HRA, LoRA, dense, conv).
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <limits>
#include <string>
#include <vector>

#include "detail/checks.hpp"

namespace hra {

class Conv2dGeometry;

/// How merge() folds an adapter into W. `safe` computes the merged weight aside and refuses it
/// (std::runtime_error, W untouched) when it is not finite; `in_place` writes W directly (no
/// extra C_out x D buffer). PEFT's `merge(safe_merge=True)` is MergeCheck::safe.
enum class MergeCheck { in_place, safe };

/// One trainable tensor: its value and its gradient, both column-major rows x cols views into
/// memory owned by the layer. Optimisers walk these; the layer stays the owner. A view cannot
/// resize what it shows.
template <typename Scalar>
struct ParameterView {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  std::string name;
  Eigen::Map<Matrix> value;
  Eigen::Map<Matrix> grad;
};

/// \brief Interface of every trainable layer: y = f(x) on batches of column vectors.
///
/// Contract, the same for every implementation:
/// - forward(X): X is input_dim() x n; returns Y (output_dim() x n), a reference to a buffer
///   owned by the layer that stays valid until the next forward(). It keeps what backward()
///   needs (documented per layer; never a d x d matrix).
/// - backward(dY): dY = dL/dY, output_dim() x n for the n of the last forward(). *Assigns* the
///   gradient of every trainable parameter (it does not accumulate) and returns dL/dX
///   (input_dim() x n; an empty matrix when compute_input_gradient is false). It consumes the
///   state of the forward: call forward() again before the next backward(), else it throws.
/// - add_regularizer(): adds the layer's regulariser value's gradient *into* the parameter
///   gradients (so call it after backward()) and returns the value (0 for none).
/// - predict(X, Y): inference without keeping anything.
/// - merge()/unmerge(): fold the adapter into the frozen weight and back (see each layer).
/// Bad shapes or non-finite inputs throw std::invalid_argument and leave the layer unchanged.
template <typename Scalar_>
class Layer : public detail::ScalarTypes<Scalar_> {
  using Types = detail::ScalarTypes<Scalar_>;

 public:
  HRA_LAYER_TYPES(Types);

  virtual ~Layer() = default;

  virtual Index input_dim() const = 0;
  virtual Index output_dim() const = 0;

  virtual const Matrix& forward(const ConstRef& x) = 0;
  virtual const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) = 0;
  virtual void predict(const ConstRef& x, Matrix& y) const = 0;

  /// Views of the trainable parameters, in a stable order.
  virtual std::vector<ParameterView<Scalar>> parameters() = 0;

  /// The trainable tensor called `name` (as parameters() names it: "hra_u.default",
  /// "lora_A.default", "lora_B.default", "weight", "bias"); std::invalid_argument naming the
  /// parameters there are when there is none.
  ParameterView<Scalar> parameter(const std::string& name) {
    std::vector<ParameterView<Scalar>> all = parameters();
    std::string known;
    for (auto& p : all) {
      if (p.name == name) return std::move(p);
      known += (known.empty() ? "" : ", ") + p.name;
    }
    detail::throw_invalid("Layer::parameter: no trainable parameter named '", name,
                          "' (parameters: ", known.empty() ? "none" : known, ")");
  }

  /// dL/d`name` as the last backward() (and add_regularizer()) assigned it: a view of the
  /// layer's gradient buffer, valid until the layer next changes shape or adapters.
  Eigen::Map<const Matrix> gradient(const std::string& name) const {
    // parameter() only builds views; reading the gradient through one changes nothing.
    const ParameterView<Scalar> p = const_cast<Layer*>(this)->parameter(name);
    return {p.grad.data(), p.grad.rows(), p.grad.cols()};
  }

  /// The convolution geometry of a convolution layer (Conv2d, HraConv2d, LoraConv2d), nullptr
  /// for a dense one: how a caller (the io tier's PEFT shapes) tells them apart without a cast.
  virtual const Conv2dGeometry* conv_geometry() const { return nullptr; }

  /// Number of trainable scalars (what an optimiser updates).
  Index num_trainable_parameters() const {
    Index n = 0;
    // parameters() only builds views; counting their sizes changes nothing.
    for (const auto& p : const_cast<Layer*>(this)->parameters()) n += p.value.size();
    return n;
  }

  /// Value of the layer's regulariser (0 when it has none); does not touch gradients.
  virtual Scalar regularizer() const { return Scalar(0); }
  /// Adds the regulariser's gradient into the parameter gradients; returns its value.
  virtual Scalar add_regularizer() { return Scalar(0); }

  virtual void merge() = 0;
  virtual void unmerge() = 0;
  /// True when every adapter is folded into the weight (forward is then the plain product).
  virtual bool merged() const = 0;

  /// Bytes the layer keeps between forward() and backward() (activations, caches).
  virtual std::size_t saved_bytes() const = 0;

  /// Sets every gradient to `value` (NaN by default: a gradient backward() forgot to write
  /// then shows up in any check, as dlib's test_layer does with its pre-filled buffers).
  void fill_gradients(Scalar value = std::numeric_limits<Scalar>::quiet_NaN()) {
    for (auto& p : parameters()) p.grad.setConstant(value);
  }
  void zero_gradients() { fill_gradients(Scalar(0)); }
};

namespace detail {

/// Shared checks for layer entry points: x must be `rows` x anything and finite.
template <typename Derived>
void check_batch(const Eigen::MatrixBase<Derived>& x, Eigen::Index rows, const char* what) {
  if (x.rows() != rows)
    throw_invalid(what, ": expected ", rows, " rows (one sample per column), got a ",
                  shape(x.rows(), x.cols()), " matrix");
  if (x.cols() < 1) throw_invalid(what, ": empty batch (0 columns)");
  check_finite(x, what);
}

}  // namespace detail
}  // namespace hra
