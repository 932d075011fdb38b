// HraConv2d behind hra::Layer: the output against the convolution written out with the dense
// W H of explicit reflections, gradients against central differences over every geometry, both
// variants and all three forms (which must agree with each other), float against double,
// stacked adapters, merge / unmerge / safe merge, bias modes, the cost model, memory, and every
// user error.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "hra/gradient_check.hpp"
#include "hra/hra_conv2d.hpp"
#include "support/conv_cases.hpp"
#include "support/conv_fixtures.hpp"
#include "support/conv_reference.hpp"
#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

namespace {

using hra::BiasMode;
using hra::Conv2dGeometry;
using hra::HraForm;
using hra::HraOptions;
using hra::Init;
using hra::Variant;
using hra_test::Index;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::Vec;
using hra_test::VecD;

const HraForm kForms[] = {HraForm::low_rank, HraForm::hybrid, HraForm::weight};
const Variant kVariants[] = {Variant::chain, Variant::gram_schmidt};

HraOptions options(Index rank, Variant variant = Variant::chain, Init init = Init::random,
                   std::uint64_t seed = 7, double lambda = 0.0) {
  HraOptions o;
  o.rank = rank;
  o.variant = variant;
  o.init = init;
  o.seed = seed;
  o.lambda = lambda;
  return o;
}

// A rank that fits every geometry of conv_cases() (D >= 3 everywhere).
Index rank_for(const Conv2dGeometry& g) {
  return std::min<Index>(3, g.fan_in());
}

template <typename T>
hra::HraConv2d<T> make_hra(const Conv2dGeometry& g, const HraOptions& o,
                           BiasMode mode = BiasMode::all, bool with_bias = true) {
  std::optional<Vec<T>> bias;
  if (with_bias) bias = hra_test::random_vec<T>(g.out_channels(), 32);
  return hra::HraConv2d<T>(
      g, hra::WeightMatrix<T>::owned(hra_test::random_as<T>(g.out_channels(), g.fan_in(), 31)),
      bias, o, with_bias ? mode : BiasMode::none);
}

// W H_a H_b ... with every H formed densely from explicit reflections (or Q Q^T).
MatD explicit_adapted_weight(const hra::HraConv2d<double>& layer) {
  MatD w = layer.weight();
  for (const auto& a : layer.adapters())
    if (!a.merged()) w = (w * hra_test::explicit_h(a.chain().reflectors(), a.variant())).eval();
  return w;
}

struct Pass {
  MatD y, dx;
  std::vector<MatD> grads;
};

template <typename T>
Pass run(hra::HraConv2d<T>& layer, const MatD& x, const MatD& dy) {
  Pass p;
  p.y = hra_test::to_double(layer.forward(x.cast<T>()));
  p.dx = hra_test::to_double(layer.backward(dy.cast<T>()));
  for (auto& prm : layer.parameters()) p.grads.push_back(hra_test::to_double(prm.grad));
  return p;
}

double pass_err(const Pass& a, const Pass& b) {
  double e = std::max(hra_test::rel_err(a.y, b.y), hra_test::rel_err(a.dx, b.dx));
  REQUIRE(a.grads.size() == b.grads.size());
  for (std::size_t i = 0; i < a.grads.size(); ++i)
    e = std::max(e, hra_test::rel_err(a.grads[i], b.grads[i]));
  return e;
}

TEST_CASE("HraConv2d: forward equals conv with the dense W H, every geometry, variant and form",
          "[hra_conv2d]") {
  for (const auto& c : hra_test::conv_cases())
    for (Variant v : kVariants)
      for (HraForm f : kForms) {
        INFO(c.name << ", " << hra::to_string(v) << ", " << hra::to_string(f));
        auto layer = make_hra<double>(c.geometry, options(rank_for(c.geometry), v));
        layer.set_form(f);
        const MatD x = hra_test::random_matrix(c.geometry.input_size(), 3, 5);
        const MatD expected =
            hra_test::conv_reference(c.geometry, explicit_adapted_weight(layer), x, *layer.bias());
        CHECK(hra_test::rel_err(layer.forward(x), expected) < 1e-13);
        CHECK(layer.last_form() == f);
        MatD y;
        layer.predict(x, y);
        CHECK(hra_test::rel_err(y, expected) < 1e-13);
      }
}

TEST_CASE("HraConv2d: gradients match central differences, every geometry, variant and form",
          "[hra_conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases())
    for (Variant v : kVariants)
      for (HraForm f : kForms) {
        INFO(c.name << ", " << hra::to_string(v) << ", " << hra::to_string(f));
        auto layer =
            make_hra<double>(c.geometry, options(rank_for(c.geometry), v, Init::random, 7, 0.01));
        layer.set_form(f);
        hra::GradientCheckOptions o;
        o.batch = 2;
        const auto report = hra::check_gradients(layer, o);
        REQUIRE(report.rows.size() == 3);  // hra_u.default, bias, input
        for (const auto& row : report.rows) {
          INFO(row.name << " (" << row.checked << " entries)");
          CHECK(row.relative_error() < 1e-7);
        }
        worst = std::max(worst, report.worst_relative_error());
      }
  WARN(
      "HraConv2d worst gradient-check relative error (double, 10 geometries x 2 variants x 3 "
      "forms): "
      << worst);
}

TEST_CASE("HraConv2d: r = D, stacked adapters and several blocks are differentiated exactly",
          "[hra_conv2d]") {
  double worst = 0;
  const auto depthwise = Conv2dGeometry(3, 5, 5, 3, 3, 3).padding(1).groups(3);  // D = 9
  const auto pointwise = Conv2dGeometry(5, 4, 3, 6, 1, 1);                       // D = 5
  const auto grouped = Conv2dGeometry(4, 5, 5, 6, 3, 3).padding(1).groups(2);    // D = 18
  for (HraForm f : kForms)
    for (Variant v : kVariants) {
      INFO(hra::to_string(f) << ", " << hra::to_string(v));
      std::vector<hra::HraConv2d<double>> layers;
      layers.push_back(make_hra<double>(depthwise, options(9, v)));  // r = D
      layers.push_back(make_hra<double>(pointwise, options(5, v)));  // r = D, X is T
      auto stacked = make_hra<double>(grouped, options(3, v));
      stacked.add_adapter("second",
                          options(4, v == Variant::chain ? Variant::gram_schmidt : Variant::chain,
                                  Init::random, 9));
      stacked.add_adapter("third", options(2, v, Init::random, 10));
      layers.push_back(std::move(stacked));
      auto blocked = make_hra<double>(grouped, [&] {
        auto o = options(11, v);
        o.block_size = 4;  // the chain's own kernels block; the layer's low-rank form does not
        return o;
      }());
      layers.push_back(std::move(blocked));
      for (auto& layer : layers) {
        layer.set_form(f);
        const auto report = hra::check_gradients(layer);
        // Gram-Schmidt with r = D spans everything: H = I - 2 Q Q^T = -I whatever U is, so dU
        // is 0 and only an absolute error means anything there.
        const bool constant_h = v == Variant::gram_schmidt && layer.adapters().size() == 1 &&
                                layer.adapter().rank() == layer.geometry().fan_in();
        for (const auto& row : report.rows) {
          INFO(row.name << " max abs error " << row.max_abs_error << " scale " << row.scale);
          if (constant_h && row.name == "hra_u.default") {
            // Central differences of an O(10) loss resolve about 1e-8 here; the analytic dU
            // itself is rounding-sized.
            CHECK(row.max_abs_error < 1e-6);
            CHECK(hra_test::max_abs(layer.adapter().gradient()) < 1e-12);
          } else {
            CHECK(row.relative_error() < 1e-7);
            worst = std::max(worst, row.relative_error());
          }
        }
        const MatD x = hra_test::random_matrix(layer.input_dim(), 2, 3);
        CHECK(hra_test::rel_err(
                  layer.forward(x),
                  hra_test::conv_reference(layer.geometry(), explicit_adapted_weight(layer), x,
                                           *layer.bias())) < 1e-12);
      }
    }
  WARN("HraConv2d worst gradient-check relative error (r = D, stacks, blocks): " << worst);
}

TEST_CASE("HraConv2d: the three forms agree with each other to rounding", "[hra_conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases())
    for (Variant v : kVariants) {
      INFO(c.name << ", " << hra::to_string(v));
      const MatD x = hra_test::random_matrix(c.geometry.input_size(), 4, 5);
      const MatD dy = hra_test::random_matrix(c.geometry.output_size(), 4, 6);
      std::vector<Pass> passes;
      for (HraForm f : kForms) {
        auto layer = make_hra<double>(c.geometry, options(rank_for(c.geometry), v));
        layer.add_adapter("second", options(2, Variant::chain, Init::random, 8));
        layer.set_form(f);
        layer.set_batch_chunks(f == HraForm::hybrid ? 3 : 1);  // workers change nothing either
        passes.push_back(run(layer, x, dy));
      }
      for (std::size_t i = 1; i < passes.size(); ++i) {
        const double e = pass_err(passes[i], passes[0]);
        CHECK(e < 1e-12);
        worst = std::max(worst, e);
      }
    }
  WARN("HraConv2d worst disagreement between the forms (double): " << worst);
}

TEST_CASE("HraConv2d: float agrees with double", "[hra_conv2d]") {
  double worst = 0;
  for (const auto& c : hra_test::conv_cases())
    for (HraForm f : kForms) {
      INFO(c.name << ", " << hra::to_string(f));
      auto ld = make_hra<double>(c.geometry, options(rank_for(c.geometry)));
      auto lf = make_hra<float>(c.geometry, options(rank_for(c.geometry)));
      ld.set_form(f);
      lf.set_form(f);
      const MatD x = hra_test::random_matrix(c.geometry.input_size(), 2, 5);
      const MatD dy = hra_test::random_matrix(c.geometry.output_size(), 2, 6);
      const double e = pass_err(run(lf, x, dy), run(ld, x, dy));
      CHECK(e < hra_test::tol<float>(c.geometry.fan_in() + c.geometry.out_channels(), 3));
      worst = std::max(worst, e);
    }
  WARN("HraConv2d worst float-vs-double relative error: " << worst);
}

TEST_CASE("HraConv2d: symmetric initialisation starts as the frozen convolution", "[hra_conv2d]") {
  const auto g = Conv2dGeometry(4, 6, 6, 6, 3, 3).padding(1).groups(2);
  auto layer = make_hra<double>(g, options(4, Variant::chain, Init::symmetric));
  const MatD x = hra_test::random_matrix(g.input_size(), 2, 1);
  CHECK(hra_test::rel_err(layer.forward(x), hra_test::conv_reference(g, MatD(layer.weight()), x,
                                                                     *layer.bias())) < 1e-14);
  // PEFT's draw: r/2 columns, each repeated.
  const MatD& u = layer.adapter().chain().reflectors();
  CHECK(u.col(0) == u.col(1));
  CHECK(u.col(2) == u.col(3));
}

TEST_CASE("HraConv2d: dU is orthogonal to each u_i, and the input gradient is optional",
          "[hra_conv2d]") {
  const auto g = Conv2dGeometry(3, 6, 5, 4, 3, 3).stride(2).padding(1);
  for (HraForm f : kForms) {
    INFO(hra::to_string(f));
    auto layer = make_hra<double>(g, options(4));
    layer.set_form(f);
    const MatD x = hra_test::random_matrix(g.input_size(), 3, 1);
    const MatD dy = hra_test::random_matrix(g.output_size(), 3, 2);
    layer.forward(x);
    layer.backward(dy);
    const MatD du = layer.adapter().gradient();
    const MatD& u = layer.adapter().chain().reflectors();
    for (Index i = 0; i < u.cols(); ++i)
      CHECK(std::abs(u.col(i).dot(du.col(i))) < 1e-12 * u.col(i).norm() * du.col(i).norm());
    layer.forward(x);
    CHECK(layer.backward(dy, false).size() == 0);
    CHECK(hra_test::rel_err(layer.adapter().gradient(), du) < 1e-14);
  }
}

TEST_CASE("HraConv2d: merge equals the unmerged output; unmerge, stacks and safe merge",
          "[hra_conv2d]") {
  for (const auto& c : hra_test::conv_cases()) {
    INFO(c.name);
    const auto& g = c.geometry;
    MatD w = hra_test::random_matrix(g.out_channels(), g.fan_in(), 3);
    const MatD w0 = w;
    hra::HraConv2dd layer(g, hra::WeightMatrix<double>::view(w),
                          hra_test::random_vec<double>(g.out_channels(), 4), options(rank_for(g)),
                          BiasMode::all);
    layer.add_adapter("b", options(2, Variant::gram_schmidt, Init::random, 3));
    const MatD x = hra_test::random_matrix(g.input_size(), 3, 5);
    const MatD unmerged = layer.forward(x);
    const MatD expected = explicit_adapted_weight(layer);
    layer.merge();
    CHECK(layer.merged());
    CHECK(hra_test::rel_err(w, expected) < 1e-13);  // the caller's W now holds W H_a H_b
    CHECK(hra_test::rel_err(layer.forward(x), unmerged) < 1e-13);
    CHECK(layer.parameters().size() == 1);  // only the bias trains once merged
    layer.unmerge();                        // pops "b"
    CHECK(layer.adapters()[0].merged());
    CHECK_FALSE(layer.adapters()[1].merged());
    CHECK(hra_test::rel_err(layer.forward(x), unmerged) < 1e-13);
    layer.unmerge();
    CHECK(hra_test::rel_err(w, w0) < 1e-13);
    CHECK(hra_test::rel_err(layer.forward(x), unmerged) < 1e-13);
    layer.merge(hra::MergeCheck::safe);
    CHECK(hra_test::rel_err(layer.forward(x), unmerged) < 1e-13);
  }
  // Safe merge refuses a non-finite result and leaves W untouched.
  const auto g = Conv2dGeometry(2, 4, 4, 3, 3, 3).padding(1);
  MatD w = MatD::Constant(3, 18, 1e308);
  hra::HraConv2dd layer(g, hra::WeightMatrix<double>::view(w), std::nullopt, options(2));
  const MatD before = w;
  hra_test::expect_error<std::runtime_error>([&] { layer.merge(hra::MergeCheck::safe); },
                                             {"HraConv2d::merge", "non-finite", "unchanged"});
  CHECK(hra_test::bitwise_equal(w, before));
  CHECK_FALSE(layer.merged());
}

TEST_CASE("HraConv2d: bias modes and parameter views", "[hra_conv2d]") {
  const auto g = Conv2dGeometry(2, 5, 5, 4, 3, 3).padding(1);
  auto none = make_hra<double>(g, options(4), BiasMode::none);
  REQUIRE(none.parameters().size() == 1);
  CHECK(none.parameters()[0].name == "hra_u.default");
  CHECK(none.parameters()[0].value.rows() == g.fan_in());  // PEFT's hra_u: (D, r)
  CHECK(none.num_trainable_parameters() == g.fan_in() * 4);
  auto all = make_hra<double>(g, options(4), BiasMode::all);
  CHECK(all.parameters().size() == 2);
  CHECK(all.parameters()[1].name == "bias");
  auto hra_only = make_hra<double>(g, options(4), BiasMode::adapter_only);
  CHECK(hra_only.parameters().size() == 2);
  auto frozen_bias = make_hra<double>(g, options(4), BiasMode::none, true);
  CHECK(frozen_bias.parameters().size() == 1);
  hra_test::expect_error<std::invalid_argument>(
      [&] {
        hra::HraConv2dd(g, hra::WeightMatrix<double>::owned(MatD::Ones(4, 18)), std::nullopt,
                        options(4), BiasMode::all);
      },
      {"HraConv2d", "bias mode trains the bias but the layer has none"});
}

TEST_CASE(
    "HraConv2d: the cost model picks the cheapest form; memory has no D x D or nL x D "
    "term",
    "[hra_conv2d]") {
  // A network's first layer (few channels): the full weight gradient is cheaper than r-sized
  // sums over every patch.
  auto first = make_hra<double>(Conv2dGeometry(1, 28, 28, 16, 3, 3).padding(1), options(8));
  CHECK(first.form_for_batch(64) == HraForm::weight);
  // ResNet-like: many channels, the hybrid.
  auto resnet = make_hra<double>(Conv2dGeometry(64, 14, 14, 64, 3, 3).padding(1), options(8));
  CHECK(resnet.form_for_batch(32) == HraForm::hybrid);
  // One output position of one image: W' would cost more than the patches.
  auto tiny = make_hra<double>(Conv2dGeometry(64, 3, 3, 64, 3, 3), options(8));
  CHECK(tiny.form_for_batch(1) == HraForm::low_rank);
  for (HraForm f : kForms)
    CHECK(resnet.estimated_flops(f, 32) >= resnet.estimated_flops(HraForm::automatic, 32));

  const auto g = Conv2dGeometry(3, 8, 8, 5, 3, 3).padding(1);
  const Index n = 4, r = 4, d = g.fan_in(), nl = n * g.out_positions();
  const std::size_t s = sizeof(double);
  const std::size_t base = static_cast<std::size_t>(g.input_size() * n + g.output_size() * n) * s;
  for (HraForm f : kForms) {
    INFO(hra::to_string(f));
    auto layer = make_hra<double>(g, options(r));
    layer.set_form(f);
    layer.forward(hra_test::random_matrix(g.input_size(), n, 1));
    const std::size_t factors = static_cast<std::size_t>(r * r) * s;  // S of one block
    const std::size_t extra = f == HraForm::low_rank
                                  ? static_cast<std::size_t>(r * nl) * s                 // K
                                  : static_cast<std::size_t>(g.out_channels() * d) * s;  // W'
    CHECK(layer.saved_bytes() == base + factors + extra);
  }
}

TEST_CASE("HraConv2d: bad options, geometry, weight and inputs throw naming the values",
          "[hra_conv2d]") {
  using hra_test::expect_error;
  using G = Conv2dGeometry;
  const auto g = G(2, 5, 5, 4, 3, 3).padding(1).groups(2);  // D = 9
  expect_error<std::invalid_argument>(
      [&] { hra::HraConv2dd(g, MatD::Ones(4, 9), options(10)); },
      {"HraConv2d", "rank r=10 exceeds D = C_in/groups*kh*kw = 1*3*3 = 9"});
  expect_error<std::invalid_argument>([&] { hra::HraConv2dd(g, MatD::Ones(4, 18), options(2)); },
                                      {"HraConv2d", "weight is 4x18", "C_out x D = 4x9"});
  expect_error<std::invalid_argument>(
      [&] { hra::HraConv2dd(G(6, 5, 5, 4, 3, 3).groups(4), MatD::Ones(4, 9), options(2)); },
      {"HraConv2d", "C_in=6 is not divisible by groups=4"});
  expect_error<std::invalid_argument>(
      [&] { hra::HraConv2dd(G(1, 3, 3, 2, 5, 3), MatD::Ones(2, 15), options(2)); },
      {"HraConv2d", "kernel spans 5 rows", "padded input has 3", "H_out=0"});
  expect_error<std::invalid_argument>(
      [&] { hra::HraConv2dd(g, MatD::Ones(4, 9), options(3, Variant::chain, Init::symmetric)); },
      {"symmetric initialisation needs an even rank", "r=3"});
  auto layer = make_hra<double>(g, options(2));
  expect_error<std::invalid_argument>([&] { layer.add_adapter("x", options(12)); },
                                      {"rank r=12 exceeds the dimension d=9"});
  expect_error<std::invalid_argument>([&] { layer.forward(MatD::Ones(49, 1)); },
                                      {"HraConv2d::forward input", "C*H*W = 2*5*5 = 50", "49x1"});
  MatD bad = MatD::Ones(50, 1);
  bad(3, 0) = std::numeric_limits<double>::quiet_NaN();
  expect_error<std::invalid_argument>([&] { layer.forward(bad); },
                                      {"HraConv2d::forward input", "non-finite", "(3, 0)"});
  expect_error<std::logic_error>([&] { layer.backward(MatD::Ones(g.output_size(), 1)); },
                                 {"HraConv2d::backward", "no forward()"});
  layer.forward(MatD::Ones(50, 2));
  layer.set_form(HraForm::weight);  // changes what backward would need: forgets the forward
  expect_error<std::logic_error>([&] { layer.backward(MatD::Ones(g.output_size(), 2)); },
                                 {"HraConv2d::backward", "no forward()"});
  // A U an optimiser made unusable: the forward throws and keeps nothing.
  auto u = layer.parameters()[0].value;
  u.col(1).setZero();
  expect_error<std::invalid_argument>([&] { layer.forward(MatD::Ones(50, 2)); },
                                      {"reflector column 1 is zero"});
  expect_error<std::logic_error>([&] { layer.backward(MatD::Ones(g.output_size(), 2)); },
                                 {"HraConv2d::backward", "no forward()"});
}

TEST_CASE("HraConv2d: agrees with PEFT's W H in F.conv2d and autograd (fixtures), every form",
          "[hra_conv2d]") {
  double worst_d = 0, worst_f = 0;
  for (const auto& name : hra_test::hra_conv_fixtures()) {
    const hra_test::ConvFixture f(name);
    INFO(name << ": " << f.geometry.describe());
    const Index r = f.file.integer("r");
    const Variant v = f.file.integer("apply_GS") ? Variant::gram_schmidt : Variant::chain;
    const MatD u = f.file.matrix("hra_u", f.geometry.fan_in(), r);
    const MatD x = f.input("x"), dy = f.output("grad_output");
    const auto check = [&](auto& layer, double tol, double& worst) {
      layer.set_reflectors("default", u.cast<typename std::decay_t<decltype(layer)>::Scalar>());
      for (HraForm form : kForms) {
        INFO(hra::to_string(form));
        layer.set_form(form);
        const Pass p = run(layer, x, dy);
        const double e = std::max(
            {hra_test::rel_err(p.y, f.output("output")), hra_test::rel_err(p.dx, f.input("grad_x")),
             hra_test::rel_err(p.grads[0], f.file.matrix("grad_hra_u", f.geometry.fan_in(), r)),
             hra_test::rel_err(p.grads[1], f.bias("grad_bias"))});
        CHECK(e < tol);
        worst = std::max(worst, e);
      }
      layer.merge();
      const double em = hra_test::rel_err(layer.weight(), f.weight("merged_weight"));
      CHECK(em < tol);
      worst = std::max(worst, em);
    };
    hra::HraConv2dd ld(f.geometry, hra::WeightMatrix<double>::owned(f.weight("weight")),
                       f.bias("bias"), options(r, v), BiasMode::all);
    check(ld, 1e-12, worst_d);
    hra::HraConv2df lf(f.geometry,
                       hra::WeightMatrix<float>::owned(f.weight("weight").cast<float>()),
                       f.bias("bias").cast<float>(), options(r, v), BiasMode::all);
    check(lf, 1e-4, worst_f);
  }
  WARN("HraConv2d worst relative error against PyTorch: " << worst_d << " (double), " << worst_f
                                                          << " (float)");
}

}  // namespace
