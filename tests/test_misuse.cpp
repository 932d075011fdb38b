// The layers used as a hostile or careless user would: their own buffers passed back in,
// parameters resized or poisoned behind their back, values the code divides by, call orders
// that fail half way. Every case is either correct or a clear exception, and a call that throws
// leaves the layer bit for bit as it was (tests/support/layer_state.hpp).
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "hra/gradient_check.hpp"
#include "hra/hra_linear.hpp"
#include "hra/linear.hpp"
#include "hra/lora_linear.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/layer_state.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra::BiasMode;
using hra::HraOptions;
using hra::Init;
using hra::LoraOptions;
using hra::Variant;
using hra_test::bitwise_equal;
using hra_test::expect_error;
using hra_test::LayerState;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::random_as;
using hra_test::random_vec;
using hra_test::rel_err;
using hra_test::Vec;

HraOptions hra_options(Index rank, Variant variant = Variant::chain) {
  HraOptions o;
  o.rank = rank;
  o.variant = variant;
  o.init = Init::random;
  o.seed = 3;
  return o;
}

// The layer kinds under test, each with a bias (trained, except the frozen Linear's), for
// d_out x d_in.
template <typename T>
std::vector<std::pair<std::string, std::function<std::unique_ptr<hra::AffineLayer<T>>()>>>
layer_kinds(Index d_out, Index d_in) {
  using Ptr = std::unique_ptr<hra::AffineLayer<T>>;
  auto w = [=] { return hra::WeightMatrix<T>::owned(random_as<T>(d_out, d_in, 1)); };
  auto b = [=] { return random_vec<T>(d_out, 2); };
  return {
      {"HraLinear chain",
       [=] { return Ptr(new hra::HraLinear<T>(w(), b(), hra_options(3), BiasMode::all)); }},
      {"HraLinear gram_schmidt",
       [=] {
         return Ptr(
             new hra::HraLinear<T>(w(), b(), hra_options(3, Variant::gram_schmidt), BiasMode::all));
       }},
      {"LoraLinear",
       [=] {
         LoraOptions o;
         o.rank = 2;
         auto l = new hra::LoraLinear<T>(w(), b(), o, BiasMode::all);
         l->set_lora_weights(l->lora_a(), random_as<T>(d_out, 2, 4));
         return Ptr(l);
       }},
      {"Linear",
       [=] { return Ptr(new hra::Linear<T>(w(), b(), hra::LinearOptions{true}, BiasMode::all)); }},
      {"Linear frozen", [=] {
         return Ptr(new hra::Linear<T>(w(), b(), hra::LinearOptions{false}, BiasMode::none));
       }}};
}

}  // namespace

TEMPLATE_TEST_CASE("Misuse: a layer's own buffers as arguments give the results of copies",
                   "[misuse][alias]", float, double) {
  using T = TestType;
  for (const auto& [d_out, d_in] : {std::pair<Index, Index>{6, 6}, {6, 8}, {8, 5}}) {
    for (const auto& [name, make] : layer_kinds<T>(d_out, d_in)) {
      INFO(name << " " << d_out << "x" << d_in);
      const Mat<T> x = random_as<T>(d_in, 4, 5), g = random_as<T>(d_out, 4, 6);
      auto layer = make();
      auto twin = make();

      // predict(m, m): the output overwrites the input it reads.
      Mat<T> want;
      twin->predict(x, want);
      Mat<T> m = x;
      layer->predict(m, m);
      CHECK(bitwise_equal(m, want));

      // backward() given the output buffer of its own forward() as dY.
      const Mat<T>& y = layer->forward(x);
      const Mat<T> y_copy = twin->forward(x);
      const Mat<T> dx_want = twin->backward(y_copy);
      const Mat<T> dx_got = layer->backward(y);
      CHECK(bitwise_equal(dx_got, dx_want));
      LayerState<T>(*twin).require_same(*layer);

      if (d_out != d_in) continue;
      // forward() given its own last output.
      const Mat<T>& y1 = layer->forward(x);
      const Mat<T> y1_copy = twin->forward(x);
      const Mat<T> y2_want = twin->forward(y1_copy);
      CHECK(bitwise_equal(layer->forward(y1), y2_want));
      // backward() given its own last input gradient as dY.
      twin->forward(x);
      layer->forward(x);
      const Mat<T> dx1 = twin->backward(g);
      const Mat<T>& dx1_ref = layer->backward(g);
      twin->forward(x);
      layer->forward(x);
      const Mat<T> dx2_want = twin->backward(dx1);
      CHECK(bitwise_equal(layer->backward(dx1_ref), dx2_want));
      LayerState<T>(*twin).require_same(*layer);
    }
  }
}

