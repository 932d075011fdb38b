// The errors of hra::mpi: a failed MPI call (hra::mpi::error, and check() that throws it), ranks
// that disagree at the start (mismatch_error) or whose parameters diverged (divergence_error).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"

namespace hra {
namespace mpi {

/// \brief An MPI call failed. what() is "<context>: <call> failed: <MPI_Error_string> (MPI error
/// class <n>)", e.g. "hra::mpi::DataParallel::broadcast_parameters: MPI_Bcast failed:
/// MPI_ERR_ROOT: invalid root (MPI error class 8)".
class error : public std::runtime_error {
 public:
  error(const std::string& context, const std::string& call, int code)
      : std::runtime_error(describe(context, call, code)), call_(call), code_(code) {
    if (MPI_Error_class(code, &class_) != MPI_SUCCESS) class_ = MPI_ERR_UNKNOWN;
  }
  /// The MPI function that failed, e.g. "MPI_Allreduce".
  const std::string& call() const noexcept { return call_; }
  /// Its return code, and that code's MPI error class (MPI_ERR_ROOT, MPI_ERR_COMM, ...).
  int code() const noexcept { return code_; }
  int error_class() const noexcept { return class_; }

 private:
  static std::string describe(const std::string& context, const std::string& call, int code) {
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    int error_class = MPI_ERR_UNKNOWN;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    if (MPI_Error_class(code, &error_class) != MPI_SUCCESS) error_class = MPI_ERR_UNKNOWN;
    const std::string what = length > 0 ? std::string(text, static_cast<std::size_t>(length))
                                        : detail::concat("unknown MPI error code ", code);
    return detail::concat(context, ": ", call, " failed: ", what, " (MPI error class ", error_class,
                          ")");
  }
  std::string call_;
  int code_;
  int class_ = MPI_ERR_UNKNOWN;
};

/// The ranks were given different parameter lists (names, shapes, scalar type) or options.
/// Thrown by the DataParallel constructor on every rank, with the same message.
class mismatch_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The ranks' parameters are no longer identical. Thrown by check_consistency() on every rank,
/// with the same message.
class divergence_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws hra::mpi::error naming `call` unless `code` is MPI_SUCCESS. For calls on a
/// communicator whose error handler is MPI_ERRORS_RETURN (DataParallel::communicator() is one).
inline void check(int code, const char* call, const std::string& context = "hra::mpi") {
  if (code != MPI_SUCCESS) throw error(context, call, code);
}

}  // namespace mpi
}  // namespace hra
