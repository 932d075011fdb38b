// Training checkpoints: parameters, optimiser state (moments, step counts, learning rate),
// random generators and the caller's metadata, written through the atomic directory writer of
// adapter saves and restored only after every check has passed.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../hash.hpp"
#include "../layer.hpp"
#include "../optim.hpp"
#include "../reflector_chain.hpp"
#include "detail/atomic_dir.hpp"
#include "detail/read_file.hpp"
#include "safetensors.hpp"

namespace hra {
namespace checkpoint {

/// A checkpoint could not be written or read, or does not fit what it is restored into. The
/// message starts with "checkpoint: " and the directory or file, and names the field, the
/// tensor or the parameter involved.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The two files of a checkpoint directory (the layout of docs/adapter_files.md: each a link
/// into the live version directory).
inline constexpr const char* state_file_name = "checkpoint.json";
inline constexpr const char* tensors_file_name = "checkpoint.safetensors";
/// checkpoint.json's "format" and "version".
inline constexpr const char* format_name = "hra-checkpoint";
inline constexpr int format_version = 1;
/// checkpoint.json is refused above this size before it is read.
inline constexpr std::uintmax_t max_state_bytes = 64u << 20;

namespace detail {

template <typename Scalar>
const char* scalar_name() {
  return sizeof(Scalar) == sizeof(float) ? "float" : "double";
}

/// obj[key] when obj is an object holding it with the JSON kind `want`; error naming `where`
/// and the key otherwise.
inline const nlohmann::json& field(const nlohmann::json& obj, const std::string& key,
                                   nlohmann::json::value_t want, const std::string& where) {
  if (!obj.is_object()) throw error(where + ": expected a JSON object, got " + obj.type_name());
  const auto it = obj.find(key);
  if (it == obj.end()) throw error(where + ": the field \"" + key + "\" is missing");
  const bool number_ok = want == nlohmann::json::value_t::number_integer &&
                         (it->is_number_integer() || it->is_number_unsigned());
  if (it->type() != want && !number_ok)
    throw error(where + ": the field \"" + key + "\" is " + it->type_name() + ", expected " +
                nlohmann::json(want).type_name());
  return *it;
}

inline std::int64_t integer(const nlohmann::json& obj, const std::string& key,
                            const std::string& where, std::int64_t min = 0) {
  const nlohmann::json& v = field(obj, key, nlohmann::json::value_t::number_integer, where);
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(INT64_MAX))
    throw error(where + ": the field \"" + key + "\" is out of range");
  const std::int64_t value = v.get<std::int64_t>();
  if (value < min)
    throw error(where + ": the field \"" + key + "\" is " + std::to_string(value) + ", less than " +
                std::to_string(min));
  return value;
}

inline std::string parameter_tensor(const std::string& group, std::size_t i) {
  return "parameters/" + group + "/" + std::to_string(i);
}
inline std::string slot_tensor(const std::string& name, std::size_t i, std::size_t slot) {
  return "optimizers/" + name + "/" + std::to_string(i) + "/" + std::to_string(slot);
}
inline std::string user_tensor(const std::string& name) {
  return "tensors/" + name;
}

}  // namespace detail

/// \brief A checkpoint to write: the parameters of one or more groups (a model, a head), the
/// state of their optimisers, random generators, the caller's tensors and metadata.
///
///     hra::checkpoint::Writer<float> w;
///     w.parameters("model", model.parameters());
///     w.optimizer("adam", adam, model.parameters());
///     w.rng("shuffle", generator);
///     w.metadata()["epoch"] = epoch;                 // any JSON: schedule position, settings...
///     w.save("run/checkpoint");                      // replaces the previous one atomically
///
/// Values are copied when they are added, so the model may go on training before save().
template <typename Scalar>
class Writer : hra::detail::ScalarCheck<Scalar> {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// The caller's metadata (a JSON object; restored as it was saved).
  nlohmann::json& metadata() { return metadata_; }

  /// The values of `params` as group `group` (their names and shapes are checked on restore).
  void parameters(const std::string& group, const std::vector<ParameterView<Scalar>>& params) {
    check_new("parameters", group, state_["parameters"]);
    nlohmann::json list = nlohmann::json::array();
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      tensors_.put_matrix(detail::parameter_tensor(group, i), p.value);
      list.push_back({{"name", p.name}, {"rows", p.value.rows()}, {"cols", p.value.cols()}});
    }
    state_["parameters"][group] = std::move(list);
  }

