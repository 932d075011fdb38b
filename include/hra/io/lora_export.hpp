// PEFT adapter directories, export: trained HRA adapters written as the exact LoRA adapter they
// are (SPEC §11), for the stacks that load LoRA only (PEFT's LoraModel, llama.cpp's
// convert_lora_to_gguf.py, ...).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../detail/checks.hpp"
#include "../hra_linear.hpp"
#include "../reflector_chain.hpp"
#include "peft_config.hpp"
#include "peft_modules.hpp"
#include "peft_save.hpp"
#include "safetensors.hpp"

namespace hra {
namespace peft {

/// How to export.
struct LoraExportOptions {
  /// The adapters of every layer composed into its LoRA (each layer must have them all), in
  /// stacking order whatever the order given; empty: the layer's active adapters, i.e. what its
  /// forward() applies.
  std::vector<std::string> adapters;
  /// Tensor dtype (F32, F16, BF16 or F64); default F32 for float layers, F64 for double ones.
  std::optional<safetensors::Dtype> dtype;
  std::string prefix = default_prefix;                 ///< prefix of every tensor name
  std::optional<std::string> base_model_name_or_path;  ///< written into the config
  /// Further config fields (e.g. task_type), as SaveOptions::extra_config; the computed ones
  /// (peft_type, r, lora_alpha, bias, ...) cannot be replaced.
  nlohmann::json extra_config = nlohmann::json::object();
};

/// One exported module: its shape and how far the stored LoRA is from the HRA layer.
struct LoraExportModule {
  std::string module;                 ///< module name, as in the PyTorch model
  std::vector<std::string> adapters;  ///< the adapters composed, in stacking order
  Eigen::Index rank = 0;              ///< R, the summed rank of those adapters (the LoRA's r)
  Eigen::Index input_dim = 0;         ///< d_in (a convolution: its fan-in C_in/groups * kh * kw)
  Eigen::Index output_dim = 0;        ///< d_out (a convolution: C_out)
  /// The scale a consumer applies, lora_alpha / R (PEFT, llama.cpp): 1 unless R differs from
  /// the export's common rank (the stored B is then the exact B divided by it).
  double scale = 1;
  /// max_ij |(W + scale B A)_ij - (W H)_ij| in double, with B and A as stored (rounded to the
  /// dtype), W H = W H_a H_b ... computed in double from the layer's W and U.
  double max_weight_error = 0;
  double max_weight = 0;  ///< max_ij |(W H)_ij|, to read max_weight_error relatively
  /// Numbers the HRA adapters store, sum of d_in r_i (= d_in R).
  std::size_t hra_numbers() const { return static_cast<std::size_t>(input_dim * rank); }
  /// Numbers the LoRA stores, R (d_in + d_out).
  std::size_t lora_numbers() const {
    return static_cast<std::size_t>(rank * (input_dim + output_dim));
  }
};

/// \brief An export: the two files and, per module, the error of the stored LoRA.
struct LoraExport {
  AdapterFiles files;                    ///< what export_lora_adapters() writes
  safetensors::Dtype dtype;              ///< the tensors' dtype
  std::vector<LoraExportModule> report;  ///< one entry per module, in module-name order

