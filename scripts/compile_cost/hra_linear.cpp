// A user's file with one HRA layer trained a step: the layer's forward and backward, an optimiser
// step, a merge (scripts/compile_cost.sh times compiling it).
#include <hra/hra.hpp>

int main() {
  Eigen::MatrixXf w = Eigen::MatrixXf::Random(64, 32);
  hra::HraOptions options;
  options.rank = 4;
  hra::HraLinearf layer(hra::WeightMatrix<float>::view(w), std::nullopt, options);
  auto adam = hra::Adam<float>::adamw(1e-3, 0.0);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(32, 16);
  const Eigen::MatrixXf& y = layer.forward(x);
  layer.backward(y / 16.0f);
  adam.step(layer.parameters());
  layer.merge();
  return 0;
}
