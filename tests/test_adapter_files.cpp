// Adapter directories on disk, the hard way: the layout save_adapter_files() writes, migration
// of plain directories, stale leftovers, savers that take turns, saves killed (SIGKILL) at
// random moments hundreds of times, failed saves (file size limit, entries in the way,
// permissions), and bounded loading of huge (sparse) and NUL-carrying files. The processes
// are forked from this one; nothing here needs Python.
#include <hra/io.hpp>

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <grp.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <typeinfo>
#include <utility>
#include <vector>

#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

// The largest single allocation while tracking is on: what shows that refusing a huge file
// never allocated its size.
namespace {
std::atomic<bool> track_allocations{false};
std::atomic<std::size_t> largest_allocation{0};
}  // namespace

// The replacements pair malloc with free; GCC, inlining them, reports a new/free mismatch at
// the free() below.
#if defined(__GNUC__)
#define HRA_TEST_NOINLINE __attribute__((noinline))
#else
#define HRA_TEST_NOINLINE
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
HRA_TEST_NOINLINE void* operator new(std::size_t n) {
  if (track_allocations.load(std::memory_order_relaxed)) {
    std::size_t seen = largest_allocation.load(std::memory_order_relaxed);
    while (n > seen && !largest_allocation.compare_exchange_weak(seen, n)) {
    }
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
HRA_TEST_NOINLINE void* operator new[](std::size_t n) {
  return ::operator new(n);
}
HRA_TEST_NOINLINE void operator delete(void* p) noexcept {
  std::free(p);
}
HRA_TEST_NOINLINE void operator delete[](void* p) noexcept {
  std::free(p);
}
HRA_TEST_NOINLINE void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
HRA_TEST_NOINLINE void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
// The nothrow forms too (std::stable_sort's temporary buffer uses them, then frees with the
// sized delete above): left to the runtime, AddressSanitizer reports its new against our free.
HRA_TEST_NOINLINE void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
HRA_TEST_NOINLINE void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return ::operator new(n, std::nothrow);
}
HRA_TEST_NOINLINE void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
HRA_TEST_NOINLINE void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

namespace fs = std::filesystem;
namespace st = hra::safetensors;
namespace peft = hra::peft;
using hra_test::expect_error;
using hra_test::read_all;
using hra_test::write_all;

namespace {

constexpr Eigen::Index d_in = 64;
const char* const module_name = "net.fc1";

hra::HraLinear<double> make_layer(Eigen::Index r, hra::Variant variant, std::uint64_t seed) {
  hra::HraOptions o;
  o.rank = r;
  o.variant = variant;
  o.init = hra::Init::random;
  o.seed = seed;
  return hra::HraLinear<double>(
      hra::WeightMatrix<double>::owned(hra_test::random_as<double>(4, d_in, seed)), std::nullopt, o,
      hra::BiasMode::none);
}

/// What a directory holds: the adapter's rank, variant and U, compared bit for bit.
struct Adapter {
  Eigen::Index r = 0;
  hra::Variant variant = hra::Variant::chain;
  Eigen::MatrixXd u;
  bool operator==(const Adapter& o) const {
    return r == o.r && variant == o.variant && u.rows() == o.u.rows() && u.cols() == o.u.cols() &&
           std::memcmp(u.data(), o.u.data(), sizeof(double) * static_cast<std::size_t>(u.size())) ==
               0;
  }
};

/// A layer to save and the Adapter a directory must then load as.
struct Saved {
  hra::HraLinear<double> layer;
  Adapter adapter;
  Saved(Eigen::Index r, hra::Variant v, std::uint64_t seed)
      : layer(make_layer(r, v, seed)), adapter{r, v, layer.adapter().chain().reflectors()} {}
  void save(const fs::path& dir) { peft::save_hra_adapters(dir, {{module_name, &layer}}); }
  /// The two files as an older hra (or PEFT) left them: plain files, no layout.
  void save_plain(const fs::path& dir) {
    const peft::AdapterFiles files = peft::hra_adapter_files({{module_name, &layer}});
    fs::create_directories(dir);
    write_all(dir / peft::config_file_name, files.config_text());
    write_all(dir / peft::weights_file_name, st::serialize(files.weights));
  }
};

/// Loads `dir` with one read of both files (what load_hra_adapters(dir, ...) does), into a
/// layer of the rank and variant its config gives. (read_config() then load_hra_adapters(dir)
/// would read the directory twice, and a save in between would make the layer not fit.)
Adapter load_dir(const fs::path& dir) {
  const auto [config, weights] = hra::detail::read_adapter_dir(dir, peft::PeftType::hra, {});
  const hra::Variant v = config.apply_gs ? hra::Variant::gram_schmidt : hra::Variant::chain;
  auto layer = make_layer(config.r, v, 999);
  peft::load_hra_adapters(config, weights, {{module_name, &layer}});
  return {config.r, v, layer.adapter().chain().reflectors()};
}

/// Entries of `dir` that are not part of a finished save (leftovers of an interrupted one).
std::size_t stale_entries(const fs::path& dir) {
  std::error_code ec;
  const fs::path live = fs::read_symlink(dir / "..data", ec);
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name == "..data" || name == ".hra-lock" || name == peft::config_file_name ||
        name == peft::weights_file_name || (!ec && fs::path(name) == live))
      continue;
    ++n;
  }
  return n;
}

/// A counter in memory shared with forked children.
struct SharedCounter {
  std::atomic<long>* value;
  SharedCounter() {
    void* p = ::mmap(nullptr, sizeof(std::atomic<long>), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    value = new (p) std::atomic<long>(0);
  }
  ~SharedCounter() { ::munmap(value, sizeof(std::atomic<long>)); }
  SharedCounter(const SharedCounter&) = delete;
  SharedCounter& operator=(const SharedCounter&) = delete;
};

/// What a forked child's function did: "" when it returned, else the exception's type name and
/// message.
struct ChildResult {
  bool returned = false;
  std::string error;  ///< "<type>: <what>"
};

/// Runs `f` in a forked child (so rlimits and crashes stay there) and reports what happened.
template <typename F>
ChildResult in_child(F f) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    std::string out = "R";
    try {
      f();
    } catch (const std::exception& e) {
      out = std::string("E") + typeid(e).name() + ": " + e.what();
    }
    const char* p = out.data();
    std::size_t left = out.size();
    while (left > 0) {
      const ssize_t n = ::write(fds[1], p, left);
      if (n <= 0) break;
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string got;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;)
    got.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  ChildResult r;
  r.returned = got == "R";
  if (!got.empty() && got[0] == 'E') r.error = got.substr(1);
  return r;
}

/// Bytes this process has read through read(2)/pread(2) so far (/proc/self/io), if known.
std::optional<std::uint64_t> bytes_read() {
  std::ifstream in("/proc/self/io");
  std::string key;
  std::uint64_t value = 0;
  while (in >> key >> value)
    if (key == "rchar:") return value;
  return std::nullopt;
}

