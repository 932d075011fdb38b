// Data parallelism for the examples: with HRA_WITH_MPI defined (the _mpi targets, linked with
// hra::mpi) the ranks of MPI_COMM_WORLD each train on a contiguous slice of every batch and
// average their gradients with hra::mpi::DataParallel; without it, or without --mpi, one
// process does everything and these classes cost nothing.
#pragma once

#include <hra/hra.hpp>

#include <Eigen/Core>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#ifdef HRA_WITH_MPI
#include <mpi.h>

#include <hra/mpi/data_parallel.hpp>
#endif

namespace hra::examples {

/// True when this program was built with MPI support (HRA_WITH_MPI).
constexpr bool built_with_mpi() {
#ifdef HRA_WITH_MPI
  return true;
#else
  return false;
#endif
}

/// \brief This process's place among the ranks: rank 0 of 1 unless started with MPI.
class Ranks {
 public:
  /// One process, no MPI.
  Ranks() = default;

#ifdef HRA_WITH_MPI
  /// The ranks of MPI_COMM_WORLD (MPI must be initialised).
  static Ranks world() {
    Ranks r;
    r.mpi_ = true;
    hra::mpi::check(MPI_Comm_rank(MPI_COMM_WORLD, &r.rank_), "MPI_Comm_rank", "examples");
    hra::mpi::check(MPI_Comm_size(MPI_COMM_WORLD, &r.size_), "MPI_Comm_size", "examples");
    return r;
  }
#endif

  int rank() const {
    return rank_;
  }
  int size() const {
    return size_;
  }
  bool root() const {
    return rank_ == 0;
  }
  bool distributed() const {
    return mpi_;
  }

  /// This rank's columns [first, first + count) of a batch of n columns: P contiguous slices
  /// in rank order whose sizes differ by at most one (some empty when n < P).
  std::pair<Eigen::Index, Eigen::Index> shard(Eigen::Index n) const {
    const Eigen::Index begin = n * rank_ / size_, end = n * (rank_ + 1) / size_;
    return {begin, end - begin};
  }

  /// The sum of `value` over the ranks (`value` itself on one process).
  double sum(double value) const {
#ifdef HRA_WITH_MPI
    if (mpi_)
      hra::mpi::check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD),
                      "MPI_Allreduce", "examples::Ranks::sum");
#endif
    return value;
  }
  /// True on every rank when `value` is true on every rank.
  bool all(bool value) const {
    int v = value ? 1 : 0;
#ifdef HRA_WITH_MPI
    if (mpi_)
      hra::mpi::check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD),
                      "MPI_Allreduce", "examples::Ranks::all");
#endif
    return v != 0;
  }

 private:
  int rank_ = 0, size_ = 1;
  bool mpi_ = false;
};

/// \brief Averages the gradients of a network's layers over the ranks after each backward():
/// g <- sum_p n_p g_p / sum_p n_p with n_p the samples of rank p's slice (one MPI_Allreduce,
/// hra::mpi::DataParallel), which is the gradient of the mean loss over the whole batch. The
/// constructor checks that every rank holds the same parameter list and copies rank 0's values.
/// On one process it does nothing. seconds() is the wall time spent in average() (packing, the
/// allreduce and the wait for the slowest rank).
template <typename Scalar>
class GradientAverager {
 public:
  GradientAverager(const Ranks& ranks, const std::vector<Layer<Scalar>*>& layers) {
#ifdef HRA_WITH_MPI
    if (ranks.distributed()) dp_ = std::make_unique<hra::mpi::DataParallel<Scalar>>(layers);
#else
    (void)ranks;
    (void)layers;
#endif
  }

  void average(double local_samples) {
#ifdef HRA_WITH_MPI
    if (!dp_) return;
    const auto start = std::chrono::steady_clock::now();
    dp_->average_gradients(local_samples);
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    bytes_ = dp_->bytes_per_step();
#else
    (void)local_samples;
#endif
  }

  double seconds() const {
    return seconds_;
  }
  /// Bytes one average() reduces (0 on one process).
  std::size_t bytes_per_step() const {
    return bytes_;
  }

 private:
#ifdef HRA_WITH_MPI
  std::unique_ptr<hra::mpi::DataParallel<Scalar>> dp_;
#endif
  double seconds_ = 0;
  std::size_t bytes_ = 0;
};

/// MPI_Init in the constructor, MPI_Finalize in the destructor, when `enable` (and built with
/// MPI); nothing otherwise.
class MpiSession {
 public:
  MpiSession(bool enable, int* argc, char*** argv) {
#ifdef HRA_WITH_MPI
    if (enable) {
      if (MPI_Init(argc, argv) != MPI_SUCCESS) throw std::runtime_error("MPI_Init failed");
      active_ = true;
    }
#else
    (void)argc;
    (void)argv;
    if (enable) throw std::invalid_argument("this program was built without MPI");
#endif
  }
  ~MpiSession() {
#ifdef HRA_WITH_MPI
    if (active_) MPI_Finalize();
#endif
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// After an error on this rank: MPI_Abort(MPI_COMM_WORLD, code) when running on several
  /// ranks (the others may be waiting in a collective); nothing otherwise.
  void abort(int code) {
#ifdef HRA_WITH_MPI
    if (active_ && ranks().size() > 1) {
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, code);
    }
#else
    (void)code;
#endif
  }

  Ranks ranks() const {
#ifdef HRA_WITH_MPI
    if (active_) return Ranks::world();
#endif
    return Ranks();
  }

 private:
  bool active_ = false;
};

}  // namespace hra::examples