  /// The largest LoraExportModule::max_weight_error over the modules.
  double max_weight_error() const {
    double e = 0;
    for (const auto& m : report) e = std::max(e, m.max_weight_error);
    return e;
  }
  /// The largest of max_weight_error / max_weight over the modules.
  double max_relative_weight_error() const {
    double e = 0;
    for (const auto& m : report)
      if (m.max_weight > 0) e = std::max(e, m.max_weight_error / m.max_weight);
    return e;
  }
};

}  // namespace peft

namespace detail {

/// The largest finite value of `dtype`.
inline double dtype_max(safetensors::Dtype dtype) {
  switch (dtype) {
    case safetensors::Dtype::F16:
      return 65504.0;
    case safetensors::Dtype::BF16:
      return 0x1.FEp127;
    case safetensors::Dtype::F32:
      return static_cast<double>(std::numeric_limits<float>::max());
    case safetensors::Dtype::F64:
      return std::numeric_limits<double>::max();
  }
  return 0;
}

/// Stores `m` as tensor `name` in `dtype` (a matrix, or the 1-D tensor of a vector) and
/// returns what a reader gets back (as double). A finite value the dtype cannot hold (it would
/// round to inf) is refused with std::invalid_argument starting with `where` and naming the
/// tensor, the entry and the value; the tensor is then not kept.
template <typename Derived>
Eigen::MatrixXd put_representable(safetensors::TensorFile& weights, const std::string& name,
                                  const Eigen::MatrixBase<Derived>& m, safetensors::Dtype dtype,
                                  const std::string& where, bool vector = false) {
  Eigen::MatrixXd stored;
  if (vector) {
    weights.put_vector(name, m, dtype);
    stored = weights.get_vector<double>(name, safetensors::NonFinite::allow);
  } else {
    weights.put_matrix(name, m, dtype);
    stored = weights.get_matrix<double>(name, safetensors::NonFinite::allow);
  }
  for (Eigen::Index j = 0; j < stored.cols(); ++j)
    for (Eigen::Index i = 0; i < stored.rows(); ++i)
      if (!std::isfinite(stored(i, j))) {
        weights.erase(name);
        const std::string entry = vector ? concat("[", i, "]") : concat("[", i, ", ", j, "]");
        throw_invalid(where, "tensor '", name, "' entry ", entry, " = ",
                      static_cast<double>(vector ? m(i + j) : m(i, j)), " does not fit in ",
                      safetensors::to_string(dtype), " (largest finite value ", dtype_max(dtype),
                      "); export in a wider dtype");
      }
  return stored;
}

/// The adapters of `layer` to export, as indices into layer.adapters() in stacking order:
/// `names` (each must exist) or, when empty, the active ones. std::invalid_argument for an
/// unknown or repeated name or nothing to export, std::logic_error while any adapter is merged.
template <typename Layer>
std::vector<std::size_t> adapters_to_export(const Layer& layer,
                                            const std::vector<std::string>& names,
                                            const std::string& where) {
  const auto& adapters = layer.adapters();
  std::string known;
  for (const auto& a : adapters) known += (known.empty() ? "" : ", ") + a.name();
  for (const auto& a : adapters)
    if (a.merged())
      throw std::logic_error(concat(where, "adapter '", a.name(),
                                    "' is merged into W, so W is not the base weight the LoRA "
                                    "must be exported against; unmerge() it first"));
  std::vector<std::size_t> order;
  if (names.empty()) {
    if (layer.adapters_enabled())
      for (std::size_t i = 0; i < adapters.size(); ++i)
        if (adapters[i].active()) order.push_back(i);
    if (order.empty())
      throw_invalid(where, "no adapter to export (",
                    layer.adapters_enabled() ? "none is active" : "adapters are disabled",
                    "; adapters: ", known, "); name them in LoraExportOptions::adapters");
    return order;
  }
  for (const auto& n : names) {
    std::size_t i = 0;
    while (i < adapters.size() && adapters[i].name() != n) ++i;
    if (i == adapters.size())
      throw_invalid(where, "the layer has no adapter '", n, "' (adapters: ", known, ")");
    if (std::find(order.begin(), order.end(), i) != order.end())
      throw_invalid(where, "adapter '", n, "' is named twice");
    order.push_back(i);
  }
  std::sort(order.begin(), order.end());
  return order;
}

/// W H_a H_b ... in double, from the layer's W and each adapter's U (the reference the export
/// is measured against).
template <typename Layer>
Eigen::MatrixXd adapted_weight(const Layer& layer, const std::vector<std::size_t>& order) {
  Eigen::MatrixXd w = layer.weight().template cast<double>();
  for (std::size_t i : order) {
    const auto& chain = layer.adapters()[i].chain();
    const ReflectorChain<double> c(chain.reflectors().template cast<double>(), chain.variant(),
                                   chain.block_size());
    c.apply_right(c.factorize(), w, Apply::h);
  }
  return w;
}

}  // namespace detail

namespace peft {

/// \brief The exact LoRA of trained HRA adapters, in memory (the memory-level entry point of
/// export_lora_adapters()), with the error of what is stored.
///
/// For every module, the adapters chosen by `options.adapters` compose W H_a H_b ... = W + B A
/// (HraAdapterLayer::lora_factors(), SPEC §11: A = U^T and B = -(W U) S^-1 per chain over the
/// whole chain, A = Q^T and B = -2 W Q for Gram-Schmidt; stacked adapters give a LoRA of the
/// summed rank R), computed in double from the layer's current W, which must be the base weight,
/// and U (so a float layer's F32 export is rounded once, when stored): A (R x d_in) is stored as
/// `<prefix><module>.lora_A.weight` (R, in_features), B as
/// `<prefix><module>.lora_B.weight` (out_features, R), PEFT's names and shapes. The config is
/// a LoraConfig with use_rslora false, dropout 0 and one lora_alpha, the most common R (the
/// first module's on ties), with no alpha_pattern: llama.cpp's convert_lora_to_gguf.py reads
/// only the top-level lora_alpha and scales every tensor by lora_alpha / its own rank, as PEFT
/// does without alpha_pattern. A module whose R is another (listed in rank_pattern) stores
/// B R / lora_alpha instead of B, so that both apply (lora_alpha / R) (B R / lora_alpha) A = B A;
/// modules of the common R have scale 1 and store B itself.
///
/// Bias: a frozen bias (BiasMode::none) belongs to the base model and is not written. A
/// trainable one is the trained bias, written as `<prefix><module>.base_layer.bias` with the
/// config's bias "all" (BiasMode::all) or "lora_only" (BiasMode::adapter_only), as
/// save_lora_adapters() writes a LoRA layer's; every module with a bias must train it the same
/// way. PEFT loads those tensors into the wrapped layers' base_layer.bias.
///
/// Throws, before anything is returned: std::logic_error when an adapter of a layer is merged
/// (W is then not the base weight); std::invalid_argument for no modules, a null layer, an
/// unknown or repeated adapter name, nothing to export, biases trained differently, a computed
/// config field in extra_config, or a value the dtype cannot hold (F16 beyond +-65504: the
/// message names the module, the tensor, the entry and the value; nothing becomes inf).
///
/// An HraConv2d is exported as PEFT's LoRA conv, lora_A (R, C_in, kh, kw) and lora_B (C_out,
/// R, 1, 1): the same A and B, flattened, only the stored shapes differ (ΔW = B A acts on
/// PyTorch's weight.view(C_out, -1) as H does). A grouped convolution (groups > 1) is refused:
/// PEFT's lora_A is a convolution over all input channels and cannot hold W H - W per group.
/// Modules may mix HraLinear and HraConv2d layers (HraLayerModules).
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
LoraExport lora_export_files(const std::map<std::string, Layer*>& modules,
                             const LoraExportOptions& options = {}) {
  detail::FilesStart start =
      detail::start_files(modules, options, "export_lora_adapters", "export", "lora_only");
  LoraExport out{std::move(start.files), start.dtype, {}};
  AdapterFiles& files = out.files;
  const std::string& bias = start.bias;
  const char* what = start.what;

  // Every module's adapters and summed rank first: the common rank is the one lora_alpha.
  std::vector<std::vector<std::size_t>> orders;
  std::vector<detail::LoraModuleShape> shapes;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    orders.push_back(detail::adapters_to_export(*layer, options.adapters, where));
    Eigen::Index rank = 0;
    for (std::size_t i : orders.back()) rank += layer->adapters()[i].chain().rank();
    shapes.push_back({module, rank, 0.0});
  }
  const double alpha = static_cast<double>(detail::lora_patterns(shapes).r);
  for (auto& s : shapes) s.alpha = alpha;