/// Runs `f` and returns the largest single allocation it made and the bytes it read.
template <typename F>
std::pair<std::size_t, std::optional<std::uint64_t>> measured(F f) {
  const auto before = bytes_read();
  largest_allocation = 0;
  track_allocations = true;
  try {
    f();
  } catch (...) {
    track_allocations = false;
    throw;
  }
  track_allocations = false;
  const auto after = bytes_read();
  std::optional<std::uint64_t> read;
  if (before && after) read = *after - *before;
  return {largest_allocation.load(), read};
}

/// A sparse file of `size` bytes at `path` starting with `head`; false when the file system
/// refuses the size.
bool sparse_file(const fs::path& path, const std::string& head, std::uint64_t size) {
  write_all(path, head);
  const int fd = ::open(path.c_str(), O_WRONLY);
  if (fd < 0) return false;
  const bool ok = ::ftruncate(fd, static_cast<off_t>(size)) == 0;
  ::close(fd);
  return ok;
}

/// A safetensors file of one F64 tensor "t" of shape [2], as bytes.
std::string small_safetensors() {
  st::TensorFile f;
  f.put_array<double>("t", {2}, {1.0, 2.0});
  return st::serialize(f);
}

}  // namespace

TEST_CASE("adapter_files: a save writes the ..data layout, each save a new version",
          "[adapter_files]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  a.save(tmp.path);
  CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());
  CHECK(fs::read_symlink(tmp.path / peft::config_file_name) == "..data/adapter_config.json");
  CHECK(fs::read_symlink(tmp.path / peft::weights_file_name) == "..data/adapter_model.safetensors");
  const fs::path first = fs::read_symlink(tmp.path / "..data");
  CHECK(first.string().rfind("..", 0) == 0);
  CHECK(!first.has_parent_path());
  // What a reader that follows links (PEFT's Python loader, std::ifstream) sees.
  CHECK(fs::is_regular_file(tmp.path / peft::weights_file_name));
  CHECK(read_all(tmp.path / peft::weights_file_name) ==
        read_all(tmp.path / first / peft::weights_file_name));
  CHECK(load_dir(tmp.path) == a.adapter);

  b.save(tmp.path);
  const fs::path second = fs::read_symlink(tmp.path / "..data");
  CHECK(second != first);
  CHECK(!fs::exists(tmp.path / first));  // the previous version is removed
  CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());
  CHECK(load_dir(tmp.path) == b.adapter);
}

TEST_CASE("adapter_files: a directory of plain files is migrated, leftovers are removed",
          "[adapter_files]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);

  SECTION("plain files from an older save or from PEFT") {
    a.save_plain(tmp.path);
    CHECK(load_dir(tmp.path) == a.adapter);  // loaders read plain directories
    b.save(tmp.path);
    CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());
    CHECK(load_dir(tmp.path) == b.adapter);
  }
  SECTION("one file replaced by hand (a plain file beside a link)") {
    a.save(tmp.path);
    st::TensorFile weights = st::load(tmp.path / peft::weights_file_name);
    st::save(tmp.path / peft::weights_file_name, weights);  // renames a plain file over the link
    REQUIRE(!fs::is_symlink(tmp.path / peft::weights_file_name));
    CHECK(load_dir(tmp.path) == a.adapter);
    b.save(tmp.path);
    CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());
    CHECK(load_dir(tmp.path) == b.adapter);
  }
  SECTION("leftovers of interrupted saves are removed, files of other programs are not") {
    a.save(tmp.path);
    // What interrupted saves of this library leave: a marked version, an empty version directory
    // (killed before its marker), and its two kinds of temporary link.
    const fs::path leftover = tmp.path / "..2020_01_01_00_00_00.1_0_1";
    fs::create_directories(leftover);
    write_all(leftover / hra::detail::version_marker_name,
              std::string(hra::detail::version_marker_text));
    write_all(leftover / peft::config_file_name, "{}");
    fs::create_directories(tmp.path / "..2020_01_01_00_00_00.1_0_2");
    fs::create_symlink("..2020_01_01_00_00_00.1_0_1", tmp.path / "....data.tmp");
    fs::create_symlink("..data/adapter_config.json", tmp.path / "..adapter_config.json.tmp");
    // What is not this library's: a version-named directory without the marker (an older hra,
    // or anybody's), a temporary file of an older hra's writer, the user's own files.
    const fs::path unmarked = tmp.path / "..2020_01_01_00_00_00.1_0_3";
    fs::create_directories(unmarked);
    write_all(unmarked / "data.bin", "theirs");
    const std::string older_temp = ".adapter_model.safetensors.tmp.999999999.123.0";
    write_all(tmp.path / older_temp, "x");
    write_all(tmp.path / "notes.txt", "kept");
    // Killed while writing the marker: a version directory holding only the marker's first
    // bytes (none to all but one) is this library's; with anything else beside it, or other
    // bytes, it is not.
    const std::string text(hra::detail::version_marker_text);
    std::vector<fs::path> partial, kept;
    for (std::size_t n = 0; n < text.size(); n += 7) {
      partial.push_back(tmp.path / ("..2020_01_01_00_00_01.1_0_" + std::to_string(n)));
      fs::create_directories(partial.back());
      write_all(partial.back() / hra::detail::version_marker_name, text.substr(0, n));
    }
    kept.push_back(tmp.path / "..2020_01_01_00_00_02.1_0_1");  // a partial marker and a file
    fs::create_directories(kept.back());
    write_all(kept.back() / hra::detail::version_marker_name, text.substr(0, 3));
    write_all(kept.back() / "data.bin", "theirs");
    kept.push_back(tmp.path / "..2020_01_01_00_00_02.1_0_2");  // other bytes than the marker's
    fs::create_directories(kept.back());
    write_all(kept.back() / hra::detail::version_marker_name, "hra adaptor");
    kept.push_back(tmp.path / "..2020_01_01_00_00_02.1_0_3");  // the marker and more
    fs::create_directories(kept.back());
    write_all(kept.back() / hra::detail::version_marker_name, text + "x");
    CHECK(stale_entries(tmp.path) == 7 + partial.size() + kept.size());
    CHECK(load_dir(tmp.path) == a.adapter);
    b.save(tmp.path);
    for (const auto& p : partial) CHECK_FALSE(fs::exists(fs::symlink_status(p)));
    for (const auto& p : kept) CHECK(fs::exists(p / hra::detail::version_marker_name));
    CHECK(read_all(kept[0] / "data.bin") == "theirs");
    CHECK(stale_entries(tmp.path) == 3 + kept.size());
    CHECK(!fs::exists(leftover));
    CHECK(!fs::exists(tmp.path / "..2020_01_01_00_00_00.1_0_2"));
    CHECK(!fs::exists(fs::symlink_status(tmp.path / "....data.tmp")));
    CHECK(!fs::exists(fs::symlink_status(tmp.path / "..adapter_config.json.tmp")));
    CHECK(read_all(unmarked / "data.bin") == "theirs");
    CHECK(read_all(tmp.path / older_temp) == "x");
    CHECK(read_all(tmp.path / "notes.txt") == "kept");
    CHECK(load_dir(tmp.path) == b.adapter);
  }
}