  /// The state of optimiser `opt` (Sgd, Adam) for `params`: every slot (momentum or moments),
  /// the update counts and the learning rate.
  template <typename Optimizer>
  void optimizer(const std::string& name, const Optimizer& opt,
                 const std::vector<ParameterView<Scalar>>& params) {
    check_new("optimizer", name, state_["optimizers"]);
    const std::vector<ParameterState<Scalar>> states = opt.state(params);
    nlohmann::json list = nlohmann::json::array();
    for (std::size_t i = 0; i < states.size(); ++i) {
      for (std::size_t s = 0; s < states[i].slots.size(); ++s)
        tensors_.put_matrix(detail::slot_tensor(name, i, s), states[i].slots[s]);
      list.push_back({{"name", params[i].name},
                      {"steps", states[i].steps},
                      {"slots", states[i].slots.size()}});
    }
    state_["optimizers"][name] = {
        {"kind", Optimizer::Options::optimizer}, {"lr", opt.lr()}, {"parameters", list}};
  }

  /// The state of a standard random engine (std::mt19937_64, ...), as its operator<< writes it.
  template <typename Engine>
  void rng(const std::string& name, const Engine& engine) {
    check_new("rng", name, state_["rng"]);
    std::ostringstream os;
    os << engine;
    state_["rng"][name] = os.str();
  }

  /// A tensor of the caller's (any matrix of this scalar).
  void tensor(const std::string& name, const Eigen::Ref<const Matrix>& m) {
    check_new("tensor", name, state_["tensors"]);
    tensors_.put_matrix(detail::user_tensor(name), m);
    state_["tensors"][name] = {{"rows", m.rows()}, {"cols", m.cols()}};
  }

  /// Writes the checkpoint into `dir` (created if needed), replacing the previous one as a
  /// whole: the layout and guarantees of peft::save_adapter_files() (docs/adapter_files.md): a
  /// kill or power loss at any moment leaves the old or the new checkpoint, savers take turns,
  /// and only this layout's own entries are ever removed. checkpoint::error on failure, the
  /// previous checkpoint left in place; std::invalid_argument for metadata that is not a JSON
  /// object or holds a string that is not UTF-8.
  void save(const std::filesystem::path& dir) const {
    if (!metadata_.is_object())
      throw std::invalid_argument(
          std::string("checkpoint: the metadata must be a JSON object, got ") +
          metadata_.type_name());
    const std::string tensor_bytes = safetensors::serialize(tensors_);
    nlohmann::json state = state_;
    state["format"] = format_name;
    state["version"] = format_version;
    state["scalar"] = detail::scalar_name<Scalar>();
    state["metadata"] = metadata_;
    state["tensors_file"] = {{"bytes", tensor_bytes.size()}, {"fnv1a", fnv1a64(tensor_bytes)}};
    std::string text;
    try {
      text = state.dump(1) + "\n";
    } catch (const nlohmann::json::type_error& e) {
      throw std::invalid_argument(std::string("checkpoint: a string is not valid UTF-8: ") +
                                  e.what());
    }
    hra::detail::replace_directory_files<error>(
        dir, {{tensors_file_name, tensor_bytes}, {state_file_name, text}}, "checkpoint: ");
  }

 private:
  static void check_new(const char* what, const std::string& name, const nlohmann::json& seen) {
    if (name.empty())
      throw std::invalid_argument(std::string("checkpoint::Writer: a ") + what +
                                  " needs a non-empty name");
    if (seen.is_object() && seen.contains(name))
      throw std::invalid_argument(std::string("checkpoint::Writer: ") + what + " '" + name +
                                  "' was added twice");
  }

  nlohmann::json state_ = {{"parameters", nlohmann::json::object()},
                           {"optimizers", nlohmann::json::object()},
                           {"rng", nlohmann::json::object()},
                           {"tensors", nlohmann::json::object()}};
  nlohmann::json metadata_ = nlohmann::json::object();
  safetensors::TensorFile tensors_;
};

