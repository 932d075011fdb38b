// Several named HRA adapters on one layer, as PEFT users control them: the exact LoRA form of
// adapters (W H = W + B A), active sets, the frozen base alone, deleting, merging a chosen
// subset, and mixed-adapter batches. Expected values come from dense products of explicit
// reflections (tests/support/definitions.hpp), never from the code under test.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "hra/hra_linear.hpp"
#include "hra/optim.hpp"
#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra::BiasMode;
using hra::HraOptions;
using hra::Init;
using hra::Variant;
using hra_test::bitwise_equal;
using hra_test::eps;
using hra_test::expect_error;
using hra_test::explicit_h;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::random_as;
using hra_test::random_vec;
using hra_test::rel_err;
using hra_test::to_double;
using hra_test::Vec;

constexpr Index kOut = 7, kIn = 9, kBatch = 5;

HraOptions options(Index rank, Variant variant, std::uint64_t seed) {
  HraOptions o;
  o.rank = rank;
  o.variant = variant;
  o.init = Init::random;
  o.seed = seed;
  return o;
}

// A layer with adapters a (chain, r=3), b (Gram-Schmidt, r=2), c (chain, r=4), applied as
// W H_a H_b H_c, and a bias.
template <typename T>
hra::HraLinear<T> three_adapters() {
  hra::HraLinear<T> layer(hra::WeightMatrix<T>::owned(random_as<T>(kOut, kIn, 1)),
                          random_vec<T>(kOut, 2), options(3, Variant::chain, 3), BiasMode::all);
  layer.add_adapter("b", options(2, Variant::gram_schmidt, 4));
  layer.add_adapter("c", options(4, Variant::chain, 5));
  return layer;
}

// The dense H of the named adapters, in stacking order.
template <typename T>
MatD dense_h(const hra::HraLinear<T>& layer, const std::vector<std::string>& names) {
  MatD h = MatD::Identity(kIn, kIn);
  for (const auto& a : layer.adapters())
    for (const auto& n : names)
      if (a.name() == n)
        h = (h * explicit_h(to_double(a.chain().reflectors()), a.variant())).eval();
  return h;
}

// W H x + b for the named adapters, in double.
template <typename T>
MatD expected_output(const hra::HraLinear<T>& layer, const std::vector<std::string>& names,
                     const MatD& x) {
  MatD y = to_double(layer.weight()) * dense_h(layer, names) * x;
  y.colwise() += to_double(*layer.bias()).col(0);
  return y;
}

template <typename T>
std::vector<std::string> parameter_names(hra::Layer<T>& layer) {
  std::vector<std::string> out;
  for (const auto& p : layer.parameters()) out.push_back(p.name);
  return out;
}

template <typename T>
double tolerance() {
  return 64 * eps<T>() * (kIn + kOut);
}

}  // namespace

