// A user's file with one HRA convolution trained a step (scripts/compile_cost.sh).
#include <hra/hra.hpp>

int main() {
  const auto geometry = hra::Conv2dGeometry(4, 12, 12, 8, 3, 3).padding(1);
  Eigen::MatrixXf w = Eigen::MatrixXf::Random(8, 4 * 3 * 3);
  hra::HraOptions options;
  options.rank = 4;
  hra::HraConv2df layer(geometry, hra::WeightMatrix<float>::view(w), std::nullopt, options);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(4 * 12 * 12, 2);
  const Eigen::MatrixXf& y = layer.forward(x);
  layer.backward(y / 2.0f);
  return 0;
}
