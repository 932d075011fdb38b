// Little-endian loads and stores of integers and IEEE floats, byte by byte: files are
// little-endian whatever the host is, and compilers turn these loops into single moves on
// little-endian machines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace hra {
namespace detail {

/// The unsigned integer stored little-endian at p (sizeof(UInt) bytes).
template <typename UInt>
UInt load_le(const unsigned char* p) {
  UInt v = 0;
  for (std::size_t i = 0; i < sizeof(UInt); ++i) v |= static_cast<UInt>(p[i]) << (8 * i);
  return v;
}

/// Stores v little-endian at p (sizeof(UInt) bytes).
template <typename UInt>
void store_le(UInt v, unsigned char* p) {
  for (std::size_t i = 0; i < sizeof(UInt); ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

/// The IEEE binary32 value stored little-endian at p.
inline float load_f32(const unsigned char* p) {
  const auto b = load_le<std::uint32_t>(p);
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

/// The IEEE binary64 value stored little-endian at p.
inline double load_f64(const unsigned char* p) {
  const auto b = load_le<std::uint64_t>(p);
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

/// Stores f as IEEE binary32, little-endian, at p (4 bytes).
inline void store_f32(float f, unsigned char* p) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  store_le(b, p);
}

/// Stores d as IEEE binary64, little-endian, at p (8 bytes).
inline void store_f64(double d, unsigned char* p) {
  std::uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  store_le(b, p);
}

}  // namespace detail
}  // namespace hra
