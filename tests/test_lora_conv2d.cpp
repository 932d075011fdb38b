// LoraConv2d behind hra::Layer: the output against the convolution written out with W + s B A,
// gradients against central differences over every geometry (with and without dropout), float
// against double, merge / unmerge / safe merge, the workers, memory, and every user error.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "hra/gradient_check.hpp"
#include "hra/lora_conv2d.hpp"
#include "support/conv_cases.hpp"
#include "support/conv_fixtures.hpp"
#include "support/conv_reference.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

namespace {

using hra::BiasMode;
using hra::Conv2dGeometry;
using hra::LoraOptions;
using hra_test::Index;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::Vec;
using hra_test::VecD;

LoraOptions options(Index rank, double alpha = 6.0, double dropout = 0.0, std::uint64_t seed = 5) {
  LoraOptions o;
  o.rank = rank;
  o.alpha = alpha;
  o.dropout = dropout;
  o.seed = seed;
  return o;
}

Index rank_for(const Conv2dGeometry& g) {
  return std::min<Index>({2, g.fan_in(), g.out_channels()});
}

// A LoRA conv with a non-zero B (PEFT's B = 0 would hide every B-dependent term).
template <typename T>
hra::LoraConv2d<T> make_lora(const Conv2dGeometry& g, const LoraOptions& o,
                             BiasMode mode = BiasMode::all) {
  hra::LoraConv2d<T> layer(
      g, hra::WeightMatrix<T>::owned(hra_test::random_as<T>(g.out_channels(), g.fan_in(), 41)),
      hra_test::random_vec<T>(g.out_channels(), 42), o, mode);
  layer.set_lora_weights(layer.lora_a(), hra_test::random_as<T>(g.out_channels(), o.rank, 43));
  return layer;
}

MatD delta_weight(const hra::LoraConv2d<double>& layer) {
  return layer.scaling() * layer.lora_b() * layer.lora_a();
}

TEST_CASE("LoraConv2d: forward equals conv with W + s B A, every geometry", "[lora_conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    auto layer = make_lora<double>(c.geometry, options(rank_for(c.geometry)));
    const MatD x = hra_test::random_matrix(c.geometry.input_size(), 3, 5);
    const MatD expected = hra_test::conv_reference(
        c.geometry, MatD(layer.weight()) + delta_weight(layer), x, *layer.bias());
    CHECK(hra_test::rel_err(layer.forward(x), expected) < 1e-13);
    MatD y;
    layer.predict(x, y);
    CHECK(hra_test::rel_err(y, expected) < 1e-13);
  }
}

TEST_CASE("LoraConv2d: gradients match central differences, with and without dropout",
          "[lora_conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases())
    for (double dropout : {0.0, 0.3}) {
      INFO(c.name << ", dropout " << dropout);
      auto layer = make_lora<double>(c.geometry, options(rank_for(c.geometry), 6.0, dropout));
      layer.set_reuse_dropout_mask(true);  // the loss must be a function of the parameters
      hra::GradientCheckOptions o;
      o.batch = 2;
      const auto report = hra::check_gradients(layer, o);
      REQUIRE(report.rows.size() == 4);  // lora_A, lora_B, bias, input
      for (const auto& row : report.rows) {
        INFO(row.name << " (" << row.checked << " entries)");
        CHECK(row.relative_error() < 1e-7);
      }
      worst = std::max(worst, report.worst_relative_error());
    }
  WARN("LoraConv2d worst gradient-check relative error (double): " << worst);
}

