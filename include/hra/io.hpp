// Umbrella header of hra's io tier (target hra::io, which adds nlohmann-json to the core): the
// safetensors format, PEFT adapter directories and training checkpoints. hra/hra.hpp is the core
// and needs only Eigen.
#pragma once

#include "io/checkpoint.hpp"
#include "io/lora_export.hpp"
#include "io/peft_config.hpp"
#include "io/peft_load.hpp"
#include "io/peft_modules.hpp"
#include "io/peft_save.hpp"
#include "io/safetensors.hpp"
