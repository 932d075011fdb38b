// hra::Sequential: forward against the hand-composed layers, gradients against central
// differences in double (and float against double), parameter names, merge / unmerge, adapter
// control, PEFT save and load through the model's module names, and every misuse.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "hra/conv2d.hpp"
#include "hra/gradient_check.hpp"
#include "hra/hra_conv2d.hpp"
#include "hra/hra_linear.hpp"
#include "hra/io/sequential.hpp"
#include "hra/linear.hpp"
#include "hra/lora_linear.hpp"
#include "hra/sequential.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace {

using Eigen::Index;
using hra::Activation;
using hra::BiasMode;
using hra_test::expect_error;
using hra_test::Mat;
using hra_test::random_as;
using hra_test::random_vec;
using hra_test::rel_err;

hra::HraOptions hra_options(Index rank, std::uint64_t seed, double lambda = 0) {
  hra::HraOptions o;
  o.rank = rank;
  o.init = hra::Init::random;  // H != I, so the adapter is visible in every output
  o.seed = seed;
  o.lambda = lambda;
  return o;
}

hra::LoraOptions lora_options(Index rank, std::uint64_t seed) {
  hra::LoraOptions o;
  o.rank = rank;
  o.seed = seed;
  return o;
}

// 6 -> 5 (HRA, GELU) -> 4 (frozen Linear, ReLU) -> 4 (LoRA, with a non-zero B) -> 3 (trainable
// head): every module kind and every activation, with seeds fixed per layer.
template <typename T>
hra::Sequential<T> mixed_model() {
  hra::Sequential<T> m;
  m.template emplace<hra::HraLinear<T>>("fc1", hra::WeightMatrix<T>::owned(random_as<T>(5, 6, 1)),
                                        random_vec<T>(5, 2), hra_options(3, 3, 0.1), BiasMode::all);
  m.set_activation("fc1", Activation::gelu_tanh);
  m.add("frozen",
        std::make_unique<hra::Linear<T>>(hra::WeightMatrix<T>::owned(random_as<T>(4, 5, 4)),
                                         random_vec<T>(4, 5), hra::LinearOptions{false}),
        Activation::relu);
  auto& lora = m.template emplace<hra::LoraLinear<T>>(
      "lora", hra::WeightMatrix<T>::owned(random_as<T>(4, 4, 6)), random_vec<T>(4, 7),
      lora_options(2, 8));
  lora.set_lora_weights(lora.lora_a(), random_as<T>(4, 2, 9));
  m.template emplace<hra::Linear<T>>("head", hra::WeightMatrix<T>::owned(random_as<T>(3, 4, 10)),
                                     random_vec<T>(3, 11), hra::LinearOptions{true}, BiasMode::all);
  return m;
}

template <typename T>
Mat<T> gelu(const Mat<T>& z) {
  Mat<T> out = z;
  for (Index i = 0; i < z.size(); ++i) {
    const double v = static_cast<double>(z(i));
    out(i) =
        static_cast<T>(0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))));
  }
  return out;
}

TEST_CASE("forward and predict equal the layers composed by hand", "[sequential]") {
  auto m = mixed_model<double>();
  auto copy = mixed_model<double>();  // the same layers, driven one by one
  const Mat<double> x = random_as<double>(6, 4, 20);
  const Mat<double> y = m.forward(x);

  const Mat<double> z1 = gelu<double>(copy.module("fc1").forward(x));
  const Mat<double> z2 = copy.module("frozen").forward(z1).cwiseMax(0.0);
  const Mat<double> z3 = copy.module("lora").forward(z2);
  const Mat<double> expected = copy.module("head").forward(z3);
  CHECK(rel_err(y, expected) < 1e-14);

  Mat<double> p;
  m.predict(x, p);
  CHECK(rel_err(p, expected) < 1e-14);
  CHECK(m.input_dim() == 6);
  CHECK(m.output_dim() == 3);
  CHECK(m.size() == 4);
  CHECK(m.names() == std::vector<std::string>{"fc1", "frozen", "lora", "head"});
}

TEST_CASE("gradients agree with central differences in double", "[sequential]") {
  auto m = mixed_model<double>();
  hra::GradientCheckOptions o;
  o.batch = 3;
  const hra::GradientCheckReport report = hra::check_gradients(m, o);
  // fc1's U and bias, lora_A/B and its (frozen) bias absent, the head's weight and bias, input.
  REQUIRE(report.rows.size() == 7);
  for (const auto& row : report.rows) {
    INFO(row.name << ": relative error " << row.relative_error());
    CHECK(row.checked > 0);
    CHECK(row.relative_error() < 1e-6);
  }
}

