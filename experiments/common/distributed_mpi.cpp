// The experiments' data parallelism over MPI (common/distributed.hpp), for the _mpi programs.
#include <mpi.h>

#include <hra/mpi/data_parallel.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <vector>

#include "distributed.hpp"

namespace hra::experiments {

bool built_with_mpi() {
  return true;
}

Ranks Ranks::world() {
  Ranks r;
  r.mpi_ = true;
  hra::mpi::check(MPI_Comm_rank(MPI_COMM_WORLD, &r.rank_), "MPI_Comm_rank", "experiments");
  hra::mpi::check(MPI_Comm_size(MPI_COMM_WORLD, &r.size_), "MPI_Comm_size", "experiments");
  return r;
}

double Ranks::sum(double value) const {
  if (mpi_)
    hra::mpi::check(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD),
                    "MPI_Allreduce", "experiments::Ranks::sum");
  return value;
}

bool Ranks::all(bool value) const {
  int v = value ? 1 : 0;
  if (mpi_)
    hra::mpi::check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD),
                    "MPI_Allreduce", "experiments::Ranks::all");
  return v != 0;
}

template <typename Scalar>
struct GradientAverager<Scalar>::Impl {
  explicit Impl(const std::vector<Layer<Scalar>*>& layers) : dp(layers) {}
  hra::mpi::DataParallel<Scalar> dp;
};

template <typename Scalar>
GradientAverager<Scalar>::GradientAverager(const Ranks& ranks,
                                           const std::vector<Layer<Scalar>*>& layers) {
  if (ranks.distributed()) impl_ = std::make_unique<Impl>(layers);
}

template <typename Scalar>
GradientAverager<Scalar>::~GradientAverager() = default;

template <typename Scalar>
void GradientAverager<Scalar>::average(double local_samples) {
  if (!impl_) return;
  const auto start = std::chrono::steady_clock::now();
  impl_->dp.average_gradients(local_samples);
  seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  bytes_ = impl_->dp.bytes_per_step();
}

template class GradientAverager<float>;
template class GradientAverager<double>;

MpiSession::MpiSession(bool enable, int* argc, char*** argv) {
  if (!enable) return;
  if (MPI_Init(argc, argv) != MPI_SUCCESS) throw std::runtime_error("MPI_Init failed");
  active_ = true;
}

MpiSession::~MpiSession() {
  if (active_) MPI_Finalize();
}

void MpiSession::abort(int code) {
  if (active_ && ranks().size() > 1) {
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
  }
}

}  // namespace hra::experiments
