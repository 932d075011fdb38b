// PEFT adapter directories, loading: adapter_config.json + adapter_model.safetensors into the
// HRA and LoRA adapters of hra layers, everything validated before the first layer changes.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../hra_linear.hpp"
#include "../lora_linear.hpp"
#include "../reflector_chain.hpp"
#include "peft_config.hpp"
#include "peft_modules.hpp"
#include "safetensors.hpp"

namespace hra {
namespace peft {

/// How to load.
struct LoadOptions {
  std::string adapter_name = "default";  ///< which adapter of each HraLinear receives U (HRA)
  std::string prefix = default_prefix;   ///< prefix of every tensor name
  /// Ignore tensors of modules that are not mapped (e.g. the other biases PEFT's bias "all"
  /// saves) instead of refusing the file. Unknown tensors under a mapped module stay errors.
  bool allow_unmapped_tensors = false;
  /// LoRA: when the file's scaling (alpha/r or alpha/sqrt(r)) differs from the layer's
  /// scaling(), load B * (file scaling / layer scaling) instead of refusing, which computes the
  /// same function with the layer's alpha.
  bool rescale_lora_b = false;
  safetensors::ReadOptions read;  ///< limits for the weights file
};

}  // namespace peft

namespace detail {

inline std::string module_where(const std::string& source, const std::string& module) {
  return concat("peft: ", source, ": module '", module, "': ");
}

/// The tensor `name` of module `module`, checked for presence and shape (mismatch_error naming
/// the file, the module, the expected and the actual shape; `meaning` explains the dimensions).
inline void expect_tensor(const safetensors::TensorFile& weights, const std::string& module,
                          const std::string& name, const std::vector<std::int64_t>& shape,
                          const std::string& meaning) {
  if (!weights.contains(name))
    throw peft::mismatch_error(concat(module_where(weights.source(), module), "tensor '", name,
                                      "' is missing (the file has ", weights.size(),
                                      " tensors; is the prefix right?)"));
  const auto& actual = weights.at(name).shape;
  if (actual != shape)
    throw peft::mismatch_error(concat(module_where(weights.source(), module), "tensor '", name,
                                      "' has shape ", safetensors::shape_string(actual),
                                      ", expected ", safetensors::shape_string(shape), " ",
                                      meaning));
}

/// Tensor `name` (any shape of rows * cols elements, already checked) as the rows x cols matrix
/// of its row-major elements.
template <typename Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> get_row_major(
    const safetensors::TensorFile& weights, const std::string& name, std::int64_t rows,
    std::int64_t cols) {
  const std::vector<Scalar> values = weights.get_array<Scalar>(name);
  return Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
      values.data(), static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(cols));
}

/// The trained bias of `module` if the file has one, validated against the layer.
template <typename Layer>
std::optional<typename Layer::Vector> read_bias(const peft::AdapterConfig& config,
                                                const safetensors::TensorFile& weights,
                                                const std::string& module, const Layer& layer,
                                                const std::string& prefix,
                                                std::set<std::string>& claimed) {
  using Scalar = typename Layer::Scalar;
  const std::string name = prefix + module + ".base_layer.bias";
  if (!weights.contains(name)) return std::nullopt;
  const std::string where = module_where(weights.source(), module);
  if (config.bias == "none")
    throw peft::mismatch_error(concat(where, "tensor '", name, "' is a trained bias, but ",
                                      config.source, " has bias \"none\""));
  if (!layer.bias() || layer.bias_mode() == BiasMode::none)
    throw peft::mismatch_error(concat(
        where, "tensor '", name, "' is a trained bias (config bias \"", config.bias,
        "\"), but the layer's bias is ",
        layer.bias() ? "frozen (BiasMode::none)" : "absent (the layer was built without one)",
        "; expected a layer with a trainable bias (BiasMode::all or adapter_only)"));
  const PeftWeightShape shape = peft_weight_shape(layer);
  expect_tensor(
      weights, module, name, {shape.rows},
      concat("(", shape.rows_name(), ",): the layer's ", shape.rows_name(), " is ", shape.rows));
  claimed.insert(name);
  return weights.get_vector<Scalar>(name);
}

/// Refuses tensors nobody claimed: always those under a mapped module (unknown parameters),
/// and the others unless `allow_unmapped`.
template <typename Modules>
void check_unclaimed(const safetensors::TensorFile& weights, const Modules& modules,
                     const std::set<std::string>& claimed, const std::string& prefix,
                     bool allow_unmapped, const char* known) {
  for (const auto& [name, tensor] : weights.tensors()) {
    (void)tensor;
    if (claimed.count(name)) continue;
    for (const auto& entry : modules) {
      const std::string under = prefix + entry.first + ".";
      if (name.compare(0, under.size(), under) == 0)
        throw peft::mismatch_error(concat(module_where(weights.source(), entry.first),
                                          "unexpected tensor '", name, "' (hra reads only ", known,
                                          " for this adapter)"));
    }
    if (!allow_unmapped) {
      std::string mapped;
      std::size_t shown = 0;
      for (const auto& entry : modules) {
        if (shown == 4) {
          mapped += ", ...";
          break;
        }
        mapped += (shown++ ? ", " : "") + entry.first;
      }
      throw peft::mismatch_error(concat(
          "peft: ", weights.source(), ": tensor '", name, "' belongs to no mapped module (mapped: ",
          mapped, "); set LoadOptions::allow_unmapped_tensors to ignore such tensors"));
    }
  }
}

/// What tells the HRA and the LoRA loader apart in load_all_or_nothing().
struct Loader {
  peft::PeftType type;  ///< the config's peft_type it reads
  const char* name;     ///< "load_hra_adapters", for errors in the module map
  const char* hint;     ///< ends the message for a config of the other type
  const char* known;    ///< the tensors it reads per module, for an unexpected one
};

/// \brief The frame of both loaders: checks the module map and the config's peft_type, calls
/// `plan(module, layer, claimed)` for every module, which validates that module's tensors, adds
/// their names to `claimed` and returns what would assign them, reads each trained bias,
/// refuses tensors no module claimed, and only then assigns: after an exception no layer has
/// changed.
template <typename Modules, typename Plan>
void load_all_or_nothing(const peft::AdapterConfig& config, const safetensors::TensorFile& weights,
                         const Modules& modules, const peft::LoadOptions& options,
                         const Loader& loader, Plan plan) {
  check_layers(modules, loader.name);
  expect_peft_type(config, loader.type, loader.hint);
  std::vector<std::function<void()>> assignments;
  std::set<std::string> claimed;
  for (const auto& [module, layer] : modules) {
    std::function<void()> assign = plan(module, *layer, claimed);
    auto bias = read_bias(config, weights, module, *layer, options.prefix, claimed);
    assignments.push_back([target = layer, assign = std::move(assign), bias = std::move(bias)] {
      assign();
      if (bias) target->set_bias(*bias);
    });
  }
  check_unclaimed(weights, modules, claimed, options.prefix, options.allow_unmapped_tensors,
                  loader.known);
  for (const auto& assign : assignments) assign();
}

/// \brief The files of the adapter directory `dir`: adapter_config.json, refused (config_error)
/// unless its peft_type is `type`, then adapter_model.safetensors (safetensors::error).
///
/// Both files are opened from one version before either is read: ..data (the live version of a
/// directory save_adapter_files() wrote) is resolved once, and a save that replaces the
/// directory meanwhile makes the reader start again, so the two always belong together. Errors
/// name the paths in `dir`; an error opening the weights is reported after the config's.
inline std::pair<peft::AdapterConfig, safetensors::TensorFile> read_adapter_dir(
    const std::filesystem::path& dir, peft::PeftType type, const safetensors::ReadOptions& read) {
  const std::string config_shown = (dir / peft::config_file_name).string();
  const std::string weights_shown = (dir / peft::weights_file_name).string();
  std::optional<InputFile<peft::io_error>> config_in;
  std::optional<InputFile<safetensors::io_error>> weights_in;
  std::exception_ptr weights_error;
  open_resolved(dir, [&](const ResolvedDir& resolved, bool report_missing) {
    bool missing = false;
    config_in.reset();
    weights_in.reset();
    weights_error = nullptr;
    config_in.emplace(resolved.path(peft::config_file_name), "peft: ", config_shown,
                      report_missing ? nullptr : &missing);
    if (missing) return false;
    try {
      weights_in.emplace(resolved.path(peft::weights_file_name), "safetensors: ", weights_shown,
                         report_missing ? nullptr : &missing);
    } catch (const safetensors::io_error&) {
      weights_error = std::current_exception();
    }
    return !missing;
  });
  peft::AdapterConfig config =
      peft::parse_config(config_in->read_all(max_config_bytes), config_shown);
  expect_peft_type(config, type);
  if (weights_error) std::rethrow_exception(weights_error);
  return {std::move(config), load_opened(*weights_in, weights_shown, read)};
}

}  // namespace detail

