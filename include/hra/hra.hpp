// Umbrella header: everything in hra.
#pragma once

#include "frozen_weight.hpp"
#include "gradient_check.hpp"
#include "hra_linear.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "lora_linear.hpp"
#include "optim.hpp"
#include "reference.hpp"
#include "reflector_chain.hpp"
