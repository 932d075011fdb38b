// A model: named modules (any hra::Layer) applied in order, each followed by an activation.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dense_layer.hpp"
#include "detail/checks.hpp"
#include "hra_adapter_layer.hpp"
#include "layer.hpp"
#include "lora_adapter_layer.hpp"

namespace hra {

/// The elementwise function a Sequential applies to a module's output.
enum class Activation {
  identity,   ///< f(z) = z
  relu,       ///< f(z) = max(z, 0), with f'(0) = 0 (PyTorch's)
  gelu_tanh,  ///< PyTorch's GELU(approximate="tanh"): z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
};

inline const char* to_string(Activation a) {
  static const char* const names[] = {"identity", "relu", "gelu_tanh"};
  return detail::enum_name(a, names);
}

/// \brief y = f_K(L_K(... f_1(L_1(x)))): named modules L_k (any hra::Layer: dense, LoRA- or
/// HRA-adapted, convolutions, another Sequential), each followed by its activation f_k.
///
///     hra::Sequential<float> model;
///     model.emplace<hra::HraLinearf>("fc1", w1, b1, options);
///     model.set_activation("fc1", hra::Activation::relu);
///     model.emplace<hra::Linearf>("head", w2, b2);
///     hra::peft::save_hra_adapters("adapter", model.hra_modules());  // names "fc1", ...
///
/// An activation is a per-module setting (identity by default), not a module: modules are the
/// layers that own parameters and PEFT names, so the names a model is built with are the module
/// names of its adapter files. The model is itself a Layer, with the Layer contract:
/// - forward(X) keeps what backward() needs; backward(dY, compute_input_gradient) assigns every
///   trainable parameter's gradient; with compute_input_gradient false it stops at the first
///   module that has trainable parameters (nothing below needs a gradient, so a frozen body
///   costs nothing) and returns an empty matrix. A backward() needs a forward() of its own
///   (std::logic_error otherwise); adding modules, merging and adapter control invalidate it.
/// - parameters() are every module's, in module order, named "<module>.<parameter>"
///   ("fc1.hra_u.default", "head.bias").
/// - merge() folds the adapters of every module that has unmerged ones (HRA, LoRA; dense
///   layers are skipped) and unmerge() undoes exactly what merge() did.
/// - set_adapters_enabled() / set_active_adapters() act on every HRA module.
/// - modules() is the name -> layer map; hra_modules() / lora_modules() / modules_of<T>() are the
///   maps of one layer kind that the PEFT save, load and export functions take.
/// Bad input throws std::invalid_argument (empty or duplicate names, a module whose input size
/// is not the previous output size, a batch of the wrong size, an argument that shares memory
/// with a buffer the model returned or writes); a verb that throws leaves the model as it was.
template <typename Scalar_>
class Sequential final : public Layer<Scalar_> {
  using Base = Layer<Scalar_>;

 public:
  HRA_LAYER_TYPES(Base);
  using Module = Layer<Scalar>;

  Sequential() = default;
  Sequential(Sequential&&) = default;
  Sequential& operator=(Sequential&&) = default;

  // --- Building ------------------------------------------------------------------------------

  /// Appends `layer` as module `name`, followed by `activation`; returns the layer. The name must
  /// be non-empty and new, the layer non-null, its input size the previous module's output size.
  template <typename LayerT>
  LayerT& add(const std::string& name, std::unique_ptr<LayerT> layer,
              Activation activation = Activation::identity) {
    static_assert(std::is_base_of<Module, LayerT>::value,
                  "Sequential::add: the module must be an hra::Layer of the model's scalar type");
    check_new(name, layer.get());
    LayerT& out = *layer;
    Entry e;
    e.name = name;
    e.layer = std::move(layer);
    e.activation = activation;
    entries_.push_back(std::move(e));
    invalidate();  // the entries moved
    last_input_grad_ = nullptr;
    return out;
  }

