// Data-parallel training on MPI ranks (hra::mpi::DataParallel): every rank builds the same
// model, trains on its share of each batch and averages the gradients, so all ranks take the
// same steps. Each rank also trains the same model alone on the whole batches; the two must agree
// to float rounding, and the ranks' parameters must be identical (exit 1 otherwise).
//
//   mpirun -n 2 mpi_data_parallel
#include <mpi.h>
#include <hra/hra.hpp>
#include <hra/mpi/data_parallel.hpp>

#include <cstdio>
#include <exception>
#include <optional>

namespace {

using Matrix = hra::Sequentialf::Matrix;

hra::Sequentialf make_model() {
  std::srand(1);  // the same "pretrained" weights on every rank
  hra::HraOptions o;
  o.rank = 4;
  o.seed = 2;
  hra::Sequentialf model;
  model.emplace<hra::HraLinearf>("fc1", Matrix(Matrix::Random(24, 12)), o);
  model.set_activation("fc1", hra::Activation::relu);
  model.emplace<hra::Linearf>("head", hra::WeightMatrix<float>::owned(Matrix::Random(3, 24)),
                              std::nullopt);
  return model;
}

// One Adam step on the columns [first, first + count) of (x, y), the loss the mean squared
// error over those columns; `dp` (if any) averages the gradients over the ranks, weighted by
// their column counts, which gives the gradient of the mean over the whole batch.
void step(hra::Sequentialf& model, hra::Adam<float>& adam, const Matrix& x, const Matrix& y,
          Eigen::Index first, Eigen::Index count, hra::mpi::DataParallelf* dp) {
  const Matrix residual = model.forward(x.middleCols(first, count)) - y.middleCols(first, count);
  model.backward((2.0f / static_cast<float>(count)) * residual, false);
  if (dp) dp->average_gradients(static_cast<double>(count));
  adam.step(model.parameters());
}

int run() {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  std::srand(7);  // the same data on every rank; each rank reads its own columns
  const Eigen::Index n = 64;
  const Matrix x = Matrix::Random(12, 8 * n), y = Matrix::Random(3, 8 * n);

  hra::Sequentialf model = make_model(), alone = make_model();
  hra::Adam<float> adam({1e-2}), alone_adam({1e-2});
  // Collective: checks every rank holds the same parameter list, copies rank 0's values.
  hra::mpi::DataParallelf dp({&model});
  for (int s = 0; s < 8; ++s) {
    const Eigen::Index first = s * n + n * rank / ranks, end = s * n + n * (rank + 1) / ranks;
    step(model, adam, x, y, first, end - first, &dp);
    step(alone, alone_adam, x, y, s * n, n, nullptr);  // one process, the whole batch
  }
  dp.check_consistency();  // throws on every rank if the ranks' parameters differ

  Matrix ours, reference;
  model.predict(x, ours);
  alone.predict(x, reference);
  const float diff = (ours - reference).cwiseAbs().maxCoeff();
  int ok = diff <= 1e-4f * reference.cwiseAbs().maxCoeff() ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("%d ranks, %ld columns each per step; max |ranks - one process| = %.3g\n", ranks,
                static_cast<long>(n / ranks), diff);
    std::printf(ok ? "%d ranks match one process\n" : "%d ranks differ from one process\n", ranks);
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 1;
  try {
    code = run();  // DataParallel is destroyed inside, before MPI_Finalize
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return code;
}
