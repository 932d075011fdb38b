// Replacing a file atomically (a temporary file beside it, flushed to disk, renamed over it):
// the primitive behind safetensors::save() and peft::save_adapter_files().
#pragma once

#include <atomic>
#include <chrono>

#include "os_files.hpp"

namespace hra {
namespace detail {

/// \brief Replaces `target` by `bytes` atomically: the bytes go to a fresh temporary file in the
/// target's directory, which is flushed to disk (fsync) and then renamed over the target.
///
/// On any failure the temporary file is removed, an existing target is left untouched and
/// `Error` (an exception type constructible from a message) is thrown; its message is `prefix`
/// (e.g. "safetensors: "), the target path, ": ", what failed and the OS error.
template <typename Error>
void replace_file_atomically(const std::filesystem::path& target, std::string_view bytes,
                             std::string_view prefix) {
  namespace fs = std::filesystem;
  const std::string where = concat(prefix, target.string(), ": ");
  if (!target.has_filename()) throw Error(where + "not a file path");
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  static std::atomic<unsigned> counter{0};
  const auto stamp =
      static_cast<unsigned long long>(std::chrono::steady_clock::now().time_since_epoch().count());

#if HRA_POSIX
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

}  // namespace detail
}  // namespace hra
