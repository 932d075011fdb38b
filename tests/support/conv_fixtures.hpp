// The PyTorch conv fixtures written by scripts/make_peft_conv_fixtures.py, in Eigen's layout
// (tests only).
#pragma once

#include <Eigen/Core>
#include <string>
#include <vector>

#include "hra/conv_geometry.hpp"
#include "support/fixtures.hpp"

namespace hra_test {

/// Every HRA / LoRA case the script writes (tests/fixtures/peft_conv_<name>.txt); a missing
/// file fails the test that loads it.
inline const std::vector<std::string>& hra_conv_fixtures() {
  static const std::vector<std::string> names = {"hra_chain_k3_pad1_r4_n2",
                                                 "hra_chain_k3x2_stride2x1_asympad_r3_n1",
                                                 "hra_chain_dilation2_groups2_r2_n1",
                                                 "hra_chain_depthwise_r3_n1",
                                                 "hra_chain_1x1_r3_n2",
                                                 "hra_gs_k3_pad1_r3_n1",
                                                 "hra_gs_dilation2_groups2_r4_n1",
                                                 "hra_gs_depthwise_r2_n2"};
  return names;
}
inline const std::vector<std::string>& lora_conv_fixtures() {
  static const std::vector<std::string> names = {"lora_k3_pad1_r2_n2", "lora_1x1_r2_n1",
                                                 "lora_dilation2_groups2_r2_n1",
                                                 "lora_depthwise_r2_n1"};
  return names;
}

/// One conv fixture: the file, its geometry, n, and its batches transposed to Eigen's
/// (C H W) x n.
struct ConvFixture {
  Fixture file;
  hra::Conv2dGeometry geometry;
  Eigen::Index n;

  explicit ConvFixture(const std::string& name)
      : file(load_fixture(std::string(HRA_TEST_FIXTURES) + "/peft_conv_" + name + ".txt")),
        geometry(geometry_of(file)),
        n(file.integer("n")) {}

  /// An activation stored (n, C H W), one NCHW image per row, as C H W x n.
  Eigen::MatrixXd input(const std::string& name) const {
    return file.matrix(name, n, geometry.input_size()).transpose();
  }
  Eigen::MatrixXd output(const std::string& name) const {
    return file.matrix(name, n, geometry.output_size()).transpose();
  }
  /// A weight-shaped matrix (C_out x D, weight.view(C_out, -1)).
  Eigen::MatrixXd weight(const std::string& name) const {
    return file.matrix(name, geometry.out_channels(), geometry.fan_in());
  }
  /// A (1, C_out) row as a vector.
  Eigen::VectorXd bias(const std::string& name) const {
    return file.matrix(name, 1, geometry.out_channels()).transpose();
  }
  bool has(const std::string& name) const { return file.matrices.count(name) > 0; }

 private:
  static hra::Conv2dGeometry geometry_of(const Fixture& f) {
    return hra::Conv2dGeometry(f.integer("C_in"), f.integer("H"), f.integer("W"),
                               f.integer("C_out"), f.integer("kernel_h"), f.integer("kernel_w"))
        .stride(f.integer("stride_h"), f.integer("stride_w"))
        .pad(f.integer("pad_left"), f.integer("pad_right"), f.integer("pad_top"),
             f.integer("pad_bottom"))
        .dilation(f.integer("dilation_h"), f.integer("dilation_w"))
        .groups(f.integer("groups"));
  }
};

}  // namespace hra_test
