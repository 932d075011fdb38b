// Builds against hra::mpi as a consumer would: one layer averaged over the ranks of
// MPI_COMM_WORLD (run it with mpirun, or alone as a single rank).
#include <hra/hra.hpp>
#include <hra/mpi/data_parallel.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 1;
  {
    hra::HraOptions o;
    o.rank = 4;
    hra::HraLinearf layer(Eigen::MatrixXf::Identity(8, 8), o);
    hra::mpi::DataParallelf dp({&layer});
    const Eigen::MatrixXf x = Eigen::MatrixXf::Random(8, 3);
    layer.backward(layer.forward(x) - x, false);
    dp.average_gradients();
    dp.check_consistency();
    std::printf("rank %d of %d: %ld values averaged\n", dp.rank(), dp.size(),
                static_cast<long>(dp.num_values()));
    rc = dp.num_values() == 32 ? 0 : 1;
  }
  MPI_Finalize();
  return rc;
}
