// PEFT adapter directories (adapter_config.json + adapter_model.safetensors): saving and loading
// the HRA and LoRA adapters of hra layers, so that adapters move between C++ and PEFT.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "detail/checks.hpp"
#include "hra_linear.hpp"
#include "io/detail/atomic_file.hpp"
#include "io/detail/json.hpp"
#include "io/detail/read_file.hpp"
#include "layer.hpp"
#include "lora_linear.hpp"
#include "reflector_chain.hpp"
#include "safetensors.hpp"

/// \brief PEFT adapter directories: what `PeftModel.save_pretrained` writes and
/// `PeftModel.from_pretrained` reads, for HRA (`peft_type` "HRA") and LoRA (`peft_type` "LORA").
///
/// A directory holds two files:
///   - `adapter_model.safetensors`: one tensor per adapter parameter, named as PEFT's
///     `get_peft_model_state_dict` names it (huggingface/peft src/peft/utils/save_and_load.py:
///     the model's state_dict key with the adapter name removed), with prefix
///     "base_model.model." and the module name as the user gives it (e.g. "net.fc1"):
///       HRA   `<prefix><module>.hra_u`            shape (in_features, r)   = U, d_in x r
///       LoRA  `<prefix><module>.lora_A.weight`    shape (r, in_features)   = A, r x d_in
///             `<prefix><module>.lora_B.weight`    shape (out_features, r)  = B, d_out x r
///       bias  `<prefix><module>.base_layer.bias`  shape (out_features,)    (see below)
///     Shapes are PyTorch's, and the Eigen matrices have the same (rows, cols); see
///     hra/safetensors.hpp for the layout. (src/peft/tuners/hra/layer.py: hra_u is
///     (in_features, r); src/peft/tuners/lora/layer.py: nn.Linear(in, r) / nn.Linear(r, out).)
///   - `adapter_config.json`: PEFT's config dataclass as JSON, keys sorted, indent 2
///     (src/peft/config.py, PeftConfigMixin.save_pretrained), with `inference_mode` true as
///     `PeftModel.save_pretrained` writes it. Fields written, from PeftConfig (src/peft/config.py)
///     and HRAConfig (src/peft/tuners/hra/config.py) or LoraConfig
///     (src/peft/tuners/lora/config.py):
///       common  peft_type, task_type, auto_mapping, base_model_name_or_path, revision,
///               inference_mode, target_modules (the module names), exclude_modules,
///               layers_to_transform, layers_pattern, modules_to_save, bias
///       HRA     r, apply_GS, init_weights
///       LoRA    r, lora_alpha, lora_dropout, fan_in_fan_out, use_rslora, use_dora, lora_bias,
///               init_lora_weights, rank_pattern, alpha_pattern, loftq_config, megatron_config,
///               megatron_core, layer_replication
///     (`peft_version` is left out: it names the PEFT release that wrote a file.)
///
/// Loading requires in the config: peft_type; r; for HRA apply_GS; for LoRA lora_alpha. It
/// reads with PEFT's defaults when absent: bias ("none"), init_weights, lora_dropout (0),
/// use_rslora (false), rank_pattern and alpha_pattern (empty). It refuses what it does not
/// compute: fan_in_fan_out, use_dora or lora_bias true, and pattern keys with regular-expression
/// syntax beyond '.' and backslash escapes (PEFT matches a key k as re.match(r"(.*\.)?(k)$",
/// module)). Other fields are kept in AdapterConfig::json and not interpreted.
///
/// Biases. With bias "all" or "lora_only", LoRA saves the trained bias of each wrapped layer as
/// `<module>.base_layer.bias` (PEFT's "all" also saves every other bias of the model, which are
/// then tensors of unmapped modules; PEFT releases before its state-dict refactor drop the bias
/// under "lora_only"). For HRA, get_peft_model_state_dict keeps only keys containing "hra_", so
/// PEFT never saves an HRA bias even when bias is "all" or "hra_only". hra writes the trained
/// bias of a layer whose bias is trainable (BiasMode other than none) under the same name in
/// both cases: PEFT's loader (load_state_dict with strict=False) assigns it to the wrapped
/// layer's bias. On loading, a bias tensor is optional; when present it needs a layer with a
/// trainable bias and a config whose bias is not "none".
///
/// Compatibility checks on loading (each a mismatch_error naming the file, the module, the
/// expected and the actual value): the layer's adapter rank equals r (or its rank_pattern
/// entry), HRA's variant equals apply_GS, tensor shapes equal the layer's (in_features,
/// out_features, r), LoRA's scaling alpha/r (alpha/sqrt(r) with use_rslora) equals the layer's
/// scaling() unless LoadOptions::rescale_lora_b folds the ratio into B, the adapter is not
/// merged. Every mapped module must have its tensors in the file, and every tensor must belong to
/// a mapped module (LoadOptions::allow_unmapped_tensors relaxes the latter for tensors outside
/// the mapped modules). Values must be finite, HRA columns non-zero (and independent for
/// Gram-Schmidt). Everything is validated before the first layer is written: after an
/// exception, no layer has changed.
///
/// Errors: config_error (adapter_config.json invalid, a field missing or of the wrong type, another
/// peft_type, an option hra does not compute), mismatch_error (the files do not fit the layers),
/// io_error (a directory or file that cannot be read or written) all derive from
/// hra::peft::error; the weights file's own problems throw hra::safetensors::error (format_error,
/// tensor_error, io_error), whose messages name the file and tensor. Every one is a
/// std::runtime_error. Saving throws std::invalid_argument for layers that a PEFT config cannot
/// describe (e.g. HRA adapters of different ranks) before any file is touched.
///
/// The module map: `{{"net.fc1", &layer1}, {"net.fc2", &layer2}}`, module names as in the
/// PyTorch model (no prefix). Functions come as templates over the scalar and as overloads taking
/// a ModuleList of float or double layers, so a braced list works without naming the scalar.
namespace hra {
namespace peft {

/// Name of the config file in an adapter directory.
inline constexpr const char* config_file_name = "adapter_config.json";
/// Name of the weights file in an adapter directory.
inline constexpr const char* weights_file_name = "adapter_model.safetensors";
/// PEFT's prefix of every tensor name (a PeftModel's `base_model.model`).
inline constexpr const char* default_prefix = "base_model.model.";

/// Base of the errors of this namespace (the weights file also throws safetensors::error).
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// adapter_config.json is not valid JSON, lacks a required field, has a field of the wrong type
/// or value, another peft_type, or an option hra does not compute.
class config_error : public error {
 public:
  using error::error;
};

/// The files are valid but do not fit the mapped layers: rank, variant, shape, scaling, a
/// missing or unexpected tensor, a merged adapter, unusable values (zero HRA column).
class mismatch_error : public error {
 public:
  using error::error;
};

/// A directory or the config file cannot be read or written.
class io_error : public error {
 public:
  using error::error;
};

/// The adapter kinds hra reads and writes.
enum class PeftType {
  hra,  ///< "HRA"
  lora  ///< "LORA"
};

/// PEFT's name of the type: "HRA" or "LORA".
inline const char* to_string(PeftType type) {
  return type == PeftType::hra ? "HRA" : "LORA";
}

namespace internal {

/// PEFT matches a rank_pattern / alpha_pattern key k against a module name m with
/// re.match(r"(.*\.)?(k)$", m) (get_pattern_key in src/peft/utils/other.py). hra evaluates keys
/// made of literal characters, '.' (any character) and backslash escapes of punctuation; false
/// for any other regular-expression syntax.
inline bool pattern_supported(std::string_view key) {
  if (key.empty()) return false;
  for (std::size_t i = 0; i < key.size(); ++i) {
    const char c = key[i];
    if (c == '\\') {
      if (++i == key.size()) return false;
      // \d, \w, \s, \b, ... are classes or anchors, not literals.
      if (std::isalnum(static_cast<unsigned char>(key[i]))) return false;
    } else if (std::strchr("^$*+?()[]{}|", c) != nullptr) {
      return false;
    }
  }
  return true;
}

/// Whether the supported pattern `key` matches `module` as re.match(r"(.*\.)?(key)$") does:
/// key covers a suffix of the module that is the whole name or follows a '.'.
inline bool pattern_matches(std::string_view key, std::string_view module) {
  std::vector<int> tokens;  // a byte, or -1 for '.' (any character)
  for (std::size_t i = 0; i < key.size(); ++i) {
    if (key[i] == '\\' && i + 1 < key.size())
      tokens.push_back(static_cast<unsigned char>(key[++i]));
    else
      tokens.push_back(key[i] == '.' ? -1 : static_cast<unsigned char>(key[i]));
  }
  if (tokens.size() > module.size()) return false;
  const std::size_t start = module.size() - tokens.size();
  if (start > 0 && module[start - 1] != '.') return false;
  for (std::size_t k = 0; k < tokens.size(); ++k)
    if (tokens[k] != -1 && tokens[k] != static_cast<unsigned char>(module[start + k])) return false;
  return true;
}

/// A module name as a pattern key that matches exactly that name (regex syntax escaped).
inline std::string escape_pattern(std::string_view module) {
  std::string out;
  for (char c : module) {
    if (std::strchr("\\^$*+?()[]{}|.", c) != nullptr && c != '\0') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace internal

/// \brief A parsed and validated adapter_config.json.
///
/// The fields hra interprets, with PEFT's defaults for the optional ones, plus the whole JSON
/// object as read (`json`, key order kept) for everything else (base_model_name_or_path,
/// target_modules, task_type, ...).
struct AdapterConfig {
  std::string source = "<memory>";     ///< the file it came from, named in error messages
  PeftType peft_type = PeftType::hra;  ///< "HRA" or "LORA"
  Eigen::Index r = 8;                  ///< rank of every module (LoRA: unless rank_pattern)
  std::string bias = "none";           ///< "none", "all", "hra_only" / "lora_only"
  bool apply_gs = false;               ///< HRA apply_GS: Gram-Schmidt variant
  bool init_weights = true;            ///< HRA init_weights (informational)
  double lora_alpha = 8.0;             ///< LoRA lora_alpha
  double lora_dropout = 0.0;           ///< LoRA lora_dropout (training only; not checked)
  bool use_rslora = false;             ///< LoRA scaling alpha/sqrt(r) instead of alpha/r
  /// LoRA rank_pattern / alpha_pattern: (key, value) in file order; the first match wins.
  std::vector<std::pair<std::string, Eigen::Index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  nlohmann::ordered_json json = nlohmann::ordered_json::object();  ///< the object as read

  /// The rank PEFT gives `module`: its first matching rank_pattern entry, else r.
  Eigen::Index rank_for(const std::string& module) const {
    for (const auto& [key, rank] : rank_pattern)
      if (internal::pattern_matches(key, module)) return rank;
    return r;
  }
  /// The lora_alpha PEFT gives `module`: its first matching alpha_pattern entry, else lora_alpha.
  double alpha_for(const std::string& module) const {
    for (const auto& [key, alpha] : alpha_pattern)
      if (internal::pattern_matches(key, module)) return alpha;
    return lora_alpha;
  }
  /// LoRA's scaling of `module`: alpha / r, or alpha / sqrt(r) with use_rslora.
  double lora_scaling_for(const std::string& module) const {
    const double rank = static_cast<double>(rank_for(module));
    const double alpha = alpha_for(module);
    return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
  }
};

namespace internal {

using ojson = nlohmann::ordered_json;

/// Configs nested deeper than this are refused while parsing (PEFT's need 3 levels).
constexpr int max_config_nesting = 32;
/// Longest adapter_config.json read from a directory.
constexpr std::uintmax_t max_config_bytes = 16u << 20;

/// Parses JSON text, refusing duplicate keys (Python keeps the last silently; an ambiguous config
/// is refused here) and absurd nesting, with config_error messages that start with `where`.
inline ojson parse_json(std::string_view text, const std::string& where) {
  return detail::parse_strict_json<ojson, config_error>(
      text, where, {max_config_nesting, "JSON nests deeper than", "not valid JSON"},
      [](const std::vector<std::string>&, const std::string& key) {
        return detail::concat("key \"", key, "\" appears more than once in an object");
      });
}

/// A JSON value for an error message, shortened.
inline std::string show(const ojson& value) {
  std::string text = value.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

/// Typed access to the fields of a config object, with messages naming the field and the file.
class Fields {
 public:
  Fields(const ojson& object, std::string where, const char* type)
      : object_(object), where_(std::move(where)), type_(type) {}

  /// The field, or nullptr when it is absent or null (PEFT's default then applies).
  const ojson* optional(const char* key) const {
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  const ojson& required(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end())
      throw config_error(detail::concat(where_, "required field \"", key,
                                        "\" is missing (peft_type ", type_, ")"));
    return *it;
  }

  std::string string(const char* key, const ojson& v) const {
    if (!v.is_string()) wrong(key, "a string", v);
    return v.get<std::string>();
  }

  bool boolean(const char* key, const ojson& v) const {
    if (!v.is_boolean()) wrong(key, "true or false", v);
    return v.get<bool>();
  }

  /// A positive integer that fits an Eigen::Index (and 32 bits, as any real rank does).
  Eigen::Index positive(const char* key, const ojson& v) const {
    constexpr std::int64_t max = std::numeric_limits<std::int32_t>::max();
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u >= 1 && u <= static_cast<std::uint64_t>(max)) return static_cast<Eigen::Index>(u);
    } else if (v.is_number_integer()) {
      const auto i = v.get<std::int64_t>();
      if (i >= 1 && i <= max) return static_cast<Eigen::Index>(i);
    }
    wrong(key, "a positive integer", v);
  }

  double number(const char* key, const ojson& v) const {
    if (!v.is_number()) wrong(key, "a number", v);
    const double d = v.get<double>();
    if (!std::isfinite(d)) wrong(key, "a finite number", v);
    return d;
  }

  [[noreturn]] void wrong(const std::string& key, const char* expected, const ojson& v) const {
    throw config_error(
        detail::concat(where_, "field \"", key, "\" must be ", expected, ", got ", show(v)));
  }

  [[noreturn]] void unsupported(const char* key, const std::string& why) const {
    throw config_error(detail::concat(where_, "field \"", key, "\": ", why));
  }

 private:
  const ojson& object_;
  std::string where_;
  const char* type_;
};

}  // namespace internal

/// \brief Parses adapter_config.json text; `source` names it in error messages.
///
/// Requires an object with peft_type "HRA" or "LORA" and a positive integer r; for HRA a
/// boolean apply_GS, for LoRA a finite number lora_alpha. Optional fields take PEFT's defaults
/// when absent or null and must have the right type when present: bias (one of "none", "all",
/// "hra_only" / "lora_only"), init_weights, lora_dropout (in [0, 1)), use_rslora, rank_pattern
/// and alpha_pattern (objects of positive integers / finite numbers with supported keys).
/// fan_in_fan_out, use_dora and lora_bias must be false when present. Throws config_error
/// naming `source` and the field.
inline AdapterConfig parse_config(std::string_view text, std::string source = "<memory>") {
  using internal::ojson;
  const std::string where = detail::concat("peft: ", source, ": ");
  AdapterConfig config;
  config.source = std::move(source);
  config.json = internal::parse_json(text, where);
  if (!config.json.is_object())
    throw config_error(
        detail::concat(where, "the config is a JSON ", config.json.type_name(), ", not an object"));

  // peft_type decides which fields are required, so it is read on its own first.
  const auto type_it = config.json.find("peft_type");
  if (type_it == config.json.end())
    throw config_error(where + "required field \"peft_type\" is missing");
  if (!type_it->is_string())
    throw config_error(detail::concat(where, "field \"peft_type\" must be a string, got ",
                                      internal::show(*type_it)));
  const std::string type = type_it->get<std::string>();
  if (type == "HRA")
    config.peft_type = PeftType::hra;
  else if (type == "LORA")
    config.peft_type = PeftType::lora;
  else
    throw config_error(detail::concat(where, "peft_type \"", type,
                                      "\" is not supported (hra reads \"HRA\" and \"LORA\")"));
  const bool hra = config.peft_type == PeftType::hra;
  const internal::Fields f(config.json, where, to_string(config.peft_type));

  config.r = f.positive("r", f.required("r"));
  if (const ojson* v = f.optional("bias")) {
    config.bias = f.string("bias", *v);
    const char* only = hra ? "hra_only" : "lora_only";
    if (config.bias != "none" && config.bias != "all" && config.bias != only)
      f.wrong("bias",
              hra ? "\"none\", \"all\" or \"hra_only\"" : "\"none\", \"all\" or \"lora_only\"", *v);
  }

  if (hra) {
    config.apply_gs = f.boolean("apply_GS", f.required("apply_GS"));
    if (const ojson* v = f.optional("init_weights"))
      config.init_weights = f.boolean("init_weights", *v);
    return config;
  }

  config.lora_alpha = f.number("lora_alpha", f.required("lora_alpha"));
  if (const ojson* v = f.optional("lora_dropout")) {
    config.lora_dropout = f.number("lora_dropout", *v);
    if (!(config.lora_dropout >= 0.0 && config.lora_dropout < 1.0))
      f.wrong("lora_dropout", "a probability in [0, 1)", *v);
  }
  if (const ojson* v = f.optional("use_rslora")) config.use_rslora = f.boolean("use_rslora", *v);
  if (const ojson* v = f.optional("fan_in_fan_out"); v && f.boolean("fan_in_fan_out", *v))
    f.unsupported("fan_in_fan_out",
                  "true (weights stored as (in, out), GPT-2's Conv1D) is not supported; hra "
                  "layers hold nn.Linear's (out, in) weights");
  if (const ojson* v = f.optional("use_dora"); v && f.boolean("use_dora", *v))
    f.unsupported("use_dora", "true (DoRA) is not supported");
  if (const ojson* v = f.optional("lora_bias"); v && f.boolean("lora_bias", *v))
    f.unsupported("lora_bias", "true (a bias on lora_B) is not supported");

  const auto read_pattern = [&](const char* key, auto&& value_of, auto& out) {
    const ojson* v = f.optional(key);
    if (!v) return;
    if (!v->is_object()) f.wrong(key, "an object", *v);
    for (const auto& item : v->items()) {
      if (!internal::pattern_supported(item.key()))
        f.unsupported(key, detail::concat("key \"", item.key(),
                                          "\" uses regular-expression syntax hra does not "
                                          "evaluate (only literal names, '.' and escapes)"));
      out.emplace_back(item.key(), value_of(detail::concat(key, "[\"", item.key(), "\"]").c_str(),
                                            item.value()));
    }
  };
  read_pattern(
      "rank_pattern", [&](const char* k, const ojson& v) { return f.positive(k, v); },
      config.rank_pattern);
  read_pattern(
      "alpha_pattern", [&](const char* k, const ojson& v) { return f.number(k, v); },
      config.alpha_pattern);
  return config;
}

/// Reads and parses `dir`/adapter_config.json (io_error if it cannot be read, config_error as
/// for parse_config(), both naming the file).
inline AdapterConfig read_config(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / config_file_name;
  return parse_config(detail::read_file<io_error>(path, "peft: ", internal::max_config_bytes),
                      path.string());
}

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

/// \brief The two files of an adapter directory, in memory.
struct AdapterFiles {
  nlohmann::json config;            ///< adapter_config.json (keys sorted, as PEFT writes them)
  safetensors::TensorFile weights;  ///< adapter_model.safetensors

  /// The config as PEFT writes it: json.dumps(indent=2, sort_keys=True), ASCII with \u escapes.
  std::string config_text() const { return config.dump(2, ' ', true); }
};

namespace internal {

template <typename Scalar>
constexpr safetensors::Dtype default_dtype() {
  return safetensors::natural_dtype<Scalar>();
}

inline std::string module_where(const std::string& source, const std::string& module) {
  return detail::concat("peft: ", source, ": module '", module, "': ");
}

/// The tensor `name` of module `module`, checked for presence and shape (mismatch_error naming
/// the file, the module, the expected and the actual shape; `meaning` explains the dimensions).
inline void expect_tensor(const safetensors::TensorFile& weights, const std::string& module,
                          const std::string& name, const std::vector<std::int64_t>& shape,
                          const std::string& meaning) {
  if (!weights.contains(name))
    throw mismatch_error(detail::concat(module_where(weights.source(), module), "tensor '", name,
                                        "' is missing (the file has ", weights.size(),
                                        " tensors; is the prefix right?)"));
  const auto& actual = weights.at(name).shape;
  if (actual != shape)
    throw mismatch_error(detail::concat(module_where(weights.source(), module), "tensor '", name,
                                        "' has shape ", safetensors::shape_string(actual),
                                        ", expected ", safetensors::shape_string(shape), " ",
                                        meaning));
}

/// The trained bias of `module` if the file has one, validated against the layer.
template <typename Layer>
std::optional<typename Layer::Vector> read_bias(const AdapterConfig& config,
                                                const safetensors::TensorFile& weights,
                                                const std::string& module, const Layer& layer,
                                                const std::string& prefix,
                                                std::set<std::string>& claimed) {
  using Scalar = typename Layer::Scalar;
  const std::string name = prefix + module + ".base_layer.bias";
  if (!weights.contains(name)) return std::nullopt;
  const std::string where = module_where(weights.source(), module);
  if (config.bias == "none")
    throw mismatch_error(detail::concat(where, "tensor '", name, "' is a trained bias, but ",
                                        config.source, " has bias \"none\""));
  if (!layer.bias() || layer.bias_mode() == BiasMode::none)
    throw mismatch_error(detail::concat(
        where, "tensor '", name, "' is a trained bias (config bias \"", config.bias,
        "\"), but the layer's bias is ",
        layer.bias() ? "frozen (BiasMode::none)" : "absent (the layer was built without one)",
        "; expected a layer with a trainable bias (BiasMode::all or adapter_only)"));
  expect_tensor(
      weights, module, name, {static_cast<std::int64_t>(layer.output_dim())},
      detail::concat("(out_features,): the layer's out_features is ", layer.output_dim()));
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
        throw mismatch_error(detail::concat(module_where(weights.source(), entry.first),
                                            "unexpected tensor '", name, "' (hra reads only ",
                                            known, " for this adapter)"));
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
      throw mismatch_error(detail::concat(
          "peft: ", weights.source(), ": tensor '", name, "' belongs to no mapped module (mapped: ",
          mapped, "); set LoadOptions::allow_unmapped_tensors to ignore such tensors"));
    }
  }
}

template <typename Modules>
void check_layers(const Modules& modules, const char* what) {
  for (const auto& [module, layer] : modules) {
    if (module.empty()) detail::throw_invalid("peft: ", what, ": an empty module name");
    if (!layer) detail::throw_invalid("peft: ", what, ": module '", module, "': null layer");
  }
}

}  // namespace internal

/// \brief Loads HRA adapters from parsed files into the mapped layers (the memory-level entry
/// point; load_hra_adapters(dir, ...) reads the files and calls this).
///
/// For every module: U (d_in x r) from `<prefix><module>.hra_u` goes into the adapter
/// `options.adapter_name` of its layer, and a trained bias `<prefix><module>.base_layer.bias`,
/// if present, into the layer's bias. Checks everything listed in the namespace comment before
/// changing any layer; on an exception no layer has changed.
template <typename Scalar>
void load_hra_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                       const HraModules<Scalar>& modules, const LoadOptions& options = {}) {
  using Layer = HraLinear<Scalar>;
  using Matrix = typename Layer::Matrix;
  internal::check_layers(modules, "load_hra_adapters");
  if (config.peft_type != PeftType::hra)
    throw config_error(detail::concat("peft: ", config.source, ": peft_type is \"",
                                      to_string(config.peft_type),
                                      "\", expected \"HRA\" (use load_lora_adapters)"));
  const Variant variant = config.apply_gs ? Variant::gram_schmidt : Variant::chain;
  struct Assignment {
    Layer* layer;
    Matrix u;
    std::optional<typename Layer::Vector> bias;
  };
  std::vector<Assignment> plan;
  std::set<std::string> claimed;
  for (const auto& [module, layer] : modules) {
    const std::string at_config = internal::module_where(config.source, module);
    const typename Layer::Adapter* adapter = nullptr;
    for (const auto& a : layer->adapters())
      if (a.name() == options.adapter_name) adapter = &a;
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
    internal::expect_tensor(
        weights, module, name, {layer->input_dim(), config.r},
        detail::concat("(in_features, r): the layer's in_features is ", layer->input_dim(),
                       " and the config has r = ", config.r));
    Matrix u = weights.get_matrix<Scalar>(name);
    try {
      // The checks of set_reflectors and of a forward (zero, overflowing or, for Gram-Schmidt,
      // dependent columns), on a copy.
      ReflectorChain<Scalar>(u, variant, adapter->chain().block_size()).factorize();
    } catch (const std::invalid_argument& e) {
      throw mismatch_error(detail::concat(internal::module_where(weights.source(), module),
                                          "tensor '", name, "' is not a usable U: ", e.what()));
    }
    claimed.insert(name);
    auto bias = internal::read_bias(config, weights, module, *layer, options.prefix, claimed);
    plan.push_back({layer, std::move(u), std::move(bias)});
  }
  internal::check_unclaimed(weights, modules, claimed, options.prefix,
                            options.allow_unmapped_tensors, "hra_u and base_layer.bias");
  for (auto& a : plan) {
    a.layer->set_reflectors(options.adapter_name, a.u);
    if (a.bias) a.layer->set_bias(*a.bias);
  }
}

/// \brief Loads LoRA adapters from parsed files into the mapped layers (memory-level entry point).
///
/// For every module: A (r x d_in) from `<prefix><module>.lora_A.weight`, B (d_out x r) from
/// `<prefix><module>.lora_B.weight` and a trained bias if present. The file's scaling
/// (config.lora_scaling_for(module)) must equal the layer's scaling() to a relative 1e-9, unless
/// options.rescale_lora_b. Checks everything before changing any layer.
template <typename Scalar>
void load_lora_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                        const LoraModules<Scalar>& modules, const LoadOptions& options = {}) {
  using Layer = LoraLinear<Scalar>;
  using Matrix = typename Layer::Matrix;
  internal::check_layers(modules, "load_lora_adapters");
  if (config.peft_type != PeftType::lora)
    throw config_error(detail::concat("peft: ", config.source, ": peft_type is \"",
                                      to_string(config.peft_type),
                                      "\", expected \"LORA\" (use load_hra_adapters)"));
  struct Assignment {
    Layer* layer;
    Matrix a, b;
    std::optional<typename Layer::Vector> bias;
  };
  std::vector<Assignment> plan;
  std::set<std::string> claimed;
  for (const auto& [module, layer] : modules) {
    const std::string at_config = internal::module_where(config.source, module);
    if (layer->merged())
      throw mismatch_error(at_config + "the layer's adapter is merged into W; unmerge() it first");
    const Eigen::Index rank = config.rank_for(module);
    if (layer->options().rank != rank)
      throw mismatch_error(detail::concat(at_config, "the config gives r = ", rank,
                                          rank == config.r ? "" : " (rank_pattern)",
                                          ", the layer has rank ", layer->options().rank));
    const std::string name_a = options.prefix + module + ".lora_A.weight";
    const std::string name_b = options.prefix + module + ".lora_B.weight";
    internal::expect_tensor(weights, module, name_a, {rank, layer->input_dim()},
                            detail::concat("(r, in_features): r = ", rank,
                                           ", the layer's in_features is ", layer->input_dim()));
    internal::expect_tensor(weights, module, name_b, {layer->output_dim(), rank},
                            detail::concat("(out_features, r): the layer's out_features is ",
                                           layer->output_dim(), ", r = ", rank));
    Matrix a = weights.get_matrix<Scalar>(name_a);
    Matrix b = weights.get_matrix<Scalar>(name_b);

    const double file_scaling = config.lora_scaling_for(module);
    const double layer_scaling =
        layer->options().alpha / static_cast<double>(layer->options().rank);
    if (std::abs(file_scaling - layer_scaling) >
        1e-9 * std::max(std::abs(file_scaling), std::abs(layer_scaling))) {
      const std::string both = detail::concat(
          "the config's scaling is ", file_scaling, " (lora_alpha ", config.alpha_for(module),
          config.use_rslora ? " / sqrt(r)" : " / r", "), the layer's is ", layer_scaling,
          " (alpha ", layer->options().alpha, " / r)");
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
    auto bias = internal::read_bias(config, weights, module, *layer, options.prefix, claimed);
    plan.push_back({layer, std::move(a), std::move(b), std::move(bias)});
  }
  internal::check_unclaimed(weights, modules, claimed, options.prefix,
                            options.allow_unmapped_tensors,
                            "lora_A.weight, lora_B.weight and base_layer.bias");
  for (auto& p : plan) {
    p.layer->set_lora_weights(p.a, p.b);
    if (p.bias) p.layer->set_bias(*p.bias);
  }
}

namespace internal {

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

inline void add_extra_config(nlohmann::json& config, const SaveOptions& options, const char* what) {
  if (options.extra_config.is_null()) return;
  if (!options.extra_config.is_object())
    detail::throw_invalid("peft: ", what, ": SaveOptions::extra_config must be a JSON object, got ",
                          options.extra_config.type_name());
  for (const auto& item : options.extra_config.items()) {
    if (computed_field(item.key()))
      detail::throw_invalid("peft: ", what, ": SaveOptions::extra_config may not set \"",
                            item.key(), "\" (it is computed from the layers)");
    config[item.key()] = item.value();
  }
}

/// PeftConfig's fields and the ones HRAConfig and LoraConfig share, as PeftModel.save_pretrained
/// writes them.
inline nlohmann::json common_config(const char* peft_type, const std::vector<std::string>& modules,
                                    const std::string& bias, const SaveOptions& options) {
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
  switch (mode) {
    case BiasMode::none:
      return "BiasMode::none";
    case BiasMode::all:
      return "BiasMode::all";
    case BiasMode::adapter_only:
      return "BiasMode::adapter_only";
  }
  return "?";
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
      detail::throw_invalid("peft: ", what, ": modules '", first, "' (", bias_mode_name(*mode),
                            ") and '", module, "' (", bias_mode_name(layer->bias_mode()),
                            ") train their biases differently; PEFT's config has one bias setting");
    }
  }
  if (!mode || *mode == BiasMode::none) return "none";
  return *mode == BiasMode::all ? "all" : adapter_only;
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
    detail::throw_invalid(where, "cannot save tensor '", name, "' as ",
                          safetensors::to_string(dtype), ": ", e.what());
  }
}

