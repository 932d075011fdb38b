// Data parallelism for the experiments: under mpirun with --mpi, the ranks of MPI_COMM_WORLD each
// train on a contiguous slice of every batch and average their gradients with
// hra::mpi::DataParallel; without it one process does everything and these classes cost
// nothing. This header needs no MPI: what does is compiled once, in distributed_mpi.cpp (the
// _mpi programs, linked with hra::mpi) or distributed_serial.cpp (the others), so a program's
// own source file is compiled once for both.
#pragma once

#include <hra/hra.hpp>

#include <Eigen/Core>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

namespace hra::experiments {

/// True when this program was linked with MPI support (distributed_mpi.cpp).
bool built_with_mpi();

/// \brief This process's place among the ranks: rank 0 of 1 unless started with MPI.
class Ranks {
 public:
  /// One process, no MPI.
  Ranks() = default;
  /// The ranks of MPI_COMM_WORLD (MPI must be initialised; only in a program built with MPI).
  static Ranks world();

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool root() const { return rank_ == 0; }
  bool distributed() const { return mpi_; }

  /// This rank's columns [first, first + count) of a batch of n columns: P contiguous slices
  /// in rank order whose sizes differ by at most one (some empty when n < P).
  std::pair<Eigen::Index, Eigen::Index> shard(Eigen::Index n) const {
    const Eigen::Index begin = n * rank_ / size_, end = n * (rank_ + 1) / size_;
    return {begin, end - begin};
  }

  /// The sum of `value` over the ranks (`value` itself on one process).
  double sum(double value) const;
  /// True on every rank when `value` is true on every rank.
  bool all(bool value) const;

 private:
  int rank_ = 0, size_ = 1;
  bool mpi_ = false;
};

/// \brief Averages the gradients of a network's layers over the ranks after each backward():
/// g <- sum_p n_p g_p / sum_p n_p with n_p the samples of rank p's slice (one MPI_Allreduce,
/// hra::mpi::DataParallel), which is the gradient of the mean loss over the whole batch. The
/// constructor checks that every rank holds the same parameter list and copies rank 0's values.
/// On one process it does nothing. seconds() is the wall time spent in average() (packing, the
/// allreduce and the wait for the slowest rank). Defined for float and double.
template <typename Scalar>
class GradientAverager {
 public:
  GradientAverager(const Ranks& ranks, const std::vector<Layer<Scalar>*>& layers);
  ~GradientAverager();
  GradientAverager(const GradientAverager&) = delete;
  GradientAverager& operator=(const GradientAverager&) = delete;

  void average(double local_samples);
  double seconds() const { return seconds_; }
  /// Bytes one average() reduces (0 on one process).
  std::size_t bytes_per_step() const { return bytes_; }

 private:
  struct Impl;  // the DataParallel of an MPI build
  std::unique_ptr<Impl> impl_;
  double seconds_ = 0;
  std::size_t bytes_ = 0;
};

/// MPI_Init in the constructor, MPI_Finalize in the destructor, when `enable` (in a program
/// built with MPI; std::invalid_argument otherwise); nothing without `enable`.
class MpiSession {
 public:
  MpiSession(bool enable, int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// After an error on this rank: MPI_Abort(MPI_COMM_WORLD, code) when running on several
  /// ranks (the others may be waiting in a collective); nothing otherwise.
  void abort(int code);

  Ranks ranks() const { return active_ ? Ranks::world() : Ranks(); }

 private:
  bool active_ = false;
};

}  // namespace hra::experiments
