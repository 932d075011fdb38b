// Measured figures that tests report in their output (tests only).
#pragma once

#include <cstdio>
#include <string>

namespace hra_test {

/// `value` in the "%.3e" form the test reports use.
inline std::string sci(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3e", value);
  return text;
}

}  // namespace hra_test