template <typename Layer>
void put_bias(safetensors::TensorFile& weights, const Layer& layer, const std::string& bias,
              const std::string& name, safetensors::Dtype dtype, const std::string& where) {
  if (bias == "none" || !layer.bias()) return;
  put_checked(weights, name, *layer.bias(), dtype, where, /*vector=*/true);
}

}  // namespace internal

/// \brief The files that save_hra_adapters() writes, in memory (the memory-level entry point).
///
/// One `<prefix><module>.hra_u` tensor (in_features, r) per module from the adapter
/// `options.adapter_name`, the trained biases when the layers' biases are trainable, and the
/// HRAConfig fields: r and apply_GS (the same for every module: HRAConfig has no rank_pattern),
/// init_weights (true when every adapter used the symmetric init), bias ("none", "all" or
/// "hra_only" from the layers' BiasMode, which must agree), target_modules (the module names).
/// std::invalid_argument for a null layer, a missing adapter, different ranks or variants,
/// values that are not finite in the chosen dtype or U that would not load back (zero or, for
/// Gram-Schmidt, dependent columns).
template <typename Scalar>
AdapterFiles hra_adapter_files(const HraModules<Scalar>& modules, const SaveOptions& options = {}) {
  const char* what = "save_hra_adapters";
  internal::check_layers(modules, what);
  if (modules.empty()) detail::throw_invalid("peft: ", what, ": no modules to save");
  const safetensors::Dtype dtype = options.dtype.value_or(internal::default_dtype<Scalar>());
  AdapterFiles files;
  files.weights.metadata()["format"] = "pt";  // what PEFT's save_pretrained passes
  const std::string bias = internal::bias_field(modules, "hra_only", what);
  Eigen::Index r = 0;
  Variant variant = Variant::chain;
  std::string first;
  bool symmetric = true;
  std::vector<std::string> names;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    const typename HraLinear<Scalar>::Adapter* adapter = nullptr;
    for (const auto& a : layer->adapters())
      if (a.name() == options.adapter_name) adapter = &a;
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
    const Eigen::MatrixXd stored =
        internal::put_checked(files.weights, name, adapter->chain().reflectors(), dtype, where);
    try {
      ReflectorChain<double>(stored, variant).factorize();
    } catch (const std::invalid_argument& e) {
      detail::throw_invalid(where, "U would not load back from tensor '", name, "': ", e.what());
    }
    internal::put_bias(files.weights, *layer, bias, options.prefix + module + ".base_layer.bias",
                       dtype, where);
    names.push_back(module);
  }
  files.config = internal::common_config("HRA", names, bias, options);
  files.config["apply_GS"] = variant == Variant::gram_schmidt;
  files.config["init_weights"] = symmetric;
  files.config["r"] = r;
  internal::add_extra_config(files.config, options, what);
  return files;
}