  /// Constructs a LayerT from `args` as module `name` (identity activation); returns it.
  template <typename LayerT, typename... Args>
  LayerT& emplace(const std::string& name, Args&&... args) {
    return add(name, std::make_unique<LayerT>(std::forward<Args>(args)...));
  }

  /// The activation after module `name`.
  void set_activation(const std::string& name, Activation activation) {
    entries_[index_of(name)].activation = activation;
    invalidate();
  }
  Activation activation(const std::string& name) const {
    return entries_[index_of(name)].activation;
  }

  // --- Access --------------------------------------------------------------------------------

  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  /// The module names, in order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.name);
    return out;
  }

  /// Module `name` (std::invalid_argument naming the modules when there is none).
  Module& module(const std::string& name) { return *entries_[index_of(name)].layer; }
  const Module& module(const std::string& name) const { return *entries_[index_of(name)].layer; }
  /// Module `name` as a T (std::invalid_argument when it is another kind of layer).
  template <typename T>
  T& module(const std::string& name) {
    return cast<T>(module(name), name);
  }
  template <typename T>
  const T& module(const std::string& name) const {
    return cast<const T>(module(name), name);
  }
  /// The module at position k (std::out_of_range past the end).
  Module& module_at(std::size_t k) { return *entries_.at(k).layer; }
  const Module& module_at(std::size_t k) const { return *entries_.at(k).layer; }

  /// Every module by name: the map type hra's io functions take (std::map<name, layer*>).
  std::map<std::string, Module*> modules() { return modules_of<Module>(); }
  /// The modules that are a T, by name: e.g. modules_of<HraConv2d<float>>().
  template <typename T>
  std::map<std::string, T*> modules_of() {
    std::map<std::string, T*> out;
    for (auto& e : entries_)
      if (auto* t = dynamic_cast<T*>(e.layer.get())) out.emplace(e.name, t);
    return out;
  }
  /// The HRA modules (linear and conv) by name, as peft::save_hra_adapters(), load_hra_adapters()
  /// and export_lora_adapters() take them (peft::HraLayerModules).
  std::map<std::string, HraAdapterLayer<Scalar>*> hra_modules() {
    return modules_of<HraAdapterLayer<Scalar>>();
  }
  /// The LoRA modules by name (peft::LoraLayerModules).
  std::map<std::string, LoraAdapterLayer<Scalar>*> lora_modules() {
    return modules_of<LoraAdapterLayer<Scalar>>();
  }

  // --- Layer ---------------------------------------------------------------------------------

  /// The first module's input size (0 for an empty model).
  Index input_dim() const override { return empty() ? 0 : entries_.front().layer->input_dim(); }
  /// The last module's output size (0 for an empty model).
  Index output_dim() const override { return empty() ? 0 : entries_.back().layer->output_dim(); }

  const Matrix& forward(const ConstRef& x) override;
  const Matrix& backward(const ConstRef& dy, bool compute_input_gradient = true) override;
  void predict(const ConstRef& x, Matrix& y) const override;

  std::vector<ParameterView<Scalar>> parameters() override {
    std::vector<ParameterView<Scalar>> out;
    for (auto& e : entries_)
      for (auto& p : e.layer->parameters()) {
        p.name = e.name + "." + p.name;
        out.push_back(std::move(p));
      }
    return out;
  }

  Scalar regularizer() const override {
    Scalar total(0);
    for (const auto& e : entries_) total += e.layer->regularizer();
    return total;
  }
  Scalar add_regularizer() override {
    Scalar total(0);
    for (auto& e : entries_) total += e.layer->add_regularizer();
    return total;
  }

  /// Folds the adapters of every module that applies some (merged() false) into its weight;
  /// dense layers (Linear, Conv2d) are skipped. All or nothing: if a module refuses, the modules
  /// merged before it are unmerged and the exception is rethrown.
  void merge() override;
  /// Undoes every merge() since the last unmerge(), most recent first (nothing if they merged
  /// nothing).
  void unmerge() override;
  /// True when no module applies an adapter on top of its weight.
  bool merged() const override {
    for (const auto& e : entries_)
      if (!e.layer->merged()) return false;
    return true;
  }