TEMPLATE_TEST_CASE("Misuse: LoRA's A and B cannot be resized or poisoned from outside",
                   "[misuse][lora]", float, double) {
  using T = TestType;
  static_assert(
      std::is_const<
          std::remove_reference_t<decltype(std::declval<hra::LoraLinear<T>&>().lora_a())>>::value,
      "lora_a() is read-only");
  static_assert(
      std::is_const<
          std::remove_reference_t<decltype(std::declval<hra::LoraLinear<T>&>().lora_b())>>::value,
      "lora_b() is read-only");
  LoraOptions o;
  o.rank = 2;
  hra::LoraLinear<T> layer(hra::WeightMatrix<T>::owned(random_as<T>(5, 7, 1)), std::nullopt, o);
  const LayerState<T> before(layer);
  expect_error<std::invalid_argument>(
      [&] { layer.set_lora_weights(Mat<T>::Ones(3, 7), Mat<T>::Ones(5, 2)); },
      {"set_lora_weights A", "2x7", "3x7"});
  expect_error<std::invalid_argument>(
      [&] { layer.set_lora_weights(Mat<T>::Ones(2, 7), Mat<T>::Ones(5, 3)); },
      {"set_lora_weights B", "5x2", "5x3"});
  Mat<T> bad = Mat<T>::Ones(5, 2);
  bad(4, 1) = std::numeric_limits<T>::infinity();
  expect_error<std::invalid_argument>([&] { layer.set_lora_weights(Mat<T>::Ones(2, 7), bad); },
                                      {"non-finite", "(4, 1)"});
  before.require_same(layer);
  layer.merge();
  expect_error<std::logic_error>(
      [&] { layer.set_lora_weights(Mat<T>::Ones(2, 7), Mat<T>::Ones(5, 2)); },
      {"merged", "unmerge"});
}

TEMPLATE_TEST_CASE("Misuse: a reflector column whose 1/|u|^2 overflows is refused everywhere",
                   "[misuse][tiny]", float, double) {
  using T = TestType;
  // float: |u|^2 = 1e-42 is not 0 (subnormal) but 1/|u|^2 overflows; double alike near 1e-160.
  const T tiny = sizeof(T) == 4 ? T(1e-21) : T(1e-160);
  hra::HraLinear<T> layer(hra::WeightMatrix<T>::owned(random_as<T>(4, 6, 1)), std::nullopt,
                          hra_options(2));
  Mat<T> u = layer.adapter().chain().reflectors();
  u.col(1).setZero();
  u(3, 1) = tiny;
  const LayerState<T> before(layer);
  expect_error<std::invalid_argument>([&] { layer.set_reflectors("default", u); },
                                      {"column 1", "too small", "rescale"});
  before.require_same(layer);
  expect_error<std::invalid_argument>([&] { hra::ReflectorChain<T> c(u); },
                                      {"column 1", "too small"});
  // Written through the optimiser's view: the next use reports it and writes nothing.
  layer.parameter("hra_u.default").value = u;
  const LayerState<T> poisoned(layer);
  const Mat<T> x = random_as<T>(6, 3, 2);
  expect_error<std::invalid_argument>([&] { layer.forward(x); }, {"column 1", "too small"});
  expect_error<std::logic_error>([&] { layer.backward(Mat<T>::Ones(4, 3)); }, {"no forward"});
  expect_error<std::invalid_argument>([&] { layer.merge(); }, {"column 1", "too small"});
  expect_error<std::invalid_argument>([&] { layer.merge(hra::MergeCheck::safe); },
                                      {"column 1", "too small"});
  Mat<T> y;
  expect_error<std::invalid_argument>([&] { layer.predict(x, y); }, {"column 1", "too small"});
  poisoned.require_same(layer);
  CHECK(layer.weight().allFinite());
}