/// \brief The files that save_lora_adapters() writes, in memory (the memory-level entry point).
///
/// `<prefix><module>.lora_A.weight` (r, in_features) and `.lora_B.weight` (out_features, r) per
/// module, the trained biases when trainable, and the LoraConfig fields: r and lora_alpha are
/// the most common rank and alpha (ties: the first module's), the other modules get
/// rank_pattern / alpha_pattern entries keyed by their escaped names; use_rslora false (the
/// layers scale by alpha / r); lora_dropout (the same for every module); bias ("none", "all" or
/// "lora_only"). std::invalid_argument for a null layer, different dropouts or biases,
/// non-finite values in the dtype, or module names whose patterns would also match another
/// module.
template <typename Scalar>
AdapterFiles lora_adapter_files(const LoraModules<Scalar>& modules,
                                const SaveOptions& options = {}) {
  const char* what = "save_lora_adapters";
  internal::check_layers(modules, what);
  if (modules.empty()) detail::throw_invalid("peft: ", what, ": no modules to save");
  const safetensors::Dtype dtype = options.dtype.value_or(internal::default_dtype<Scalar>());
  AdapterFiles files;
  files.weights.metadata()["format"] = "pt";
  const std::string bias = internal::bias_field(modules, "lora_only", what);

  // The most common rank and alpha become r and lora_alpha (first module wins ties).
  const auto most_common = [&](auto value_of) {
    using Value = decltype(value_of(*modules.begin()->second));
    std::vector<std::pair<Value, int>> counts;
    for (const auto& entry : modules) {
      const Value v = value_of(*entry.second);
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
  const Eigen::Index r = most_common([](const LoraLinear<Scalar>& l) { return l.options().rank; });
  const double alpha = most_common([](const LoraLinear<Scalar>& l) { return l.options().alpha; });
  const double dropout = modules.begin()->second->options().dropout;

  nlohmann::json rank_pattern = nlohmann::json::object();
  nlohmann::json alpha_pattern = nlohmann::json::object();
  std::vector<std::string> names;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    const LoraOptions& o = layer->options();
    if (o.dropout != dropout)
      detail::throw_invalid(where, "dropout ", o.dropout, " differs from module '",
                            modules.begin()->first, "' (", dropout,
                            "); PEFT's LoraConfig has one lora_dropout");
    if (o.rank != r) rank_pattern[internal::escape_pattern(module)] = o.rank;
    if (o.alpha != alpha)
      alpha_pattern[internal::escape_pattern(module)] = internal::json_number(o.alpha);
    internal::put_checked(files.weights, options.prefix + module + ".lora_A.weight",
                          layer->lora_a(), dtype, where);
    internal::put_checked(files.weights, options.prefix + module + ".lora_B.weight",
                          layer->lora_b(), dtype, where);
    internal::put_bias(files.weights, *layer, bias, options.prefix + module + ".base_layer.bias",
                       dtype, where);
    names.push_back(module);
  }
  files.config = internal::common_config("LORA", names, bias, options);
  files.config["alpha_pattern"] = alpha_pattern;
  files.config["fan_in_fan_out"] = false;
  files.config["init_lora_weights"] = true;
  files.config["layer_replication"] = nullptr;
  files.config["loftq_config"] = nlohmann::json::object();
  files.config["lora_alpha"] = internal::json_number(alpha);
  files.config["lora_bias"] = false;
  files.config["lora_dropout"] = dropout;
  files.config["megatron_config"] = nullptr;
  files.config["megatron_core"] = "megatron.core";
  files.config["r"] = r;
  files.config["rank_pattern"] = rank_pattern;
  files.config["use_dora"] = false;
  files.config["use_rslora"] = false;
  internal::add_extra_config(files.config, options, what);

  // PEFT gives each module the first pattern that matches a suffix of its name, so a module
  // whose name ends another's could pick up the wrong entry: read the config back as PEFT would.
  const AdapterConfig check = parse_config(files.config_text(), "<config being saved>");
  for (const auto& [module, layer] : modules)
    if (check.rank_for(module) != layer->options().rank ||
        check.alpha_for(module) != layer->options().alpha)
      detail::throw_invalid("peft: ", what, ": module '", module,
                            "': its rank or alpha cannot be expressed by rank_pattern / "
                            "alpha_pattern without also matching another module's name");
  return files;
}

/// \brief Writes `files` into the directory `dir` (created if needed) as
/// adapter_model.safetensors and adapter_config.json.
///
/// Guarantee: both files are serialised first (conversion errors touch nothing), then each is
/// written to a temporary file in `dir`, flushed and renamed over its target, weights first. If
/// writing the config fails, the previous weights file is put back (or the new one removed
/// when there was none), so after an exception both files are as they were (io_error naming
/// the path; it says so if even putting back failed). A crash (power loss) between the two
/// renames can leave the new weights beside the old config; loading then refuses the pair if
/// they do not fit each other or the layers.
inline void save_adapter_files(const std::filesystem::path& dir, const AdapterFiles& files) {
  namespace fs = std::filesystem;
  const std::string where = detail::concat("peft: ", dir.string(), ": ");
  std::string config_text;
  try {
    config_text = files.config_text();
  } catch (const nlohmann::json::exception& e) {
    detail::throw_invalid(where, "the config has a string that is not valid UTF-8: ", e.what());
  }
  const std::string weights_bytes = safetensors::serialize(files.weights);

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir))
    throw io_error(where + "cannot create the directory" + (ec ? ": " + ec.message() : ""));
  const fs::path weights_path = dir / weights_file_name;
  const fs::path config_path = dir / config_file_name;
  std::optional<std::string> previous;  // the weights file being replaced
  if (fs::exists(weights_path, ec)) previous = detail::read_file<io_error>(weights_path, "peft: ");

  try {
    detail::replace_file_atomically<io_error>(weights_path, weights_bytes, "peft: ");
  } catch (const io_error& e) {
    throw io_error(std::string(e.what()) + "; nothing was changed");
  }
  try {
    detail::replace_file_atomically<io_error>(config_path, config_text, "peft: ");
  } catch (const io_error& e) {
    std::string outcome = "; the previous adapter files are left as they were";
    try {
      if (previous) {
        detail::replace_file_atomically<io_error>(weights_path, *previous, "peft: ");
      } else if (!fs::remove(weights_path, ec) || ec) {
        throw io_error("remove failed");
      }
    } catch (const std::exception&) {
      outcome = "; putting the previous " + std::string(weights_file_name) +
                " back failed too, so the directory holds the new weights with the old config";
    }
    throw io_error(e.what() + outcome);
  }
}