// What a save owns in a directory (docs/adapter_files.md): the two files, ..data, its temporary
// links, .hra-lock and the version directories it marked. Anything else survives every save and
// export untouched, and a directory whose ..data does not name a version inside it is refused.
namespace {
const char* const version_a = "..2020_01_01_00_00_00.1_0_1";

/// `version_a` as this library leaves it (its marker and a file) in `dir`.
void make_marked_version(const fs::path& dir, const std::string& name = version_a) {
  fs::create_directories(dir / name);
  write_all(dir / name / hra::detail::version_marker_name,
            std::string(hra::detail::version_marker_text));
  write_all(dir / name / peft::config_file_name, "{}");
}

/// The entries of `before` that `after` lost or changed, skipping those `owned` names.
template <typename Owned>
std::vector<std::string> changed_entries(const std::map<std::string, std::string>& before,
                                         const std::map<std::string, std::string>& after,
                                         Owned owned) {
  std::vector<std::string> out;
  for (const auto& [path, what] : before) {
    if (owned(path)) continue;
    const auto it = after.find(path);
    if (it == after.end() || it->second != what) out.push_back(path);
  }
  return out;
}

/// The first component of `rel` below `dir_name`, or "" when `rel` is not inside it.
std::string entry_in(const std::string& rel, const std::string& dir_name) {
  const std::string start = dir_name + "/";
  if (rel.compare(0, start.size(), start) != 0) return "";
  const std::string rest = rel.substr(start.size());
  return rest.substr(0, rest.find('/'));
}
}  // namespace

TEST_CASE("adapter_files: saves and exports remove nothing they did not write",
          "[adapter_files][ownership]") {
  const hra_test::TempDir tmp("hra_test_adapter_owned");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  const fs::path dir = tmp.path / "adapter";
  fs::create_directories(dir / "..cache");
  write_all(dir / "..notes", "the user's notes");
  write_all(dir / "..cache" / "blob", "the user's cache");
  fs::create_directories(dir / "..2020_01_01_00_00_00.7_0_7");  // a version name, no marker
  write_all(dir / "..2020_01_01_00_00_00.7_0_7" / "data.bin", "not hra's");
  write_all(dir / "..data.tmp", "a name like hra's temporary link, but not it");
  write_all(dir / "notes.txt", "kept");
  const auto before = hra_test::tree_snapshot(tmp.path);
  const auto lost = [&] {
    return changed_entries(before, hra_test::tree_snapshot(tmp.path),
                           [](const std::string&) { return false; });
  };
  a.save(dir);
  CHECK(lost().empty());
  CHECK(load_dir(dir) == a.adapter);
  b.save(dir);
  CHECK(lost().empty());
  CHECK(load_dir(dir) == b.adapter);
  (void)peft::export_lora_adapters(dir, {{module_name, &a.layer}});
  CHECK(lost().empty());
  CHECK(peft::read_config(dir).peft_type == peft::PeftType::lora);
  a.save(dir);
  CHECK(lost().empty());
  CHECK(load_dir(dir) == a.adapter);
  // One marked version (the live one) is all that a finished save leaves of its own.
  int marked = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (hra::detail::version_kind(dir, e.path().filename().string()) ==
        hra::detail::VersionKind::ours)
      ++marked;
  CHECK(marked == 1);
}

TEST_CASE("adapter_files: a directory a save does not understand is refused, nothing changed",
          "[adapter_files][ownership]") {
  const hra_test::TempDir tmp("hra_test_adapter_refused");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  const fs::path root = tmp.path / "root", dir = root / "adapter", outside = root / "outside";
  struct Case {
    const char* name;
    void (*make)(const fs::path& dir, const fs::path& outside);
    const char* message;
  };
  const std::vector<Case> cases = {
      {"..data -> .",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data"), fs::create_symlink(".", d / "..data");
       },
       "links to '.'"},
      {"..data -> ..",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data"), fs::create_symlink("..", d / "..data");
       },
       "links to '..'"},
      {"..data -> victim (a directory of the user's)",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data"), fs::create_symlink("victim", d / "..data");
       },
       "links to 'victim'"},
      {"..data -> ../outside",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data"), fs::create_symlink("../outside", d / "..data");
       },
       "links to '../outside'"},
      {"..data -> an absolute path",
       [](const fs::path& d, const fs::path& o) {
         fs::remove(d / "..data"), fs::create_symlink(o, d / "..data");
       },
       "which is not a version directory"},
      {"..data -> a version name with a parent",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data");
         fs::create_symlink(std::string("victim/") + version_a, d / "..data");
       },
       "which is not a version directory"},
      {"..data -> a version name that is a file",
       [](const fs::path& d, const fs::path&) {
         write_all(d / version_a, "a file");
         fs::remove(d / "..data");
         fs::create_symlink(version_a, d / "..data");
       },
       "the live version named by ..data is not a directory"},
      {"..data -> a version name that links outside",
       [](const fs::path& d, const fs::path& o) {
         fs::create_symlink(o, d / version_a);
         fs::remove(d / "..data");
         fs::create_symlink(version_a, d / "..data");
       },
       "the live version named by ..data is not a directory"},
      {"..data a regular file",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data");
         write_all(d / "..data", "mine");
       },
       "exists and is not a symlink"},
      {"..data a directory",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / "..data");
         fs::create_directories(d / "..data");
         write_all(d / "..data" / "x", "mine");
       },
       "exists and is not a symlink"},
      {"....data.tmp a regular file",
       [](const fs::path& d, const fs::path&) { write_all(d / "....data.tmp", "mine"); },
       "temporary link, and it holds something else"},
      {"..adapter_config.json.tmp a directory",
       [](const fs::path& d, const fs::path&) {
         fs::create_directories(d / "..adapter_config.json.tmp");
         write_all(d / "..adapter_config.json.tmp" / "x", "mine");
       },
       "temporary link, and it holds something else"},
      {"..adapter_model.safetensors.tmp a link elsewhere",
       [](const fs::path& d, const fs::path&) {
         fs::create_symlink("../outside", d / "..adapter_model.safetensors.tmp");
       },
       "temporary link, and it holds something else"},
      {"....data.tmp a link to a non-version",
       [](const fs::path& d, const fs::path&) { fs::create_symlink("..", d / "....data.tmp"); },
       "temporary link, and it holds something else"},
      {".hra-lock a symlink",
       [](const fs::path& d, const fs::path& o) {
         fs::remove(d / ".hra-lock");
         fs::create_symlink(o / "lock", d / ".hra-lock");
       },
       "cannot open the lock file"},
      {"adapter_config.json a directory",
       [](const fs::path& d, const fs::path&) {
         fs::remove(d / peft::config_file_name);
         fs::create_directories(d / peft::config_file_name);
       },
       "exists and is neither a regular file nor a symlink"},
  };
  for (const bool from_layout : {false, true}) {
    for (const Case& c : cases) {
      INFO((from_layout ? "a saved layout" : "plain files") << " and " << c.name);
      fs::remove_all(root);
      fs::create_directories(outside);
      write_all(outside / "o.txt", "outside");
      write_all(outside / "lock", "");
      write_all(root / "parent.txt", "parent");
      if (from_layout)
        a.save(dir);
      else
        a.save_plain(dir);
      fs::create_directories(dir / "victim");
      write_all(dir / "victim" / "precious", "the user's");
      write_all(dir / "notes.txt", "kept");
      c.make(dir, outside);
      const auto before = hra_test::tree_snapshot(tmp.path);
      expect_error<peft::io_error>([&] { b.save(dir); }, {dir.string(), c.message});
      CHECK(hra_test::tree_snapshot(tmp.path) == before);
      expect_error<peft::io_error>(
          [&] {
            (void)peft::export_lora_adapters(dir, {{module_name, &b.layer}});
          },
          {dir.string(), c.message});
      CHECK(hra_test::tree_snapshot(tmp.path) == before);
    }
  }
}

