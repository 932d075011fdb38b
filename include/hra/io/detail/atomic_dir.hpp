// Replacing the files of a directory together, atomically (the layout Kubernetes' AtomicWriter
// uses): the primitive behind peft::save_adapter_files(). See docs/adapter_files.md.
//
//   DIR/adapter_config.json        -> ..data/adapter_config.json        (symlinks, never change)
//   DIR/adapter_model.safetensors  -> ..data/adapter_model.safetensors
//   DIR/..data                     -> ..2026_01_31_12_00_00.4242_0_31337  (the live version)
//   DIR/..2026_01_31_12_00_00.4242_0_31337/{adapter_config.json, adapter_model.safetensors}
//   DIR/.hra-lock                  (flock'ed by a saver; savers of one directory take turns)
//
// A save writes a fresh version directory (files and directory fsynced), then renames a new
// symlink over ..data: one rename(2), so every reader that goes through ..data sees either the
// whole old version or the whole new one. Readers resolve ..data once and open every file of
// that version before reading any.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <optional>
#include <random>
#include <vector>

#include "os_files.hpp"

namespace hra {
namespace detail {

/// The symlink that names the live version directory.
inline constexpr const char* data_link_name = "..data";
/// The file savers flock, so that two saves of one directory do not interleave.
inline constexpr const char* dir_lock_name = ".hra-lock";

/// The marker file every version directory holds, written right after the directory is made
/// and before anything else: with the name pattern (is_version_name()), what tells a version
/// this library wrote from anything else in the directory.
inline constexpr const char* version_marker_name = "..hra-version";
/// The marker's exact content.
inline constexpr std::string_view version_marker_text = "hra adapter version directory\n";

/// Whether `name` has the form of a version directory's name,
/// "..YYYY_MM_DD_HH_MM_SS.<pid>_<count>_<random>" (make_version_dir()), and nothing else: no
/// separator, no other characters.
inline bool is_version_name(std::string_view name) {
  // ".." then 4+2+2+2+2+2 digits joined by '_', then '.', then three '_'-joined digit runs.
  static constexpr int date_digits[] = {4, 2, 2, 2, 2, 2};
  std::size_t i = 0;
  const auto digits = [&](std::size_t min, std::size_t max) {
    std::size_t n = 0;
    while (i < name.size() && n < max && name[i] >= '0' && name[i] <= '9') ++i, ++n;
    return n >= min;
  };
  const auto expect = [&](char c) { return i < name.size() && name[i++] == c; };
  if (!expect('.') || !expect('.')) return false;
  for (int k = 0; k < 6; ++k) {
    if (k > 0 && !expect('_')) return false;
    const auto n = static_cast<std::size_t>(date_digits[k]);
    if (!digits(n, n)) return false;
  }
  if (!expect('.') || !digits(1, 20)) return false;
  for (int k = 0; k < 2; ++k)
    if (!expect('_') || !digits(1, 20)) return false;
  return i == name.size();
}

/// What an entry `dir`/`name` is to this library.
enum class VersionKind {
  ours,        ///< a version directory it wrote: the name pattern, a real directory, the marker
  unfinished,  ///< a version name, a real directory holding only a partial marker: a save killed
               ///< while writing the marker (its first bytes, possibly none)
  empty,       ///< an empty real directory with a version name (a save killed before its marker)
  foreign      ///< anything else: never removed, never followed
};

inline VersionKind version_kind(const std::filesystem::path& dir, std::string_view name) {
  namespace fs = std::filesystem;
  if (!is_version_name(name)) return VersionKind::foreign;
  std::error_code ec;
  const fs::path p = dir / std::string(name);
  if (!fs::is_directory(fs::symlink_status(p, ec))) return VersionKind::foreign;
  const fs::path marker = p / version_marker_name;
  if (fs::is_regular_file(fs::symlink_status(marker, ec))) {
    const std::uintmax_t size = fs::file_size(marker, ec);
    if (ec || size > version_marker_text.size()) return VersionKind::foreign;
    std::string text(static_cast<std::size_t>(size), '\0');
    std::FILE* f = std::fopen(marker.c_str(), "rb");
    if (!f) return VersionKind::foreign;
    const std::size_t got = std::fread(text.data(), 1, text.size(), f);
    std::fclose(f);
    if (got != text.size() || version_marker_text.substr(0, text.size()) != text)
      return VersionKind::foreign;
    if (text.size() == version_marker_text.size()) return VersionKind::ours;
    // A partial marker: ours only if nothing else is in the directory.
    fs::directory_iterator it(p, ec), end;
    if (ec) return VersionKind::foreign;
    int entries = 0;
    for (; it != end && entries < 2; it.increment(ec)) {
      if (ec) return VersionKind::foreign;
      ++entries;
    }
    return entries == 1 ? VersionKind::unfinished : VersionKind::foreign;
  }
  if (fs::is_empty(p, ec) && !ec) return VersionKind::empty;
  return VersionKind::foreign;
}

/// Removes `dir`/`name` if it is a version directory this library wrote (recursively), one a
/// killed save left with a partial marker, or an empty one with a version name; anything else
/// is left alone. Best effort, no error.
inline void remove_own_version(const std::filesystem::path& dir, std::string_view name) {
  std::error_code ignored;
  const std::filesystem::path p = dir / std::string(name);
  switch (version_kind(dir, name)) {
    case VersionKind::ours:
      std::filesystem::remove_all(p, ignored);
      break;
    case VersionKind::unfinished:
      std::filesystem::remove(p / version_marker_name, ignored);
      std::filesystem::remove(p, ignored);  // removes only an empty dir
      break;
    case VersionKind::empty:
      std::filesystem::remove(p, ignored);  // removes only an empty dir
      break;
    case VersionKind::foreign:
      break;
  }
}

/// What the user-visible file `name` links to: "..data/<name>".
inline std::filesystem::path data_link_target(std::string_view name) {
  return std::filesystem::path(data_link_name) / std::string(name);
}

/// Whether `dir`/`name` is the symlink ..data/<name> of this layout.
inline bool is_data_link(const std::filesystem::path& dir, std::string_view name) {
  std::error_code ec;
  const std::filesystem::path p = dir / std::string(name);
  if (!std::filesystem::is_symlink(std::filesystem::symlink_status(p, ec))) return false;
  const std::filesystem::path target = std::filesystem::read_symlink(p, ec);
  return !ec && target == data_link_target(name);
}

/// The target of `dir`/..data (the live version's name), or nothing when there is none.
inline std::optional<std::filesystem::path> live_version(const std::filesystem::path& dir) {
  std::error_code ec;
  const std::filesystem::path target = std::filesystem::read_symlink(dir / data_link_name, ec);
  if (ec) return std::nullopt;
  return target;
}

/// \brief Where a reader finds the files of `dir`, with ..data resolved once: path(name) is
/// the live version's file when `dir`/name is this layout's link, otherwise `dir`/name itself
/// (plain directories: PEFT's, fixtures, files edited by hand).
struct ResolvedDir {
  std::filesystem::path dir;
  std::optional<std::filesystem::path> version;  ///< target of ..data when it was read

