// The one bounded reader of whole files used by the file formats.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <ios>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>

#include "../../detail/checks.hpp"

namespace hra {
namespace detail {

/// \brief The whole content of the regular file at `path`, refused when it is longer than
/// `max_bytes`.
///
/// Throws `Error` (an exception type constructible from a message) whose message is `prefix`,
/// the path, ": " and what failed: "cannot open: no such file", "not a regular file", "cannot
/// read its size: <reason>", "is <n> bytes, more than the <max_bytes> accepted", "cannot open
/// for reading: <reason>" or "read <k> of <n> bytes".
template <typename Error>
std::string read_file(const std::filesystem::path& path, std::string_view prefix,
                      std::uintmax_t max_bytes = std::numeric_limits<std::uintmax_t>::max()) {
  const std::string where = concat(prefix, path.string(), ": ");
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) throw Error(where + "cannot open: no such file");
  if (ec) throw Error(where + "cannot open: " + ec.message());
  if (!std::filesystem::is_regular_file(status)) throw Error(where + "not a regular file");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) throw Error(where + "cannot read its size: " + ec.message());
  if (size > max_bytes)
    throw Error(concat(where, "is ", size, " bytes, more than the ", max_bytes, " accepted"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(where + "cannot open for reading: " + std::strerror(errno));
  std::string bytes(static_cast<std::size_t>(size), '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size)
    throw Error(concat(where, "read ", in.gcount(), " of ", size, " bytes"));
  return bytes;
}

}  // namespace detail
}  // namespace hra
