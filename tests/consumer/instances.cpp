// The one file of the consumer that compiles hra's float layers (see main_extern.cpp).
#include <hra/extern_templates.hpp>

HRA_INSTANTIATE_LAYERS(, float)