// The same promise over directory layouts drawn at random (fixed seeds): every entry of a
// kind the save could meet. A save either refuses, exactly when the layout has an entry it
// does not understand, with nothing changed anywhere under the scratch root; or it succeeds,
// every entry it does not own is unchanged, and the directory loads as the new adapter.
TEST_CASE("adapter_files: saves into random directory layouts touch only what they own",
          "[adapter_files][ownership]") {
  const hra_test::TempDir tmp("hra_test_adapter_layouts");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  const fs::path root = tmp.path / "root", dir = root / "adapter", outside = root / "outside";
  const std::vector<std::string> files = {peft::config_file_name, peft::weights_file_name};
  const std::string marked = version_a, unmarked = "..2020_01_01_00_00_00.2_0_2",
                    empty = "..2020_01_01_00_00_00.3_0_3", as_file = "..2020_01_01_00_00_00.4_0_4",
                    as_link = "..2020_01_01_00_00_00.5_0_5",
                    missing = "..2020_01_01_00_00_00.6_0_6";
  std::mt19937_64 gen(20261207);
  const auto pick = [&](int n) { return static_cast<int>(gen() % static_cast<unsigned>(n)); };
  const auto coin = [&] { return pick(2) == 0; };
  int refused = 0, saved = 0;
  constexpr int layouts = 400;
  for (int round = 0; round < layouts; ++round) {
    fs::remove_all(root);
    fs::create_directories(outside);
    write_all(outside / "o.txt", "outside");
    write_all(root / "parent.txt", "parent");
    fs::create_directories(dir);
    bool expect_refusal = false;
    std::string layout;
    // Version-named entries of every kind.
    if (coin()) make_marked_version(dir, marked), layout += "marked ";
    if (coin()) {
      fs::create_directories(dir / unmarked);
      write_all(dir / unmarked / "data.bin", "theirs");
      layout += "unmarked ";
    }
    if (coin()) fs::create_directories(dir / empty), layout += "empty ";
    if (coin()) write_all(dir / as_file, "a file"), layout += "version-file ";
    if (coin()) fs::create_symlink(outside, dir / as_link), layout += "version-link ";
    // The user's own entries.
    if (coin()) {
      fs::create_directories(dir / "victim");
      write_all(dir / "victim" / "precious", "the user's");
    }
    if (coin()) write_all(dir / "..notes", "notes");
    if (coin()) {
      fs::create_directories(dir / "..cache");
      write_all(dir / "..cache" / "blob", "blob");
    }
    // ..data.
    // Half the layouts draw only ..data a save understands (so that both outcomes are common).
    static constexpr int understood_data[] = {0, 1, 2, 3, 12};
    const int data = coin() ? understood_data[pick(5)] : pick(13);
    layout += "data" + std::to_string(data) + " ";
    const auto data_link = [&](const fs::path& target) {
      fs::create_symlink(target, dir / "..data");
    };
    switch (data) {
      case 0:
        break;  // absent
      case 1:
        make_marked_version(dir, marked), data_link(marked);
        break;
      case 2:
        fs::create_directories(dir / unmarked);
        write_all(dir / unmarked / "data.bin", "theirs");
        data_link(unmarked);
        break;
      case 3:
        data_link(missing);
        break;  // dangling, but a version name: understood
      case 4:
        data_link("."), expect_refusal = true;
        break;
      case 5:
        data_link(".."), expect_refusal = true;
        break;
      case 6:
        data_link("victim"), expect_refusal = true;
        break;
      case 7:
        data_link(outside), expect_refusal = true;
        break;
      case 8:
        if (!fs::exists(dir / as_file)) write_all(dir / as_file, "a file");
        data_link(as_file), expect_refusal = true;
        break;
      case 9:
        if (!fs::exists(fs::symlink_status(dir / as_link)))
          fs::create_symlink(outside, dir / as_link);
        data_link(as_link), expect_refusal = true;
        break;
      case 10:
        write_all(dir / "..data", "mine"), expect_refusal = true;
        break;
      case 11:
        fs::create_directories(dir / "..data"), expect_refusal = true;
        break;
      case 12:
        fs::create_directories(dir / empty);
        data_link(empty);
        break;
    }
    // The two files.
    for (const std::string& f : files) {
      const int kind = pick(6);
      layout += f.substr(0, 7) + std::to_string(kind) + " ";
      switch (kind) {
        case 0:
          break;
        case 1:
          write_all(dir / f, "plain");
          break;
        case 2:
          fs::create_symlink(fs::path("..data") / f, dir / f);
          break;
        case 3:
          fs::create_symlink(outside / "o.txt", dir / f);
          break;
        case 4:
          fs::create_symlink("nowhere", dir / f);
          break;
        case 5:
          fs::create_directories(dir / f), expect_refusal = true;
          break;
      }
    }
    // The temporary-link names.
    for (const std::string& link : {std::string("..data"), files[0], files[1]}) {
      const fs::path p = dir / (".." + link + ".tmp");
      const int kind = pick(16);
      switch (kind) {
        case 0:
          layout += "own-temp ";
          fs::create_symlink(link == "..data" ? fs::path(missing) : fs::path("..data") / link, p);
          break;
        case 1:
          write_all(p, "mine"), expect_refusal = true;
          break;
        case 2:
          fs::create_directories(p), expect_refusal = true;
          break;
        case 3:
          fs::create_symlink("../outside", p), expect_refusal = true;
          break;
        default:
          break;  // absent, most often
      }
    }
    // The lock file.
    const int lock = pick(6);
    if (lock == 1) write_all(dir / ".hra-lock", "");
    if (lock == 2) fs::create_symlink(outside / "o.txt", dir / ".hra-lock"), expect_refusal = true;

    INFO("layout " << round << ": " << layout);
    const auto before = hra_test::tree_snapshot(tmp.path);
    bool threw = false;
    try {
      b.save(dir);
    } catch (const std::exception& e) {
      threw = true;
      INFO("message: " << e.what());
      CHECK(typeid(e) == typeid(peft::io_error));
      CHECK(expect_refusal);
    }
    if (threw) {
      ++refused;
      CHECK(hra_test::tree_snapshot(tmp.path) == before);
      continue;
    }
    ++saved;
    CHECK(!expect_refusal);
    // What the save owns: the two files, ..data and its temporary links, the lock, and the
    // version directories it marked (or that were empty).
    const auto owned = [&](const std::string& rel) {
      const std::string e = entry_in(rel, "root/adapter");
      if (e.empty()) return false;
      if (e == "..data" || e == ".hra-lock" || e == files[0] || e == files[1]) return true;
      if (e == "....data.tmp" || e == ".." + files[0] + ".tmp" || e == ".." + files[1] + ".tmp")
        return true;
      return e == marked || e == empty;
    };
    CHECK(changed_entries(before, hra_test::tree_snapshot(tmp.path), owned).empty());
    CHECK(load_dir(dir) == b.adapter);
    a.save(dir);
    CHECK(changed_entries(before, hra_test::tree_snapshot(tmp.path), owned).empty());
    CHECK(load_dir(dir) == a.adapter);
  }
  INFO("refused " << refused << ", saved " << saved);
  CHECK(refused + saved == layouts);
  CHECK(refused > 50);  // both outcomes are exercised by the seed
  CHECK(saved > 50);
}

