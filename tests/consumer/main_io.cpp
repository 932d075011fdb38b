// Builds against hra::io as a consumer would: a safetensors round trip of one matrix.
#include <hra/io.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const Eigen::MatrixXf w = Eigen::MatrixXf::Random(3, 5);
  hra::safetensors::TensorFile file;
  file.put_matrix("w", w);
  hra::safetensors::save(argv[1], file);
  const Eigen::MatrixXf back = hra::safetensors::load(argv[1]).get_matrix<float>("w", 3, 5);
  std::printf("safetensors round trip %s\n", back == w ? "exact" : "WRONG");
  return back == w ? 0 : 1;
}
