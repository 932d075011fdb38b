// PEFT adapter directories, saving: the HRA and LoRA adapters of hra layers as the
// adapter_config.json and adapter_model.safetensors PEFT reads, both files replaced together.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../detail/checks.hpp"
#include "../hra_linear.hpp"
#include "../lora_linear.hpp"
#include "../reflector_chain.hpp"
#include "detail/atomic_dir.hpp"
#include "peft_config.hpp"
#include "peft_modules.hpp"
#include "safetensors.hpp"

namespace hra {
namespace peft {

/// How to save.
struct SaveOptions {
  std::string adapter_name = "default";     ///< which adapter of each HraLinear (HRA only)
  std::optional<safetensors::Dtype> dtype;  ///< tensor dtype; default F32 for float, else F64
  std::string prefix = default_prefix;      ///< prefix of every tensor name
  std::optional<std::string> base_model_name_or_path;  ///< written into the config
  /// Further config fields (e.g. task_type, modules_to_save, target_modules), replacing the
  /// defaults written; the fields hra computes (peft_type, r, bias, apply_GS, lora_alpha, ...)
  /// cannot be replaced (std::invalid_argument).
  nlohmann::json extra_config = nlohmann::json::object();
};

/// \brief The two files of an adapter directory, in memory.
struct AdapterFiles {
  nlohmann::json config;            ///< adapter_config.json (keys sorted, as PEFT writes them)
  safetensors::TensorFile weights;  ///< adapter_model.safetensors

