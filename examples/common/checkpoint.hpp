// Training checkpoints for the examples: a JSON document of scalars and a safetensors file of
// tensors, replaced on disk as a whole, so that a kill at any moment leaves either the previous
// checkpoint or the new one, never a mix.
#pragma once

#include <hra/hra.hpp>
#include <hra/io/safetensors.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace hra::examples {

/// A checkpoint could not be written or read (names the path and the OS error or the defect).
class checkpoint_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What a checkpoint holds: scalars (any JSON) and tensors.
struct CheckpointData {
  nlohmann::json state = nlohmann::json::object();
  safetensors::TensorFile tensors;
};

namespace detail {

inline std::string os_error(const std::string& what, const std::filesystem::path& path) {
  return "checkpoint: " + what + " " + path.string() + ": " + std::strerror(errno);
}

/// Writes `bytes` to a new file at `path` and fsyncs it.
inline void write_synced(const std::filesystem::path& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw checkpoint_error(os_error("cannot create", path));
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string message = os_error("cannot write", path);
      ::close(fd);
      throw checkpoint_error(message);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const std::string message = os_error("cannot fsync", path);
    ::close(fd);
    throw checkpoint_error(message);
  }
  if (::close(fd) != 0) throw checkpoint_error(os_error("cannot close", path));
}

/// fsync of a directory, so that the entries created or renamed in it are durable.
inline void sync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw checkpoint_error(os_error("cannot open", dir));
  const int rc = ::fsync(fd);
  const std::string message = rc != 0 ? os_error("cannot fsync", dir) : "";
  ::close(fd);
  if (rc != 0) throw checkpoint_error(message);
}

inline std::string read_all(const std::filesystem::path& path) {
  std::string out;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw checkpoint_error(os_error("cannot open", path));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string message = os_error("cannot read", path);
      ::close(fd);
      throw checkpoint_error(message);
    }
    if (n == 0) break;
    out.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

/// 64-bit FNV-1a of `bytes`: the checkpoint's check that its tensor file is the one written.
inline std::uint64_t fnv1a(const void* data, std::size_t bytes,
                           std::uint64_t h = 14695981039346656037ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

/// Holds an exclusive flock() on DIR/.lock while alive: two processes saving into one
/// checkpoint directory take turns instead of mixing their files.
class DirectoryLock {
 public:
  explicit DirectoryLock(const std::filesystem::path& dir) {
    const auto path = dir / ".lock";
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw checkpoint_error(os_error("cannot open", path));
    while (::flock(fd_, LOCK_EX) != 0)
      if (errno != EINTR) {
        const std::string message = os_error("cannot lock", path);
        ::close(fd_);
        throw checkpoint_error(message);
      }
  }
  ~DirectoryLock() { ::close(fd_); }  // closing releases the lock
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace detail

/// 64-bit FNV-1a of a matrix's bytes (e.g. logits): equal hashes for bit-for-bit equal values.
template <typename Derived>
std::uint64_t bytes_hash(const Eigen::DenseBase<Derived>& m) {
  const Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> plain = m;
  return detail::fnv1a(plain.data(),
                       static_cast<std::size_t>(plain.size()) * sizeof(typename Derived::Scalar));
}

/// \brief Writes a checkpoint into `dir`, replacing the previous one as a whole.
///
/// Layout: DIR/snapshot-<n>/{state.json, tensors.safetensors} and a symbolic link DIR/current
/// naming the newest snapshot. A save writes a new snapshot directory (each file fsynced, then
/// the directory), points a new link DIR/current.tmp at it, renames that over DIR/current (the
/// atomic step: rename(2) replaces the link in one go), fsyncs DIR and only then removes the
/// older snapshots and any leftovers of interrupted saves. A kill at any moment leaves
/// DIR/current naming a complete snapshot: the old one or the new one. state.json records the
/// size and FNV-1a hash of tensors.safetensors, which load_checkpoint() verifies. Saves into one
/// directory are serialised by an flock() on DIR/.lock. Throws checkpoint_error naming the path
/// and the OS error; a failed save leaves the previous checkpoint in place.
inline void save_checkpoint(const std::filesystem::path& dir, const CheckpointData& data) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw checkpoint_error("checkpoint: cannot create " + dir.string() + ": " + ec.message());
  detail::DirectoryLock lock(dir);

  // The next snapshot number: one past the largest present (so names never repeat).
  std::uint64_t next = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("snapshot-", 0) == 0) {
      try {
        next = std::max<std::uint64_t>(next, std::stoull(name.substr(9)) + 1);
      } catch (const std::exception&) {
      }
    }
  }
  const std::string snapshot = "snapshot-" + std::to_string(next);
  const fs::path tmp_dir = dir / snapshot;
  if (!fs::create_directory(tmp_dir, ec) || ec)
    throw checkpoint_error("checkpoint: cannot create " + tmp_dir.string() + ": " +
                           (ec ? ec.message() : "exists"));
  const std::string tensor_bytes = safetensors::serialize(data.tensors);
  nlohmann::json state = data.state;
  state["tensors_file"] = {{"bytes", tensor_bytes.size()},
                           {"fnv1a", detail::fnv1a(tensor_bytes.data(), tensor_bytes.size())}};
  detail::write_synced(tmp_dir / "tensors.safetensors", tensor_bytes);
  detail::write_synced(tmp_dir / "state.json", state.dump(1) + "\n");
  detail::sync_directory(tmp_dir);

  const fs::path link_tmp = dir / "current.tmp";
  fs::remove(link_tmp, ec);
  if (::symlink(snapshot.c_str(), link_tmp.c_str()) != 0)
    throw checkpoint_error(detail::os_error("cannot create the link", link_tmp));
  if (::rename(link_tmp.c_str(), (dir / "current").c_str()) != 0)
    throw checkpoint_error(detail::os_error("cannot rename into place", link_tmp));
  detail::sync_directory(dir);

  // Everything but the new snapshot is now garbage: older snapshots, interrupted saves.
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("snapshot-", 0) == 0 && name != snapshot) fs::remove_all(entry.path(), ec);
  }
}