TEST_CASE("every activation's backward agrees with central differences", "[sequential]") {
  for (const Activation a : {Activation::identity, Activation::relu, Activation::gelu_tanh}) {
    INFO(hra::to_string(a));
    hra::Sequential<double> m;
    m.emplace<hra::HraLinear<double>>("a",
                                      hra::WeightMatrix<double>::owned(random_as<double>(5, 5, 1)),
                                      random_vec<double>(5, 2), hra_options(2, 3), BiasMode::all);
    m.set_activation("a", a);
    m.emplace<hra::HraLinear<double>>("b",
                                      hra::WeightMatrix<double>::owned(random_as<double>(4, 5, 4)),
                                      random_vec<double>(4, 5), hra_options(2, 6), BiasMode::all);
    m.set_activation("b", a);  // an activation after the last module too
    CHECK(m.activation("a") == a);
    const hra::GradientCheckReport report = hra::check_gradients(m);
    REQUIRE(report.rows.size() == 5);  // a: U, bias; b: U, bias; input
    CHECK(report.worst_relative_error() < 1e-6);
  }
}

TEST_CASE("float gradients match the double analytic ones", "[sequential]") {
  auto md = mixed_model<double>();
  auto mf = mixed_model<float>();
  const Mat<double> x = random_as<double>(6, 5, 30), g = random_as<double>(3, 5, 31);
  md.forward(x);
  const Mat<double> dxd = md.backward(g);
  mf.forward(x.cast<float>());
  const Mat<float> dxf = mf.backward(g.cast<float>());
  CHECK(rel_err(dxf, dxd) < 1e-4);
  const auto pd = md.parameters();
  const auto pf = mf.parameters();
  REQUIRE(pd.size() == pf.size());
  for (std::size_t i = 0; i < pd.size(); ++i) {
    INFO(pd[i].name);
    CHECK(pf[i].name == pd[i].name);
    CHECK(rel_err(pf[i].grad, pd[i].grad) < 1e-4);
  }
}

TEST_CASE("backward without an input gradient stops at the first trainable module",
          "[sequential]") {
  auto m = mixed_model<double>();
  auto full = mixed_model<double>();
  const Mat<double> x = random_as<double>(6, 3, 40), g = random_as<double>(3, 3, 41);
  m.forward(x);
  CHECK(m.backward(g, /*compute_input_gradient=*/false).size() == 0);
  full.forward(x);
  full.backward(g);
  const auto a = m.parameters();
  const auto b = full.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(rel_err(a[i].grad, b[i].grad) < 1e-13);

  // A frozen body: only the head trains, so nothing below it is differentiated.
  hra::Sequential<double> frozen_body;
  frozen_body.emplace<hra::Linear<double>>(
      "body", hra::WeightMatrix<double>::owned(random_as<double>(4, 6, 42)), std::nullopt,
      hra::LinearOptions{false});
  auto& head = frozen_body.emplace<hra::Linear<double>>(
      "head", hra::WeightMatrix<double>::owned(random_as<double>(3, 4, 43)), std::nullopt);
  const Mat<double> h = frozen_body.module("body").forward(x);
  frozen_body.forward(x);
  frozen_body.backward(g, false);
  const Mat<double> expected = g * h.transpose();
  CHECK(rel_err(head.parameters().front().grad, expected) < 1e-14);
}

TEST_CASE("parameters are named after their modules", "[sequential]") {
  auto m = mixed_model<double>();
  std::vector<std::string> names;
  for (const auto& p : m.parameters()) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"fc1.hra_u.default", "fc1.bias", "lora.lora_A.default",
                                          "lora.lora_B.default", "head.weight", "head.bias"});
  Index count = 0;
  for (const auto& name : m.names()) count += m.module(name).num_trainable_parameters();
  CHECK(m.num_trainable_parameters() == count);
  CHECK(m.num_trainable_parameters() == 6 * 3 + 5 + 2 * 4 + 4 * 2 + 3 * 4 + 3);
  // The regulariser is fc1's (lambda = 0.1), added into its gradient.
  CHECK(m.regularizer() == m.module("fc1").regularizer());
  CHECK(m.regularizer() > 0);
  CHECK(m.add_regularizer() == m.module("fc1").regularizer());
}