  /// The config as PEFT writes it: json.dumps(indent=2, sort_keys=True), ASCII with \u escapes.
  /// std::invalid_argument when a string in it is not valid UTF-8 (JSON cannot hold it).
  std::string config_text() const {
    try {
      return config.dump(2, ' ', true);
    } catch (const nlohmann::json::type_error& e) {
      throw std::invalid_argument(
          std::string("peft: the adapter config has a string that is not valid UTF-8: ") +
          e.what());
    }
  }
};

}  // namespace peft

namespace detail {

/// Config fields computed from the layers, which SaveOptions::extra_config may not replace.
inline bool computed_field(const std::string& key) {
  static const char* const fields[] = {"peft_type",
                                       "r",
                                       "bias",
                                       "apply_GS",
                                       "lora_alpha",
                                       "lora_dropout",
                                       "use_rslora",
                                       "rank_pattern",
                                       "alpha_pattern",
                                       "fan_in_fan_out",
                                       "use_dora",
                                       "lora_bias",
                                       "init_lora_weights"};
  for (const char* f : fields)
    if (key == f) return true;
  return false;
}

inline void add_extra_config(nlohmann::json& config, const peft::SaveOptions& options,
                             const char* what) {
  if (options.extra_config.is_null()) return;
  if (!options.extra_config.is_object())
    throw_invalid("peft: ", what, ": SaveOptions::extra_config must be a JSON object, got ",
                  options.extra_config.type_name());
  for (const auto& item : options.extra_config.items()) {
    if (computed_field(item.key()))
      throw_invalid("peft: ", what, ": SaveOptions::extra_config may not set \"", item.key(),
                    "\" (it is computed from the layers)");
    try {
      (void)item.value().dump();  // what config_text() will do, here where the key is known
    } catch (const nlohmann::json::type_error& e) {
      throw_invalid("peft: ", what, ": SaveOptions::extra_config \"", item.key(),
                    "\" holds a string that is not valid UTF-8 (", e.what(), ")");
    }
    config[item.key()] = item.value();
  }
}

/// PeftConfig's fields and the ones HRAConfig and LoraConfig share, as PeftModel.save_pretrained
/// writes them.
inline nlohmann::json common_config(const char* peft_type, const std::vector<std::string>& modules,
                                    const std::string& bias, const peft::SaveOptions& options) {
  nlohmann::json c = nlohmann::json::object();
  c["auto_mapping"] = nullptr;
  c["base_model_name_or_path"] = options.base_model_name_or_path
                                     ? nlohmann::json(*options.base_model_name_or_path)
                                     : nlohmann::json(nullptr);
  c["bias"] = bias;
  c["exclude_modules"] = nullptr;
  c["inference_mode"] = true;
  c["layers_pattern"] = nullptr;
  c["layers_to_transform"] = nullptr;
  c["modules_to_save"] = nullptr;
  c["peft_type"] = peft_type;
  c["revision"] = nullptr;
  c["target_modules"] = modules;
  c["task_type"] = nullptr;
  return c;
}

inline const char* bias_mode_name(BiasMode mode) {
  return mode == BiasMode::none  ? "BiasMode::none"
         : mode == BiasMode::all ? "BiasMode::all"
                                 : "BiasMode::adapter_only";
}

/// PEFT's bias field for the layers: every layer that has a bias must train it the same way.
template <typename Modules>
std::string bias_field(const Modules& modules, const char* adapter_only, const char* what) {
  std::optional<BiasMode> mode;
  std::string first;
  for (const auto& [module, layer] : modules) {
    if (!layer->bias()) continue;
    if (!mode) {
      mode = layer->bias_mode();
      first = module;
    } else if (*mode != layer->bias_mode()) {
      throw_invalid("peft: ", what, ": modules '", first, "' (", bias_mode_name(*mode), ") and '",
                    module, "' (", bias_mode_name(layer->bias_mode()),
                    ") train their biases differently; PEFT's config has one bias setting");
    }
  }
  if (!mode || *mode == BiasMode::none) return "none";
  return *mode == BiasMode::all ? "all" : adapter_only;
}

/// Where every writer of adapter files starts: the empty files (the weights tagged as PEFT's
/// save_pretrained tags them), the tensors' dtype, PEFT's bias field, and the name the writer's
/// errors give.
struct FilesStart {
  peft::AdapterFiles files;
  safetensors::Dtype dtype;  ///< options.dtype if given, else the layers' natural one (F32 or F64)
  std::string bias;          ///< see bias_field()
  const char* what;          ///< the public function, e.g. "save_hra_adapters"
};

/// Checks the modules first: std::invalid_argument naming `what` for an empty module name, a
/// null layer or no modules (nothing to `verb`), then for biases trained differently.
template <typename Layer, typename Options>
FilesStart start_files(const std::map<std::string, Layer*>& modules, const Options& options,
                       const char* what, const char* verb, const char* adapter_only) {
  check_layers(modules, what);
  if (modules.empty()) throw_invalid("peft: ", what, ": no modules to ", verb);
  FilesStart start{peft::AdapterFiles(),
                   options.dtype.value_or(safetensors::natural_dtype<typename Layer::Scalar>()),
                   bias_field(modules, adapter_only, what), what};
  start.files.weights.metadata()["format"] = "pt";
  return start;
}

/// A JSON number for a count or alpha, as Python writes it: an integer when it is one.
inline nlohmann::json json_number(double value) {
  if (value == std::floor(value) && std::abs(value) < 9.0e15)
    return nlohmann::json(static_cast<std::int64_t>(value));
  return nlohmann::json(value);
}

/// Stores `m` as tensor `name` in `dtype` and returns what a reader gets back (as double), so
/// that values the dtype cannot hold (F16 overflows to inf) are refused before any file is
/// written. std::invalid_argument starting with `where`.
template <typename Derived>
Eigen::MatrixXd put_checked(safetensors::TensorFile& weights, const std::string& name,
                            const Eigen::MatrixBase<Derived>& m, safetensors::Dtype dtype,
                            const std::string& where, bool vector = false) {
  if (vector)
    weights.put_vector(name, m, dtype);
  else
    weights.put_matrix(name, m, dtype);
  try {
    if (vector) return weights.get_vector<double>(name);
    return weights.get_matrix<double>(name);
  } catch (const safetensors::tensor_error& e) {
    throw_invalid(where, "cannot save tensor '", name, "' as ", safetensors::to_string(dtype), ": ",
                  e.what());
  }
}

/// \brief Gives the stored tensor `name` the shape `shape` of the same element count: a
/// convolution's row-major factor matrix as PEFT's conv weight (see PeftWeightShape).
inline void reshape_tensor(safetensors::TensorFile& weights, const std::string& name,
                           std::vector<std::int64_t> shape) {
  safetensors::Tensor t = weights.at(name);
  t.shape = std::move(shape);
  weights.put(name, std::move(t));
}

/// std::invalid_argument (starting with `where`) for a layer whose factors PEFT's LoRA cannot
/// hold (PeftWeightShape::lora_refusal(): a grouped or dilated convolution).
inline void expect_lora_representable(const PeftWeightShape& shape, const std::string& where) {
  const std::string refusal = shape.lora_refusal();
  if (!refusal.empty()) throw_invalid(where, refusal, "; save it as HRA instead");
}

template <typename Layer>
void put_bias(safetensors::TensorFile& weights, const Layer& layer, const std::string& bias,
              const std::string& name, safetensors::Dtype dtype, const std::string& where) {
  if (bias == "none" || !layer.bias()) return;
  put_checked(weights, name, *layer.bias(), dtype, where, /*vector=*/true);
}

/// The rank and alpha of one module of a LoRA adapter directory.
struct LoraModuleShape {
  std::string module;
  Eigen::Index rank;
  double alpha;
};

/// LoraConfig's r, lora_alpha, rank_pattern and alpha_pattern for modules of these shapes.
struct LoraPatterns {
  Eigen::Index r = 0;
  double alpha = 0;
  nlohmann::json rank_pattern = nlohmann::json::object();
  nlohmann::json alpha_pattern = nlohmann::json::object();
};

/// The most common rank and alpha become r and lora_alpha (the first module wins ties); the
/// other modules get rank_pattern / alpha_pattern entries keyed by their escaped names.
inline LoraPatterns lora_patterns(const std::vector<LoraModuleShape>& shapes) {
  const auto most_common = [&](auto value_of) {
    using Value = decltype(value_of(shapes.front()));
    std::vector<std::pair<Value, int>> counts;
    for (const auto& s : shapes) {
      const Value v = value_of(s);
      auto it =
          std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == v; });
      if (it == counts.end())
        counts.emplace_back(v, 1);
      else
        ++it->second;
    }
    return std::max_element(counts.begin(), counts.end(),
                            [](const auto& a, const auto& b) { return a.second < b.second; })
        ->first;
  };
  LoraPatterns p;
  p.r = most_common([](const LoraModuleShape& s) { return s.rank; });
  p.alpha = most_common([](const LoraModuleShape& s) { return s.alpha; });
  for (const auto& s : shapes) {
    if (s.rank != p.r) p.rank_pattern[escape_pattern(s.module)] = s.rank;
    if (s.alpha != p.alpha) p.alpha_pattern[escape_pattern(s.module)] = json_number(s.alpha);
  }
  return p;
}

