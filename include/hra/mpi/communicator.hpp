// The MPI plumbing of hra::mpi: an owned duplicate communicator that reports errors instead of
// aborting, the MPI datatype of each scalar, and collectives over buffers larger than an int
// count.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>

#include "error.hpp"

namespace hra {
namespace mpi {
namespace detail {

template <typename Scalar>
struct MpiScalar;
template <>
struct MpiScalar<float> {
  static MPI_Datatype type() { return MPI_FLOAT; }
  static constexpr const char* name = "float";
};
template <>
struct MpiScalar<double> {
  static MPI_Datatype type() { return MPI_DOUBLE; }
  static constexpr const char* name = "double";
};

/// Calls f(offset, count) over [0, n) in pieces of at most INT_MAX elements (MPI counts are
/// int); once for any buffer below 2^31 - 1 elements. Nothing for n = 0.
template <typename F>
void for_chunks(std::size_t n, F&& f) {
  for (std::size_t offset = 0; offset < n;) {
    const int count = static_cast<int>(std::min<std::size_t>(n - offset, INT_MAX));
    f(offset, count);
    offset += static_cast<std::size_t>(count);
  }
}

/// Owns a duplicate of a communicator, with MPI_ERRORS_RETURN as its error handler, and frees
/// it on destruction (unless MPI is already finalised).
class Communicator {
 public:
  Communicator() = default;
  Communicator(MPI_Comm parent, const char* context) {
    check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup", context);
    const int rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    if (rc != MPI_SUCCESS) {
      release();
      check(rc, "MPI_Comm_set_errhandler", context);
    }
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  Communicator(Communicator&& other) noexcept : comm_(other.comm_) { other.comm_ = MPI_COMM_NULL; }
  Communicator& operator=(Communicator&& other) noexcept {
    if (this != &other) {
      release();
      comm_ = other.comm_;
      other.comm_ = MPI_COMM_NULL;
    }
    return *this;
  }
  ~Communicator() { release(); }
  MPI_Comm get() const { return comm_; }

 private:
  void release() noexcept {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
};

}  // namespace detail
}  // namespace mpi
}  // namespace hra
