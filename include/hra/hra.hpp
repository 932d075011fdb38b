// Umbrella header: everything in hra.
#pragma once

#include "reflector_chain.hpp"
#include "reference.hpp"