  explicit ResolvedDir(std::filesystem::path d) : dir(std::move(d)), version(live_version(dir)) {}

  std::filesystem::path path(std::string_view name) const {
    if (version && is_data_link(dir, name))
      return (version->is_absolute() ? *version : dir / *version) / std::string(name);
    return dir / std::string(name);
  }
  /// Whether ..data names another version than when this was resolved (a save happened).
  bool changed() const { return live_version(dir) != version; }
};

/// \brief Calls `open(resolved, report_missing)` with `dir` resolved through ..data until it
/// succeeds. `open` opens every file it needs from resolved.path(name) before reading any and
/// returns false when one was missing; when ..data has changed since it was resolved (a save
/// removed that version in between), it is resolved and opened again; otherwise `open` is
/// called once more with report_missing true, to throw its missing-file error.
template <typename Open>
void open_resolved(const std::filesystem::path& dir, Open open) {
  for (int attempt = 0; attempt < 16; ++attempt) {
    const ResolvedDir resolved(dir);
    if (open(resolved, false)) return;
    if (!resolved.changed()) {
      (void)open(resolved, true);
      return;
    }
  }
  (void)open(ResolvedDir(dir), true);
}

/// One file of a directory replaced by replace_directory_files().
struct NamedBytes {
  std::string name;        ///< file name in the directory (no separators)
  std::string_view bytes;  ///< its new content
};

/// The steps of replace_directory_files(), in order: where a fault-injection test stops a save
/// (see atomic_dir_step()). `migrated` is reached only when plain files were migrated.
enum class AtomicDirStep {
  locked,           ///< the lock is held; nothing has changed yet
  cleaned,          ///< leftovers of interrupted saves removed
  version_made,     ///< a version directory is made, without its marker (when migrating: the
                    ///< copy of the current files first, then the new version)
  marker_opened,    ///< its marker file is created, none of its bytes written yet
  link_replaced,    ///< migration: one plain file replaced by its link (once per file)
  migrated,         ///< plain files copied into a version, ..data and the links point at it
  file_written,     ///< one file of the new version written and fsynced (once per file)
  version_written,  ///< the new version's files and directory are written and fsynced
  committed,        ///< ..data names the new version (the atomic step)
  synced,           ///< the directory is fsynced
  done              ///< the previous version is removed
};

#ifdef HRA_TESTING_FAULT_INJECTION
namespace testing {
/// \brief Test-only, and only compiled in when HRA_TESTING_FAULT_INJECTION is defined (hra's
/// kill tests define it for their whole program; a program defines it in every translation unit
/// that includes hra's io headers or in none). Called, when set, after each step of every
/// replace_directory_files() in the process: a test that kills its own process there
/// (raise(SIGKILL)) shows what a kill at that exact step leaves, without depending on timing.
inline void (*atomic_dir_fault_hook)(AtomicDirStep) = nullptr;
}  // namespace testing

/// Reports `step` to testing::atomic_dir_fault_hook, if set.
inline void atomic_dir_step(AtomicDirStep step) {
  if (testing::atomic_dir_fault_hook != nullptr) testing::atomic_dir_fault_hook(step);
}
#else
/// A step of a save; nothing happens there outside fault-injection builds.
inline void atomic_dir_step(AtomicDirStep) {}
#endif

#if HRA_POSIX
/// fsync of the file or directory at `path`; 0 or the errno.
inline int fsync_path(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  const int rc = ::fsync(fd) == 0 ? 0 : errno;
  ::close(fd);
  return rc;
}
#else
inline int fsync_path(const std::filesystem::path&) {
  return 0;
}
#endif

/// Writes `bytes` to the new file `path` and flushes it to disk; 0 or the errno.
inline int write_new_file(const std::filesystem::path& path, std::string_view bytes,
                          const AtomicDirStep* opened = nullptr) {
#if HRA_POSIX
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) return errno;
  if (opened) atomic_dir_step(*opened);
  const char* p = bytes.data();
  std::size_t left = bytes.size();
  int err = 0;
  while (left > 0 && err == 0) {
    const ::ssize_t n = ::write(fd, p, left);
    if (n < 0) {
      if (errno != EINTR) err = errno;
      continue;
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  return err;
#else
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (opened) atomic_dir_step(*opened);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.flush();
  return out ? 0 : EIO;
#endif
}

/// A new version directory in `dir`, "..<UTC date and time>.<pid>_<count>_<random>", holding
/// only its marker (version_marker_name, fsynced). Returns its name; `fail(what, errno)` is
/// called (and must throw) on failure, after removing the directory if it was made.
template <typename Fail>
std::filesystem::path make_version_dir(const std::filesystem::path& dir, Fail fail) {
  static std::atomic<unsigned> counter{0};
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};  // the date only makes the names readable; pid, count and random make them unique
#if HRA_POSIX
  ::gmtime_r(&now, &utc);
  const long pid = static_cast<long>(::getpid());
#else
  utc = *std::gmtime(&now);
  const long pid = 0;
#endif
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y_%m_%d_%H_%M_%S", &utc);
  std::random_device random;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const std::filesystem::path name =
        concat("..", stamp, ".", pid, "_", counter.fetch_add(1), "_", random() % 100000u);
    std::error_code ec;
    if (std::filesystem::create_directory(dir / name, ec)) {
      atomic_dir_step(AtomicDirStep::version_made);
      const AtomicDirStep opened = AtomicDirStep::marker_opened;
      if (const int err =
              write_new_file(dir / name / version_marker_name, version_marker_text, &opened)) {
        std::error_code ignored;
        std::filesystem::remove_all(dir / name, ignored);
        fail(concat("cannot write the version marker in ", (dir / name).string()), err);
      }
      return name;
    }
    if (ec) fail(concat("cannot create the version directory ", (dir / name).string()), ec.value());
  }
  fail("cannot find a free version directory name", EEXIST);
  return {};
}

/// The temporary symlink swap_symlink() makes for `link`: "..<link>.tmp".
inline std::string temp_link_name(std::string_view link) {
  return concat("..", link, ".tmp");
}

/// Whether `dir`/`entry` is a temporary link swap_symlink() left for one of `links` (a symlink
/// of that name whose target is what swap_symlink() would have put there: a version name for
/// ..data, "..data/<name>" for a file). Such a link is this library's to remove.
inline bool is_own_temp_link(const std::filesystem::path& dir, std::string_view entry,
                             const std::vector<std::string>& links) {
  namespace fs = std::filesystem;
  for (const std::string& link : links) {
    if (entry != temp_link_name(link)) continue;
    std::error_code ec;
    const fs::path p = dir / std::string(entry);
    if (!fs::is_symlink(fs::symlink_status(p, ec))) return false;
    const fs::path target = fs::read_symlink(p, ec);
    if (ec) return false;
    return link == data_link_name ? is_version_name(target.string())
                                  : target == data_link_target(link);
  }
  return false;
}

/// Puts `target` at the symlink `dir`/`link` atomically: a temporary symlink renamed over it.
/// 0 or the errno. The temporary name must be free or hold this library's own temporary link
/// (replace_directory_files() checks that first); anything else there is never removed.
inline int swap_symlink(const std::filesystem::path& dir, const std::string& link,
                        const std::filesystem::path& target) {
  const std::filesystem::path temp = dir / temp_link_name(link);
  std::error_code ec;
  if (std::filesystem::is_symlink(std::filesystem::symlink_status(temp, ec)))
    std::filesystem::remove(temp, ec);
  std::filesystem::create_symlink(target, temp, ec);
  if (ec) return ec.value();
  std::filesystem::rename(temp, dir / link, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(temp, ignored);
    return ec.value();
  }
  return 0;
}

/// Copies the content of `from` (links followed) to the new file `to`, flushed to disk: a hard
/// link when the file system allows it (no data copied), otherwise a copy. 0 or the errno.
inline int copy_durably(const std::filesystem::path& from, const std::filesystem::path& to) {
#if HRA_POSIX
  if (::linkat(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), AT_SYMLINK_FOLLOW) == 0)
    return fsync_path(to);
#endif
  std::error_code ec;
  std::filesystem::copy_file(from, to, ec);
  if (ec) return ec.value();
  return fsync_path(to);
}

