// Builds against hra as a consumer whose program compiles the layers once would: this file sees
// the float layers as extern templates, instances.cpp defines them (README, "Compile time").
#include <hra/extern_templates.hpp>

#include <cstdio>

int main() {
  Eigen::MatrixXf w = Eigen::MatrixXf::Random(6, 5);
  hra::HraOptions options;
  options.rank = 2;
  hra::HraLinearf layer(hra::WeightMatrix<float>::view(w), std::nullopt, options);
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 3);
  const Eigen::MatrixXf y = layer.forward(x);  // symmetric init: H = I, so y = W x
  layer.backward(y);
  const float err = (y - w * x).norm();
  std::printf("extern templates: |W H x - W x| = %.3g\n", static_cast<double>(err));
  return err < 1e-5f ? 0 : 1;
}
