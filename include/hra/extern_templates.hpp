// Compile hra's layers once per program instead of once per source file (optional).
//
// Every translation unit that constructs a layer instantiates all of its virtual members
// (forward, backward, merge, ...) and the chain kernels behind them, for each scalar type: in a
// program of many source files that is most of the compile time. Including this header instead
// of <hra/hra.hpp> declares the float and double instances of the chain and of every layer as
// explicit instantiations defined elsewhere (`extern template`), so that these source files only
// call them. Exactly one source file of the program then defines them:
//
//   #include <hra/extern_templates.hpp>
//   HRA_INSTANTIATE_LAYERS(, float)    // and/or (, double), possibly in a second file
//
// Everything stays header-only: the definitions are the same inline code, compiled in the
// file you choose (with the flags of that file). Other scalar types (long double, ...) are
// instantiated implicitly, as without this header. hra's own tests, examples and benchmarks are
// built this way (tests/support/instances_*.cpp); the consumer tests use the headers plainly.
#pragma once

#include "hra.hpp"

// HRA_INSTANTIATE_LAYERS(extern, T) declares, HRA_INSTANTIATE_LAYERS(, T) defines, the instances
// for scalar type T.
#define HRA_INSTANTIATE_LAYERS(keyword, T)              \
  keyword template struct ::hra::detail::Kernels<T>;    \
  keyword template class ::hra::detail::RightUpdate<T>; \
  keyword template class ::hra::ReflectorChain<T>;      \
  keyword template class ::hra::AffineLayer<T>;         \
  keyword template class ::hra::DenseLayer<T>;          \
  keyword template class ::hra::HraAdapterLayer<T>;     \
  keyword template class ::hra::LoraAdapterLayer<T>;    \
  keyword template class ::hra::Linear<T>;              \
  keyword template class ::hra::HraLinear<T>;           \
  keyword template class ::hra::LoraLinear<T>;          \
  keyword template class ::hra::Conv2d<T>;              \
  keyword template class ::hra::HraConv2d<T>;           \
  keyword template class ::hra::LoraConv2d<T>;

HRA_INSTANTIATE_LAYERS(extern, float)
HRA_INSTANTIATE_LAYERS(extern, double)