namespace peft {

/// \brief Loads HRA adapters from parsed files into the mapped layers (the memory-level entry
/// point; load_hra_adapters(dir, ...) reads the files and calls this).
///
/// For every module: U (d_in x r) from `<prefix><module>.hra_u` goes into the adapter
/// `options.adapter_name` of its layer, and a trained bias `<prefix><module>.base_layer.bias`,
/// if present, into the layer's bias. Checks everything listed in the namespace comment (in
/// hra/io/peft_config.hpp) before changing any layer; on an exception no layer has changed.
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
void load_hra_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                       const std::map<std::string, Layer*>& modules,
                       const LoadOptions& options = {}) {
  using Scalar = typename Layer::Scalar;
  const Variant variant = config.apply_gs ? Variant::gram_schmidt : Variant::chain;
  const auto plan = [&](const std::string& module, Layer& layer,
                        std::set<std::string>& claimed) -> std::function<void()> {
    const std::string at_config = detail::module_where(config.source, module);
    const auto* adapter = detail::find_adapter(layer, options.adapter_name);
    if (!adapter)
      throw mismatch_error(detail::concat(at_config, "the layer has no adapter '",
                                          options.adapter_name, "' (add_adapter() it first)"));
    if (adapter->merged())
      throw mismatch_error(detail::concat(at_config, "adapter '", options.adapter_name,
                                          "' is merged into W; unmerge() it before loading"));
    if (adapter->chain().rank() != config.r)
      throw mismatch_error(detail::concat(at_config, "the config has r = ", config.r,
                                          ", the layer's adapter '", options.adapter_name,
                                          "' has rank ", adapter->chain().rank()));
    if (adapter->chain().variant() != variant)
      throw mismatch_error(detail::concat(
          at_config, "the config has apply_GS = ", config.apply_gs ? "true" : "false",
          ", the layer's adapter '", options.adapter_name, "' uses the ",
          to_string(adapter->chain().variant()),
          " variant (apply_GS = ", config.apply_gs ? "false" : "true", ")"));

    const std::string name = options.prefix + module + ".hra_u";
    const detail::PeftWeightShape shape = detail::peft_weight_shape(layer);
    detail::expect_tensor(
        weights, module, name, {shape.fan_in, config.r},
        detail::concat("(", shape.fan_in_name(), ", r): the layer's ", shape.fan_in_name(), " is ",
                       shape.fan_in, " and the config has r = ", config.r));
    typename Layer::Matrix u = weights.get_matrix<Scalar>(name);
    try {
      // The checks of set_reflectors and of a forward (zero, overflowing or, for Gram-Schmidt,
      // dependent columns), on a copy.
      ReflectorChain<Scalar>(u, variant, adapter->chain().block_size()).factorize();
    } catch (const std::invalid_argument& e) {
      throw mismatch_error(detail::concat(detail::module_where(weights.source(), module),
                                          "tensor '", name, "' is not a usable U: ", e.what()));
    }
    claimed.insert(name);
    return [&layer, u = std::move(u), adapter_name = options.adapter_name] {
      layer.set_reflectors(adapter_name, u);
    };
  };
  detail::load_all_or_nothing(config, weights, modules, options,
                              {PeftType::hra, "load_hra_adapters", " (use load_lora_adapters)",
                               "hra_u and base_layer.bias"},
                              plan);
}