/// Saves the adapter `options.adapter_name` of every mapped HraLinear as a PEFT HRA adapter
/// directory (see hra_adapter_files() and save_adapter_files()).
template <typename Scalar>
void save_hra_adapters(const std::filesystem::path& dir, const HraModules<Scalar>& modules,
                       const SaveOptions& options = {}) {
  save_adapter_files(dir, hra_adapter_files(modules, options));
}

/// Saves every mapped LoraLinear as a PEFT LoRA adapter directory (see lora_adapter_files()).
template <typename Scalar>
void save_lora_adapters(const std::filesystem::path& dir, const LoraModules<Scalar>& modules,
                        const SaveOptions& options = {}) {
  save_adapter_files(dir, lora_adapter_files(modules, options));
}

namespace internal {

inline AdapterConfig read_config_of_type(const std::filesystem::path& dir, PeftType type) {
  AdapterConfig config = read_config(dir);
  if (config.peft_type != type)
    throw config_error(detail::concat("peft: ", config.source, ": peft_type is \"",
                                      to_string(config.peft_type), "\", expected \"",
                                      to_string(type), "\""));
  return config;
}

}  // namespace internal

/// \brief Loads the PEFT HRA adapter directory `dir` into the mapped layers and returns its
/// config. Reads adapter_config.json (io_error / config_error), then adapter_model.safetensors
/// (safetensors::error), then validates and assigns as the memory-level load_hra_adapters().
template <typename Scalar>
AdapterConfig load_hra_adapters(const std::filesystem::path& dir, const HraModules<Scalar>& modules,
                                const LoadOptions& options = {}) {
  AdapterConfig config = internal::read_config_of_type(dir, PeftType::hra);
  const safetensors::TensorFile weights = safetensors::load(dir / weights_file_name, options.read);
  load_hra_adapters(config, weights, modules, options);
  return config;
}