TEST_CASE("merge folds every adapter and unmerge restores the model", "[sequential]") {
  auto m = mixed_model<double>();
  m.module<hra::HraLinear<double>>("fc1").add_adapter("second", hra_options(2, 50));
  const Mat<double> x = random_as<double>(6, 4, 51);
  Mat<double> before, merged, after;
  m.predict(x, before);
  const Mat<double> w_fc1 = m.module<hra::HraLinear<double>>("fc1").weight();
  const Mat<double> w_lora = m.module<hra::LoraLinear<double>>("lora").weight();
  CHECK(!m.merged());
  m.merge();  // the dense layers are skipped
  CHECK(m.merged());
  CHECK(m.module("fc1").merged());
  CHECK(m.module<hra::LoraLinear<double>>("lora").merged());
  m.predict(x, merged);
  CHECK(rel_err(merged, before) < 1e-12);
  CHECK(m.parameters().size() == 3);  // fc1.bias, head.weight, head.bias
  m.merge();                          // nothing left to merge: no change
  m.unmerge();
  CHECK(!m.merged());
  for (const auto& a : m.module<hra::HraLinear<double>>("fc1").adapters()) CHECK(!a.merged());
  CHECK(rel_err(Mat<double>(m.module<hra::HraLinear<double>>("fc1").weight()), w_fc1) < 1e-13);
  CHECK(rel_err(Mat<double>(m.module<hra::LoraLinear<double>>("lora").weight()), w_lora) < 1e-13);
  m.predict(x, after);
  CHECK(rel_err(after, before) < 1e-12);
  // A forward() before merge() cannot be differentiated after it.
  m.forward(x);
  m.merge();
  expect_error<std::logic_error>([&] { m.backward(random_as<double>(3, 4, 52)); },
                                 {"no forward()"});
  m.unmerge();
}

TEST_CASE("a merge a module refuses leaves every module unmerged", "[sequential]") {
  hra::Sequential<double> m;
  m.emplace<hra::HraLinear<double>>("a",
                                    hra::WeightMatrix<double>::owned(random_as<double>(4, 4, 1)),
                                    std::nullopt, hra_options(2, 2));
  auto& lora = m.emplace<hra::LoraLinear<double>>(
      "b", hra::WeightMatrix<double>::owned(Mat<double>::Constant(4, 4, 1e308)), std::nullopt,
      lora_options(2, 3));
  lora.set_lora_weights(Mat<double>::Constant(2, 4, 1e308), Mat<double>::Constant(4, 2, 1e308));
  const Mat<double> w = m.module<hra::HraLinear<double>>("a").weight();
  CHECK_THROWS_AS(m.merge(), std::runtime_error);  // W + B A overflows
  CHECK(!m.module("a").merged());
  CHECK(!lora.merged());
  CHECK(rel_err(Mat<double>(m.module<hra::HraLinear<double>>("a").weight()), w) < 1e-13);
}

TEST_CASE("adapter control reaches every HRA module", "[sequential]") {
  auto m = mixed_model<double>();
  m.add("fc2", std::make_unique<hra::HraLinear<double>>(
                   hra::WeightMatrix<double>::owned(random_as<double>(3, 3, 60)), std::nullopt,
                   hra_options(2, 61)));
  auto& fc1 = m.module<hra::HraLinear<double>>("fc1");
  auto& fc2 = m.module<hra::HraLinear<double>>("fc2");
  fc1.add_adapter("task", hra_options(2, 62));
  fc2.add_adapter("task", hra_options(2, 63));
  const Mat<double> x = random_as<double>(6, 3, 64);

  m.set_active_adapters({"task"});
  CHECK(fc1.active_adapters() == std::vector<std::string>{"task"});
  CHECK(fc2.active_adapters() == std::vector<std::string>{"task"});
  // fc2 has no adapter "other": nothing changes, fc1 included.
  fc1.add_adapter("other", hra_options(2, 65));  // active from the start
  const std::vector<std::string> fc1_active = fc1.active_adapters();
  expect_error<std::invalid_argument>([&] { m.set_active_adapters({"other"}); }, {"other"});
  CHECK(fc1.active_adapters() == fc1_active);
  CHECK(fc2.active_adapters() == std::vector<std::string>{"task"});
  m.set_active_adapters({"default", "task"});

  Mat<double> adapted, base, expected_base;
  m.predict(x, adapted);
  m.set_adapters_enabled(false);
  CHECK(!fc1.adapters_enabled());
  CHECK(!fc2.adapters_enabled());
  m.predict(x, base);
  CHECK(rel_err(base, adapted) > 1e-3);
  // The base model by hand: each HRA module as its frozen W x + b.
  {
    Mat<double> h = fc1.weight() * x;
    h.colwise() += *fc1.bias();
    h = gelu<double>(h);
    Mat<double> z;
    m.module("frozen").predict(h, z);
    z = z.cwiseMax(0.0);
    m.module("lora").predict(z, h);
    m.module("head").predict(h, z);
    expected_base = fc2.weight() * z;
  }
  CHECK(rel_err(base, expected_base) < 1e-13);
  m.set_adapters_enabled(true);
  Mat<double> again;
  m.predict(x, again);
  CHECK(again == adapted);

  // Disabling needs unmerged modules: fc2's refusal puts fc1 back.
  fc2.merge();
  expect_error<std::logic_error>([&] { m.set_adapters_enabled(false); }, {"unmerge"});
  CHECK(fc1.adapters_enabled());
  fc2.unmerge_all();
}

