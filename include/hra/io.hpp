// Umbrella header of hra's io tier (target hra::io, which adds nlohmann-json to the core): the
// safetensors format and PEFT adapter directories. hra/hra.hpp is the core and needs only Eigen.
#pragma once

#include "io/lora_export.hpp"
#include "io/peft_config.hpp"
#include "io/peft_load.hpp"
#include "io/peft_modules.hpp"
#include "io/peft_save.hpp"
#include "io/safetensors.hpp"