/// \brief Loads the PEFT LoRA adapter directory `dir` into the mapped layers and returns its
/// config (see load_hra_adapters(dir, ...)).
template <typename Scalar>
AdapterConfig load_lora_adapters(const std::filesystem::path& dir,
                                 const LoraModules<Scalar>& modules,
                                 const LoadOptions& options = {}) {
  AdapterConfig config = internal::read_config_of_type(dir, PeftType::lora);
  const safetensors::TensorFile weights = safetensors::load(dir / weights_file_name, options.read);
  load_lora_adapters(config, weights, modules, options);
  return config;
}

// The saving and loading functions for a braced list of float or double layers (see ModuleList).

/// hra_adapter_files(modules, options) for a braced list.
inline AdapterFiles hra_adapter_files(const HraModuleList& modules,
                                      const SaveOptions& options = {}) {
  return modules.visit([&](const auto& map) { return hra_adapter_files(map, options); });
}

/// lora_adapter_files(modules, options) for a braced list.
inline AdapterFiles lora_adapter_files(const LoraModuleList& modules,
                                       const SaveOptions& options = {}) {
  return modules.visit([&](const auto& map) { return lora_adapter_files(map, options); });
}

/// save_hra_adapters(dir, modules, options) for a braced list.
inline void save_hra_adapters(const std::filesystem::path& dir, const HraModuleList& modules,
                              const SaveOptions& options = {}) {
  save_adapter_files(dir, hra_adapter_files(modules, options));
}