// A save killed at each of its steps, deterministically: the child's save kills its own
// process (SIGKILL) when it reaches the step, so no timing decides where the kill lands.
namespace {
using Step = hra::detail::AtomicDirStep;
Step kill_step = Step::locked;
int kill_occurrence = 1;
int step_seen = 0;
void kill_at_step(Step step) {
  if (step == kill_step && ++step_seen == kill_occurrence) std::raise(SIGKILL);
}
}  // namespace

TEST_CASE(
    "adapter_files: a save killed at each of its steps leaves the old adapter before the "
    "commit and the new one from it on",
    "[adapter_files][kill]") {
  struct Point {
    Step step;
    int occurrence;
    const char* name;
    bool migration_only;  // reached only when a save migrates plain files
  };
  // In the order a save reaches them; the per-file steps at their first and second file.
  const std::vector<Point> points = {
      {Step::locked, 1, "locked", false},
      {Step::cleaned, 1, "cleaned", false},
      {Step::version_made, 1, "first version directory made, no marker yet", false},
      {Step::marker_opened, 1, "its marker created, empty", false},
      {Step::link_replaced, 1, "first link replaced (migration)", true},
      {Step::link_replaced, 2, "second link replaced (migration)", true},
      {Step::migrated, 1, "migrated", true},
      {Step::version_made, 2, "new version's directory made (migration)", true},
      {Step::marker_opened, 2, "new version's marker created, empty (migration)", true},
      {Step::file_written, 1, "first file of the new version written", false},
      {Step::file_written, 2, "second file written", false},
      {Step::version_written, 1, "new version written and fsynced", false},
      {Step::committed, 1, "..data renamed to the new version", false},
      {Step::synced, 1, "directory fsynced", false},
      {Step::done, 1, "previous version removed", false},
  };
  const hra_test::TempDir tmp("hra_test_adapter_files_steps");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  int kills = 0, old_seen = 0, new_seen = 0;
  for (const bool plain : {false, true}) {
    for (const Point& point : points) {
      const bool migration_step = point.migration_only;
      const fs::path dir = tmp.path / (std::string(plain ? "plain_" : "layout_") +
                                       std::to_string(static_cast<int>(point.step)) + "_" +
                                       std::to_string(point.occurrence));
      if (plain)
        a.save_plain(dir);
      else
        a.save(dir);
      INFO((plain ? "from plain files" : "from a saved layout") << ", killed at: " << point.name);
      const pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        kill_step = point.step;
        kill_occurrence = point.occurrence;
        step_seen = 0;
        hra::detail::testing::atomic_dir_fault_hook = kill_at_step;
        try {
          b.save(dir);
        } catch (...) {
          ::_exit(3);
        }
        ::_exit(0);  // the step was not reached
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      if (migration_step && !plain) {
        // A saved layout needs no migration: the save runs to its end.
        REQUIRE(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
        CHECK(load_dir(dir) == b.adapter);
        continue;
      }
      REQUIRE(WIFSIGNALED(status));
      REQUIRE(WTERMSIG(status) == SIGKILL);
      ++kills;
      const bool after_commit = point.step >= Step::committed;  // the steps are in save order
      const Adapter got = load_dir(dir);
      CHECK(got == (after_commit ? b.adapter : a.adapter));
      (got == a.adapter ? old_seen : new_seen) += 1;
      CHECK(stale_entries(dir) <= 3);  // the new version, a temporary link, a migration copy
      // The kill released the lock (the kernel drops a dead process's flock): the next save
      // neither waits nor fails, and removes every leftover.
      a.save(dir);
      CHECK(stale_entries(dir) == 0);
      CHECK(hra_test::adapter_dir_entries(dir) == hra_test::saved_adapter_dir());
      CHECK(load_dir(dir) == a.adapter);
    }
  }
  CHECK(kills == 25);  // 15 steps from plain files, 10 from a layout
  CHECK(old_seen == 19);
  CHECK(new_seen == 6);
}

// Kills a child that saves the two adapters alternately at uniformly random moments; after
// each kill the directory must load as exactly the adapter of the last completed save ("old")
// or of the one in progress ("new"). Every tenth round starts from plain files (migration).
// The test above puts kills at each step; this one at moments no list of steps names.
namespace {
struct KillCounts {
  int kills = 0, old_ = 0, new_ = 0, mixed = 0, errors = 0;
  int in_first = 0;    ///< kills before the child's first save returned
  int later = 0;       ///< kills after one or more saves returned
  long window_us = 0;  ///< three saves in a fresh child: kills fall in [0, window + 100 us]
  std::size_t stale_max = 0, stale_total = 0;
  std::string place;  ///< the directory's file system
};

KillCounts kill_test(Saved& a, Saved& b, int wanted_kills, std::uint64_t seed) {
  // On tmpfs when there is one: a kill (unlike a power loss) keeps what was written but not yet
  // fsynced, so the outcome is the same, and the fsyncs that take milliseconds on a disk do not
  // slow the 100 rounds down.
  const hra_test::TempDir tmp("hra_test_adapter_files_kill");
  fs::path dir = tmp.path / "adapter";
  std::error_code ec;
  const fs::path shm = fs::path("/dev/shm") / tmp.path.filename();
  if (fs::is_directory("/dev/shm") && fs::create_directory(shm, ec)) dir = shm / "adapter";
  struct RemoveShm {
    fs::path path;
    ~RemoveShm() {
      std::error_code ignored;
      if (!path.empty()) fs::remove_all(path, ignored);
    }
  } remove_shm{dir.parent_path() == shm ? shm : fs::path()};
  UNSCOPED_INFO("kill test directory: " << dir);
  Saved* both[2] = {&a, &b};
  a.save(dir);
  SharedCounter done, started, elapsed_us;
  // How long a fresh child takes for its first three saves: the window the kills spread over.
  // Measured in a child, not here: a child's first save also pays for copying the pages it
  // touches (copy-on-write), which under AddressSanitizer takes several times the save itself.
  long window_us = 0;
  for (int i = 0; i < 3; ++i) {
    const ChildResult r = in_child([&] {
      const auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < 3; ++k) both[k % 2]->save(dir);
      elapsed_us.value->store(static_cast<long>(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
              .count()));
    });
    INFO("child: " << r.error);
    REQUIRE(r.returned);
    window_us = std::max(window_us, elapsed_us.value->load());
  }
  a.save(dir);
  int live = 0;  // the adapter of the last completed save
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> delay(0.0, static_cast<double>(window_us) + 100.0);
  KillCounts c;
  c.place = remove_shm.path.empty() ? "temp dir" : "tmpfs";
  c.window_us = window_us;
  for (int round = 0; c.kills < wanted_kills && round < 4 * wanted_kills; ++round) {
    if (round % 10 == 9) {
      fs::remove_all(dir);
      both[live]->save_plain(dir);
    }
    done.value->store(0);
    started.value->store(0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      started.value->store(1);
      try {
        for (long i = 0;; ++i) {
          both[(live + 1 + i) % 2]->save(dir);
          done.value->store(i + 1);
        }
      } catch (...) {
        ::_exit(3);
      }
    }
    // The delay counts from the child's first instruction: a fork can take longer than a save
    // (0.5-1 ms in some sandboxes against 0.2 ms for a save on tmpfs), and a delay counted from
    // the fork would kill every child before it wrote anything.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.value->load() == 0 && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(delay(gen)));
    ::kill(pid, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));  // a child that failed a save exits with 3 instead
    if (WTERMSIG(status) == SIGKILL) ++c.kills;
    const long n = done.value->load();
    (n == 0 ? c.in_first : c.later) += 1;
    const int old_index = n == 0 ? live : static_cast<int>((live + n) % 2);
    const std::size_t stale = stale_entries(dir);
    c.stale_max = std::max(c.stale_max, stale);
    c.stale_total += stale;
    try {
      const Adapter got = load_dir(dir);
      if (got == both[old_index]->adapter) {
        ++c.old_;
        live = old_index;
      } else if (got == both[1 - old_index]->adapter) {
        ++c.new_;
        live = 1 - old_index;
      } else {
        ++c.mixed;
      }
    } catch (const std::exception& e) {
      ++c.errors;
      UNSCOPED_INFO("load after kill " << c.kills << " failed: " << e.what());
    }
  }
  // The next completed save removes whatever the kills left.
  both[1 - live]->save(dir);
  CHECK(stale_entries(dir) == 0);
  CHECK(hra_test::adapter_dir_entries(dir) == hra_test::saved_adapter_dir());
  CHECK(load_dir(dir) == both[1 - live]->adapter);
  return c;
}
}  // namespace