/// \brief Loads LoRA adapters from parsed files into the mapped layers (memory-level entry point).
///
/// For every module: A (r x d_in) from `<prefix><module>.lora_A.weight`, B (d_out x r) from
/// `<prefix><module>.lora_B.weight` and a trained bias if present. The file's scaling
/// (config.lora_scaling_for(module)) must equal the layer's scaling() to a relative 1e-9, unless
/// options.rescale_lora_b. Checks everything before changing any layer.
template <typename Layer, detail::IfLayerOf<Layer, LoraAdapterLayer> = 0>
void load_lora_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                        const std::map<std::string, Layer*>& modules,
                        const LoadOptions& options = {}) {
  using Scalar = typename Layer::Scalar;
  using Matrix = typename Layer::Matrix;
  const auto plan = [&](const std::string& module, Layer& layer,
                        std::set<std::string>& claimed) -> std::function<void()> {
    const std::string at_config = detail::module_where(config.source, module);
    if (layer.merged())
      throw mismatch_error(at_config + "the layer's adapter is merged into W; unmerge() it first");
    const Eigen::Index rank = config.rank_for(module);
    if (layer.options().rank != rank)
      throw mismatch_error(detail::concat(at_config, "the config gives r = ", rank,
                                          rank == config.r ? "" : " (rank_pattern)",
                                          ", the layer has rank ", layer.options().rank));
    const std::string name_a = options.prefix + module + ".lora_A.weight";
    const std::string name_b = options.prefix + module + ".lora_B.weight";
    const detail::PeftWeightShape shape = detail::peft_weight_shape(layer);
    const std::string refusal = shape.lora_refusal();
    if (!refusal.empty()) throw mismatch_error(at_config + "the layer is " + refusal);
    detail::expect_tensor(weights, module, name_a, shape.lora_a(rank),
                          detail::concat(shape.lora_a_name(), ": r = ", rank, ", the layer's ",
                                         shape.fan_in_name(), " is ", shape.fan_in));
    detail::expect_tensor(weights, module, name_b, shape.lora_b(rank),
                          detail::concat(shape.lora_b_name(), ": the layer's ", shape.rows_name(),
                                         " is ", shape.rows, ", r = ", rank));
    // A convolution's tensors hold the row-major r x fan_in and rows x r matrices.
    Matrix a = detail::get_row_major<Scalar>(weights, name_a, rank, shape.fan_in);
    Matrix b = detail::get_row_major<Scalar>(weights, name_b, shape.rows, rank);

    const double file_scaling = config.lora_scaling_for(module);
    const double layer_scaling = layer.options().alpha / static_cast<double>(layer.options().rank);
    if (std::abs(file_scaling - layer_scaling) >
        1e-9 * std::max(std::abs(file_scaling), std::abs(layer_scaling))) {
      const std::string both = detail::concat(
          "the config's scaling is ", file_scaling, " (lora_alpha ", config.alpha_for(module),
          config.use_rslora ? " / sqrt(r)" : " / r", "), the layer's is ", layer_scaling,
          " (alpha ", layer.options().alpha, " / r)");
      if (!options.rescale_lora_b)
        throw mismatch_error(at_config + both +
                             "; build the layer with a matching alpha or set "
                             "LoadOptions::rescale_lora_b");
      if (layer_scaling == 0.0)
        throw mismatch_error(at_config + both + "; B cannot be rescaled to a zero scaling");
      b *= static_cast<Scalar>(file_scaling / layer_scaling);
      if (!b.allFinite()) throw mismatch_error(at_config + both + "; rescaling B overflows");
    }
    claimed.insert(name_a);
    claimed.insert(name_b);
    return [&layer, a = std::move(a), b = std::move(b)] { layer.set_lora_weights(a, b); };
  };
  detail::load_all_or_nothing(config, weights, modules, options,
                              {PeftType::lora, "load_lora_adapters", " (use load_hra_adapters)",
                               "lora_A.weight, lora_B.weight and base_layer.bias"},
                              plan);
}

