// A user's file with one HRA layer trained data-parallel over MPI (scripts/compile_cost.sh).
#include <hra/hra.hpp>
#include <hra/mpi/data_parallel.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    hra::HraOptions options;
    options.rank = 4;
    hra::HraLinearf layer(Eigen::MatrixXf::Identity(8, 8), options);
    hra::mpi::DataParallelf dp({&layer});
    const Eigen::MatrixXf x = Eigen::MatrixXf::Random(8, 3);
    layer.backward(layer.forward(x) - x, false);
    dp.average_gradients();
  }
  MPI_Finalize();
  return 0;
}