  std::size_t saved_bytes() const override {
    std::size_t n = static_cast<std::size_t>(grad_.size()) * sizeof(Scalar);
    for (const auto& e : entries_)
      n += e.layer->saved_bytes() +
           static_cast<std::size_t>(e.out.size() + e.pre.size()) * sizeof(Scalar);
    return n;
  }

  // --- Adapter control (the HRA modules) -----------------------------------------------------

  /// set_adapters_enabled(enabled) on every HRA module; all or nothing.
  void set_adapters_enabled(bool enabled) {
    for_each_hra([&](HraAdapterLayer<Scalar>& l) { l.set_adapters_enabled(enabled); },
                 [](HraAdapterLayer<Scalar>& l, bool was) { l.set_adapters_enabled(was); },
                 [](const HraAdapterLayer<Scalar>& l) { return l.adapters_enabled(); });
  }
  /// set_active_adapters(names) on every HRA module (each must hold every name); all or nothing.
  void set_active_adapters(const std::vector<std::string>& names) {
    for_each_hra([&](HraAdapterLayer<Scalar>& l) { l.set_active_adapters(names); },
                 [](HraAdapterLayer<Scalar>& l, const std::vector<std::string>& was) {
                   l.set_active_adapters(was);
                 },
                 [](const HraAdapterLayer<Scalar>& l) { return l.active_adapters(); });
  }

 private:
  struct Entry {
    std::string name;
    std::unique_ptr<Module> layer;
    Activation activation = Activation::identity;
    Matrix out;  // f(z) when the activation is not the identity
    Matrix pre;  // z, for GELU's derivative
  };
  struct Merged {
    std::size_t module;
    std::size_t unmerges;  // unmerge() calls that undo it (HRA unmerges one adapter per call)
  };

  static constexpr Scalar gelu_c() { return Scalar(0.7978845608028654); }  // sqrt(2 / pi)
  static constexpr Scalar gelu_k() { return Scalar(0.044715); }

  static void activate(Activation a, const Matrix& z, Matrix& out) {
    if (a == Activation::relu) {
      out = z.cwiseMax(Scalar(0));
    } else if (a == Activation::gelu_tanh) {
      out = z.unaryExpr([](Scalar v) {
        return Scalar(0.5) * v * (Scalar(1) + std::tanh(gelu_c() * (v + gelu_k() * v * v * v)));
      });
    } else {
      out = z;
    }
  }
  // out = g * f'(z) elementwise, for the activation of entry e (not the identity).
  static void activation_backward(const Entry& e, const ConstRef& g, Matrix& out) {
    if (e.activation == Activation::relu) {
      out = (e.out.array() > Scalar(0)).select(g, Scalar(0));
    } else {
      out = g.binaryExpr(e.pre, [](Scalar gv, Scalar v) {
        const Scalar t = std::tanh(gelu_c() * (v + gelu_k() * v * v * v));
        const Scalar d =
            Scalar(0.5) * (Scalar(1) + t) + Scalar(0.5) * v * (Scalar(1) - t * t) * gelu_c() *
                                                (Scalar(1) + Scalar(3) * gelu_k() * v * v);
        return gv * d;
      });
    }
  }

  void check_new(const std::string& name, const Module* layer) const {
    if (name.empty()) detail::throw_invalid("Sequential::add: a module name must not be empty");
    for (const auto& e : entries_)
      if (e.name == name)
        detail::throw_invalid("Sequential::add: there is already a module '", name, "'");
    if (!layer) detail::throw_invalid("Sequential::add: module '", name, "' is a null layer");
    if (!empty() && layer->input_dim() != output_dim())
      detail::throw_invalid("Sequential::add: module '", name, "' takes ", layer->input_dim(),
                            " inputs but module '", entries_.back().name, "' gives ", output_dim());
  }

