// The PEFT adapter calls for a whole hra::Sequential: its module names are the adapter file's
// module names, so no second name -> layer map is written by hand.
#pragma once

#include <filesystem>

#include "../sequential.hpp"
#include "lora_export.hpp"
#include "peft_load.hpp"
#include "peft_save.hpp"

namespace hra {
namespace peft {

/// save_hra_adapters(dir, model.hra_modules(), options): every HRA module of `model`.
template <typename Scalar>
void save_hra_adapters(const std::filesystem::path& dir, Sequential<Scalar>& model,
                       const SaveOptions& options = {}) {
  save_hra_adapters(dir, model.hra_modules(), options);
}

/// save_lora_adapters(dir, model.lora_modules(), options): every LoRA module of `model`.
template <typename Scalar>
void save_lora_adapters(const std::filesystem::path& dir, Sequential<Scalar>& model,
                        const SaveOptions& options = {}) {
  save_lora_adapters(dir, model.lora_modules(), options);
}

/// load_hra_adapters(dir, model.hra_modules(), options) (all or nothing, as that call).
template <typename Scalar>
AdapterConfig load_hra_adapters(const std::filesystem::path& dir, Sequential<Scalar>& model,
                                const LoadOptions& options = {}) {
  return load_hra_adapters(dir, model.hra_modules(), options);
}

/// load_lora_adapters(dir, model.lora_modules(), options) (all or nothing, as that call).
template <typename Scalar>
AdapterConfig load_lora_adapters(const std::filesystem::path& dir, Sequential<Scalar>& model,
                                 const LoadOptions& options = {}) {
  return load_lora_adapters(dir, model.lora_modules(), options);
}

/// export_lora_adapters(dir, model.hra_modules(), options): the exact LoRA of every HRA module.
template <typename Scalar>
LoraExport export_lora_adapters(const std::filesystem::path& dir, Sequential<Scalar>& model,
                                const LoraExportOptions& options = {}) {
  return export_lora_adapters(dir, model.hra_modules(), options);
}

}  // namespace peft
}  // namespace hra