TEMPLATE_TEST_CASE("Misuse: a block size as large as Index allows acts as one block",
                   "[misuse][chain]", float, double) {
  using T = TestType;
  HraOptions huge = hra_options(5), one = hra_options(5);
  huge.block_size = std::numeric_limits<Index>::max();
  one.block_size = 5;
  const Mat<T> w = random_as<T>(4, 9, 1), x = random_as<T>(9, 3, 2);
  hra::HraLinear<T> a(w, huge), b(w, one);
  CHECK(bitwise_equal(a.forward(x), b.forward(x)));
  CHECK(bitwise_equal(a.backward(Mat<T>::Ones(4, 3)), b.backward(Mat<T>::Ones(4, 3))));
  CHECK(a.adapter().chain().block_size() == std::numeric_limits<Index>::max());
  a.merge();
  b.merge();
  CHECK(bitwise_equal(a.weight(), b.weight()));
}

TEMPLATE_TEST_CASE("Misuse: a backward that throws changes nothing and the forward stays usable",
                   "[misuse][order]", float, double) {
  using T = TestType;
  for (const auto& [name, make] : layer_kinds<T>(5, 7)) {
    INFO(name);
    auto layer = make();
    const Mat<T> x = random_as<T>(7, 3, 5);
    expect_error<std::logic_error>([&] { layer->backward(Mat<T>::Ones(5, 3)); }, {"no forward"});
    layer->forward(x);
    layer->backward(Mat<T>::Ones(5, 3));  // every gradient now written once
    layer->forward(x);
    const LayerState<T> before(*layer);
    expect_error<std::invalid_argument>([&] { layer->backward(Mat<T>::Ones(5, 2)); },
                                        {"dY", "5x3", "5x2"});
    Mat<T> nan = Mat<T>::Ones(5, 3);
    nan(2, 1) = std::numeric_limits<T>::quiet_NaN();
    expect_error<std::invalid_argument>([&] { layer->backward(nan); }, {"non-finite", "(2, 1)"});
    before.require_same(*layer);
    CHECK_NOTHROW(layer->backward(Mat<T>::Ones(5, 3)));
  }
}

TEST_CASE("Misuse: check_gradients restores every parameter when the layer throws",
          "[misuse][gradient]") {
  // A layer whose forward starts throwing after a few calls, in the middle of the perturbations.
  class Flaky final : public hra::Layer<double> {
   public:
    Flaky() : inner_(random_as<double>(4, 6, 1), hra_options(2)) {}
    Index input_dim() const override { return inner_.input_dim(); }
    Index output_dim() const override { return inner_.output_dim(); }
    const Matrix& forward(const ConstRef& x) override {
      if (++calls_ > 5) throw std::runtime_error("flaky forward");
      return inner_.forward(x);
    }
    const Matrix& backward(const ConstRef& dy, bool in) override { return inner_.backward(dy, in); }
    void predict(const ConstRef& x, Matrix& y) const override { inner_.predict(x, y); }
    std::vector<hra::ParameterView<double>> parameters() override { return inner_.parameters(); }
    void merge() override {}
    void unmerge() override {}
    bool merged() const override { return false; }
    std::size_t saved_bytes() const override { return 0; }
    hra::HraLineard inner_;

   private:
    int calls_ = 0;
  } flaky;
  const MatD u = flaky.inner_.adapter().chain().reflectors();
  expect_error<std::runtime_error>([&] { hra::check_gradients(flaky); }, {"flaky forward"});
  CHECK(bitwise_equal(flaky.inner_.adapter().chain().reflectors(), u));
}

TEST_CASE("Misuse: the regulariser refuses a column whose direction is undefined",
          "[misuse][regularizer]") {
  HraOptions o = hra_options(3);
  o.lambda = 0.1;
  hra::HraLineard layer(random_as<double>(4, 6, 1), o);
  layer.forward(random_as<double>(6, 2, 2));
  layer.backward(MatD::Ones(4, 2));
  layer.parameter("hra_u.default").value.col(2).setZero();
  const LayerState<double> before(layer);
  expect_error<std::invalid_argument>([&] { (void)layer.regularizer(); },
                                      {"regularizer", "column 2", "norm 0"});
  expect_error<std::invalid_argument>([&] { (void)layer.add_regularizer(); },
                                      {"regularizer", "column 2"});
  before.require_same(layer);
}