  std::size_t index_of(const std::string& name) const {
    for (std::size_t k = 0; k < entries_.size(); ++k)
      if (entries_[k].name == name) return k;
    std::string known;
    for (const auto& e : entries_) known += (known.empty() ? "'" : ", '") + e.name + "'";
    detail::throw_invalid("Sequential: no module '", name,
                          "' (the modules: ", known.empty() ? std::string("none") : known, ")");
  }

  template <typename T, typename M>
  static T& cast(M& m, const std::string& name) {
    T* t = dynamic_cast<T*>(&m);
    if (!t)
      detail::throw_invalid("Sequential::module: module '", name,
                            "' is not of the requested layer type");
    return *t;
  }

  void check_ready(const char* what) const {
    if (empty()) throw std::logic_error(std::string("Sequential::") + what + ": no modules");
  }

  // x must not share memory with what the model returned or writes (pass a copy).
  void check_unaliased(const ConstRef& x, const char* what) const {
    const auto clash = [&](const Matrix* m) { return m && detail::overlaps(x, *m); };
    bool bad = clash(last_output_) || clash(last_input_grad_) || clash(&grad_);
    for (const auto& e : entries_) bad = bad || clash(&e.out) || clash(&e.pre);
    if (bad)
      detail::throw_invalid("Sequential::", what,
                            ": the argument shares memory with a buffer of the model (the "
                            "output of its last forward() or backward()); pass a copy");
  }

  // The last forward() can no longer be differentiated (its output stays what it is: the
  // module-owned input gradient of the last backward() is remembered across).
  void invalidate() {
    pending_ = false;
    last_output_ = nullptr;
  }

  // Applies `set` to every HRA module; on an exception restores the ones already changed with
  // `restore(layer, get(layer) before)` and rethrows.
  template <typename Set, typename Restore, typename Get>
  void for_each_hra(Set&& set, Restore&& restore, Get&& get) {
    using Saved = decltype(get(std::declval<const HraAdapterLayer<Scalar>&>()));
    std::vector<std::pair<HraAdapterLayer<Scalar>*, Saved>> done;
    try {
      for (auto& e : entries_)
        if (auto* h = dynamic_cast<HraAdapterLayer<Scalar>*>(e.layer.get())) {
          Saved was = get(*h);
          set(*h);
          done.emplace_back(h, std::move(was));
        }
    } catch (...) {
      for (auto it = done.rbegin(); it != done.rend(); ++it) restore(*it->first, it->second);
      throw;
    }
    invalidate();
  }

  // Adapters merged into module k's weight (HRA: one unmerge() per adapter; others: 0 or 1).
  std::size_t merged_count(std::size_t k) const {
    const Module* l = entries_[k].layer.get();
    if (const auto* h = dynamic_cast<const HraAdapterLayer<Scalar>*>(l)) {
      std::size_t n = 0;
      for (const auto& a : h->adapters()) n += a.merged();
      return n;
    }
    return l->merged() ? 1 : 0;
  }

  std::vector<Entry> entries_;
  std::vector<Merged> merges_;  // what merge() did, in order
  Matrix grad_;                 // dL/d(module output) through an activation
  Matrix no_gradient_;          // what backward() returns without an input gradient
  const Matrix* last_output_ = nullptr;
  const Matrix* last_input_grad_ = nullptr;
  Index batch_ = 0;
  bool pending_ = false;  // a forward() awaits its backward()
};