/// What check_understood() found in a directory it accepts.
struct UnderstoodDir {
  std::optional<std::filesystem::path> live;  ///< the version ..data names, if any
  bool migrate = false;                       ///< some file to write is not yet its ..data link
  std::vector<std::string> links;             ///< ..data and the file names: the links a save swaps
};

/// Step 1 of replace_directory_files(): throws `Error` for an entry in the way or a directory
/// this library does not understand (see there), changing nothing.
template <typename Error>
UnderstoodDir check_understood(const std::filesystem::path& dir,
                               const std::vector<NamedBytes>& files, std::string_view prefix) {
  namespace fs = std::filesystem;
  const std::string not_understood =
      "; this is not a directory hra's saves understand, so nothing was changed (move the entry "
      "away, or save into another directory)";
  std::error_code ec;
  const fs::path data_path = dir / data_link_name;
  const fs::file_status data_status = fs::symlink_status(data_path, ec);
  UnderstoodDir out;
  if (fs::exists(data_status)) {
    if (!fs::is_symlink(data_status))
      throw Error(concat(prefix, data_path.string(),
                         ": exists and is not a symlink (hra's link to the live version)",
                         not_understood));
    const fs::path target = fs::read_symlink(data_path, ec);
    if (ec || !is_version_name(target.string()))
      throw Error(concat(prefix, data_path.string(), ": links to '", target.string(),
                         "', which is not a version directory of hra's layout (\"..<date>.<pid>_"
                         "<count>_<random>\" directly inside the directory)",
                         not_understood));
    const fs::file_status live_status = fs::symlink_status(dir / target, ec);
    if (fs::exists(live_status) && !fs::is_directory(live_status))
      throw Error(concat(prefix, (dir / target).string(),
                         ": the live version named by ..data is not a directory", not_understood));
    out.live = target;
  }
  out.links = {data_link_name};
  for (const NamedBytes& f : files) {
    const fs::path p = dir / f.name;
    const fs::file_status s = fs::symlink_status(p, ec);
    if (fs::exists(s) && !fs::is_symlink(s) && !fs::is_regular_file(s))
      throw Error(concat(prefix, p.string(),
                         ": exists and is neither a regular file nor a symlink; remove it first"));
    if (!is_data_link(dir, f.name)) out.migrate = true;
    out.links.push_back(f.name);
  }
  for (const std::string& link : out.links) {
    const fs::path temp = dir / temp_link_name(link);
    if (fs::exists(fs::symlink_status(temp, ec)) &&
        !is_own_temp_link(dir, temp_link_name(link), out.links))
      throw Error(concat(prefix, temp.string(),
                         ": hra's saves use this name for a temporary link, and it holds "
                         "something else",
                         not_understood));
  }
  return out;
}