// The same two for a braced list of float or double layers (see ModuleList).

/// load_hra_adapters(config, weights, modules, options) for a braced list of float layers.
template <int N = 0>
void load_hra_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                       const LazyList<N, HraModuleList<float>>& modules,
                       const LoadOptions& options = {}) {
  load_hra_adapters(config, weights, modules.map(), options);
}

/// load_lora_adapters(config, weights, modules, options) for a braced list of float layers.
template <int N = 0>
void load_lora_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                        const LazyList<N, LoraModuleList<float>>& modules,
                        const LoadOptions& options = {}) {
  load_lora_adapters(config, weights, modules.map(), options);
}

/// load_hra_adapters(config, weights, modules, options) for a braced list of double layers.
template <int N = 0>
void load_hra_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                       const LazyList<N, HraModuleList<double>>& modules,
                       const LoadOptions& options = {}) {
  load_hra_adapters(config, weights, modules.map(), options);
}

/// load_lora_adapters(config, weights, modules, options) for a braced list of double layers.
template <int N = 0>
void load_lora_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                        const LazyList<N, LoraModuleList<double>>& modules,
                        const LoadOptions& options = {}) {
  load_lora_adapters(config, weights, modules.map(), options);
}

}  // namespace peft

namespace detail {

/// What every directory loader does: reads `dir` (read_adapter_dir(): the config must say
/// `Type`), loads it into `modules` (a map or a braced list) with the memory-level
/// load_hra_adapters() or load_lora_adapters(), and returns the config.
template <peft::PeftType Type, typename Modules>
peft::AdapterConfig load_adapter_dir(const std::filesystem::path& dir, const Modules& modules,
                                     const peft::LoadOptions& options) {
  auto [config, weights] = read_adapter_dir(dir, Type, options.read);
  if constexpr (Type == peft::PeftType::hra)
    peft::load_hra_adapters(config, weights, modules, options);
  else
    peft::load_lora_adapters(config, weights, modules, options);
  return std::move(config);  // a structured binding: not moved implicitly
}

}  // namespace detail

