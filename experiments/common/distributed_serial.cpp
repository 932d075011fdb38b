// The experiments' data parallelism without MPI (common/distributed.hpp): one process, nothing to
// average.
#include <stdexcept>

#include "distributed.hpp"

namespace hra::experiments {

bool built_with_mpi() {
  return false;
}

Ranks Ranks::world() {
  throw std::logic_error("experiments::Ranks::world: this program was built without MPI");
}

double Ranks::sum(double value) const {
  return value;
}

bool Ranks::all(bool value) const {
  return value;
}

template <typename Scalar>
struct GradientAverager<Scalar>::Impl {};

template <typename Scalar>
GradientAverager<Scalar>::GradientAverager(const Ranks&, const std::vector<Layer<Scalar>*>&) {}

template <typename Scalar>
GradientAverager<Scalar>::~GradientAverager() = default;

template <typename Scalar>
void GradientAverager<Scalar>::average(double) {}

template class GradientAverager<float>;
template class GradientAverager<double>;

MpiSession::MpiSession(bool enable, int*, char***) {
  if (enable) throw std::invalid_argument("this program was built without MPI");
}

MpiSession::~MpiSession() = default;

void MpiSession::abort(int) {}

}  // namespace hra::experiments