TEST_CASE("adapter_files: saves killed at random moments leave the old or the new adapter",
          "[adapter_files][kill]") {
  // Two shapes (r = 2 chain, r = 4 Gram-Schmidt), then one shape in two variants: a mix of the
  // latter would load without error, so only a bitwise comparison of U and variant catches it.
  Saved chain2(2, hra::Variant::chain, 1), gs4(4, hra::Variant::gram_schmidt, 2);
  Saved chain3(3, hra::Variant::chain, 3), gs3(3, hra::Variant::gram_schmidt, 4);
  KillCounts total;
  const auto report = [&](const char* what, const KillCounts& c) {
    WARN("KILL_TEST " << what << " kills=" << c.kills << " old=" << c.old_ << " new=" << c.new_
                      << " mixed=" << c.mixed << " errors=" << c.errors << " in_first_save="
                      << c.in_first << " after_a_save=" << c.later << " window_us=" << c.window_us
                      << " stale_left=" << c.stale_max << " (max after a kill; " << c.stale_total
                      << " in all, each removed by the next save; on " << c.place << ")");
    CHECK(c.mixed == 0);
    CHECK(c.errors == 0);
    CHECK(c.stale_max <= 3);  // the new version, a temporary link, a migration copy
    total.kills += c.kills;
    total.old_ += c.old_;
    total.new_ += c.new_;
    total.mixed += c.mixed;
    total.errors += c.errors;
    total.in_first += c.in_first;
    total.later += c.later;
    total.window_us = std::max(total.window_us, c.window_us);
    total.stale_max = std::max(total.stale_max, c.stale_max);
    total.stale_total += c.stale_total;
    total.place = c.place;
  };
  report("r2-chain/r4-gs", kill_test(chain2, gs4, 100, 12));
  report("r3-chain/r3-gs", kill_test(chain3, gs3, 100, 34));
  report("total", total);
  CHECK(total.kills >= 150);
  // The kills spread over the saves: some inside the child's first save, some after it had
  // completed one or more (so the directory changed under the kills). Whether one lands between
  // a commit and the child's count of it ("new") is luck (0-4 % of the kills); the test above
  // puts a kill exactly there.
  CHECK(total.in_first > 0);
  CHECK(total.later > 0);
}

