// The agreement protocol of hra::mpi::DataParallel, without MPI calls: the fixed-size records
// the ranks gather (the constructor's Signature of each rank's parameter list and options,
// check_consistency()'s per-tensor Checksum), the digest of parameter values, and the text of
// the messages every rank builds from the same gathered data, so that all ranks throw together.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "../detail/checks.hpp"

namespace hra {
namespace mpi {
namespace detail {

using hra::detail::concat;

inline const char* scalar_name(std::uint64_t bytes) {
  return bytes == sizeof(float) ? "float" : bytes == sizeof(double) ? "double" : "unknown";
}

/// splitmix64's finaliser: a bijection of 64-bit words in which every input bit reaches every
/// output bit, so that two changes in a hashed stream cannot cancel by lining up.
inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// \brief The 64-bit digest of a tensor's values that check_consistency() compares across ranks,
/// from `h` (mix64 of the tensor's index). Each step h <- mix64(h ^ word) is a bijection of h,
/// so a change in any single word always changes the result. Word by word rather than
/// hra::fnv1a64 (hra's byte hash, which the layout descriptor uses): this one passes over every
/// parameter, 8 bytes per step instead of one.
inline std::uint64_t values_digest(const void* data, std::size_t bytes, std::uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, p + i, 8);
    h = mix64(h ^ word);
  }
  std::uint64_t tail = 0;
  if (bytes > i) std::memcpy(&tail, p + i, bytes - i);
  return mix64(h ^ tail ^ (static_cast<std::uint64_t>(bytes) << 56));
}

/// What every rank sends in the constructor's single MPI_Allgather (fixed size, raw bytes).
struct Signature {
  std::uint64_t scalar_bytes;   ///< sizeof(Scalar)
  std::uint64_t tensors;        ///< number of parameter tensors
  std::uint64_t values;         ///< total scalars
  std::uint64_t layout_hash;    ///< fnv1a64 of every tensor's name and shape, in order
  std::uint64_t root;           ///< DataParallelOptions::root
  std::uint64_t check_every;    ///< DataParallelOptions::check_every
  std::uint64_t local_problem;  ///< 1: this rank's own arguments are invalid (see its descriptor)
  bool operator==(const Signature& o) const {
    return scalar_bytes == o.scalar_bytes && tensors == o.tensors && values == o.values &&
           layout_hash == o.layout_hash && root == o.root && check_every == o.check_every &&
           local_problem == o.local_problem;
  }
  bool operator!=(const Signature& o) const { return !(*this == o); }
};

/// What every rank sends per tensor in check_consistency()'s MPI_Allgather.
struct Checksum {
  std::uint64_t hash;  ///< values_digest of the values (record 0: 1 if the layout changed)
  double sum;          ///< sum of the values, for the message
};

/// "1, 3, 4 and 7" for the first few ranks of a list, "..." after 8.
inline std::string list_ranks(const std::vector<int>& ranks) {
  std::ostringstream os;
  for (std::size_t i = 0; i < ranks.size() && i < 8; ++i)
    os << (i == 0 ? "" : i + 1 == ranks.size() ? " and " : ", ") << ranks[i];
  if (ranks.size() > 8) os << ", ...";
  return os.str();
}

/// The entries of a layout descriptor (each tensor's "'name' rows x cols", NUL-terminated).
inline std::vector<std::string> split_descriptor(const std::string& text) {
  std::vector<std::string> out;
  std::size_t begin = 0;
  for (std::size_t i = 0; i < text.size(); ++i)
    if (text[i] == '\0') {
      out.push_back(text.substr(begin, i - begin));
      begin = i + 1;
    }
  return out;
}

inline std::string describe_layout_difference(const std::vector<std::string>& t0,
                                              const std::vector<std::string>& tk, int k) {
  const std::size_t common = std::min(t0.size(), tk.size());
  for (std::size_t i = 0; i < common; ++i)
    if (t0[i] != tk[i])
      return concat("tensor ", i, " is ", tk[i], " on rank ", k, " but ", t0[i], " on rank 0");
  if (t0.size() != tk.size()) {
    const bool more_on_k = tk.size() > t0.size();
    return concat("rank ", k, " has ", tk.size(), " parameter tensors, rank 0 has ", t0.size(),
                  "; the first ", common, " agree, then rank ", more_on_k ? k : 0, " has ",
                  more_on_k ? tk[common] : t0[common]);
  }
  return "the layouts hash differently";  // a hash collision of different texts: unreachable
}

}  // namespace detail
}  // namespace mpi
}  // namespace hra
