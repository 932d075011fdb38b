// The operating system's file interface, included in one place by the io tier's file primitives
// (atomic_file.hpp, atomic_dir.hpp, read_file.hpp): the POSIX headers where HRA_POSIX holds, the
// standard streams elsewhere, and the text of an errno value for error messages.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include "../../detail/checks.hpp"
#include "../../detail/platform.hpp"

#if HRA_POSIX
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#else
#include <fstream>
#endif

namespace hra {
namespace detail {

/// The message strerror(3) gives for an errno value.
inline std::string errno_text(int err) {
  return std::strerror(err);
}

}  // namespace detail
}  // namespace hra