/// \brief Replaces the files `files` of the directory `dir` (created if needed) together and
/// atomically, in the layout described at the top of this header.
///
/// Serialised by an exclusive flock on `dir`/.hra-lock: a second saver of the same directory
/// (thread or process) waits until the first has finished, then replaces its files in turn.
///
/// Only what this library owns is ever removed or replaced (docs/adapter_files.md, "What a save
/// owns"): the files being written, `..data`, its temporary links, and version directories,
/// recognised by their name *and* the marker inside them. Steps:
/// 1. refuse, with nothing changed, a directory it does not understand: `..data` that is not a
///    symlink to a version name directly inside `dir` (`..data -> .`, `-> ..`, `-> victim` or an
///    absolute path), a version name there that is not a directory, a temporary-link name
///    holding something else than this library's link, a directory where a file goes;
/// 2. remove what interrupted saves left: marked version directories other than the live one,
///    empty directories with a version name, this library's temporary links;
/// 3. when some file of `dir` is not yet this layout's link (a plain directory from PEFT or
///    another tool, or a file replaced by hand), migrate: copy the current files into a version
///    directory, point ..data at it, and replace each plain file by its link, which reads the
///    same bytes (so a reader sees the old files throughout);
/// 4. write the new version (its marker, every file and the directory fsynced), rename a new
///    ..data over the old one, fsync `dir`, and remove the previous version if it is a marked
///    one. A kill at any moment leaves ..data naming the old or the new version.
///
/// Errors throw `Error` (constructible from a message) starting with `prefix`, the path of the
/// file or directory involved, what failed and the OS error text; after a failure `dir` reads
/// as it did before (the new version directory is removed, best effort).
template <typename Error>
void replace_directory_files(const std::filesystem::path& dir, const std::vector<NamedBytes>& files,
                             std::string_view prefix) {
  namespace fs = std::filesystem;
  const std::string where = concat(prefix, dir.string(), ": ");
  const std::string unchanged = "; the previous files are left as they were";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir))
    throw Error(where + "cannot create the directory" + (ec ? ": " + ec.message() : ""));

  (void)check_understood<Error>(dir, files, prefix);