  std::vector<std::string> names;
  std::size_t index = 0;
  for (const auto& [module, layer] : modules) {
    const std::string where = detail::concat("peft: ", what, ": module '", module, "': ");
    const std::vector<std::size_t>& order = orders[index++];
    std::vector<std::string> chosen;
    for (std::size_t i : order) {
      const auto& adapter = layer->adapters()[i];
      chosen.push_back(adapter.name());
      // The export is computed in double, where a float U whose column's squared norm underflows
      // still has a direction; the layer itself refuses that U, and so does its export.
      try {
        (void)adapter.chain().factorize();
      } catch (const std::invalid_argument& e) {
        detail::throw_invalid(where, "U of adapter '", adapter.name(),
                              "' is not usable by the layer: ", e.what());
      }
    }
    const detail::PeftWeightShape shape = detail::peft_weight_shape(*layer);
    detail::expect_lora_representable(shape, where);
    const auto factors = layer->template lora_factors<double>(chosen);

    LoraExportModule entry;
    entry.module = module;
    entry.adapters = chosen;
    entry.rank = factors.a.rows();
    entry.input_dim = static_cast<Eigen::Index>(shape.fan_in);
    entry.output_dim = static_cast<Eigen::Index>(shape.rows);
    const std::string name_a = options.prefix + module + ".lora_A.weight";
    const std::string name_b = options.prefix + module + ".lora_B.weight";
    // The consumer's scale alpha / R, undone in B (exactly 1, so B itself, for the common rank).
    entry.scale = alpha / static_cast<double>(entry.rank);
    const Eigen::MatrixXd a =
        detail::put_representable(files.weights, name_a, factors.a, out.dtype, where);
    const Eigen::MatrixXd b =
        detail::put_representable(files.weights, name_b, factors.b / entry.scale, out.dtype, where);
    if (shape.conv) {
      detail::reshape_tensor(files.weights, name_a, shape.lora_a(entry.rank));
      detail::reshape_tensor(files.weights, name_b, shape.lora_b(entry.rank));
    }
    if (bias != "none" && layer->bias())
      detail::put_representable(files.weights, options.prefix + module + ".base_layer.bias",
                                *layer->bias(), out.dtype, where, /*vector=*/true);
    Eigen::MatrixXd wh = detail::adapted_weight(*layer, order);
    entry.max_weight = wh.size() ? wh.cwiseAbs().maxCoeff() : 0.0;
    wh.noalias() -= entry.scale * (b * a);
    wh -= layer->weight().template cast<double>();
    entry.max_weight_error = wh.size() ? wh.cwiseAbs().maxCoeff() : 0.0;
    names.push_back(module);
    out.report.push_back(std::move(entry));
  }
  SaveOptions save;
  save.base_model_name_or_path = options.base_model_name_or_path;
  save.extra_config = options.extra_config;
  files.config = detail::common_config("LORA", names, bias, save);
  detail::add_lora_fields(files.config, detail::lora_patterns(shapes), /*dropout=*/0.0);
  detail::add_extra_config(files.config, save, what);
  detail::check_lora_patterns(files, shapes, what);
  return out;
}

/// \brief Writes the exact LoRA of the mapped HRA layers' adapters as a PEFT LoRA adapter
/// directory `dir` (adapter_config.json, adapter_model.safetensors; see lora_export_files()
/// and save_adapter_files()) and returns the export with its error report. The directory is
/// what PEFT's PeftModel.from_pretrained, llama.cpp's convert_lora_to_gguf.py and hra's
/// load_lora_adapters() read; it is exact for the base weights it was exported against only.
template <typename Layer, detail::IfLayerOf<Layer, HraAdapterLayer> = 0>
LoraExport export_lora_adapters(const std::filesystem::path& dir,
                                const std::map<std::string, Layer*>& modules,
                                const LoraExportOptions& options = {}) {
  LoraExport out = lora_export_files(modules, options);
  save_adapter_files(dir, out.files);
  return out;
}

/// lora_export_files(modules, options) for a braced list of float layers (see ModuleList).
template <int N = 0>
LoraExport lora_export_files(const LazyList<N, HraModuleList<float>>& modules,
                             const LoraExportOptions& options = {}) {
  return lora_export_files(modules.map(), options);
}

/// export_lora_adapters(dir, modules, options) for a braced list of float layers.
template <int N = 0>
LoraExport export_lora_adapters(const std::filesystem::path& dir,
                                const LazyList<N, HraModuleList<float>>& modules,
                                const LoraExportOptions& options = {}) {
  return export_lora_adapters(dir, modules.map(), options);
}

/// lora_export_files(modules, options) for a braced list of double layers (see ModuleList).
template <int N = 0>
LoraExport lora_export_files(const LazyList<N, HraModuleList<double>>& modules,
                             const LoraExportOptions& options = {}) {
  return lora_export_files(modules.map(), options);
}

/// export_lora_adapters(dir, modules, options) for a braced list of double layers.
template <int N = 0>
LoraExport export_lora_adapters(const std::filesystem::path& dir,
                                const LazyList<N, HraModuleList<double>>& modules,
                                const LoraExportOptions& options = {}) {
  return export_lora_adapters(dir, modules.map(), options);
}

}  // namespace peft
}  // namespace hra