/// LoraConfig's own fields (beyond common_config()), as PeftModel.save_pretrained writes them.
inline void add_lora_fields(nlohmann::json& config, const LoraPatterns& patterns, double dropout) {
  config["alpha_pattern"] = patterns.alpha_pattern;
  config["fan_in_fan_out"] = false;
  config["init_lora_weights"] = true;
  config["layer_replication"] = nullptr;
  config["loftq_config"] = nlohmann::json::object();
  config["lora_alpha"] = json_number(patterns.alpha);
  config["lora_bias"] = false;
  config["lora_dropout"] = dropout;
  config["megatron_config"] = nullptr;
  config["megatron_core"] = "megatron.core";
  config["r"] = patterns.r;
  config["rank_pattern"] = patterns.rank_pattern;
  config["use_dora"] = false;
  config["use_rslora"] = false;
}

/// PEFT gives each module the first pattern that matches a suffix of its name, so a module
/// whose name ends another's could pick up the wrong entry: reads the config back as PEFT would
/// and throws std::invalid_argument unless every module gets its own rank and alpha.
inline void check_lora_patterns(const peft::AdapterFiles& files,
                                const std::vector<LoraModuleShape>& shapes, const char* what) {
  const peft::AdapterConfig check = peft::parse_config(files.config_text(), "<config being saved>");
  for (const auto& s : shapes)
    if (check.rank_for(s.module) != s.rank || check.alpha_for(s.module) != s.alpha)
      throw_invalid("peft: ", what, ": module '", s.module,
                    "': its rank or alpha cannot be expressed by rank_pattern / "
                    "alpha_pattern without also matching another module's name");
}

}  // namespace detail