TEMPLATE_TEST_CASE("Adapters: lora_factors is the exact LoRA form W H = W + B A",
                   "[adapters][export]", float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const MatD w = to_double(layer.weight());
  const std::vector<std::vector<std::string>> cases = {
      {"default"}, {"b"}, {"c"}, {"default", "b"}, {"default", "b", "c"}, {"b", "c"}};
  double worst = 0;
  for (const auto& names : cases) {
    INFO("adapters " << names.size() << " first " << names.front());
    const auto f = layer.lora_factors(names);
    Index rank = 0;
    for (const auto& [name, r] : f.ranks) rank += r;
    CHECK(f.a.rows() == rank);
    CHECK(f.a.cols() == kIn);
    CHECK(f.b.rows() == kOut);
    CHECK(f.b.cols() == rank);
    const MatD merged = w * dense_h(layer, names);
    const double e = rel_err(MatD(w + to_double(f.b) * to_double(f.a)), merged);
    CHECK(e <= tolerance<T>());
    worst = std::max(worst, e);
  }
  WARN("EXPORT_IDENTITY " << (sizeof(T) == 4 ? "float" : "double")
                          << " max rel |W + B A - W H| = " << hra_test::sci(worst));
  // The default is every applied adapter, in stacking order (names given out of order too).
  const auto all = layer.lora_factors();
  const auto shuffled = layer.lora_factors({"c", "default", "b"});
  CHECK(bitwise_equal(all.a, shuffled.a));
  CHECK(bitwise_equal(all.b, shuffled.b));
  REQUIRE(all.ranks.size() == 3);
  CHECK(all.ranks[0] == std::make_pair(std::string("default"), Index{3}));
  CHECK(all.ranks[2] == std::make_pair(std::string("c"), Index{4}));

  expect_error<std::invalid_argument>([&] { layer.lora_factors({"nope"}); },
                                      {"no adapter named 'nope'", "default, b, c"});
  expect_error<std::invalid_argument>([&] { layer.lora_factors({"b", "b"}); }, {"twice"});
  layer.merge({"default"}, hra::MergeCheck::in_place);
  expect_error<std::logic_error>([&] { layer.lora_factors({"default"}); }, {"'default'", "merged"});
  // Over the merged W, the rest is still exact: W H_a (merged) H_b H_c = W' + B A.
  const auto rest = layer.lora_factors();
  CHECK(rest.ranks.size() == 2);
  const MatD expected = w * dense_h(layer, {"default", "b", "c"});
  CHECK(rel_err(MatD(to_double(layer.weight()) + to_double(rest.b) * to_double(rest.a)),
                expected) <= tolerance<T>());
}

TEMPLATE_TEST_CASE("Adapters: set_active_adapters chooses what forward applies and trains",
                   "[adapters][control]", float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const MatD x = hra_test::random_matrix(kIn, kBatch, 6);
  const Mat<T> xt = x.cast<T>();
  CHECK(layer.active_adapters() == std::vector<std::string>{"default", "b", "c"});

  layer.set_active_adapters({"c", "default"});
  CHECK(layer.active_adapters() == std::vector<std::string>{"default", "c"});
  CHECK_FALSE(layer.adapter("b").active());
  CHECK(parameter_names<T>(layer) == std::vector<std::string>{"hra_u.default", "hra_u.c", "bias"});
  CHECK(rel_err(layer.forward(xt), expected_output(layer, {"default", "c"}, x)) <= tolerance<T>());
  Mat<T> y;
  layer.predict(xt, y);
  CHECK(rel_err(y, expected_output(layer, {"default", "c"}, x)) <= tolerance<T>());

  // A training step leaves the inactive adapter's U alone.
  const Mat<T> ub = layer.adapter("b").chain().reflectors();
  layer.backward(Mat<T>::Ones(kOut, kBatch));
  hra::Sgd<T> sgd({0.1});
  sgd.step(layer.parameters());
  CHECK(bitwise_equal(layer.adapter("b").chain().reflectors(), ub));

  // None active: the frozen layer.
  layer.set_active_adapters({});
  CHECK(layer.merged());
  CHECK(rel_err(layer.forward(xt), expected_output(layer, {}, x)) <= tolerance<T>());

  expect_error<std::invalid_argument>(
      [&] {
        layer.set_active_adapters({"b", "zz"});
      },
      {"no adapter named 'zz'"});
  CHECK(layer.active_adapters().empty());  // unchanged by the failed call

  // Merged adapters stay active, and nothing may be applied before them.
  layer.set_active_adapters({"default", "b", "c"});
  layer.merge({"default"}, hra::MergeCheck::in_place);
  expect_error<std::logic_error>(
      [&] {
        layer.set_active_adapters({"b", "c"});
      },
      {"'default'", "merged", "cannot be deactivated"});
  layer.unmerge();
  layer.set_active_adapters({"b"});
  layer.merge(hra::MergeCheck::in_place);  // b only
  expect_error<std::logic_error>(
      [&] {
        layer.set_active_adapters({"default", "b"});
      },
      {"'default'", "before the merged adapter 'b'"});
  CHECK(layer.active_adapters() == std::vector<std::string>{"b"});
}

