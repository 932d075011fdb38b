// IEEE 754 binary16 (half) and bfloat16 conversions, written out bit by bit so that they do not
// depend on compiler extensions (_Float16, __bf16) or on the host's floating-point environment.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace hra {
namespace detail {

/// The bits of a double, without type punning through a union.
inline std::uint64_t bits_of(double x) {
  std::uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

/// \brief Rounds a double to a 16-bit float with `ExpBits` exponent and `ManBits` mantissa bits,
/// round-to-nearest-even, in one step (no double rounding through float).
///
/// Overflow gives a signed infinity, underflow a signed zero or subnormal, NaN a quiet NaN of the
/// same sign (with the top payload bits kept). binary16: <5, 10>; bfloat16: <8, 7>.
template <int ExpBits, int ManBits>
std::uint16_t round_to_small_float(double x) {
  static_assert(ExpBits + ManBits == 15, "a 16-bit float has 1 sign, ExpBits and ManBits bits");
  constexpr int bias = (1 << (ExpBits - 1)) - 1;
  constexpr int min_exp = 1 - bias;  // exponent of the smallest normal number
  constexpr std::uint32_t inf_bits = ((1u << ExpBits) - 1u) << ManBits;
  constexpr std::uint32_t quiet_bit = 1u << (ManBits - 1);

  const std::uint64_t b = bits_of(x);
  const std::uint32_t sign = static_cast<std::uint32_t>(b >> 63) << 15;
  const int exp_field = static_cast<int>((b >> 52) & 0x7FF);
  const std::uint64_t mantissa = b & ((std::uint64_t{1} << 52) - 1);

  if (exp_field == 0x7FF) {
    if (mantissa == 0) return static_cast<std::uint16_t>(sign | inf_bits);
    const auto payload = static_cast<std::uint32_t>(mantissa >> (52 - ManBits));
    return static_cast<std::uint16_t>(sign | inf_bits | quiet_bit | payload);
  }
  if (exp_field == 0 && mantissa == 0) return static_cast<std::uint16_t>(sign);

  // x = significand * 2^(exponent - 52) with the implicit bit made explicit.
  const int exponent = exp_field == 0 ? -1022 : exp_field - 1023;
  const std::uint64_t significand =
      exp_field == 0 ? mantissa : (mantissa | (std::uint64_t{1} << 52));
  if (exponent > bias + 1) return static_cast<std::uint16_t>(sign | inf_bits);

  // Count x in units of the target's spacing at x: 2^(exponent - ManBits) for normal results,
  // the fixed subnormal spacing 2^(min_exp - ManBits) below the normal range.
  const int shift = 52 - ManBits + (exponent < min_exp ? min_exp - exponent : 0);
  if (shift > 60) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
  std::uint64_t units = significand >> shift;
  const std::uint64_t rest = significand & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half_unit = std::uint64_t{1} << (shift - 1);
  if (rest > half_unit || (rest == half_unit && (units & 1u))) ++units;

  // A normal result has units in [2^ManBits, 2^(ManBits+1)]; the upper end (a carry out of the
  // mantissa) lands on the next exponent by plain addition, and so does a subnormal that rounds
  // up to the smallest normal.
  std::uint64_t magnitude = units;
  if (exponent >= min_exp)
    magnitude = (static_cast<std::uint64_t>(exponent - min_exp + 1) << ManBits) + units -
                (std::uint64_t{1} << ManBits);
  if (magnitude >= inf_bits) return static_cast<std::uint16_t>(sign | inf_bits);
  return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(magnitude));
}

/// \brief The exact value of a 16-bit float with `ExpBits` exponent and `ManBits` mantissa bits.
/// Every such value is representable in float (and double); NaN keeps its sign.
template <int ExpBits, int ManBits>
float widen_small_float(std::uint16_t h) {
  constexpr int bias = (1 << (ExpBits - 1)) - 1;
  constexpr std::uint32_t exp_mask = (1u << ExpBits) - 1u;
  const bool negative = (h & 0x8000u) != 0;
  const std::uint32_t exp_field = (static_cast<std::uint32_t>(h) >> ManBits) & exp_mask;
  const std::uint32_t mantissa = h & ((1u << ManBits) - 1u);
  float magnitude;
  if (exp_field == exp_mask) {
    magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity()
                              : std::numeric_limits<float>::quiet_NaN();
  } else if (exp_field == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), 1 - bias - ManBits);
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | (1u << ManBits)),
                           static_cast<int>(exp_field) - bias - ManBits);
  }
  return negative ? -magnitude : magnitude;
}

/// IEEE binary16 bits nearest to x (round to nearest, ties to even).
inline std::uint16_t double_to_half(double x) {
  return round_to_small_float<5, 10>(x);
}
/// bfloat16 bits nearest to x (round to nearest, ties to even).
inline std::uint16_t double_to_bfloat16(double x) {
  return round_to_small_float<8, 7>(x);
}
/// The exact value of IEEE binary16 bits.
inline float half_to_float(std::uint16_t h) {
  return widen_small_float<5, 10>(h);
}
/// The exact value of bfloat16 bits.
inline float bfloat16_to_float(std::uint16_t h) {
  return widen_small_float<8, 7>(h);
}

}  // namespace detail
}  // namespace hra
