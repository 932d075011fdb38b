// The convolution geometries every conv test runs over (tests only).
#pragma once

#include <string>
#include <vector>

#include "hra/conv_geometry.hpp"

namespace hra_test {

struct ConvCase {
  std::string name;
  hra::Conv2dGeometry geometry;
};

/// Small geometries that between them exercise every parameter of a convolution: stride 2,
/// symmetric and fully asymmetric padding, dilation 2, groups 2, depthwise (groups = C_in =
/// C_out), pointwise 1x1 (whose patches are the image itself) and a padded, strided 1x1,
/// non-square kernels, and all of it at once.
inline std::vector<ConvCase> conv_cases() {
  using G = hra::Conv2dGeometry;
  return {
      {"3x3 pad 1", G(3, 5, 6, 4, 3, 3).padding(1)},
      {"stride 2", G(3, 7, 6, 4, 3, 3).stride(2).padding(1)},
      {"asymmetric padding", G(2, 5, 4, 3, 3, 2).pad(1, 0, 0, 2)},
      {"dilation 2", G(2, 7, 7, 3, 3, 3).dilation(2).padding(2, 1)},
      {"groups 2", G(4, 5, 5, 6, 3, 3).padding(1).groups(2)},
      {"depthwise", G(3, 5, 5, 3, 3, 3).padding(1).groups(3)},
      {"1x1", G(5, 4, 3, 6, 1, 1)},
      {"1x1 stride 2 padded", G(4, 5, 5, 3, 1, 1).stride(2).padding(1)},
      {"non-square 2x3 stride 2x1", G(2, 6, 7, 3, 2, 3).stride(2, 1).padding(1, 0)},
      {"everything", G(4, 8, 7, 6, 3, 2).stride(2, 1).pad(2, 1, 1, 0).dilation(1, 2).groups(2)},
  };
}

}  // namespace hra_test