TEMPLATE_TEST_CASE("Adapters: disabled adapters give the frozen base, nothing deleted",
                   "[adapters][control]", float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const Mat<T> x = random_as<T>(kIn, kBatch, 7);
  Mat<T> base = layer.weight() * x;
  base.colwise() += *layer.bias();
  const Mat<T> adapted = layer.forward(x);

  layer.set_adapters_enabled(false);
  CHECK_FALSE(layer.adapters_enabled());
  CHECK(layer.merged());
  CHECK(bitwise_equal(layer.forward(x), base));
  CHECK(parameter_names<T>(layer) == std::vector<std::string>{"bias"});
  layer.backward(Mat<T>::Ones(kOut, kBatch));
  expect_error<std::logic_error>([&] { layer.merge(hra::MergeCheck::in_place); }, {"disabled"});

  layer.set_adapters_enabled(true);
  CHECK(bitwise_equal(layer.forward(x), adapted));
  CHECK(layer.adapters().size() == 3);

  layer.merge({"default"}, hra::MergeCheck::in_place);
  expect_error<std::logic_error>([&] { layer.set_adapters_enabled(false); },
                                 {"merged", "not the base weight"});
  CHECK(layer.adapters_enabled());
}

TEMPLATE_TEST_CASE("Adapters: delete_adapter removes one, not a merged one", "[adapters][control]",
                   float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const Mat<T> w = layer.weight();
  const MatD x = hra_test::random_matrix(kIn, kBatch, 8);
  layer.merge({"default"}, hra::MergeCheck::in_place);
  expect_error<std::logic_error>([&] { layer.delete_adapter("default"); },
                                 {"'default'", "merged", "unmerge"});
  expect_error<std::invalid_argument>([&] { layer.delete_adapter("zz"); }, {"'zz'"});
  layer.delete_adapter("b");
  CHECK(layer.adapters().size() == 2);
  CHECK(layer.active_adapters() == std::vector<std::string>{"default", "c"});
  // The merge record still points at the right adapter after the shift: W already holds
  // W H_default, and forward applies only c on top of it.
  CHECK(rel_err(layer.forward(x.cast<T>()), expected_output(layer, {"c"}, x)) <= tolerance<T>());
  layer.unmerge();
  CHECK(rel_err(layer.weight(), w) <= tolerance<T>());
  CHECK_FALSE(layer.adapter("default").merged());
}

TEMPLATE_TEST_CASE("Adapters: merging a chosen subset keeps W H_a H_b ... exact",
                   "[adapters][merge]", float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const Mat<T> w = layer.weight();
  const MatD x = hra_test::random_matrix(kIn, kBatch, 9);
  const MatD want = expected_output(layer, {"default", "b", "c"}, x);

  expect_error<std::logic_error>([&] { layer.merge({"b"}, hra::MergeCheck::in_place); },
                                 {"'b'", "after the unmerged adapter 'default'", "first"});
  CHECK(bitwise_equal(layer.weight(), w));
  layer.merge({"default", "b"}, hra::MergeCheck::in_place);
  CHECK(layer.adapter("default").merged());
  CHECK(layer.adapter("b").merged());
  CHECK_FALSE(layer.adapter("c").merged());
  CHECK_FALSE(layer.merged());
  CHECK(rel_err(layer.forward(x.cast<T>()), want) <= tolerance<T>());
  expect_error<std::logic_error>([&] { layer.merge({"b"}, hra::MergeCheck::in_place); },
                                 {"'b'", "already merged"});
  layer.merge(hra::MergeCheck::safe);  // the rest, safely
  CHECK(layer.merged());
  CHECK(rel_err(layer.forward(x.cast<T>()), want) <= tolerance<T>());

  layer.set_active_adapters({"default", "b", "c"});
  layer.unmerge_all();
  CHECK(rel_err(layer.weight(), w) <= tolerance<T>());
  for (const auto& a : layer.adapters()) CHECK_FALSE(a.merged());

  layer.set_active_adapters({"default", "c"});
  expect_error<std::logic_error>([&] { layer.merge({"b"}, hra::MergeCheck::in_place); },
                                 {"'b'", "not active"});
  expect_error<std::invalid_argument>([&] { layer.merge({"zz"}, hra::MergeCheck::in_place); },
                                      {"'zz'"});
}