TEST_CASE("Misuse: long double values beyond double's range are accepted and named right",
          "[misuse][long_double]") {
  using L = long double;
  Mat<L> w = random_as<L>(3, 4, 1);
  w(1, 2) = 1e400L;  // finite in long double, infinite as a double
  hra::HraLinear<L> layer(w, hra_options(2));
  CHECK(layer.weight()(1, 2) == 1e400L);
  Mat<L> x = random_as<L>(4, 2, 2);
  x(3, 1) = 1e-400L;
  CHECK(layer.forward(x).allFinite());
  Mat<L> bad = w;
  bad(2, 3) = std::numeric_limits<L>::infinity();
  expect_error<std::invalid_argument>([&] { hra::HraLinear<L> l(bad, hra_options(2)); },
                                      {"non-finite", "(2, 3)"});
}

TEMPLATE_TEST_CASE("Misuse: merge/unmerge drift over 1000 cycles is a few ulp per cycle",
                   "[misuse][merge]", float, double) {
  using T = TestType;
  hra::HraLinear<T> layer(random_as<T>(64, 64, 1), hra_options(8));
  const Mat<T> w = layer.weight();
  for (int k = 0; k < 1000; ++k) {
    layer.merge();
    layer.unmerge();
  }
  const double drift = rel_err(layer.weight(), w);
  const double per_cycle_ulp = drift / hra_test::eps<T>() / 1000.0;
  WARN("MERGE_DRIFT " << (sizeof(T) == 4 ? "float" : "double") << " 64x64 r=8: relative "
                      << hra_test::sci(drift) << " after 1000 merge/unmerge cycles ("
                      << per_cycle_ulp << " ulp per cycle)");
  CHECK(drift > 0);  // rounding: the round trip is not exact, which the README documents
  CHECK(per_cycle_ulp < 16);
}

TEMPLATE_TEST_CASE("Misuse: every throwing verb leaves the layer as it was", "[misuse][verbs]",
                   float, double) {
  using T = TestType;
  hra::HraLinear<T> layer(hra::WeightMatrix<T>::owned(random_as<T>(5, 7, 1)), random_vec<T>(5, 2),
                          hra_options(3), BiasMode::all);
  layer.add_adapter("b", hra_options(2, Variant::gram_schmidt));
  layer.forward(random_as<T>(7, 3, 3));
  layer.backward(Mat<T>::Ones(5, 3));
  const LayerState<T> before(layer);
  expect_error<std::invalid_argument>([&] { layer.add_adapter("b", hra_options(2)); },
                                      {"'b'", "already exists"});
  expect_error<std::invalid_argument>([&] { layer.add_adapter("c", hra_options(8)); },
                                      {"r=8", "d=7"});
  expect_error<std::invalid_argument>([&] { layer.set_reflectors("b", Mat<T>::Ones(7, 2)); },
                                      {"column 1", "linearly dependent"});
  expect_error<std::invalid_argument>([&] { layer.set_reflectors("b", Mat<T>::Ones(7, 3)); },
                                      {"7x2", "7x3"});
  expect_error<std::invalid_argument>([&] { layer.set_active_adapters({"x"}); }, {"'x'"});
  expect_error<std::invalid_argument>([&] { layer.set_bias(Vec<T>::Ones(4)); }, {"5x1", "4x1"});
  Vec<T> nan_bias = Vec<T>::Ones(5);
  nan_bias(3) = std::numeric_limits<T>::quiet_NaN();
  expect_error<std::invalid_argument>([&] { layer.set_bias(nan_bias); }, {"non-finite"});
  expect_error<std::logic_error>([&] { layer.unmerge(); }, {"no adapter is merged"});
  expect_error<std::invalid_argument>([&] { layer.delete_adapter("x"); }, {"'x'"});
  expect_error<std::logic_error>([&] { layer.merge({"b"}, hra::MergeCheck::safe); },
                                 {"'b'", "after"});
  Mat<T> y;
  expect_error<std::invalid_argument>([&] { layer.predict(Mat<T>::Ones(6, 2), y); },
                                      {"7 rows", "6x2"});
  before.require_same(layer);
}