namespace peft {

/// \brief Loads the PEFT HRA adapter directory `dir` into the mapped layers and returns its
/// config. Reads adapter_config.json (io_error / config_error), then adapter_model.safetensors
/// (safetensors::error), then validates and assigns as the memory-level load_hra_adapters().
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
AdapterConfig load_hra_adapters(const std::filesystem::path& dir,
                                const std::map<std::string, Layer*>& modules,
                                const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::hra>(dir, modules, options);
}

/// \brief Loads the PEFT LoRA adapter directory `dir` into the mapped layers and returns its
/// config (see load_hra_adapters(dir, ...)).
template <typename Layer, detail::IfLayerOf<Layer, LoraAdapterLayer> = 0>
AdapterConfig load_lora_adapters(const std::filesystem::path& dir,
                                 const std::map<std::string, Layer*>& modules,
                                 const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::lora>(dir, modules, options);
}

// The directory loaders for a braced list (see ModuleList).

/// load_hra_adapters(dir, modules, options) for a braced list of float layers.
template <int N = 0>
AdapterConfig load_hra_adapters(const std::filesystem::path& dir,
                                const LazyList<N, HraModuleList<float>>& modules,
                                const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::hra>(dir, modules.map(), options);
}

/// load_lora_adapters(dir, modules, options) for a braced list of float layers.
template <int N = 0>
AdapterConfig load_lora_adapters(const std::filesystem::path& dir,
                                 const LazyList<N, LoraModuleList<float>>& modules,
                                 const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::lora>(dir, modules.map(), options);
}

/// load_hra_adapters(dir, modules, options) for a braced list of double layers.
template <int N = 0>
AdapterConfig load_hra_adapters(const std::filesystem::path& dir,
                                const LazyList<N, HraModuleList<double>>& modules,
                                const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::hra>(dir, modules.map(), options);
}

/// load_lora_adapters(dir, modules, options) for a braced list of double layers.
template <int N = 0>
AdapterConfig load_lora_adapters(const std::filesystem::path& dir,
                                 const LazyList<N, LoraModuleList<double>>& modules,
                                 const LoadOptions& options = {}) {
  return detail::load_adapter_dir<PeftType::lora>(dir, modules.map(), options);
}

}  // namespace peft
}  // namespace hra
