// A user's file that saves an HRA layer's adapter as a PEFT directory (scripts/compile_cost.sh).
#include <hra/hra.hpp>
#include <hra/io.hpp>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  Eigen::MatrixXf w = Eigen::MatrixXf::Random(64, 32);
  hra::HraOptions options;
  options.rank = 4;
  hra::HraLinearf layer(hra::WeightMatrix<float>::view(w), std::nullopt, options);
  hra::peft::save_hra_adapters(argv[1], {{"model.fc1", &layer}});
  return 0;
}