#if HRA_POSIX
  const fs::path lock_path = dir / dir_lock_name;
  const int lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0666);
  if (lock_fd < 0)
    throw Error(concat(prefix, lock_path.string(),
                       ": cannot open the lock file: ", errno_text(errno), unchanged));
  struct LockGuard {
    int fd;
    ~LockGuard() { ::close(fd); }  // closing releases the flock
  } guard{lock_fd};
  while (::flock(lock_fd, LOCK_EX) != 0) {
    if (errno != EINTR)
      throw Error(
          concat(prefix, lock_path.string(), ": cannot lock: ", errno_text(errno), unchanged));
  }
#endif
  atomic_dir_step(AtomicDirStep::locked);

  // 1. Checked again under the lock: the check before it changed nothing (not even the lock
  // file), and no other saver can be half-way through a save now.
  const UnderstoodDir understood = check_understood<Error>(dir, files, prefix);
  const std::optional<fs::path>& live = understood.live;
  const bool migrate = understood.migrate;
  const std::vector<std::string>& links = understood.links;

  // 2. What interrupted saves left behind: marked versions but the live one, empty version
  // directories, temporary links. Nothing else is touched.
  std::vector<std::string> leftovers;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (live && fs::path(name) == *live) continue;
    if (is_version_name(name) || is_own_temp_link(dir, name, links)) leftovers.push_back(name);
  }
  for (const std::string& name : leftovers) {
    if (is_version_name(name)) {
      remove_own_version(dir, name);
    } else {
      std::error_code ignored;
      fs::remove(dir / name, ignored);  // a symlink: removes the link only
    }
  }
  atomic_dir_step(AtomicDirStep::cleaned);

  const auto fail_at = [&](const fs::path& path, const std::string& what, int err,
                           const std::optional<fs::path>& remove) {
    if (remove) {
      std::error_code ignored;
      fs::remove_all(dir / *remove, ignored);
    }
    throw Error(concat(prefix, path.string(), ": ", what, ": ",
                       std::generic_category().message(err), unchanged));
  };

  if (migrate) {
    // Every file keeps reading its current bytes: first through a copy under ..data, then
    // through its link to that copy.
    const fs::path old_copy = make_version_dir(
        dir, [&](const std::string& what, int err) { fail_at(dir, what, err, std::nullopt); });
    for (const NamedBytes& f : files) {
      const fs::path p = dir / f.name;
      if (!fs::exists(p, ec)) continue;  // missing, or a dangling link: nothing to keep
      if (const int err = copy_durably(p, dir / old_copy / f.name))
        fail_at(p, "cannot keep a copy of the current file in " + (dir / old_copy).string(), err,
                old_copy);
    }
    if (const int err = fsync_path(dir / old_copy))
      fail_at(dir / old_copy, "fsync failed", err, old_copy);
    if (const int err = swap_symlink(dir, data_link_name, old_copy))
      fail_at(dir / data_link_name, "cannot link the current files", err, old_copy);
    for (const NamedBytes& f : files) {
      if (is_data_link(dir, f.name)) continue;
      // From here on the previous files live in old_copy: a failure keeps it.
      if (const int err = swap_symlink(dir, f.name, data_link_target(f.name)))
        fail_at(dir / f.name,
                "cannot replace the file by its link to " + std::string(data_link_name), err,
                std::nullopt);
      atomic_dir_step(AtomicDirStep::link_replaced);
    }
    if (const int err = fsync_path(dir)) fail_at(dir, "fsync failed", err, std::nullopt);
    atomic_dir_step(AtomicDirStep::migrated);
  }

  const std::optional<fs::path> previous = live_version(dir);  // the migration copy, or live
  const fs::path version = make_version_dir(
      dir, [&](const std::string& what, int err) { fail_at(dir, what, err, std::nullopt); });
  for (const NamedBytes& f : files) {
    if (const int err = write_new_file(dir / version / f.name, f.bytes))
      fail_at(dir / f.name, concat("write failed (new version in ", (dir / version).string(), ")"),
              err, version);
    atomic_dir_step(AtomicDirStep::file_written);
  }
  if (const int err = fsync_path(dir / version))
    fail_at(dir / version, "fsync failed", err, version);
  atomic_dir_step(AtomicDirStep::version_written);
  if (const int err = swap_symlink(dir, data_link_name, version))
    fail_at(dir / data_link_name, "cannot point the link at the new version", err, version);
  atomic_dir_step(AtomicDirStep::committed);
  // The new version is live; a failure to make that durable or to tidy up is not reported
  // (the next save removes what is left).
  (void)fsync_path(dir);
  atomic_dir_step(AtomicDirStep::synced);
  for (const std::optional<fs::path>& old : {live, previous}) {
    if (!old || *old == version) continue;
    remove_own_version(dir, old->string());  // only a marked version directly inside dir
  }
  atomic_dir_step(AtomicDirStep::done);
}

}  // namespace detail
}  // namespace hra