template <typename Scalar_>
auto Sequential<Scalar_>::forward(const ConstRef& x) -> const Matrix& {
  check_ready("forward");
  if (x.rows() != input_dim() || x.cols() < 1)
    detail::throw_invalid("Sequential::forward: expected a batch of ", input_dim(),
                          " rows (one sample per column) and at least one column, got a ",
                          detail::shape(x.rows(), x.cols()), " matrix");
  check_unaliased(x, "forward");
  invalidate();
  const Matrix* in = nullptr;
  for (auto& e : entries_) {
    const Matrix& z = in ? e.layer->forward(*in) : e.layer->forward(x);
    if (e.activation == Activation::identity) {
      in = &z;
      continue;
    }
    if (e.activation == Activation::gelu_tanh) e.pre = z;
    activate(e.activation, z, e.out);
    in = &e.out;
  }
  batch_ = x.cols();
  pending_ = true;
  last_output_ = in;
  return *in;
}

template <typename Scalar_>
auto Sequential<Scalar_>::backward(const ConstRef& dy, bool compute_input_gradient)
    -> const Matrix& {
  check_ready("backward");
  if (!pending_)
    throw std::logic_error(
        "Sequential::backward: no forward() to differentiate (each backward() needs a forward() "
        "of its own, after any change to the modules, merge or adapter control)");
  detail::check_shape(dy, output_dim(), batch_, "Sequential::backward: dY");
  detail::check_finite(dy, "Sequential::backward: dY");
  check_unaliased(dy, "backward");
  std::size_t first = 0;
  if (!compute_input_gradient)
    while (first < entries_.size() && entries_[first].layer->num_trainable_parameters() == 0)
      ++first;
  pending_ = false;
  last_input_grad_ = nullptr;
  no_gradient_.resize(0, 0);
  const Matrix* g = nullptr;  // dL/d(output of module k), module-owned
  for (std::size_t k = entries_.size(); k-- > first;) {
    Entry& e = entries_[k];
    const bool need = k > first || compute_input_gradient;
    if (e.activation == Activation::identity) {
      g = g ? &e.layer->backward(*g, need) : &e.layer->backward(dy, need);
    } else {
      if (g)
        activation_backward(e, *g, grad_);
      else
        activation_backward(e, dy, grad_);
      g = &e.layer->backward(grad_, need);
    }
  }
  if (!compute_input_gradient || !g) return no_gradient_;
  last_input_grad_ = g;
  return *g;
}

template <typename Scalar_>
void Sequential<Scalar_>::predict(const ConstRef& x, Matrix& y) const {
  check_ready("predict");
  if (detail::overlaps(x, y))
    detail::throw_invalid("Sequential::predict: x shares memory with the output y; pass a copy");
  Matrix a, z;
  for (std::size_t k = 0; k < entries_.size(); ++k) {
    const Entry& e = entries_[k];
    if (k == 0)
      e.layer->predict(x, z);
    else
      e.layer->predict(a, z);
    if (e.activation == Activation::identity)
      a.swap(z);
    else
      activate(e.activation, z, a);
  }
  y = std::move(a);
}

template <typename Scalar_>
void Sequential<Scalar_>::merge() {
  std::vector<Merged> done;
  try {
    for (std::size_t k = 0; k < entries_.size(); ++k) {
      Module& l = *entries_[k].layer;
      if (l.merged() || dynamic_cast<DenseLayer<Scalar>*>(&l)) continue;
      const std::size_t before = merged_count(k);
      l.merge();
      const std::size_t after = merged_count(k);
      done.push_back({k, after > before ? after - before : 1});
    }
  } catch (...) {
    for (auto it = done.rbegin(); it != done.rend(); ++it)
      for (std::size_t i = 0; i < it->unmerges; ++i) entries_[it->module].layer->unmerge();
    invalidate();
    throw;
  }
  merges_.insert(merges_.end(), done.begin(), done.end());
  invalidate();
}

template <typename Scalar_>
void Sequential<Scalar_>::unmerge() {
  while (!merges_.empty()) {
    const Merged m = merges_.back();
    for (std::size_t i = 0; i < m.unmerges; ++i) entries_[m.module].layer->unmerge();
    merges_.pop_back();
  }
  invalidate();
}

using Sequentialf = Sequential<float>;
using Sequentiald = Sequential<double>;

}  // namespace hra