namespace peft {

/// \brief The files that save_hra_adapters() writes, in memory (the memory-level entry point).
///
/// One `<prefix><module>.hra_u` tensor (in_features, r) per module from the adapter
/// (for a convolution (C_in/groups * kh * kw, r), PEFT's HRAConv2d's; any groups)
/// `options.adapter_name`, the trained biases when the layers' biases are trainable, and the
/// HRAConfig fields: r and apply_GS (the same for every module: HRAConfig has no rank_pattern),
/// init_weights (true when every adapter used the symmetric init), bias ("none", "all" or
/// "hra_only" from the layers' BiasMode, which must agree), target_modules (the module names).
/// std::invalid_argument for a null layer, a missing adapter, different ranks or variants,
/// values that are not finite in the chosen dtype or U that would not load back (zero or, for
/// Gram-Schmidt, dependent columns).
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
AdapterFiles hra_adapter_files(const std::map<std::string, Layer*>& modules,
                               const SaveOptions& options = {}) {
  auto [files, dtype, bias, what] =
      detail::start_files(modules, options, "save_hra_adapters", "save", "hra_only");
  Eigen::Index r = 0;
  Variant variant = Variant::chain;
  std::string first;
  bool symmetric = true;
  std::vector<std::string> names;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    const auto* adapter = detail::find_adapter(*layer, options.adapter_name);
    if (!adapter)
      detail::throw_invalid(where, "the layer has no adapter '", options.adapter_name, "'");
    if (first.empty()) {
      r = adapter->chain().rank();
      variant = adapter->chain().variant();
      first = module;
    } else if (adapter->chain().rank() != r) {
      detail::throw_invalid(where, "r = ", adapter->chain().rank(), " differs from module '", first,
                            "' (r = ", r, "); PEFT's HRAConfig has one r for every module");
    } else if (adapter->chain().variant() != variant) {
      detail::throw_invalid(where, "the ", to_string(adapter->chain().variant()),
                            " variant differs from module '", first, "' (", to_string(variant),
                            "); PEFT's HRAConfig has one apply_GS for every module");
    }
    symmetric = symmetric && adapter->init() == Init::symmetric;
    const std::string name = options.prefix + module + ".hra_u";
    // U as the layer uses it, in its own scalar (an optimiser may have written a column whose
    // squared norm underflows in float), then as the file will hold it.
    try {
      (void)adapter->chain().factorize();
    } catch (const std::invalid_argument& e) {
      detail::throw_invalid(where, "U of adapter '", options.adapter_name,
                            "' is not usable by the layer: ", e.what());
    }
    const Eigen::MatrixXd stored =
        detail::put_checked(files.weights, name, adapter->chain().reflectors(), dtype, where);
    // Checked in the layer's scalar: a reader loads U into a layer like this one, and a
    // float TU then never instantiates the double chain. A dtype that holds U exactly (the
    // layer's own) reads back what was factorized above: nothing more to check.
    using Scalar = typename Layer::Scalar;
    const typename Layer::Matrix read_back = stored.cast<Scalar>();
    if (!(read_back.array() == adapter->chain().reflectors().array()).all()) {
      try {
        ReflectorChain<Scalar>(read_back, variant).factorize();
      } catch (const std::invalid_argument& e) {
        detail::throw_invalid(where, "U would not load back from tensor '", name, "': ", e.what());
      }
    }
    detail::put_bias(files.weights, *layer, bias, options.prefix + module + ".base_layer.bias",
                     dtype, where);
    names.push_back(module);
  }
  files.config = detail::common_config("HRA", names, bias, options);
  files.config["apply_GS"] = variant == Variant::gram_schmidt;
  files.config["init_weights"] = symmetric;
  files.config["r"] = r;
  detail::add_extra_config(files.config, options, what);
  return std::move(files);  // a structured binding: not moved implicitly
}

