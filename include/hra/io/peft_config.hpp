// PEFT adapter directories, the config file: adapter_config.json parsed and validated into an
// AdapterConfig, PEFT's rank_pattern / alpha_pattern matching, and the errors of hra::peft.
#pragma once

#include <Eigen/Core>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../detail/checks.hpp"
#include "detail/atomic_dir.hpp"
#include "detail/json.hpp"
#include "detail/read_file.hpp"

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
///     hra/io/safetensors.hpp for the layout. (src/peft/tuners/hra/layer.py: hra_u is
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
///
/// The headers: hra/io/peft_config.hpp (this one: the config file, the errors),
/// hra/io/peft_modules.hpp (the module maps), hra/io/peft_load.hpp and hra/io/peft_save.hpp;
/// hra/io.hpp includes them all.
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

}  // namespace peft

namespace detail {

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

}  // namespace detail

namespace peft {

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
      if (detail::pattern_matches(key, module)) return rank;
    return r;
  }
  /// The lora_alpha PEFT gives `module`: its first matching alpha_pattern entry, else lora_alpha.
  double alpha_for(const std::string& module) const {
    for (const auto& [key, alpha] : alpha_pattern)
      if (detail::pattern_matches(key, module)) return alpha;
    return lora_alpha;
  }
  /// LoRA's scaling of `module`: alpha / r, or alpha / sqrt(r) with use_rslora.
  double lora_scaling_for(const std::string& module) const {
    const double rank = static_cast<double>(rank_for(module));
    const double alpha = alpha_for(module);
    return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
  }
};

}  // namespace peft

