// Internals of hra/safetensors.hpp: little-endian element codecs, shape arithmetic and the
// atomic replace-a-file primitive.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "checks.hpp"
#include "half.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define HRA_SAFETENSORS_POSIX 1
#else
#include <fstream>
#define HRA_SAFETENSORS_POSIX 0
#endif

namespace hra {
namespace detail {
namespace safetensors {

// Little-endian loads and stores byte by byte: files are little-endian whatever the host is, and
// compilers turn these loops into single moves on little-endian machines.
template <typename UInt>
UInt load_le(const unsigned char* p) {
  UInt v = 0;
  for (std::size_t i = 0; i < sizeof(UInt); ++i) v |= static_cast<UInt>(p[i]) << (8 * i);
  return v;
}

template <typename UInt>
void store_le(UInt v, unsigned char* p) {
  for (std::size_t i = 0; i < sizeof(UInt); ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

inline float load_f32(const unsigned char* p) {
  const auto b = load_le<std::uint32_t>(p);
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline double load_f64(const unsigned char* p) {
  const auto b = load_le<std::uint64_t>(p);
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
}

inline void store_f32(float f, unsigned char* p) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  store_le(b, p);
}

inline void store_f64(double d, unsigned char* p) {
  std::uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  store_le(b, p);
}

/// a * b, or false when the product does not fit in 64 bits.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

/// "[2, 3]" for a shape.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// "[1, 2]": the multi-index of row-major flat position `flat` in `shape`.
inline std::string unravel(std::uint64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> index(shape.size(), 0);
  for (std::size_t k = shape.size(); k-- > 0;) {
    const auto extent = static_cast<std::uint64_t>(shape[k]);
    if (extent == 0) break;
    index[k] = static_cast<std::int64_t>(flat % extent);
    flat /= extent;
  }
  return shape_string(index);
}

inline std::string errno_text(int err) {
  return std::strerror(err);
}

/// \brief Replaces `target` by `bytes` atomically: the bytes go to a fresh temporary file in the
/// target's directory, which is flushed to disk (fsync) and then renamed over the target. On any
/// failure the temporary file is removed, an existing target is left untouched and `Error` (an
/// exception type constructible from a message) is thrown naming the path and the OS error.
template <typename Error>
void replace_file_atomically(const std::filesystem::path& target, std::string_view bytes) {
  namespace fs = std::filesystem;
  const std::string where = concat("safetensors: ", target.string(), ": ");
  if (!target.has_filename()) throw Error(where + "not a file path");
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  static std::atomic<unsigned> counter{0};
  const auto stamp =
      static_cast<unsigned long long>(std::chrono::steady_clock::now().time_since_epoch().count());

#if HRA_SAFETENSORS_POSIX
  fs::path temp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temp = dir / concat(".", target.filename().string(), ".tmp.", ::getpid(), ".", stamp, ".",
                        counter.fetch_add(1));
    // 0666 and the process umask give the permissions an ordinary new file would have.
    fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST)
      throw Error(concat(where, "cannot create a temporary file in ", dir.string(), ": ",
                         errno_text(errno)));
  }
  if (fd < 0)
    throw Error(concat(where, "cannot find a free temporary file name in ", dir.string()));

  const auto fail = [&](const char* what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(temp.c_str());
    throw Error(concat(where, what, " (temporary file ", temp.string(), "): ", errno_text(err)));
  };
  const char* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ::ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("write failed", errno);
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("fsync failed", errno);
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) fail("close failed", errno);
  if (::rename(temp.c_str(), target.c_str()) != 0) fail("rename over the target failed", errno);
  // Make the rename itself durable; the file is already in place, so a failure here is ignored.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
#else
  const fs::path temp =
      dir / concat(".", target.filename().string(), ".tmp.", stamp, ".", counter.fetch_add(1));
  try {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(concat(where, "cannot create temporary file ", temp.string()));
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) throw Error(concat(where, "write failed (temporary file ", temp.string(), ")"));
    out.close();
    std::error_code ec;
    fs::rename(temp, target, ec);
    if (ec) throw Error(concat(where, "rename over the target failed: ", ec.message()));
  } catch (...) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw;
  }
#endif
}

}  // namespace safetensors
}  // namespace detail
}  // namespace hra
