// The one file of a user's program that compiles hra's float layers for every other file
// (include/hra/extern_templates.hpp; scripts/compile_cost.sh times it).
#include <hra/extern_templates.hpp>

HRA_INSTANTIATE_LAYERS(, float)