/// \brief The checkpoint save_checkpoint() last completed in `dir`; nothing when there is none
/// (no DIR/current). checkpoint_error when it exists but cannot be read or is inconsistent (a
/// tensor file of another size or hash than state.json records, bad JSON or safetensors).
inline std::optional<CheckpointData> load_checkpoint(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path current = dir / "current";
  std::error_code ec;
  if (!fs::is_symlink(current, ec)) return std::nullopt;
  const fs::path snapshot = dir / fs::read_symlink(current, ec);
  if (ec) throw checkpoint_error("checkpoint: cannot read the link " + current.string());
  CheckpointData out;
  const std::string text = detail::read_all(snapshot / "state.json");
  try {
    out.state = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw checkpoint_error("checkpoint: " + (snapshot / "state.json").string() + ": " + e.what());
  }
  const std::string bytes = detail::read_all(snapshot / "tensors.safetensors");
  const auto& record = out.state.at("tensors_file");
  if (record.at("bytes").get<std::uint64_t>() != bytes.size() ||
      record.at("fnv1a").get<std::uint64_t>() != detail::fnv1a(bytes.data(), bytes.size()))
    throw checkpoint_error("checkpoint: " + (snapshot / "tensors.safetensors").string() +
                           " is not the file state.json describes (size or hash differs)");
  try {
    out.tensors =
        safetensors::parse(std::string_view(bytes), (snapshot / "tensors.safetensors").string());
  } catch (const safetensors::error& e) {
    throw checkpoint_error(std::string("checkpoint: ") + e.what());
  }
  return out;
}

/// \brief Puts every value of `params` as tensor "<prefix><i>" and returns their names and
/// shapes (JSON, for the check on restore).
template <typename Scalar>
nlohmann::json put_parameters(safetensors::TensorFile& file, const std::string& prefix,
                              const std::vector<ParameterView<Scalar>>& params) {
  nlohmann::json list = nlohmann::json::array();
  for (std::size_t i = 0; i < params.size(); ++i) {
    file.put_matrix(prefix + std::to_string(i), params[i].value);
    list.push_back({{"name", params[i].name},
                    {"rows", params[i].value.rows()},
                    {"cols", params[i].value.cols()}});
  }
  return list;
}

/// Restores what put_parameters() stored into `params` (the same list); checkpoint_error naming
/// the parameter when a name or shape differs (nothing is changed then).
template <typename Scalar>
void get_parameters(const safetensors::TensorFile& file, const std::string& prefix,
                    const nlohmann::json& list, const std::vector<ParameterView<Scalar>>& params) {
  if (list.size() != params.size())
    throw checkpoint_error("checkpoint: " + std::to_string(list.size()) + " parameters saved, " +
                           std::to_string(params.size()) + " in the network");
  std::vector<Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>> values;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (list[i].at("name").get<std::string>() != p.name)
      throw checkpoint_error("checkpoint: parameter " + std::to_string(i) + " is '" +
                             list[i].at("name").get<std::string>() + "', the network's is '" +
                             p.name + "'");
    values.push_back(
        file.get_matrix<Scalar>(prefix + std::to_string(i), p.value.rows(), p.value.cols()));
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto view = params[i].value;  // a Map: assigning writes the layer's memory
    view = values[i];
  }
}

/// \brief Puts an optimiser's state (ParameterState of each of `params`) as tensors
/// "<prefix><i>.<slot>" and returns the step counts and slot counts (JSON).
template <typename Scalar>
nlohmann::json put_optimizer_state(safetensors::TensorFile& file, const std::string& prefix,
                                   const std::vector<ParameterState<Scalar>>& state) {
  nlohmann::json list = nlohmann::json::array();
  for (std::size_t i = 0; i < state.size(); ++i) {
    for (std::size_t s = 0; s < state[i].slots.size(); ++s)
      file.put_matrix(prefix + std::to_string(i) + "." + std::to_string(s), state[i].slots[s]);
    list.push_back({{"steps", state[i].steps}, {"slots", state[i].slots.size()}});
  }
  return list;
}

/// What put_optimizer_state() stored, for Sgd/Adam::set_state() (which validates the shapes).
template <typename Scalar>
std::vector<ParameterState<Scalar>> get_optimizer_state(const safetensors::TensorFile& file,
                                                        const std::string& prefix,
                                                        const nlohmann::json& list) {
  std::vector<ParameterState<Scalar>> out;
  for (std::size_t i = 0; i < list.size(); ++i) {
    ParameterState<Scalar> s;
    s.steps = list[i].at("steps").get<std::int64_t>();
    const auto slots = list[i].at("slots").get<std::size_t>();
    for (std::size_t k = 0; k < slots; ++k)
      s.slots.push_back(
          file.get_matrix<Scalar>(prefix + std::to_string(i) + "." + std::to_string(k)));
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace hra::examples