TEST_CASE("LoraConv2d: float agrees with double; workers change nothing", "[lora_conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    auto ld = make_lora<double>(c.geometry, options(rank_for(c.geometry)));
    auto lf = make_lora<float>(c.geometry, options(rank_for(c.geometry)));
    auto lw = make_lora<double>(c.geometry, options(rank_for(c.geometry)));
    lw.set_batch_chunks(3);
    const MatD x = hra_test::random_matrix(c.geometry.input_size(), 4, 5);
    const MatD dy = hra_test::random_matrix(c.geometry.output_size(), 4, 6);
    const MatD yd = ld.forward(x), dxd = ld.backward(dy);
    const Mat<float> yf = lf.forward(x.cast<float>()), dxf = lf.backward(dy.cast<float>());
    double e = std::max(hra_test::rel_err(yf, yd), hra_test::rel_err(dxf, dxd));
    for (std::size_t i = 0; i < 3; ++i)
      e = std::max(e, hra_test::rel_err(lf.parameters()[i].grad, ld.parameters()[i].grad));
    CHECK(e < hra_test::tol<float>(c.geometry.fan_in() + c.geometry.out_channels(), 2));
    worst = std::max(worst, e);
    CHECK(hra_test::rel_err(lw.forward(x), yd) == 0.0);
    CHECK(hra_test::rel_err(lw.backward(dy), dxd) == 0.0);
    for (std::size_t i = 0; i < 3; ++i)
      CHECK(hra_test::rel_err(lw.parameters()[i].grad, ld.parameters()[i].grad) < 1e-14);
  }
  WARN("LoraConv2d worst float-vs-double relative error: " << worst);
}

TEST_CASE("LoraConv2d: PEFT's init starts as the frozen convolution; A is r x D", "[lora_conv2d]") {
  const auto g = Conv2dGeometry(4, 6, 6, 6, 3, 3).padding(1).groups(2);
  hra::LoraConv2dd layer(g, hra_test::random_matrix(6, 18, 1), options(4));
  CHECK(layer.lora_a().rows() == 4);
  CHECK(layer.lora_a().cols() == g.fan_in());
  CHECK(layer.lora_b().isZero(0));
  CHECK(layer.lora_a().cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(double(g.fan_in())));
  const MatD x = hra_test::random_matrix(g.input_size(), 2, 2);
  CHECK(hra_test::rel_err(layer.forward(x), hra_test::conv_reference(g, MatD(layer.weight()), x)) <
        1e-14);
  CHECK(layer.num_trainable_parameters() == 4 * (g.fan_in() + g.out_channels()));
}

TEST_CASE("LoraConv2d: merge equals the unmerged output (groups too); unmerge restores W",
          "[lora_conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    const auto& g = c.geometry;
    MatD w = hra_test::random_matrix(g.out_channels(), g.fan_in(), 3);
    const MatD w0 = w;
    hra::LoraConv2dd layer(g, hra::WeightMatrix<double>::view(w), std::nullopt,
                           options(rank_for(g)));
    layer.set_lora_weights(layer.lora_a(),
                           hra_test::random_matrix(g.out_channels(), rank_for(g), 4));
    const MatD x = hra_test::random_matrix(g.input_size(), 3, 5);
    const MatD unmerged = layer.forward(x);
    layer.merge(hra::MergeCheck::safe);
    CHECK(layer.merged());
    CHECK(layer.parameters().empty());
    CHECK(hra_test::rel_err(w, w0 + delta_weight(layer)) < 1e-14);
    CHECK(hra_test::rel_err(layer.forward(x), unmerged) < 1e-13);
    const MatD dy = hra_test::random_matrix(g.output_size(), 3, 6);
    const MatD dx_merged = layer.backward(dy);
    layer.unmerge();
    CHECK(hra_test::rel_err(w, w0) < 1e-14);
    layer.forward(x);
    CHECK(hra_test::rel_err(layer.backward(dy), dx_merged) < 1e-13);
  }
}

TEST_CASE("LoraConv2d: memory kept between the passes", "[lora_conv2d]") {
  const auto g = Conv2dGeometry(3, 8, 8, 5, 3, 3).stride(2).padding(1).groups(1);
  const Index n = 3, r = 2;
  const std::size_t s = sizeof(double);
  for (double dropout : {0.0, 0.5}) {
    auto layer = make_lora<double>(g, options(r, 2.0, dropout));
    layer.forward(hra_test::random_matrix(g.input_size(), n, 1));
    const std::size_t expected =
        static_cast<std::size_t>(g.input_size() * n + r * n * g.out_positions() +
                                 g.output_size() * n) *
            s +
        (dropout > 0 ? static_cast<std::size_t>(g.input_size() * n) : 0);
    CHECK(layer.saved_bytes() == expected);
  }
}

