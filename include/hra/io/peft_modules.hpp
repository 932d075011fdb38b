// PEFT adapter directories, the module maps: which hra layer stands for which module of the
// PyTorch model, as the saving and loading functions take them.
#pragma once

#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <variant>

#include "../detail/checks.hpp"
#include "../hra_linear.hpp"
#include "../lora_linear.hpp"

namespace hra {
namespace detail {
template <int N, typename T>
struct Identity {
  using type = T;
};
}  // namespace detail

namespace peft {

/// Modules to save or load: module name (as in the PyTorch model, e.g. "net.fc1") -> layer.
template <typename Scalar>
using HraModules = std::map<std::string, HraLinear<Scalar>*>;
/// Modules to save or load: module name -> LoRA layer.
template <typename Scalar>
using LoraModules = std::map<std::string, LoraLinear<Scalar>*>;

/// \brief A braced list of {module name, layer} pairs, all float or all double layers:
/// `{{"net.fc1", &fc1}, {"net.fc2", &fc2}}`.
///
/// The saving and loading functions are templates over the scalar, which a braced list cannot
/// deduce; each has an overload taking a ModuleList, which holds the list as the map of the
/// layers' scalar (HraModules<float>, ...) and hands that map to the template.
template <template <typename> class Layer>
class ModuleList {
 public:
  using FloatModules = std::map<std::string, Layer<float>*>;
  using DoubleModules = std::map<std::string, Layer<double>*>;

  ModuleList(std::initializer_list<typename FloatModules::value_type> modules)
      : modules_(FloatModules(modules)) {}
  ModuleList(std::initializer_list<typename DoubleModules::value_type> modules)
      : modules_(DoubleModules(modules)) {}

  /// f(modules) with the map of the layers' scalar; returns what f returns.
  template <typename F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), modules_);
  }

 private:
  std::variant<FloatModules, DoubleModules> modules_;
};

/// A braced list of HRA layers (see ModuleList).
using HraModuleList = ModuleList<HraLinear>;
/// A braced list of LoRA layers (see ModuleList).
using LoraModuleList = ModuleList<LoraLinear>;

/// \brief `List`, named through a template parameter: the type of the braced-list overloads'
/// modules parameter.
///
/// Those overloads take `LazyList<N, HraModuleList>` (N defaulted, never deduced), which makes
/// them function templates: their bodies, which run the float and the double path through all
/// of the saving or loading code, are instantiated only where they are called. As plain inline
/// functions they were instantiated by every file that included the header (16 s of the 20 s
/// that `#include <hra/io.hpp>` took GCC 12 with -fsyntax-only).
template <int N, typename List>
using LazyList = typename detail::Identity<N, List>::type;

}  // namespace peft

namespace detail {

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
