// Conv2d (and Conv2dGeometry, im2col/col2im) behind hra::Layer: the output against the
// convolution written out as loops, gradients against central differences over every geometry,
// float against double, the per-image workers, memory, and every user error.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "hra/conv2d.hpp"
#include "hra/conv_geometry.hpp"
#include "hra/detail/im2col.hpp"
#include "hra/gradient_check.hpp"
#include "support/conv_cases.hpp"
#include "support/conv_fixtures.hpp"
#include "support/conv_reference.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

namespace {

using hra::BiasMode;
using hra::Conv2dGeometry;
using hra_test::Index;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::Vec;
using hra_test::VecD;

template <typename T>
hra::Conv2d<T> make_conv(const Conv2dGeometry& g, bool train_weight = true, bool with_bias = true,
                         BiasMode mode = BiasMode::all) {
  std::optional<Vec<T>> bias;
  if (with_bias) bias = hra_test::random_vec<T>(g.out_channels(), 22);
  hra::Conv2dOptions o;
  o.train_weight = train_weight;
  return hra::Conv2d<T>(
      g, hra::WeightMatrix<T>::owned(hra_test::random_as<T>(g.out_channels(), g.fan_in(), 21)),
      bias, o, with_bias ? mode : BiasMode::none);
}

TEST_CASE("Conv2dGeometry: output size, D and sizes follow PyTorch's formula", "[conv2d]") {
  const auto g =
      Conv2dGeometry(6, 10, 9, 4, 3, 2).stride(2, 3).pad(0, 3, 1, 2).dilation(2, 1).groups(2);
  // H_out = floor((10 + 1 + 2 - 2*2 - 1)/2) + 1 = 5, W_out = floor((9 + 0 + 3 - 1*1 - 1)/3) + 1 = 4
  CHECK(g.out_height() == 5);
  CHECK(g.out_width() == 4);
  CHECK(g.fan_in() == 3 * 3 * 2);
  CHECK(g.input_size() == 6 * 10 * 9);
  CHECK(g.output_size() == 4 * 5 * 4);
  CHECK_FALSE(g.is_pointwise());
  CHECK(Conv2dGeometry(3, 4, 4, 2, 1, 1).is_pointwise());
  CHECK_FALSE(Conv2dGeometry(3, 4, 4, 2, 1, 1).stride(2).is_pointwise());
  CHECK(Conv2dGeometry(2, 3, 3, 2, 3, 3).padding(1) ==
        Conv2dGeometry(2, 3, 3, 2, 3, 3).pad(1, 1, 1, 1));
  CHECK(Conv2dGeometry(2, 3, 3, 2, 3, 3).padding(1) != Conv2dGeometry(2, 3, 3, 2, 3, 3));
  CHECK_NOTHROW(g.validate("test"));
}

TEST_CASE("im2col and col2im are adjoint: <T(x), dT> = <x, T^*(dT)>", "[conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    const auto& g = c.geometry;
    const MatD x = hra_test::random_matrix(g.input_size(), 1, 3);
    const MatD dt = hra_test::random_matrix(g.out_positions(), g.in_channels() * g.taps(), 4);
    MatD t(g.out_positions(), g.in_channels() * g.taps());
    hra::detail::im2col(g, x.data(), t.data());
    MatD back(g.input_size(), 1);
    hra::detail::col2im(g, dt.data(), back.data());
    const double lhs = (t.array() * dt.array()).sum(), rhs = (x.array() * back.array()).sum();
    CHECK(std::abs(lhs - rhs) <= 1e-12 * std::max(1.0, std::abs(lhs)));
  }
}

TEST_CASE("Conv2d: forward equals the convolution written out, for every geometry", "[conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name << ": " << c.geometry.describe());
    auto layer = make_conv<double>(c.geometry);
    const MatD x = hra_test::random_matrix(c.geometry.input_size(), 3, 5);
    const MatD expected =
        hra_test::conv_reference(c.geometry, MatD(layer.weight()), x, *layer.bias());
    CHECK(hra_test::rel_err(layer.forward(x), expected) < 1e-14);
    MatD y;
    layer.predict(x, y);
    CHECK(hra_test::rel_err(y, expected) < 1e-14);
  }
}

TEST_CASE("Conv2d: gradients match central differences for every geometry", "[conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    for (bool train : {true, false}) {
      auto layer = make_conv<double>(c.geometry, train);
      hra::GradientCheckOptions o;
      o.batch = 2;
      const auto report = hra::check_gradients(layer, o);
      CHECK(report.rows.size() == (train ? 3u : 2u));
      for (const auto& row : report.rows) {
        INFO(row.name << " checked " << row.checked);
        CHECK(row.relative_error() < 1e-8);
      }
      worst = std::max(worst, report.worst_relative_error());
    }
  }
  WARN("Conv2d worst gradient-check relative error (double): " << worst);
}

