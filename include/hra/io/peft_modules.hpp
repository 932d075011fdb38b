// PEFT adapter directories, the module maps: which hra layer stands for which module of the
// PyTorch model, as the saving and loading functions take them, and the tensor shapes PEFT
// gives each kind of layer.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../hra_conv2d.hpp"
#include "../hra_linear.hpp"
#include "../lora_conv2d.hpp"
#include "../lora_linear.hpp"

namespace hra {
namespace detail {
template <int N, typename T>
struct Identity {
  using type = T;
};
}  // namespace detail

namespace peft {

/// \brief Modules to save or load: module name (as in the PyTorch model, e.g. "net.fc1") ->
/// layer.
///
/// The saving, loading and export functions take a std::map from names to pointers of any one
/// HRA layer type: HraLinear (this alias), HraConv2d, or their base HraAdapterLayer for a model
/// with both kinds (HraLayerModules: a CNN's conv and linear layers in one adapter directory).
/// LoRA likewise (LoraLinear, LoraConv2d, LoraAdapterLayer).
template <typename Scalar>
using HraModules = std::map<std::string, HraLinear<Scalar>*>;
/// Modules to save or load: module name -> LoRA layer.
template <typename Scalar>
using LoraModules = std::map<std::string, LoraLinear<Scalar>*>;
/// Modules of either HRA layer kind (HraLinear and HraConv2d) in one map.
template <typename Scalar>
using HraLayerModules = std::map<std::string, HraAdapterLayer<Scalar>*>;
/// Modules of either LoRA layer kind (LoraLinear and LoraConv2d) in one map.
template <typename Scalar>
using LoraLayerModules = std::map<std::string, LoraAdapterLayer<Scalar>*>;

/// \brief A braced list of {module name, layer} pairs of one scalar type:
/// `{{"net.fc1", &fc1}, {"net.fc2", &fc2}}`.
///
/// The saving and loading functions are templates over the layer type, which a braced list
/// cannot deduce; each has two overloads taking a ModuleList, one per scalar (float, double), of
/// which only the one that matches the layers accepts the list. Only that overload's body, the
/// path of that scalar, is then compiled (one ModuleList over both scalars compiled both paths
/// in every file that saved or loaded an adapter).
template <template <typename> class Layer, typename Scalar>
class ModuleList {
 public:
  using Modules = std::map<std::string, Layer<Scalar>*>;

  ModuleList(std::initializer_list<typename Modules::value_type> modules) : modules_(modules) {}

  /// The list as the map the other overloads take.
  const Modules& map() const { return modules_; }

 private:
  Modules modules_;
};

/// A braced list of HRA layers of one scalar type (see ModuleList).
template <typename Scalar>
using HraModuleList = ModuleList<HraLinear, Scalar>;
/// A braced list of LoRA layers of one scalar type (see ModuleList).
template <typename Scalar>
using LoraModuleList = ModuleList<LoraLinear, Scalar>;

/// \brief `List`, named through a template parameter: the type of the braced-list overloads'
/// modules parameter.
///
/// Those overloads take `LazyList<N, HraModuleList<S>>` (N defaulted, never deduced), which makes
/// them function templates: their bodies, which run the saving or loading code, are
/// instantiated only where they are called. As plain inline
/// functions they were instantiated by every file that included the header (16 s of the 20 s
/// that `#include <hra/io.hpp>` took GCC 12 with -fsyntax-only).
template <int N, typename List>
using LazyList = typename detail::Identity<N, List>::type;

}  // namespace peft

namespace detail {

/// int when Layer (HraLinear<float>, HraConv2d<double>, ...) derives from Base<its Scalar>:
/// what the map-taking functions accept as the layers of their module maps.
template <typename Layer, template <typename> class Base>
using IfLayerOf =
    std::enable_if_t<std::is_base_of<Base<typename Layer::Scalar>, Layer>::value, int>;

/// \brief PEFT's view of one layer's weight: rows x fan_in (a linear layer's out_features x
/// in_features; a convolution's C_out x C_in/groups * kh * kw, PyTorch's weight.view(C_out, -1)).
///
/// A convolution's LoRA factors are stored as PEFT's conv weights, lora_A (r, C_in/groups, kh,
/// kw) and lora_B (C_out, r, 1, 1): the bytes of the row-major r x fan_in and C_out x r
/// matrices, so only the shapes differ from a linear layer's. hra_u is (fan_in, r) for both.
struct PeftWeightShape {
  std::int64_t rows = 0;
  std::int64_t fan_in = 0;
  const Conv2dGeometry* conv = nullptr;  ///< the convolution's geometry; null for a linear layer