TEST_CASE("a conv model: merged equals unmerged and gradients check", "[sequential]") {
  const auto g1 = hra::Conv2dGeometry(1, 6, 6, 3, 3, 3).stride(2).padding(1);
  const auto g2 = hra::Conv2dGeometry(3, g1.out_height(), g1.out_width(), 4, 3, 3).padding(1);
  hra::Sequential<double> m;
  m.emplace<hra::HraConv2d<double>>("conv1", g1,
                                    hra::WeightMatrix<double>::owned(random_as<double>(3, 9, 1)),
                                    random_vec<double>(3, 2), hra_options(3, 3), BiasMode::all);
  m.set_activation("conv1", Activation::relu);
  m.emplace<hra::HraConv2d<double>>("conv2", g2,
                                    hra::WeightMatrix<double>::owned(random_as<double>(4, 27, 4)),
                                    std::nullopt, hra_options(4, 5));
  m.set_activation("conv2", Activation::gelu_tanh);
  m.emplace<hra::Linear<double>>(
      "head", hra::WeightMatrix<double>::owned(random_as<double>(2, g2.output_size(), 6)),
      random_vec<double>(2, 7), hra::LinearOptions{true}, BiasMode::all);
  hra::GradientCheckOptions o;
  o.batch = 2;
  CHECK(hra::check_gradients(m, o).worst_relative_error() < 1e-6);
  CHECK(m.hra_modules().size() == 2);
  CHECK(m.modules_of<hra::HraConv2d<double>>().size() == 2);

  const Mat<double> x = random_as<double>(36, 3, 8);
  Mat<double> unmerged, merged;
  m.predict(x, unmerged);
  m.merge();
  m.predict(x, merged);
  CHECK(rel_err(merged, unmerged) < 1e-12);
  m.unmerge();
}

TEST_CASE("PEFT save through the module names, load into a fresh model", "[sequential]") {
  hra_test::TempDir dir("test_sequential");
  auto trained = mixed_model<double>();
  // Move every U away from its initialisation: a few Adam steps on a fixed target.
  const Mat<double> x = random_as<double>(6, 8, 70), target = random_as<double>(3, 8, 71);
  hra::Adam<double> adam({1e-2});
  for (int step = 0; step < 5; ++step) {
    const Mat<double> r = trained.forward(x) - target;
    trained.backward(r, false);
    adam.step(trained.parameters());
  }
  const std::map<std::string, hra::Layer<double>*> all = trained.modules();
  CHECK(all.size() == 4);
  CHECK(all.at("fc1") == &trained.module("fc1"));
  hra::peft::save_hra_adapters(dir.path / "hra", trained.hra_modules());
  hra::peft::save_lora_adapters(dir.path / "lora", trained);  // io/sequential.hpp

  auto fresh = mixed_model<double>();
  // The head trains in full fine-tuning and is not part of an adapter: copy it.
  for (auto& p : fresh.module("head").parameters())
    for (auto& q : trained.module("head").parameters())
      if (p.name == q.name) p.value = q.value;
  Mat<double> want, before, got;
  trained.predict(x, want);
  fresh.predict(x, before);
  CHECK(rel_err(before, want) > 1e-3);
  hra::peft::load_hra_adapters(dir.path / "hra", fresh.hra_modules());
  hra::peft::load_lora_adapters(dir.path / "lora", fresh);
  fresh.predict(x, got);
  CHECK(rel_err(got, want) < 1e-13);

  // The exact LoRA of the HRA modules, by module name.
  const auto e = hra::peft::export_lora_adapters(dir.path / "exported", trained);
  REQUIRE(e.report.size() == 1);
  CHECK(e.report.front().module == "fc1");
}