TEST_CASE("adapter_files: concurrent savers take turns, concurrent loaders never see a mix",
          "[adapter_files][concurrent]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  a.save(tmp.path);

  SECTION("a saver waits while another holds the directory's lock") {
    const int fd = ::open((tmp.path / ".hra-lock").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    REQUIRE(::flock(fd, LOCK_EX) == 0);
    SharedCounter done;
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(fd);  // the inherited descriptor shares the parent's lock
      try {
        b.save(tmp.path);
        done.value->store(1);
      } catch (...) {
      }
      ::_exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    CHECK(done.value->load() == 0);
    CHECK(load_dir(tmp.path) == a.adapter);
    ::close(fd);  // releases the lock
    REQUIRE(::waitpid(pid, nullptr, 0) == pid);
    CHECK(done.value->load() == 1);
    CHECK(load_dir(tmp.path) == b.adapter);
  }
  SECTION("two processes saving 40 times each while this one loads") {
    pid_t savers[2];
    for (int k = 0; k < 2; ++k) {
      savers[k] = ::fork();
      REQUIRE(savers[k] >= 0);
      if (savers[k] == 0) {
        int rc = 0;
        try {
          for (int i = 0; i < 40; ++i) (k == 0 ? a : b).save(tmp.path);
        } catch (...) {
          rc = 3;
        }
        ::_exit(rc);
      }
    }
    int loads = 0, as = 0, bs = 0, mixed = 0, errors = 0, running = 2;
    while (running > 0) {
      try {
        const Adapter got = load_dir(tmp.path);
        (got == a.adapter ? as : got == b.adapter ? bs : mixed) += 1;
      } catch (const std::exception& e) {
        ++errors;
        UNSCOPED_INFO("concurrent load failed: " << e.what());
      }
      ++loads;
      for (pid_t& pid : savers) {
        int status = 0;
        if (pid > 0 && ::waitpid(pid, &status, WNOHANG) == pid) {
          CHECK(WIFEXITED(status));
          CHECK(WEXITSTATUS(status) == 0);
          pid = 0;
          --running;
        }
      }
    }
    WARN("CONCURRENT_TEST loads=" << loads << " a=" << as << " b=" << bs << " mixed=" << mixed
                                  << " errors=" << errors);
    CHECK(mixed == 0);
    CHECK(errors == 0);
    CHECK(stale_entries(tmp.path) == 0);
    const Adapter last = load_dir(tmp.path);
    CHECK((last == a.adapter || last == b.adapter));
  }
}

TEST_CASE("adapter_files: a save that fails leaves the previous adapter loadable",
          "[adapter_files][save]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  Saved a(2, hra::Variant::chain, 1), b(4, hra::Variant::gram_schmidt, 2);
  const std::string config_path = (tmp.path / peft::config_file_name).string();
  const std::string weights_path = (tmp.path / peft::weights_file_name).string();
  const peft::AdapterFiles b_files = peft::hra_adapter_files({{module_name, &b.layer}});
  const std::size_t b_weights = st::serialize(b_files.weights).size();
  const std::size_t b_config = b_files.config_text().size();
  REQUIRE(b_weights > b_config);

  SECTION("the disk is full (RLIMIT_FSIZE in a child), at every size that matters") {
    for (const bool plain : {false, true}) {
      for (const std::size_t limit : {std::size_t{0}, std::size_t{1}, std::size_t{8}, b_config - 1,
                                      b_config, b_config + 1, b_weights - 1, b_weights}) {
        DYNAMIC_SECTION((plain ? "from plain files" : "from the layout") << ", limit " << limit) {
          if (plain)
            a.save_plain(tmp.path);
          else
            a.save(tmp.path);
          std::vector<std::string> before;
          for (const auto& e : fs::directory_iterator(tmp.path))
            before.push_back(e.path().filename().string());
          std::sort(before.begin(), before.end());
          const ChildResult r = in_child([&] {
            std::signal(SIGXFSZ, SIG_IGN);
            struct rlimit lim {};
            ::getrlimit(RLIMIT_FSIZE, &lim);
            lim.rlim_cur = limit;
            ::setrlimit(RLIMIT_FSIZE, &lim);
            b.save(tmp.path);
          });
          INFO("child: " << r.error);
          if (limit >= b_weights) {
            CHECK(r.returned);
            CHECK(load_dir(tmp.path) == b.adapter);
            continue;
          }
          CHECK(!r.returned);
          CHECK_THAT(r.error,
                     Catch::Matchers::Contains("hra4peft8io_error") &&
                         Catch::Matchers::Contains("File too large") &&
                         Catch::Matchers::Contains("; the previous files are left as they were"));
          if (limit < hra::detail::version_marker_text.size()) {
            // A new version's marker is its first file.
            CHECK_THAT(r.error, Catch::Matchers::Contains("cannot write the version marker in "));
          } else {
            // Then the weights, the larger file; test_adapter_io fails the config.
            CHECK_THAT(r.error, Catch::Matchers::Contains(": write failed (new version in ") &&
                                    Catch::Matchers::Contains(weights_path));
          }
          CHECK(load_dir(tmp.path) == a.adapter);
          if (!plain) {
            std::vector<std::string> after;
            for (const auto& e : fs::directory_iterator(tmp.path))
              after.push_back(e.path().filename().string());
            std::sort(after.begin(), after.end());
            CHECK(after == before);  // the new version directory is removed
          }
          b.save(tmp.path);  // and the next save works
          CHECK(load_dir(tmp.path) == b.adapter);
          CHECK(stale_entries(tmp.path) == 0);
        }
      }
    }
  }
  SECTION("entries in the way and directories that cannot be created") {
    a.save(tmp.path);
    write_all(tmp.path / "file", "x");
    expect_error<peft::io_error>(
        [&] { b.save(tmp.path / "file" / "adapter"); },
        {(tmp.path / "file" / "adapter").string(), "cannot create the directory: Not a directory"});
    const fs::path other = tmp.path / "other";
    fs::create_directories(other / "..data");  // a directory where the link goes
    expect_error<peft::io_error>([&] { b.save(other); },
                                 {(other / "..data").string(), "exists and is not a symlink"});
    CHECK(load_dir(tmp.path) == a.adapter);
  }
  SECTION("permission denied: a read-only directory (as root, the save runs as user nobody)") {
    a.save(tmp.path);
    const fs::perms read_only = fs::perms::owner_read | fs::perms::owner_exec |
                                fs::perms::group_read | fs::perms::group_exec |
                                fs::perms::others_read | fs::perms::others_exec;
    fs::permissions(tmp.path, read_only);
    // Root is not denied by permission bits, so a root test drops to nobody (65534) in the
    // child first; the parent keeps its identity and restores the bits.
    const ChildResult r = in_child([&] {
      if (::geteuid() == 0 &&
          (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0))
        throw std::runtime_error("cannot become user nobody");
      b.save(tmp.path);
    });
    fs::permissions(tmp.path, fs::perms::owner_all);
    INFO("child: " << r.error);
    CHECK(!r.returned);
    CHECK_THAT(r.error, Catch::Matchers::Contains("hra4peft8io_error") &&
                            Catch::Matchers::Contains(tmp.path.string()) &&
                            Catch::Matchers::Contains("Permission denied"));
    CHECK(load_dir(tmp.path) == a.adapter);
    b.save(tmp.path);  // with the bits restored the next save works
    CHECK(load_dir(tmp.path) == b.adapter);
    CHECK(stale_entries(tmp.path) == 0);
  }
}

TEST_CASE("adapter_files: huge and sparse files are refused by size before they are read",
          "[adapter_files][bounded]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  const fs::path file = tmp.path / "huge.safetensors";
  const std::uint64_t gib = std::uint64_t{1} << 30;
  const std::size_t small = 1 << 20;  // no allocation or read beyond this

  SECTION("100 GiB: refused by ReadOptions::max_file_bytes, nothing read") {
    if (!sparse_file(file, small_safetensors(), 100 * gib)) {
      WARN("the file system refuses a 100 GiB sparse file; case skipped");
      return;
    }
    const auto [alloc, read] = measured([&] {
      expect_error<st::io_error>([&] { st::load(file); },
                                 {file.string(),
                                  ": is 107374182400 bytes, more than the "
                                  "17179869184 accepted (ReadOptions::max_file_bytes)"});
    });
    CHECK(alloc < small);
    if (read) CHECK(*read < small);
    // The same file as an adapter's weights, through the directory loader.
    Saved a(2, hra::Variant::chain, 1);
    a.save(tmp.path / "adapter");
    fs::remove(tmp.path / "adapter" / peft::weights_file_name);
    fs::rename(file, tmp.path / "adapter" / peft::weights_file_name);
    expect_error<st::io_error>([&] { load_dir(tmp.path / "adapter"); }, {"more than the"});
  }
  SECTION("2 GiB of zeros: header length 0, refused after 8 bytes") {
    REQUIRE(sparse_file(file, "", 2 * gib));
    const auto [alloc, read] = measured([&] {
      expect_error<st::format_error>([&] { st::load(file); }, {"header is not valid JSON"});
    });
    CHECK(alloc < small);
    if (read) CHECK(*read < small);
  }
  SECTION("2 GiB: a valid small file followed by a sparse tail") {
    REQUIRE(sparse_file(file, small_safetensors(), 2 * gib));
    const auto [alloc, read] = measured([&] {
      expect_error<st::format_error>(
          [&] { st::load(file); },
          {"at the end of the data buffer belong to no tensor (the format allows no trailing "
           "bytes)"});
    });
    CHECK(alloc < small);
    if (read) CHECK(*read < small);
    // Accepted when trailing bytes are allowed, reading only the tensor's 16 bytes.
    st::ReadOptions lenient;
    lenient.allow_unindexed_bytes = true;
    const auto [alloc2, read2] = measured([&] {
      const st::TensorFile f = st::load(file, lenient);
      CHECK(f.at("t").data.size() == 16);
    });
    CHECK(alloc2 < small);
    if (read2) CHECK(*read2 < small);
  }
  SECTION("2 GiB: a header length of 1.5 GiB, beyond max_header_bytes") {
    std::string head(8, '\0');
    const std::uint64_t len = 3 * gib / 2;
    for (int i = 0; i < 8; ++i)
      head[static_cast<std::size_t>(i)] = static_cast<char>(len >> (8 * i));
    REQUIRE(sparse_file(file, head, 2 * gib));
    const auto [alloc, read] = measured([&] {
      expect_error<st::format_error>([&] { st::load(file); },
                                     {"header length 1610612736 exceeds the limit of 100000000"});
    });
    CHECK(alloc < small);
    if (read) CHECK(*read < small);
  }
  SECTION("a header that declares more data than the file holds") {
    std::string bytes = small_safetensors();
    write_all(file, bytes.substr(0, bytes.size() - 8));
    expect_error<st::format_error>([&] { st::load(file); },
                                   {"run past the end of the data buffer"});
  }
  SECTION("a 2 GiB adapter_config.json: refused by its 16 MiB limit") {
    Saved a(2, hra::Variant::chain, 1);
    const fs::path dir = tmp.path / "adapter";
    a.save_plain(dir);
    REQUIRE(sparse_file(dir / peft::config_file_name, "{", 2 * gib));
    const auto [alloc, read] = measured([&] {
      expect_error<peft::io_error>([&] { load_dir(dir); },
                                   {"is 2147483648 bytes, more than the 16777216 accepted"});
    });
    CHECK(alloc < small);
    if (read) CHECK(*read < small);
  }
}

TEST_CASE("adapter_files: NUL bytes in the JSON of either file are refused",
          "[adapter_files][nul]") {
  const hra_test::TempDir tmp("hra_test_adapter_files");
  Saved a(2, hra::Variant::chain, 1);
  const fs::path dir = tmp.path / "adapter";
  a.save_plain(dir);
  const std::string config = read_all(dir / peft::config_file_name);
  const std::string weights = read_all(dir / peft::weights_file_name);

  SECTION("adapter_config.json: after the object, and inside a string") {
    write_all(dir / peft::config_file_name, config + std::string("\0{\"r\": 7}", 9));
    expect_error<peft::config_error>(
        [&] { load_dir(dir); },
        {(dir / peft::config_file_name).string(),
         "not valid JSON: NUL byte at offset " + std::to_string(config.size())});
    std::string inside = config;
    inside.insert(inside.find("HRA") + 1, 1, '\0');
    write_all(dir / peft::config_file_name, inside);
    expect_error<peft::config_error>([&] { load_dir(dir); }, {"NUL byte at offset"});
    expect_error<peft::config_error>([&] { peft::parse_config(std::string("{}\0", 3)); },
                                     {"<memory>: not valid JSON: NUL byte at offset 2"});
  }
  SECTION("the safetensors header: NUL padding, or text after a NUL") {
    const std::uint64_t header_len =
        hra::detail::load_le<std::uint64_t>(reinterpret_cast<const unsigned char*>(weights.data()));
    std::string json = weights.substr(8, static_cast<std::size_t>(header_len));
    json.erase(json.find_last_not_of(' ') + 1);
    const std::string data = weights.substr(8 + static_cast<std::size_t>(header_len));
    const auto file_with = [&](const std::string& header) {
      std::string out(8, '\0');
      hra::detail::store_le(static_cast<std::uint64_t>(header.size()),
                            reinterpret_cast<unsigned char*>(out.data()));
      return out + header + data;
    };
    // Before, both loaded: nlohmann stops at a NUL and the rest was never looked at.
    const std::string padded = file_with(json + std::string(8 - json.size() % 8, '\0'));
    const std::string trailing = file_with(json + std::string(1, '\0') + "{\"x\": garbage");
    for (const std::string& bytes : {padded, trailing}) {
      write_all(dir / peft::weights_file_name, bytes);
      expect_error<st::format_error>(
          [&] { st::load(dir / peft::weights_file_name); },
          {"header is not valid JSON: NUL byte at offset " + std::to_string(json.size())});
      expect_error<st::format_error>([&] { st::parse(bytes); },
                                     {"safetensors: <memory>: header is not valid JSON: NUL"});
      expect_error<st::format_error>([&] { load_dir(dir); }, {"NUL byte at offset"});
    }
  }
}