/// \brief The files that save_lora_adapters() writes, in memory (the memory-level entry point).
///
/// `<prefix><module>.lora_A.weight` (r, in_features) and `.lora_B.weight` (out_features, r) per
/// module (a convolution's as (r, C_in, kh, kw) and (C_out, r, 1, 1); groups > 1 is refused,
/// PEFT's LoRA conv has no grouped form), the trained biases when trainable, and the LoraConfig
/// fields: r and lora_alpha are the most common rank and alpha (ties: the first module's), the
/// other modules get rank_pattern / alpha_pattern entries keyed by their escaped names; use_rslora
/// false (the layers scale by alpha / r); lora_dropout (the same for every module); bias ("none",
/// "all" or "lora_only"). std::invalid_argument for a null layer, different dropouts or biases,
/// non-finite values in the dtype, or module names whose patterns would also match another
/// module.
template <typename Layer, detail::IfLayerOf<Layer, LoraAdapterLayer> = 0>
AdapterFiles lora_adapter_files(const std::map<std::string, Layer*>& modules,
                                const SaveOptions& options = {}) {
  auto [files, dtype, bias, what] =
      detail::start_files(modules, options, "save_lora_adapters", "save", "lora_only");

  std::vector<detail::LoraModuleShape> shapes;
  for (const auto& [module, layer] : modules)
    shapes.push_back({module, layer->options().rank, layer->options().alpha});
  const detail::LoraPatterns patterns = detail::lora_patterns(shapes);
  const double dropout = modules.begin()->second->options().dropout;

  std::vector<std::string> names;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    const LoraOptions& o = layer->options();
    if (o.dropout != dropout)
      detail::throw_invalid(where, "dropout ", o.dropout, " differs from module '",
                            modules.begin()->first, "' (", dropout,
                            "); PEFT's LoraConfig has one lora_dropout");
    const detail::PeftWeightShape shape = detail::peft_weight_shape(*layer);
    detail::expect_lora_representable(shape, where);
    const std::string name_a = options.prefix + module + ".lora_A.weight";
    const std::string name_b = options.prefix + module + ".lora_B.weight";
    detail::put_checked(files.weights, name_a, layer->lora_a(), dtype, where);
    detail::put_checked(files.weights, name_b, layer->lora_b(), dtype, where);
    if (shape.conv) {
      detail::reshape_tensor(files.weights, name_a, shape.lora_a(o.rank));
      detail::reshape_tensor(files.weights, name_b, shape.lora_b(o.rank));
    }
    detail::put_bias(files.weights, *layer, bias, options.prefix + module + ".base_layer.bias",
                     dtype, where);
    names.push_back(module);
  }
  files.config = detail::common_config("LORA", names, bias, options);
  detail::add_lora_fields(files.config, patterns, dropout);
  detail::add_extra_config(files.config, options, what);
  detail::check_lora_patterns(files, shapes, what);
  return std::move(files);
}

/// \brief Writes `files` into the directory `dir` (created if needed) as
/// adapter_model.safetensors and adapter_config.json, replacing both together atomically.
///
/// Both files are serialised first (conversion errors touch nothing). The two names in `dir`
/// are symlinks into a version directory named by the symlink `dir`/..data; a save writes a
/// new version (fsynced), renames a new ..data over the old one and removes the old version
/// (see docs/adapter_files.md and detail::replace_directory_files()). Guarantees:
///   - a kill or power loss at any moment leaves `dir` loading as exactly the previous adapter
///     or exactly the new one (loaders resolve ..data once for both files);
///   - what an interrupted save left behind is removed by the next save;
///   - saves of one directory by several threads or processes take turns (an flock on
///     `dir`/.hra-lock; the later one waits, and its adapter is the one left);
///   - a failed save (disk full, permissions, an entry in the way) throws io_error naming the
///     file and the OS error, and leaves the previous adapter in place and loadable.
/// A directory of plain files (an older hra, PEFT, a copy) is migrated by its first save,
/// with the old files readable throughout. PEFT and other readers follow the symlinks.
inline void save_adapter_files(const std::filesystem::path& dir, const AdapterFiles& files) {
  const std::string where = detail::concat("peft: ", dir.string(), ": ");
  std::string config_text;
  try {
    config_text = files.config_text();
  } catch (const std::invalid_argument& e) {
    detail::throw_invalid(where, e.what());
  }
  const std::string weights_bytes = safetensors::serialize(files.weights);
  detail::replace_directory_files<io_error>(
      dir, {{weights_file_name, weights_bytes}, {config_file_name, config_text}}, "peft: ");
}