TEST_CASE("Conv2d: float agrees with double", "[conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    auto ld = make_conv<double>(c.geometry);
    auto lf = make_conv<float>(c.geometry);
    const MatD x = hra_test::random_matrix(c.geometry.input_size(), 2, 6);
    const MatD dy = hra_test::random_matrix(c.geometry.output_size(), 2, 7);
    const MatD yd = ld.forward(x);
    const MatD dxd = ld.backward(dy);
    const Mat<float> yf = lf.forward(x.cast<float>());
    const Mat<float> dxf = lf.backward(dy.cast<float>());
    const double tol = hra_test::tol<float>(c.geometry.fan_in() + c.geometry.out_channels(), 0);
    const double e =
        std::max({hra_test::rel_err(yf, yd), hra_test::rel_err(dxf, dxd),
                  hra_test::rel_err(lf.parameters()[0].grad, ld.parameters()[0].grad),
                  hra_test::rel_err(lf.parameters()[1].grad, ld.parameters()[1].grad)});
    CHECK(e < tol);
    worst = std::max(worst, e);
  }
  WARN("Conv2d worst float-vs-double relative error: " << worst);
}

TEST_CASE("Conv2d: several workers give the results of one", "[conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    auto one = make_conv<double>(c.geometry);
    auto many = make_conv<double>(c.geometry);
    one.set_batch_chunks(1);
    many.set_batch_chunks(3);
    const MatD x = hra_test::random_matrix(c.geometry.input_size(), 5, 8);
    const MatD dy = hra_test::random_matrix(c.geometry.output_size(), 5, 9);
    CHECK(hra_test::rel_err(many.forward(x), one.forward(x)) == 0.0);
    CHECK(hra_test::rel_err(many.backward(dy), one.backward(dy)) == 0.0);
    CHECK(hra_test::rel_err(many.parameters()[0].grad, one.parameters()[0].grad) < 1e-14);
    CHECK(hra_test::rel_err(many.parameters()[1].grad, one.parameters()[1].grad) < 1e-14);
  }
}

TEST_CASE("Conv2d: a frozen layer trains nothing, keeps only Y, and skips what is not wanted",
          "[conv2d]") {
  const auto g = Conv2dGeometry(3, 6, 6, 4, 3, 3).padding(1);
  auto frozen = make_conv<double>(g, false, true, BiasMode::none);
  CHECK(frozen.parameters().empty());
  CHECK(frozen.num_trainable_parameters() == 0);
  CHECK(frozen.merged());
  const MatD x = hra_test::random_matrix(g.input_size(), 4, 1);
  frozen.forward(x);
  CHECK(frozen.saved_bytes() == static_cast<std::size_t>(g.output_size() * 4) * sizeof(double));
  const MatD dy = hra_test::random_matrix(g.output_size(), 4, 2);
  CHECK(frozen.backward(dy, false).size() == 0);

  auto trained = make_conv<double>(g, true, true, BiasMode::all);
  CHECK(trained.num_trainable_parameters() == g.out_channels() * g.fan_in() + g.out_channels());
  trained.forward(x);
  CHECK(trained.saved_bytes() ==
        static_cast<std::size_t>((g.input_size() + g.output_size()) * 4) * sizeof(double));
  // adapter_only: this layer carries no adapter, so its bias stays frozen (PEFT's "hra_only").
  auto head = make_conv<double>(g, true, true, BiasMode::adapter_only);
  CHECK(head.parameters().size() == 1);
  CHECK(head.parameters()[0].name == "weight");
}

TEST_CASE("Conv2d: a viewed weight is used in place", "[conv2d]") {
  const auto g = Conv2dGeometry(2, 4, 4, 3, 3, 3).padding(1);
  MatD w = hra_test::random_matrix(g.out_channels(), g.fan_in(), 3);
  hra::Conv2dd layer(g, hra::WeightMatrix<double>::view(w), std::nullopt, {false});
  const MatD x = hra_test::random_matrix(g.input_size(), 2, 4);
  w *= 2.0;
  CHECK(hra_test::rel_err(layer.forward(x), hra_test::conv_reference(g, w, x)) < 1e-14);
}

