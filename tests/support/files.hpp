// Whole-file reads and writes, and a temporary file size limit, for tests that write files
// (tests only).
#pragma once

#include <catch2/catch.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <csignal>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace hra_test {

/// The bytes of the file at `p` ("" if it cannot be opened).
inline std::string read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// Replaces the file at `p` by `bytes`.
inline void write_all(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// The names in the directory `dir`, sorted, with every version directory of the adapter
/// layout (a name starting with ".." other than "..data") shown as "..<version>": a directory
/// peft::save_adapter_files() wrote is {"..<version>", "..data", ".hra-lock",
/// "adapter_config.json", "adapter_model.safetensors"}.
inline std::vector<std::string> adapter_dir_entries(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    names.push_back(name.compare(0, 2, "..") == 0 && name != "..data" ? "..<version>" : name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

/// Everything under `root` (not following symlinks), by path relative to `root`: "d" for a
/// directory, "f:<bytes>" for a file, "l:<target>" for a symlink, "?" for anything else. Two
/// equal snapshots mean that nothing under `root` was created, removed or changed.
inline std::map<std::string, std::string> tree_snapshot(const std::filesystem::path& root) {
  namespace fs = std::filesystem;
  std::map<std::string, std::string> out;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator();
       ++it) {
    const fs::file_status s = it->symlink_status();
    const std::string rel = it->path().lexically_relative(root).string();
    if (fs::is_symlink(s))
      out[rel] = "l:" + fs::read_symlink(it->path()).string();
    else if (fs::is_directory(s))
      out[rel] = "d";
    else if (fs::is_regular_file(s))
      out[rel] = "f:" + read_all(it->path());
    else
      out[rel] = "?";
  }
  return out;
}

/// What adapter_dir_entries() gives for a directory saved by peft::save_adapter_files().
inline const std::vector<std::string>& saved_adapter_dir() {
  static const std::vector<std::string> names = {
      "..<version>", "..data", ".hra-lock", "adapter_config.json", "adapter_model.safetensors"};
  return names;
}

/// \brief While it lives, files this process writes may not grow beyond `bytes` (RLIMIT_FSIZE):
/// a write past the limit fails with EFBIG instead of raising SIGXFSZ, which is ignored. Both
/// are restored at scope exit, so a failing write can be provoked inside the function given to
/// expect_error() and the checks run after the limit is gone.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(std::size_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit_) == 0);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit limited = old_limit_;
    limited.rlim_cur = bytes;
    const bool set = ::setrlimit(RLIMIT_FSIZE, &limited) == 0;
    if (!set) std::signal(SIGXFSZ, old_handler_);  // no destructor runs after a failed REQUIRE
    REQUIRE(set);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_limit_);
    std::signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  struct rlimit old_limit_ {};
  void (*old_handler_)(int) = SIG_DFL;
};

}  // namespace hra_test