/// Saves the adapter `options.adapter_name` of every mapped HRA layer as a PEFT HRA adapter
/// directory (see hra_adapter_files() and save_adapter_files()).
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
void save_hra_adapters(const std::filesystem::path& dir,
                       const std::map<std::string, Layer*>& modules,
                       const SaveOptions& options = {}) {
  save_adapter_files(dir, hra_adapter_files(modules, options));
}

/// Saves every mapped LoRA layer as a PEFT LoRA adapter directory (see lora_adapter_files()).
template <typename Layer, detail::IfLayerOf<Layer, LoraAdapterLayer> = 0>
void save_lora_adapters(const std::filesystem::path& dir,
                        const std::map<std::string, Layer*>& modules,
                        const SaveOptions& options = {}) {
  save_adapter_files(dir, lora_adapter_files(modules, options));
}

// The same four for a braced list of float or double layers (see ModuleList): one overload per
// scalar, the map overload's work.

/// hra_adapter_files(modules, options) for a braced list of float layers.
template <int N = 0>
AdapterFiles hra_adapter_files(const LazyList<N, HraModuleList<float>>& modules,
                               const SaveOptions& options = {}) {
  return hra_adapter_files(modules.map(), options);
}

/// lora_adapter_files(modules, options) for a braced list of float layers.
template <int N = 0>
AdapterFiles lora_adapter_files(const LazyList<N, LoraModuleList<float>>& modules,
                                const SaveOptions& options = {}) {
  return lora_adapter_files(modules.map(), options);
}

/// save_hra_adapters(dir, modules, options) for a braced list of float layers.
template <int N = 0>
void save_hra_adapters(const std::filesystem::path& dir,
                       const LazyList<N, HraModuleList<float>>& modules,
                       const SaveOptions& options = {}) {
  save_adapter_files(dir, hra_adapter_files(modules.map(), options));
}

/// save_lora_adapters(dir, modules, options) for a braced list of float layers.
template <int N = 0>
void save_lora_adapters(const std::filesystem::path& dir,
                        const LazyList<N, LoraModuleList<float>>& modules,
                        const SaveOptions& options = {}) {
  save_adapter_files(dir, lora_adapter_files(modules.map(), options));
}

/// hra_adapter_files(modules, options) for a braced list of double layers.
template <int N = 0>
AdapterFiles hra_adapter_files(const LazyList<N, HraModuleList<double>>& modules,
                               const SaveOptions& options = {}) {
  return hra_adapter_files(modules.map(), options);
}

/// lora_adapter_files(modules, options) for a braced list of double layers.
template <int N = 0>
AdapterFiles lora_adapter_files(const LazyList<N, LoraModuleList<double>>& modules,
                                const SaveOptions& options = {}) {
  return lora_adapter_files(modules.map(), options);
}

/// save_hra_adapters(dir, modules, options) for a braced list of double layers.
template <int N = 0>
void save_hra_adapters(const std::filesystem::path& dir,
                       const LazyList<N, HraModuleList<double>>& modules,
                       const SaveOptions& options = {}) {
  save_adapter_files(dir, hra_adapter_files(modules.map(), options));
}

/// save_lora_adapters(dir, modules, options) for a braced list of double layers.
template <int N = 0>
void save_lora_adapters(const std::filesystem::path& dir,
                        const LazyList<N, LoraModuleList<double>>& modules,
                        const SaveOptions& options = {}) {
  save_adapter_files(dir, lora_adapter_files(modules.map(), options));
}

}  // namespace peft
}  // namespace hra
