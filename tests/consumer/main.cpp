// Builds against hra as a consumer would and checks one round trip H^T H x = x.
#include <hra/hra.hpp>

#include <cstdio>

int main() {
  const auto chain = hra::ReflectorChaind::initialized(16, 4, hra::Init::random, 7);
  const Eigen::MatrixXd x = Eigen::MatrixXd::Random(16, 3);
  Eigen::MatrixXd y, back;
  chain.apply(x, y);
  chain.apply_transpose(y, back);
  const double err = (back - x).norm();
  std::printf("round trip error %.3g\n", err);
  return err < 1e-12 ? 0 : 1;
}