  std::vector<std::int64_t> lora_a(std::int64_t r) const {
    if (!conv) return {r, fan_in};
    return {r, conv->group_in_channels(), conv->kernel_h(), conv->kernel_w()};
  }
  std::vector<std::int64_t> lora_b(std::int64_t r) const {
    if (!conv) return {rows, r};
    return {rows, r, 1, 1};
  }
  /// How messages name the fan-in, the rows and the two LoRA shapes.
  const char* fan_in_name() const { return conv ? "in_channels/groups*kh*kw" : "in_features"; }
  const char* rows_name() const { return conv ? "out_channels" : "out_features"; }
  const char* lora_a_name() const { return conv ? "(r, in_channels, kh, kw)" : "(r, in_features)"; }
  const char* lora_b_name() const { return conv ? "(out_channels, r, 1, 1)" : "(out_features, r)"; }
  /// Why PEFT's LoRA cannot hold this layer's factors, or "" when it can: a grouped
  /// convolution (PEFT's lora_A is a convolution over all input channels), or a dilated one
  /// (dilation > 1 along an axis whose kernel is longer than 1: PEFT builds lora_A from the
  /// base layer's kernel, stride and padding but not its dilation, so its unmerged forward
  /// would convolve other patches than the base layer, or fail on the output size).
  std::string lora_refusal() const {
    if (!conv) return "";
    if (conv->groups() != 1)
      return concat("a convolution with groups = ", conv->groups(),
                    " has no PEFT LoRA form (lora_A is a convolution over all ",
                    conv->in_channels(), " input channels)");
    if ((conv->dilation_h() > 1 && conv->kernel_h() > 1) ||
        (conv->dilation_w() > 1 && conv->kernel_w() > 1))
      return concat("a convolution with dilation (", conv->dilation_h(), ", ", conv->dilation_w(),
                    ") and kernel ", conv->kernel_h(), "x", conv->kernel_w(),
                    " has no PEFT LoRA form (PEFT's lora_A takes the base layer's kernel, stride "
                    "and padding but not its dilation)");
    return "";
  }
};

/// The PeftWeightShape of an HRA or LoRA layer (its convolution geometry from
/// Layer::conv_geometry()).
template <typename Scalar>
PeftWeightShape peft_weight_shape(const AffineLayer<Scalar>& layer) {
  PeftWeightShape s;
  s.rows = static_cast<std::int64_t>(layer.weight().rows());
  s.fan_in = static_cast<std::int64_t>(layer.weight().cols());
  s.conv = layer.conv_geometry();
  return s;
}

/// std::invalid_argument naming `what` for an empty module name or a null layer.
template <typename Modules>
void check_layers(const Modules& modules, const char* what) {
  for (const auto& [module, layer] : modules) {
    if (module.empty()) throw_invalid("peft: ", what, ": an empty module name");
    if (!layer) throw_invalid("peft: ", what, ": module '", module, "': null layer");
  }
}

/// The adapter called `name` of the HRA layer `layer`, or nullptr when it has none.
template <typename Layer>
const typename Layer::Adapter* find_adapter(const Layer& layer, const std::string& name) {
  for (const auto& a : layer.adapters())
    if (a.name() == name) return &a;
  return nullptr;
}

}  // namespace detail
}  // namespace hra
