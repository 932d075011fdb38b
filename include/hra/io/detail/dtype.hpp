// The element types of safetensors files (the dtype codec): their names, sizes and the
// conversions between stored elements and Eigen scalars, and the one checked byte count of a
// shape of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../../detail/checks.hpp"
#include "half.hpp"
#include "little_endian.hpp"

namespace hra {
namespace safetensors {

/// Element types hra reads and writes.
enum class Dtype {
  F16,   ///< IEEE 754 binary16: 1 sign, 5 exponent, 10 mantissa bits
  BF16,  ///< bfloat16: 1 sign, 8 exponent, 7 mantissa bits (the top half of a float)
  F32,   ///< IEEE 754 binary32
  F64    ///< IEEE 754 binary64
};

/// The dtype's name in a safetensors header: "F16", "BF16", "F32" or "F64".
inline const char* to_string(Dtype dtype) {
  static constexpr const char* names[] = {"F16", "BF16", "F32", "F64"};
  return detail::enum_name(dtype, names);
}

/// Bytes per element: 2, 2, 4 or 8.
inline std::size_t size_of(Dtype dtype) {
  switch (dtype) {
    case Dtype::F16:
    case Dtype::BF16:
      return 2;
    case Dtype::F32:
      return 4;
    case Dtype::F64:
      return 8;
  }
  return 0;
}

/// The Dtype named `name` in a header, or nothing for names hra does not read (I32, BOOL, ...).
inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (Dtype d : {Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64})
    if (name == to_string(d)) return d;
  return std::nullopt;
}

/// The dtype that stores `Scalar` without rounding: F32 for float, F64 for double (and long
/// double, which is then rounded to double).
template <typename Scalar>
constexpr Dtype natural_dtype() {
  return std::is_same<Scalar, float>::value ? Dtype::F32 : Dtype::F64;
}

}  // namespace safetensors

namespace detail {

/// Why a shape has no byte count (see byte_count()).
enum class ShapeFault {
  none,      ///< the count is valid
  negative,  ///< a dimension is negative
  overflow   ///< product(shape) * element size does not fit in 64 bits
};

/// What byte_count() found: the bytes, valid when `fault` is ShapeFault::none.
struct ByteCount {
  std::uint64_t bytes = 0;
  ShapeFault fault = ShapeFault::none;
  explicit operator bool() const { return fault == ShapeFault::none; }
};

/// \brief product(shape) * element_size (1 for an element count), with the overflow checked:
/// the bytes a tensor of that shape holds (shape [] holds one element). Every check of a
/// shape against its data, and of a header's shape and offsets, goes through it.
inline ByteCount byte_count(const std::vector<std::int64_t>& shape, std::uint64_t element_size) {
  std::uint64_t bytes = element_size;
  for (const std::int64_t e : shape) {  // the first fault, in the order of the dimensions
    if (e < 0) return {0, ShapeFault::negative};
    const auto extent = static_cast<std::uint64_t>(e);
    if (bytes != 0 && extent > std::numeric_limits<std::uint64_t>::max() / bytes)
      return {0, ShapeFault::overflow};
    bytes *= extent;
  }
  return {bytes, ShapeFault::none};
}

// Element conversion between the stored dtypes and the Eigen scalars.

/// One stored element as a double.
inline double decode_one(safetensors::Dtype dtype, const unsigned char* p) {
  using safetensors::Dtype;
  switch (dtype) {
    case Dtype::F16:
      return half_to_float(load_le<std::uint16_t>(p));
    case Dtype::BF16:
      return bfloat16_to_float(load_le<std::uint16_t>(p));
    case Dtype::F32:
      return load_f32(p);
    case Dtype::F64:
      return load_f64(p);
  }
  return 0.0;
}

/// Converts n stored elements to Scalar (the dtype switch is outside the loops).
template <typename Scalar>
void decode(safetensors::Dtype dtype, const unsigned char* src, std::size_t n, Scalar* dst) {
  using safetensors::Dtype;
  switch (dtype) {
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<Scalar>(half_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<Scalar>(bfloat16_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<Scalar>(load_f32(src + 4 * i));
      return;
    case Dtype::F64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<Scalar>(load_f64(src + 8 * i));
      return;
  }
}

/// Converts n values to `dtype`, rounding to nearest even; dst holds n * size_of(dtype) bytes.
template <typename Scalar>
void encode(const Scalar* src, std::size_t n, safetensors::Dtype dtype, unsigned char* dst) {
  using safetensors::Dtype;
  switch (dtype) {
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i)
        store_le(double_to_half(static_cast<double>(src[i])), dst + 2 * i);
      return;
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i)
        store_le(double_to_bfloat16(static_cast<double>(src[i])), dst + 2 * i);
      return;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) store_f32(static_cast<float>(src[i]), dst + 4 * i);
      return;
    case Dtype::F64:
      for (std::size_t i = 0; i < n; ++i) store_f64(static_cast<double>(src[i]), dst + 8 * i);
      return;
  }
}

}  // namespace detail
}  // namespace hra