TEST_CASE("LoraConv2d: bad options, geometry, weights and inputs throw naming the values",
          "[lora_conv2d]") {
  using hra_test::expect_error;
  using G = Conv2dGeometry;
  const auto g = G(2, 5, 5, 4, 3, 3).padding(1).groups(2);  // D = 9
  expect_error<std::invalid_argument>(
      [&] { hra::LoraConv2dd(g, MatD::Ones(4, 9), options(5)); },
      {"LoraConv2d", "rank r=5 exceeds min(C_out, D) = min(4, 9)", "1*3*3"});
  expect_error<std::invalid_argument>([&] { hra::LoraConv2dd(g, MatD::Ones(4, 18), options(2)); },
                                      {"LoraConv2d", "weight is 4x18", "C_out x D = 4x9"});
  expect_error<std::invalid_argument>(
      [&] { hra::LoraConv2dd(G(3, 5, 5, 4, 3, 3).groups(2), MatD::Ones(4, 9), options(2)); },
      {"LoraConv2d", "C_in=3 is not divisible by groups=2"});
  expect_error<std::invalid_argument>(
      [&] { hra::LoraConv2dd(G(1, 4, 2, 2, 3, 3).padding(1, 0), MatD::Ones(2, 9), options(2)); },
      {"LoraConv2d", "kernel spans 3 columns", "padded input has 2", "W_out=0"});
  expect_error<std::invalid_argument>(
      [&] { hra::LoraConv2dd(g, MatD::Ones(4, 9), options(2, 2.0, 1.0)); },
      {"LoraConv2d", "dropout must be in [0, 1)"});
  hra::LoraConv2dd layer(g, MatD::Ones(4, 9), options(2));
  expect_error<std::invalid_argument>(
      [&] { layer.set_lora_weights(MatD::Ones(2, 18), MatD::Ones(4, 2)); },
      {"LoraConv2d::set_lora_weights A", "expected a 2x9"});
  expect_error<std::invalid_argument>([&] { layer.forward(MatD::Ones(51, 1)); },
                                      {"LoraConv2d::forward input", "C*H*W = 2*5*5 = 50", "51x1"});
  expect_error<std::logic_error>([&] { layer.backward(MatD::Ones(g.output_size(), 1)); },
                                 {"LoraConv2d::backward", "no forward()"});
  layer.merge();
  expect_error<std::logic_error>([&] { layer.merge(); }, {"LoraConv2d::merge", "already merged"});
}

TEST_CASE("LoraConv2d: agrees with PEFT's lora.Conv2d and autograd (fixtures)", "[lora_conv2d]") {
  double worst = 0;
  int peft_modules = 0;
  for (const auto& name : hra_test::lora_conv_fixtures()) {
    const hra_test::ConvFixture f(name);
    INFO(name << ": " << f.geometry.describe());
    const Index r = f.file.integer("r");
    peft_modules += static_cast<int>(f.file.integer("peft_module"));
    const double alpha = std::stod(f.file.field("alpha"));
    const MatD a = f.file.matrix("lora_A", r, f.geometry.fan_in());
    const MatD b = f.file.matrix("lora_B", f.geometry.out_channels(), r);
    hra::LoraConv2dd layer(f.geometry, hra::WeightMatrix<double>::owned(f.weight("weight")),
                           f.bias("bias"), options(r, alpha), BiasMode::all);
    layer.set_lora_weights(a, b);
    const double e =
        std::max({hra_test::rel_err(layer.forward(f.input("x")), f.output("output")),
                  hra_test::rel_err(layer.backward(f.output("grad_output")), f.input("grad_x")),
                  hra_test::rel_err(layer.parameters()[0].grad,
                                    f.file.matrix("grad_lora_A", r, f.geometry.fan_in())),
                  hra_test::rel_err(layer.parameters()[1].grad,
                                    f.file.matrix("grad_lora_B", f.geometry.out_channels(), r)),
                  hra_test::rel_err(layer.parameters()[2].grad, f.bias("grad_bias")),
                  hra_test::rel_err(delta_weight(layer), f.weight("delta_weight"))});
    CHECK(e < 1e-12);
    worst = std::max(worst, e);
    const MatD w0 = layer.weight();
    layer.merge();
    CHECK(hra_test::rel_err(MatD(layer.weight()) - w0, f.weight("delta_weight")) < 1e-12);
  }
  CHECK(peft_modules == 2);  // groups 1 and dilation 1: PEFT's own forward and get_delta_weight
  WARN("LoraConv2d worst relative error against PyTorch (double): " << worst);
}

}  // namespace
