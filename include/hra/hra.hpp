// Umbrella header: everything in hra's core (needs only Eigen). The file formats are the
// hra::io tier; reference.hpp (naive restatements for tests and benchmarks) is not included.
#pragma once

#include "affine_layer.hpp"
#include "conv2d.hpp"
#include "conv_geometry.hpp"
#include "dense_layer.hpp"
#include "gradient_check.hpp"
#include "hra_adapter_layer.hpp"
#include "hra_conv2d.hpp"
#include "hra_linear.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "lora_adapter_layer.hpp"
#include "lora_conv2d.hpp"
#include "lora_linear.hpp"
#include "optim.hpp"
#include "orthogonality.hpp"
#include "reflector_chain.hpp"
#include "sequential.hpp"
#include "weight_matrix.hpp"