TEMPLATE_TEST_CASE("Adapters: unmerge restores W with the U that was merged", "[adapters][merge]",
                   float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const Mat<T> w = layer.weight();
  auto views = layer.parameters();  // taken before the merge
  const Mat<T> u_merged = layer.adapter("default").chain().reflectors();
  layer.merge({"default"}, hra::MergeCheck::in_place);
  // An optimiser step on stale views, and set_reflectors, cannot change what unmerge restores.
  views.front().value.setConstant(T(3));
  expect_error<std::logic_error>([&] { layer.set_reflectors("default", Mat<T>::Ones(kIn, 3)); },
                                 {"merged", "unmerge"});
  layer.unmerge();
  CHECK(rel_err(layer.weight(), w) <= tolerance<T>());
  CHECK(bitwise_equal(layer.adapter("default").chain().reflectors(), u_merged));
  // The earlier views still point at the adapter's U.
  CHECK(views.front().value.data() == layer.parameters().front().value.data());
}

TEMPLATE_TEST_CASE("Adapters: a mixed batch equals each column through its own adapter",
                   "[adapters][mixed]", float, double) {
  using T = TestType;
  auto layer = three_adapters<T>();
  const Index n = 11;
  const MatD x = hra_test::random_matrix(kIn, n, 10);
  const std::vector<Index> which = {0, 2, -1, 1, 1, 0, 2, 2, -1, 0, 1};
  Mat<T> y;
  layer.predict_mixed(x.cast<T>(), which, y);
  REQUIRE(y.rows() == kOut);
  REQUIRE(y.cols() == n);
  const char* names[] = {"default", "b", "c"};
  for (Index j = 0; j < n; ++j) {
    INFO("column " << j << " adapter " << which[static_cast<std::size_t>(j)]);
    const Index a = which[static_cast<std::size_t>(j)];
    const MatD want =
        a < 0 ? expected_output(layer, {}, x.col(j)) : expected_output(layer, {names[a]}, x.col(j));
    CHECK(rel_err(y.col(j), want) <= tolerance<T>());
  }
  // By name, "" for the base layer; the same result.
  Mat<T> y2;
  layer.predict_mixed(x.cast<T>(),
                      std::vector<std::string>{"default", "c", "", "b", "b", "default", "c", "c",
                                               "", "default", "b"},
                      y2);
  CHECK(bitwise_equal(y, y2));
  // Active flags do not matter; a single adapter column equals predict() with only it active.
  layer.set_active_adapters({"b"});
  Mat<T> only_b, mixed_b;
  layer.predict(x.cast<T>(), only_b);
  layer.predict_mixed(x.cast<T>(), std::vector<Index>(static_cast<std::size_t>(n), 1), mixed_b);
  CHECK(rel_err(mixed_b, only_b) <= tolerance<T>());

  expect_error<std::invalid_argument>(
      [&] { layer.predict_mixed(x.cast<T>(), std::vector<Index>(3, 0), y); },
      {"3 adapter indices for 11 columns"});
  std::vector<Index> bad = which;
  bad[4] = 3;
  expect_error<std::invalid_argument>([&] { layer.predict_mixed(x.cast<T>(), bad, y); },
                                      {"column 4", "index 3", "3 adapters"});
  bad[4] = -2;
  expect_error<std::invalid_argument>([&] { layer.predict_mixed(x.cast<T>(), bad, y); },
                                      {"column 4", "index -2"});
  expect_error<std::invalid_argument>(
      [&] {
        layer.predict_mixed(x.cast<T>(), std::vector<std::string>(static_cast<std::size_t>(n), "q"),
                            y);
      },
      {"no adapter named 'q'"});
  layer.merge(hra::MergeCheck::in_place);
  expect_error<std::logic_error>([&] { layer.predict_mixed(x.cast<T>(), which, y); },
                                 {"'b'", "merged", "not the base weight"});
}