TEST_CASE("Conv2d: bad geometry, weight, bias and inputs throw naming the values", "[conv2d]") {
  using hra_test::expect_error;
  using G = Conv2dGeometry;
  const auto make = [](const G& g, Index rows, Index cols) {
    return hra::Conv2dd(g, MatD::Ones(rows, cols));
  };
  expect_error<std::invalid_argument>([&] { make(G(6, 5, 5, 4, 3, 3).groups(4), 4, 27); },
                                      {"Conv2d", "C_in=6 is not divisible by groups=4"});
  expect_error<std::invalid_argument>([&] { make(G(4, 5, 5, 6, 3, 3).groups(4), 6, 9); },
                                      {"Conv2d", "C_out=6 is not divisible by groups=4"});
  expect_error<std::invalid_argument>(
      [&] { make(G(1, 2, 8, 2, 3, 3).padding(0), 2, 9); },
      {"Conv2d", "kernel spans 3 rows", "kernel_h=3", "padded input has 2", "H=2", "H_out=0"});
  expect_error<std::invalid_argument>(
      [&] { make(G(1, 8, 4, 2, 3, 3).dilation(1, 2).padding(0, 0), 2, 9); },
      {"Conv2d", "kernel spans 5 columns", "dilation_w=2", "padded input has 4", "W_out=0"});
  expect_error<std::invalid_argument>([&] { make(G(1, 4, 4, 0, 3, 3), 1, 9); },
                                      {"Conv2d", "C_out=0", "output would be empty"});
  expect_error<std::invalid_argument>([&] { make(G(1, 0, 4, 2, 3, 3), 2, 9); },
                                      {"Conv2d", "H=0 must be >= 1"});
  expect_error<std::invalid_argument>([&] { make(G(1, 4, 4, 2, 3, 3).stride(1, 0), 2, 9); },
                                      {"Conv2d", "stride_w=0 must be >= 1"});
  expect_error<std::invalid_argument>([&] { make(G(1, 4, 4, 2, 3, 3).dilation(0, 1), 2, 9); },
                                      {"Conv2d", "dilation_h=0 must be >= 1"});
  expect_error<std::invalid_argument>([&] { make(G(1, 4, 4, 2, 3, 3).padding(1, -1), 2, 9); },
                                      {"Conv2d", "padding must be >= 0", "left=-1"});
  expect_error<std::invalid_argument>([&] { make(G(2, 4, 4, 2, 3, 3).groups(0), 2, 9); },
                                      {"Conv2d", "groups=0 must be >= 1"});
  expect_error<std::invalid_argument>(
      [&] { make(G(4, 5, 5, 6, 3, 3).groups(2), 6, 36); },
      {"Conv2d", "weight is 6x36", "C_out x D = 6x18", "C_in/groups*kh*kw = 2*3*3"});
  MatD nan_w = MatD::Ones(2, 9);
  nan_w(1, 3) = std::numeric_limits<double>::quiet_NaN();
  expect_error<std::invalid_argument>([&] { hra::Conv2dd(G(1, 4, 4, 2, 3, 3), nan_w); },
                                      {"Conv2d", "non-finite", "(1, 3)"});
  expect_error<std::invalid_argument>(
      [&] {
        hra::Conv2dd(G(1, 4, 4, 2, 3, 3), hra::WeightMatrix<double>::owned(MatD::Ones(2, 9)),
                     VecD::Ones(3));
      },
      {"Conv2d", "bias", "expected a 2x1"});

  const auto g = G(2, 4, 5, 3, 3, 3).padding(1);
  auto layer = make_conv<double>(g);
  expect_error<std::invalid_argument>(
      [&] { layer.forward(MatD::Ones(39, 2)); },
      {"Conv2d::forward input", "C*H*W = 2*4*5 = 40", "got a 39x2"});
  MatD y;
  expect_error<std::invalid_argument>([&] { layer.predict(MatD::Ones(41, 1), y); },
                                      {"Conv2d::predict input", "= 40", "got a 41x1"});
  expect_error<std::invalid_argument>([&] { layer.forward(MatD::Ones(40, 0)); },
                                      {"Conv2d::forward input", "empty batch"});
  MatD bad = MatD::Ones(40, 2);
  bad(7, 1) = std::numeric_limits<double>::infinity();
  expect_error<std::invalid_argument>([&] { layer.forward(bad); },
                                      {"Conv2d::forward input", "non-finite", "(7, 1)"});
  expect_error<std::logic_error>([&] { layer.backward(MatD::Ones(g.output_size(), 2)); },
                                 {"Conv2d::backward", "no forward()"});
  layer.forward(MatD::Ones(40, 2));
  expect_error<std::invalid_argument>([&] { layer.backward(MatD::Ones(g.output_size(), 3)); },
                                      {"Conv2d::backward gradient dY", "expected a 60x2"});
}

TEST_CASE("Conv2d: agrees with torch.nn.functional.conv2d and autograd (fixtures)", "[conv2d]") {
  double worst = 0;
  int cases = 0;
  for (const auto& name : hra_test::hra_conv_fixtures()) {
    const hra_test::ConvFixture f(name);
    if (!f.has("frozen_output")) continue;
    INFO(name << ": " << f.geometry.describe());
    ++cases;
    hra::Conv2dd layer(f.geometry, hra::WeightMatrix<double>::owned(f.weight("weight")),
                       f.bias("bias"), {true}, BiasMode::all);
    const double ey = hra_test::rel_err(layer.forward(f.input("x")), f.output("frozen_output"));
    const double ex =
        hra_test::rel_err(layer.backward(f.output("grad_output")), f.input("frozen_grad_x"));
    const double ew = hra_test::rel_err(layer.parameters()[0].grad, f.weight("frozen_grad_weight"));
    const double eb = hra_test::rel_err(layer.parameters()[1].grad, f.bias("frozen_grad_bias"));
    CHECK(ey < 1e-13);
    CHECK(ex < 1e-13);
    CHECK(ew < 1e-13);
    CHECK(eb < 1e-13);
    worst = std::max({worst, ey, ex, ew, eb});
  }
  CHECK(cases == 3);
  WARN("Conv2d worst relative error against PyTorch (double): " << worst);
}

}  // namespace
