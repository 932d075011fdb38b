// Internal: a seedable generator whose output is the same on every platform.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

namespace hra {
namespace detail {

/// std::mt19937_64's sequence is fixed by the standard, but the std:: distributions are not,
/// so the mapping to floating point is done here to keep seeded runs reproducible everywhere.
class Random {
 public:
  explicit Random(std::uint64_t seed) : engine_(seed) {}

  /// Uniform in [0, 1) with 53 random bits.
  double uniform01() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  /// Uniform in [-bound, bound).
  double uniform(double bound) { return (2.0 * uniform01() - 1.0) * bound; }

  /// Standard normal by Box-Muller (one of the pair is discarded: simplicity over speed).
  double normal() {
    const double u1 = 1.0 - uniform01();  // in (0, 1], keeps log finite
    const double u2 = uniform01();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) { return static_cast<std::uint64_t>(uniform01() * n) % n; }

  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

}  // namespace detail
}  // namespace hra