TEST_CASE("bad building input throws with the module named", "[sequential]") {
  hra::Sequential<double> m;
  const auto linear = [](Index out, Index in) {
    return std::make_unique<hra::Linear<double>>(
        hra::WeightMatrix<double>::owned(random_as<double>(out, in, 1)), std::nullopt);
  };
  expect_error<std::logic_error>([&] { m.forward(random_as<double>(2, 2, 1)); }, {"no modules"});
  expect_error<std::invalid_argument>([&] { m.add("", linear(3, 2)); }, {"must not be empty"});
  expect_error<std::invalid_argument>(
      [&] { m.add("null", std::unique_ptr<hra::Linear<double>>()); }, {"'null'", "null layer"});
  m.add("a", linear(3, 2));
  expect_error<std::invalid_argument>([&] { m.add("a", linear(4, 3)); }, {"already", "'a'"});
  expect_error<std::invalid_argument>([&] { m.add("b", linear(4, 5)); },
                                      {"'b' takes 5 inputs", "'a' gives 3"});
  CHECK(m.size() == 1);
  expect_error<std::invalid_argument>([&] { m.module("zz"); }, {"no module 'zz'", "'a'"});
  expect_error<std::invalid_argument>([&] { m.set_activation("zz", Activation::relu); },
                                      {"no module 'zz'"});
  expect_error<std::invalid_argument>([&] { m.module<hra::HraLinear<double>>("a"); },
                                      {"'a' is not of the requested layer type"});
  CHECK_THROWS_AS(m.module_at(1), std::out_of_range);
  CHECK(&m.module_at(0) == &m.module("a"));
}

TEST_CASE("bad call input throws: shapes, order, aliasing", "[sequential]") {
  auto m = mixed_model<double>();
  const Mat<double> x = random_as<double>(6, 3, 80), g = random_as<double>(3, 3, 81);
  expect_error<std::invalid_argument>([&] { m.forward(random_as<double>(5, 3, 82)); },
                                      {"expected a batch of 6 rows", "5x3"});
  expect_error<std::logic_error>([&] { m.backward(g); }, {"no forward()"});
  m.forward(x);
  expect_error<std::invalid_argument>([&] { m.backward(random_as<double>(3, 2, 83)); },
                                      {"dY", "3x3", "3x2"});
  m.backward(g);
  expect_error<std::logic_error>([&] { m.backward(g); }, {"no forward()"});

  // The output of forward() passed back in (a model whose output size is its input size).
  hra::Sequential<double> square;
  square.emplace<hra::HraLinear<double>>(
      "a", hra::WeightMatrix<double>::owned(random_as<double>(4, 4, 84)), std::nullopt,
      hra_options(2, 85));
  square.set_activation("a", Activation::relu);
  square.emplace<hra::Linear<double>>(
      "b", hra::WeightMatrix<double>::owned(random_as<double>(4, 4, 86)), std::nullopt);
  const Mat<double> xs = random_as<double>(4, 2, 87);
  const Mat<double>& out = square.forward(xs);
  expect_error<std::invalid_argument>([&] { square.forward(out); }, {"shares memory", "copy"});
  expect_error<std::invalid_argument>([&] { square.backward(out); }, {"shares memory"});
  const Mat<double>& dx = square.backward(Mat<double>(out));
  square.forward(xs);
  expect_error<std::invalid_argument>([&] { square.backward(dx); }, {"shares memory"});
  Mat<double> y = xs;
  expect_error<std::invalid_argument>([&] { square.predict(y, y); },
                                      {"shares memory with the output"});
  expect_error<std::invalid_argument>([&] { square.predict(y.topRows(4), y); }, {"shares memory"});
  // A fresh copy is accepted.
  const Mat<double> copy = out;
  CHECK_NOTHROW(square.predict(copy, y));
}

}  // namespace