/// save_lora_adapters(dir, modules, options) for a braced list.
inline void save_lora_adapters(const std::filesystem::path& dir, const LoraModuleList& modules,
                               const SaveOptions& options = {}) {
  save_adapter_files(dir, lora_adapter_files(modules, options));
}

/// load_hra_adapters(config, weights, modules, options) for a braced list.
inline void load_hra_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                              const HraModuleList& modules, const LoadOptions& options = {}) {
  modules.visit([&](const auto& map) { load_hra_adapters(config, weights, map, options); });
}

/// load_lora_adapters(config, weights, modules, options) for a braced list.
inline void load_lora_adapters(const AdapterConfig& config, const safetensors::TensorFile& weights,
                               const LoraModuleList& modules, const LoadOptions& options = {}) {
  modules.visit([&](const auto& map) { load_lora_adapters(config, weights, map, options); });
}

/// load_hra_adapters(dir, modules, options) for a braced list.
inline AdapterConfig load_hra_adapters(const std::filesystem::path& dir,
                                       const HraModuleList& modules,
                                       const LoadOptions& options = {}) {
  return modules.visit([&](const auto& map) { return load_hra_adapters(dir, map, options); });
}

/// load_lora_adapters(dir, modules, options) for a braced list.
inline AdapterConfig load_lora_adapters(const std::filesystem::path& dir,
                                        const LoraModuleList& modules,
                                        const LoadOptions& options = {}) {
  return modules.visit([&](const auto& map) { return load_lora_adapters(dir, map, options); });
}

}  // namespace peft
}  // namespace hra
