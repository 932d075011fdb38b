// The one bounded reader of files used by the file formats: an opened file whose size is known
// before anything is read, and whole-file reads refused by size before they allocate.
#pragma once

#include <limits>
#include <utility>

#include "os_files.hpp"

namespace hra {
namespace detail {

/// \brief A regular file opened for reading, with its size taken when it was opened.
///
/// Reads go through the open descriptor, so a file renamed or unlinked after open() still reads
/// as the version that was opened (what lets a loader read both files of one adapter version
/// while a saver replaces the directory). Errors throw `Error` (constructible from a message)
/// whose message is `prefix`, the path given as `shown` (default: `path`), ": " and what failed.
template <typename Error>
class InputFile {
 public:
  /// Opens `path`: "cannot open: no such file", "not a regular file", "cannot open: <reason>".
  /// With `missing` non-null, a missing file sets *missing and returns a closed InputFile
  /// instead of throwing.
  InputFile(const std::filesystem::path& path, std::string_view prefix,
            std::string shown = std::string(), bool* missing = nullptr)
      : where_(concat(prefix, shown.empty() ? path.string() : shown, ": ")) {
#if HRA_POSIX
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused below).
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd_ < 0) {
      const int err = errno;
      if (err == ENOENT && missing) {
        *missing = true;
        return;
      }
      if (err == ENOENT) throw Error(where_ + "cannot open: no such file");
      throw Error(where_ + "cannot open: " + errno_text(err));
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      close();
      throw Error(where_ + "cannot read its size: " + errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      close();
      throw Error(where_ + "not a regular file");
    }
    size_ = static_cast<std::uintmax_t>(st.st_size);
#else
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (!std::filesystem::exists(status)) {
      if (missing) {
        *missing = true;
        return;
      }
      throw Error(where_ + "cannot open: no such file");
    }
    if (!std::filesystem::is_regular_file(status)) throw Error(where_ + "not a regular file");
    size_ = std::filesystem::file_size(path, ec);
    if (ec) throw Error(where_ + "cannot read its size: " + ec.message());
    in_.open(path, std::ios::binary);
    if (!in_) throw Error(where_ + "cannot open for reading: " + errno_text(errno));
    open_ = true;
#endif
  }
  ~InputFile() {
    close();
  }
  InputFile(InputFile&& other) noexcept
      : where_(std::move(other.where_)),
        size_(other.size_)
#if HRA_POSIX
        ,
        fd_(std::exchange(other.fd_, -1))
#else
        ,
        in_(std::move(other.in_)),
        open_(std::exchange(other.open_, false))
#endif
  {
  }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  InputFile& operator=(InputFile&&) = delete;

  /// Whether a file is open (false only after a missing file with `missing` set).
  bool is_open() const {
#if HRA_POSIX
    return fd_ >= 0;
#else
    return open_;
#endif
  }
  /// The size in bytes when it was opened.
  std::uintmax_t size() const {
    return size_;
  }
  /// "prefix path: ", the start of every message about this file.
  const std::string& where() const {
    return where_;
  }

  /// Reads exactly `n` bytes at `offset` into `out`; "read <k> of <n> bytes at offset <o>" when
  /// the file is shorter than that (it shrank since it was opened), "read failed: <reason>".
  void read_at(std::uintmax_t offset, void* out, std::size_t n) {
    auto* p = static_cast<char*>(out);
    std::size_t done = 0;
#if HRA_POSIX
    while (done < n) {
      const ::ssize_t got = ::pread(fd_, p + done, n - done, static_cast<::off_t>(offset + done));
      if (got < 0) {
        if (errno == EINTR) continue;
        throw Error(where_ + "read failed: " + errno_text(errno));
      }
      if (got == 0) break;
      done += static_cast<std::size_t>(got);
    }
#else
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(p, static_cast<std::streamsize>(n));
    done = static_cast<std::size_t>(in_.gcount());
#endif
    if (done != n)
      throw Error(concat(where_, "read ", done, " of ", n, " bytes at offset ", offset));
  }

  /// The whole file (its size when opened), refused before allocating when it is longer than
  /// `max_bytes`: "is <n> bytes, more than the <max_bytes> accepted".
  std::string read_all(std::uintmax_t max_bytes) {
    if (size_ > max_bytes)
      throw Error(concat(where_, "is ", size_, " bytes, more than the ", max_bytes, " accepted"));
    std::string bytes(static_cast<std::size_t>(size_), '\0');
    read_at(0, bytes.data(), bytes.size());
    return bytes;
  }

 private:
  void close() {
#if HRA_POSIX
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
#else
    if (open_) in_.close();
    open_ = false;
#endif
  }

  std::string where_;
  std::uintmax_t size_ = 0;
#if HRA_POSIX
  int fd_ = -1;
#else
  std::ifstream in_;
  bool open_ = false;
#endif
};

/// \brief The whole content of the regular file at `path`, refused before it is read when it is
/// longer than `max_bytes`.
///
/// Throws `Error` (an exception type constructible from a message) whose message is `prefix`,
/// the path, ": " and what failed: "cannot open: no such file", "not a regular file", "cannot
/// open: <reason>", "cannot read its size: <reason>", "is <n> bytes, more than the <max_bytes>
/// accepted" or "read <k> of <n> bytes at offset 0".
template <typename Error>
std::string read_file(const std::filesystem::path& path, std::string_view prefix,
                      std::uintmax_t max_bytes = std::numeric_limits<std::uintmax_t>::max()) {
  InputFile<Error> file(path, prefix);
  return file.read_all(max_bytes);
}

}  // namespace detail
}  // namespace hra