namespace detail {

using ConfigJson = nlohmann::ordered_json;

/// Configs nested deeper than this are refused while parsing (PEFT's need 3 levels).
constexpr int max_config_nesting = 32;
/// Longest adapter_config.json read from a directory.
constexpr std::uintmax_t max_config_bytes = 16u << 20;

/// Parses JSON text, refusing duplicate keys (Python keeps the last silently; an ambiguous config
/// is refused here) and absurd nesting, with config_error messages that start with `where`.
inline ConfigJson parse_config_json(std::string_view text, const std::string& where) {
  return parse_strict_json<ConfigJson, peft::config_error>(
      text, where, {max_config_nesting, "JSON nests deeper than", "not valid JSON"},
      [](const std::vector<std::string>&, const std::string& key) {
        return concat("key \"", key, "\" appears more than once in an object");
      });
}

/// A JSON value for an error message, shortened.
inline std::string show_json(const ConfigJson& value) {
  std::string text = value.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

/// Typed access to the fields of a config object, with messages naming the field and the file.
class ConfigFields {
 public:
  ConfigFields(const ConfigJson& object, std::string where, const char* type)
      : object_(object), where_(std::move(where)), type_(type) {}

  /// The field, or nullptr when it is absent or null (PEFT's default then applies).
  const ConfigJson* optional(const char* key) const {
    const auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  const ConfigJson& required(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end())
      throw peft::config_error(
          concat(where_, "required field \"", key, "\" is missing (peft_type ", type_, ")"));
    return *it;
  }

  std::string string(const char* key, const ConfigJson& v) const {
    if (!v.is_string()) wrong(key, "a string", v);
    return v.get<std::string>();
  }

  bool boolean(const char* key, const ConfigJson& v) const {
    if (!v.is_boolean()) wrong(key, "true or false", v);
    return v.get<bool>();
  }

  /// A positive integer that fits an Eigen::Index (and 32 bits, as any real rank does).
  Eigen::Index positive(const char* key, const ConfigJson& v) const {
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

  double number(const char* key, const ConfigJson& v) const {
    if (!v.is_number()) wrong(key, "a number", v);
    const double d = v.get<double>();
    if (!std::isfinite(d)) wrong(key, "a finite number", v);
    return d;
  }

  [[noreturn]] void wrong(const std::string& key, const char* expected, const ConfigJson& v) const {
    throw peft::config_error(
        concat(where_, "field \"", key, "\" must be ", expected, ", got ", show_json(v)));
  }

  [[noreturn]] void unsupported(const char* key, const std::string& why) const {
    throw peft::config_error(concat(where_, "field \"", key, "\": ", why));
  }

 private:
  const ConfigJson& object_;
  std::string where_;
  const char* type_;
};

/// config_error unless `config` is of `type`; `hint` ends the message (" (use load_...)").
inline void expect_peft_type(const peft::AdapterConfig& config, peft::PeftType type,
                             const char* hint = "") {
  if (config.peft_type != type)
    throw peft::config_error(concat("peft: ", config.source, ": peft_type is \"",
                                    peft::to_string(config.peft_type), "\", expected \"",
                                    peft::to_string(type), "\"", hint));
}

}  // namespace detail

namespace peft {

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
  using detail::ConfigJson;
  const std::string where = detail::concat("peft: ", source, ": ");
  AdapterConfig config;
  config.source = std::move(source);
  config.json = detail::parse_config_json(text, where);
  if (!config.json.is_object())
    throw config_error(
        detail::concat(where, "the config is a JSON ", config.json.type_name(), ", not an object"));

  // peft_type decides which fields are required, so it is read on its own first.
  const auto type_it = config.json.find("peft_type");
  if (type_it == config.json.end())
    throw config_error(where + "required field \"peft_type\" is missing");
  if (!type_it->is_string())
    throw config_error(detail::concat(where, "field \"peft_type\" must be a string, got ",
                                      detail::show_json(*type_it)));
  const std::string type = type_it->get<std::string>();
  if (type == "HRA")
    config.peft_type = PeftType::hra;
  else if (type == "LORA")
    config.peft_type = PeftType::lora;
  else
    throw config_error(detail::concat(where, "peft_type \"", type,
                                      "\" is not supported (hra reads \"HRA\" and \"LORA\")"));
  const bool hra = config.peft_type == PeftType::hra;
  const detail::ConfigFields f(config.json, where, to_string(config.peft_type));

  config.r = f.positive("r", f.required("r"));
  if (const ConfigJson* v = f.optional("bias")) {
    config.bias = f.string("bias", *v);
    const char* only = hra ? "hra_only" : "lora_only";
    if (config.bias != "none" && config.bias != "all" && config.bias != only)
      f.wrong("bias",
              hra ? "\"none\", \"all\" or \"hra_only\"" : "\"none\", \"all\" or \"lora_only\"", *v);
  }

  if (hra) {
    config.apply_gs = f.boolean("apply_GS", f.required("apply_GS"));
    if (const ConfigJson* v = f.optional("init_weights"))
      config.init_weights = f.boolean("init_weights", *v);
    return config;
  }

  config.lora_alpha = f.number("lora_alpha", f.required("lora_alpha"));
  if (const ConfigJson* v = f.optional("lora_dropout")) {
    config.lora_dropout = f.number("lora_dropout", *v);
    if (!(config.lora_dropout >= 0.0 && config.lora_dropout < 1.0))
      f.wrong("lora_dropout", "a probability in [0, 1)", *v);
  }
  if (const ConfigJson* v = f.optional("use_rslora"))
    config.use_rslora = f.boolean("use_rslora", *v);
  if (const ConfigJson* v = f.optional("fan_in_fan_out"); v && f.boolean("fan_in_fan_out", *v))
    f.unsupported("fan_in_fan_out",
                  "true (weights stored as (in, out), GPT-2's Conv1D) is not supported; hra "
                  "layers hold nn.Linear's (out, in) weights");
  if (const ConfigJson* v = f.optional("use_dora"); v && f.boolean("use_dora", *v))
    f.unsupported("use_dora", "true (DoRA) is not supported");
  if (const ConfigJson* v = f.optional("lora_bias"); v && f.boolean("lora_bias", *v))
    f.unsupported("lora_bias", "true (a bias on lora_B) is not supported");

  const auto read_pattern = [&](const char* key, auto&& value_of, auto& out) {
    const ConfigJson* v = f.optional(key);
    if (!v) return;
    if (!v->is_object()) f.wrong(key, "an object", *v);
    for (const auto& item : v->items()) {
      if (!detail::pattern_supported(item.key()))
        f.unsupported(key, detail::concat("key \"", item.key(),
                                          "\" uses regular-expression syntax hra does not "
                                          "evaluate (only literal names, '.' and escapes)"));
      out.emplace_back(item.key(), value_of(detail::concat(key, "[\"", item.key(), "\"]").c_str(),
                                            item.value()));
    }
  };
  read_pattern(
      "rank_pattern", [&](const char* k, const ConfigJson& v) { return f.positive(k, v); },
      config.rank_pattern);
  read_pattern(
      "alpha_pattern", [&](const char* k, const ConfigJson& v) { return f.number(k, v); },
      config.alpha_pattern);
  return config;
}

/// Reads and parses `dir`/adapter_config.json (io_error if it cannot be read or is larger than
/// 16 MiB, refused before it is read; config_error as for parse_config(), both naming the file).
/// A directory written by save_adapter_files() is read through its live version (..data).
inline AdapterConfig read_config(const std::filesystem::path& dir) {
  const std::string shown = (dir / config_file_name).string();
  std::optional<detail::InputFile<io_error>> in;
  detail::open_resolved(dir, [&](const detail::ResolvedDir& resolved, bool report_missing) {
    bool missing = false;
    in.reset();
    in.emplace(resolved.path(config_file_name), "peft: ", shown,
               report_missing ? nullptr : &missing);
    return !missing;
  });
  return parse_config(in->read_all(detail::max_config_bytes), shown);
}

}  // namespace peft
}  // namespace hra