/// \brief A checkpoint read back, restored in two steps: each restore call checks everything it
/// can against its target and only *stages* the change; apply() then performs every staged
/// change, and cannot fail. So a checkpoint that does not fit (a parameter of another name or
/// shape, an optimiser slot of the wrong shape, a negative step count, a reflector column that
/// is zero, a generator state that does not parse) throws checkpoint::error before anything the
/// caller owns has changed.
///
///     auto r = hra::checkpoint::Reader<float>::load("run/checkpoint");  // nothing: none yet
///     if (r) {
///       r->parameters("model", model.parameters());
///       r->optimizer("adam", adam, model.parameters());
///       r->rng("shuffle", generator);
///       const int epoch = r->metadata().at("epoch");
///       r->apply();
///     }
template <typename Scalar>
class Reader : hra::detail::ScalarCheck<Scalar> {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  /// The checkpoint in `dir`; nothing when `dir` does not exist or is empty (no checkpoint saved
  /// yet; a lock file may be there). checkpoint::error for anything else that is not a complete
  /// checkpoint of this scalar type: one file without the other, a file that is not a regular
  /// file (a directory, a device), a tensor file of another size or hash than checkpoint.json
  /// records, JSON that does not parse or lacks a field, another format or version.
  static std::optional<Reader> load(const std::filesystem::path& dir,
                                    const safetensors::ReadOptions& read = {}) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::file_status status = fs::status(dir, ec);
    if (!fs::exists(status)) return std::nullopt;
    if (!fs::is_directory(status)) throw error("checkpoint: " + dir.string() + ": not a directory");
    const std::string state_shown = (dir / state_file_name).string();
    const std::string tensors_shown = (dir / tensors_file_name).string();
    std::optional<hra::detail::InputFile<error>> state_in, tensors_in;
    bool none = false;
    hra::detail::open_resolved(dir, [&](const hra::detail::ResolvedDir& resolved,
                                        bool report_missing) {
      bool state_missing = false, tensors_missing = false;
      state_in.reset();
      tensors_in.reset();
      state_in.emplace(resolved.path(state_file_name), "checkpoint: ", state_shown, &state_missing);
      tensors_in.emplace(resolved.path(tensors_file_name), "checkpoint: ", tensors_shown,
                         &tensors_missing);
      none = state_missing && tensors_missing && !resolved.version;
      if (none) {
        // No checkpoint yet only if nothing else is there either: a directory of something
        // else (an older program's checkpoint, a stray file) must not pass for an empty one.
        for (const auto& e : fs::directory_iterator(dir, ec)) {
          const std::string entry = e.path().filename().string();
          if (entry != hra::detail::dir_lock_name)
            throw error("checkpoint: " + dir.string() + ": holds no checkpoint (no " +
                        state_file_name + ") but holds '" + entry +
                        "'; not a checkpoint directory");
        }
        return true;
      }
      if (!state_missing && !tensors_missing) return true;
      if (!report_missing) return false;  // perhaps a save replaced the version meanwhile
      throw error("checkpoint: " + dir.string() + ": " +
                  (state_missing ? std::string(state_file_name) : std::string(tensors_file_name)) +
                  " is missing (an incomplete checkpoint directory)");
    });
    if (none) return std::nullopt;
    Reader r;
    r.dir_ = dir.string();
    const std::string text = state_in->read_all(max_state_bytes);
    try {
      r.state_ = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw error("checkpoint: " + state_shown + ": not valid JSON: " + e.what());
    }
    const std::string& where = state_shown;
    if (!r.state_.is_object())
      throw error("checkpoint: " + where + ": expected a JSON object, got " + r.state_.type_name());
    if (r.state_.value("format", "") != format_name)
      throw error("checkpoint: " + where + ": not an hra checkpoint (\"format\" is not \"" +
                  format_name + "\")");
    if (detail::integer(r.state_, "version", "checkpoint: " + where) != format_version)
      throw error("checkpoint: " + where + ": version " +
                  std::to_string(detail::integer(r.state_, "version", where)) +
                  ", this hra reads version " + std::to_string(format_version));
    const nlohmann::json& saved_scalar =
        detail::field(r.state_, "scalar", nlohmann::json::value_t::string, "checkpoint: " + where);
    const std::string scalar = saved_scalar.get<std::string>();
    if (scalar != detail::scalar_name<Scalar>())
      throw error("checkpoint: " + where + ": saved with " + scalar + " values, read as " +
                  detail::scalar_name<Scalar>());
    const nlohmann::json& file = detail::field(
        r.state_, "tensors_file", nlohmann::json::value_t::object, "checkpoint: " + where);
    const auto bytes = static_cast<std::uint64_t>(
        detail::integer(file, "bytes", "checkpoint: " + where + ": tensors_file"));
    const nlohmann::json& hash =
        detail::field(file, "fnv1a", nlohmann::json::value_t::number_integer,
                      "checkpoint: " + where + ": tensors_file");
    for (const char* part : {"parameters", "optimizers", "rng", "tensors", "metadata"})
      (void)detail::field(r.state_, part, nlohmann::json::value_t::object, "checkpoint: " + where);
    if (tensors_in->size() != bytes)
      throw error("checkpoint: " + tensors_shown + " is " + std::to_string(tensors_in->size()) +
                  " bytes, checkpoint.json records " + std::to_string(bytes));
    const std::string tensor_bytes =
        tensors_in->read_all(std::min<std::uintmax_t>(read.max_file_bytes, bytes));
    if (!hash.is_number_unsigned() || hash.get<std::uint64_t>() != fnv1a64(tensor_bytes))
      throw error("checkpoint: " + tensors_shown +
                  " is not the file checkpoint.json describes (its hash differs)");
    try {
      r.tensors_ = safetensors::parse(std::string_view(tensor_bytes), tensors_shown, read);
    } catch (const std::exception& e) {
      throw error(std::string("checkpoint: ") + e.what());
    }
    return r;
  }

  /// The caller's metadata, as saved.
  const nlohmann::json& metadata() const { return state_.at("metadata"); }

  /// Checks group `group` against `params` (the same count, names and shapes, finite values,
  /// and for an HRA adapter's U, named "hra_u.*" or "<module>.hra_u.*", columns a reflection can
  /// use) and stages the copy.
  void parameters(const std::string& group, const std::vector<ParameterView<Scalar>>& params) {
    const std::string where = "checkpoint: " + dir_ + ": parameters '" + group + "'";
    const nlohmann::json& list = entry("parameters", group, nlohmann::json::value_t::array);
    if (list.size() != params.size())
      throw error(where + ": " + std::to_string(list.size()) + " saved, " +
                  std::to_string(params.size()) + " given");
    std::vector<Matrix> values;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      const std::string at = where + ": parameter " + std::to_string(i);
      const std::string name =
          detail::field(list[i], "name", nlohmann::json::value_t::string, at).get<std::string>();
      if (name != p.name) throw error(at + " is '" + name + "', the one given is '" + p.name + "'");
      Matrix value = get(detail::parameter_tensor(group, i), p.value.rows(), p.value.cols(),
                         at + " '" + name + "'");
      if (!hra::detail::all_finite(value))
        throw error(at + " '" + name + "' has non-finite values");
      // A layer's own U is "hra_u.<adapter>"; a container's is "<module>.hra_u.<adapter>".
      if (name.rfind("hra_u.", 0) == 0 || name.find(".hra_u.") != std::string::npos) {
        try {
          (void)ReflectorChain<Scalar>(value);  // finite, non-zero, usable columns; r <= d
        } catch (const std::invalid_argument& e) {
          throw error(at + " '" + name + "' is not a usable U: " + e.what());
        }
      }
      values.push_back(std::move(value));
    }
    staged_.push_back([params, values = std::move(values)] {
      for (std::size_t i = 0; i < params.size(); ++i) {
        auto view = params[i].value;  // a Map: assigning writes the owner's memory
        view = values[i];
      }
    });
  }

  /// Checks optimiser `name`'s saved state against `opt` (the same kind) and `params` (the
  /// names, every slot's shape, step counts >= 0, finite values; Optimizer::check_state) and
  /// stages its restore, with the saved learning rate.
  template <typename Optimizer>
  void optimizer(const std::string& name, Optimizer& opt,
                 const std::vector<ParameterView<Scalar>>& params) {
    const std::string where = "checkpoint: " + dir_ + ": optimizer '" + name + "'";
    const nlohmann::json& saved = entry("optimizers", name, nlohmann::json::value_t::object);
    const std::string kind =
        detail::field(saved, "kind", nlohmann::json::value_t::string, where).get<std::string>();
    if (kind != Optimizer::Options::optimizer)
      throw error(where + " is " + kind + ", restored into " + Optimizer::Options::optimizer);
    const auto lr_it = saved.find("lr");
    if (lr_it == saved.end() || !lr_it->is_number())
      throw error(where + ": the field \"lr\" is missing or not a number");
    const double lr = lr_it->get<double>();
    if (!std::isfinite(lr) || lr < 0) throw error(where + ": lr " + std::to_string(lr));
    const nlohmann::json& list =
        detail::field(saved, "parameters", nlohmann::json::value_t::array, where);
    if (list.size() != params.size())
      throw error(where + ": state of " + std::to_string(list.size()) + " parameters saved, " +
                  std::to_string(params.size()) + " given");
    std::vector<ParameterState<Scalar>> states;
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string at = where + ": parameter " + std::to_string(i);
      const std::string pname =
          detail::field(list[i], "name", nlohmann::json::value_t::string, at).get<std::string>();
      if (pname != params[i].name)
        throw error(at + " is '" + pname + "', the one given is '" + params[i].name + "'");
      ParameterState<Scalar> s;
      s.steps = detail::integer(list[i], "steps", at, std::numeric_limits<std::int64_t>::min());
      const auto slots = static_cast<std::size_t>(detail::integer(list[i], "slots", at));
      if (slots > 16) throw error(at + ": " + std::to_string(slots) + " state tensors");
      for (std::size_t k = 0; k < slots; ++k)
        s.slots.push_back(
            get(detail::slot_tensor(name, i, k), -1, -1, at + " slot " + std::to_string(k)));
      states.push_back(std::move(s));
    }
    try {
      opt.check_state(params, states);
    } catch (const std::invalid_argument& e) {
      throw error(where + ": " + e.what());
    }
    staged_.push_back([&opt, params, states = std::move(states), lr] {
      opt.set_state(params, states);
      opt.set_lr(lr);
    });
  }

  /// Parses generator `name`'s saved state into a copy of `engine`'s type and stages assigning
  /// it to `engine`.
  template <typename Engine>
  void rng(const std::string& name, Engine& engine) {
    const nlohmann::json& saved = entry("rng", name, nlohmann::json::value_t::string);
    const std::string text = saved.get<std::string>();
    std::istringstream is(text);
    Engine parsed;
    is >> parsed;
    if (!is)
      throw error("checkpoint: " + dir_ + ": rng '" + name +
                  "' is not the state of this kind of generator");
    staged_.push_back([&engine, parsed] { engine = parsed; });
  }

  /// The caller's tensor `name` (checkpoint::error when there is none).
  Matrix tensor(const std::string& name) const {
    const nlohmann::json& saved = entry("tensors", name, nlohmann::json::value_t::object);
    const std::string where = "checkpoint: " + dir_ + ": tensor '" + name + "'";
    return get(detail::user_tensor(name), detail::integer(saved, "rows", where),
               detail::integer(saved, "cols", where), where);
  }

  /// Performs every staged restore, in the order staged; does not throw.
  void apply() {
    for (auto& f : staged_) f();
    staged_.clear();
  }

 private:
  Reader() = default;

  const nlohmann::json& entry(const char* part, const std::string& name,
                              nlohmann::json::value_t kind) const {
    const std::string where = "checkpoint: " + dir_;
    const nlohmann::json& group = state_.at(part);
    if (!group.contains(name)) throw error(where + ": holds no " + part + " entry '" + name + "'");
    return detail::field(group, name, kind, where + ": " + part);
  }

  // The tensor `name` as a rows x cols matrix (-1: any shape of two dimensions or fewer).
  Matrix get(const std::string& name, Eigen::Index rows, Eigen::Index cols,
             const std::string& where) const {
    try {
      if (rows < 0) return tensors_.get_matrix<Scalar>(name);
      return tensors_.get_matrix<Scalar>(name, rows, cols);
    } catch (const std::exception& e) {
      throw error(where + ": " + e.what());
    }
  }

  std::string dir_;
  nlohmann::json state_;
  safetensors::TensorFile tensors_;
  std::vector<std::function<void()>> staged_;
};

}  // namespace checkpoint
}  // namespace hra
