// The double instances of hra's chain and layers, compiled once for all of hra's own programs
// (tests, examples, benchmarks), which see them as extern templates (hra/extern_templates.hpp).
#include "hra/extern_templates.hpp"

HRA_INSTANTIATE_LAYERS(, double)
