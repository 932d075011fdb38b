// hra's byte hash: 64-bit FNV-1a, what checkpoints record of their tensor file and what a program
// can use to fingerprint tensors or text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace hra {

/// FNV-1a's 64-bit offset basis: the hash of no bytes, and the default seed of fnv1a64().
inline constexpr std::uint64_t fnv1a64_offset_basis = 14695981039346656037ull;
/// FNV-1a's 64-bit prime.
inline constexpr std::uint64_t fnv1a64_prime = 1099511628211ull;

/// \brief The 64-bit FNV-1a (Fowler-Noll-Vo) hash of the `size` bytes at `data`, continued from
/// `seed`: fnv1a64(b, m, fnv1a64(a, n)) is the hash of the n bytes
/// at a followed by the m bytes at b. Not a cryptographic hash: it tells accidental changes
/// (a truncated or swapped file, diverged values) from none, not a forgery. The bytes are
/// hashed as they are in memory, so a tensor's hash depends on its scalar type and layout.
inline std::uint64_t fnv1a64(const void* data, std::size_t size,
                             std::uint64_t seed = fnv1a64_offset_basis) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t h = seed;
  for (std::size_t i = 0; i < size; ++i) h = (h ^ p[i]) * fnv1a64_prime;
  return h;
}

/// The 64-bit FNV-1a hash of `bytes` (a std::string, a literal): fnv1a64(bytes.data(),
/// bytes.size()). To continue a hash, pass the seed to that form (a second argument here would
/// be read as a byte count).
constexpr std::uint64_t fnv1a64(std::string_view bytes) noexcept {
  std::uint64_t h = fnv1a64_offset_basis;
  for (const char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * fnv1a64_prime;
  return h;
}

}  // namespace hra
