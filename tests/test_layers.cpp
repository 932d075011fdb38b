// The trainable layers (HraLinear, LoraLinear, Linear) behind hra::Layer: gradients against
// central differences, float against double, symmetric initialisation, merge / unmerge (stacked,
// safe, views), the orthogonality regulariser, parameter counts and memory, and every user error.
// Expected values come from definitions written out here (dense products of explicit
// reflections, Eigen's Householder QR, plain matrix products), never from the code under test.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "hra/gradient_check.hpp"
#include "hra/hra_linear.hpp"
#include "hra/linear.hpp"
#include "hra/lora_linear.hpp"
#include "hra/weight_matrix.hpp"
#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra::BiasMode;
using hra::HraOptions;
using hra::Init;
using hra::LoraOptions;
using hra::RegularizerForm;
using hra::Variant;

using hra_test::bitwise_equal;
using hra_test::eps;
using hra_test::expect_error;
using hra_test::explicit_chain;
using hra_test::explicit_gram_schmidt;
using hra_test::explicit_h;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::max_abs;
using hra_test::random_as;
using hra_test::random_matrix;
using hra_test::random_vec;
using hra_test::rel_err;
using hra_test::to_double;
using hra_test::tol;
using hra_test::Vec;
using hra_test::VecD;
template <typename T>
using Weight = hra::WeightMatrix<T>;

// y = W x + b, the frozen layer written out.
template <typename T>
Mat<T> affine(const Mat<T>& w, const Mat<T>& x, const Vec<T>& b) {
  Mat<T> y = w * x;
  y.colwise() += b;
  return y;
}

// --- Independent definitions -------------------------------------------------------------------

// lambda |I - C|_F^2 (or |I - C|_F), C_ij = u_i.u_j / (|u_i| |u_j|), by loops over the pairs.
double explicit_regularizer(const MatD& u, double lambda, RegularizerForm form) {
  double sum = 0;
  for (Index i = 0; i < u.cols(); ++i)
    for (Index j = 0; j < u.cols(); ++j) {
      double dot = 0, ni = 0, nj = 0;
      for (Index k = 0; k < u.rows(); ++k) {
        dot += u(k, i) * u(k, j);
        ni += u(k, i) * u(k, i);
        nj += u(k, j) * u(k, j);
      }
      const double c = dot / std::sqrt(ni * nj);
      const double e = (i == j ? 1.0 : 0.0) - c;
      sum += e * e;
    }
  return form == RegularizerForm::squared ? lambda * sum : lambda * std::sqrt(sum);
}

// --- Layer factories ---------------------------------------------------------------------------

constexpr Index kOut = 6, kIn = 8;

HraOptions hra_options(Index rank, Variant variant = Variant::chain, Init init = Init::random,
                       std::uint64_t seed = 7, double lambda = 0.0,
                       RegularizerForm form = RegularizerForm::squared) {
  HraOptions o;
  o.rank = rank;
  o.variant = variant;
  o.init = init;
  o.seed = seed;
  o.lambda = lambda;
  o.regularizer = form;
  return o;
}

template <typename T>
hra::HraLinear<T> make_hra(const HraOptions& o, BiasMode mode = BiasMode::none,
                           bool with_bias = true, Index d_out = kOut, Index d_in = kIn) {
  std::optional<Vec<T>> bias;
  if (with_bias) bias = random_vec<T>(d_out, 12);
  return hra::HraLinear<T>(Weight<T>::owned(random_as<T>(d_out, d_in, 11)), bias, o, mode);
}

LoraOptions lora_options(Index rank, double alpha = 8.0, double dropout = 0.0,
                         std::uint64_t seed = 5) {
  LoraOptions o;
  o.rank = rank;
  o.alpha = alpha;
  o.dropout = dropout;
  o.seed = seed;
  return o;
}

// A LoRA layer whose B is set non-zero (PEFT starts at B = 0, where dL/dA vanishes).
template <typename T>
hra::LoraLinear<T> make_lora(const LoraOptions& o, BiasMode mode = BiasMode::none,
                             bool with_bias = true, Index d_out = kOut, Index d_in = kIn) {
  std::optional<Vec<T>> bias;
  if (with_bias) bias = random_vec<T>(d_out, 12);
  hra::LoraLinear<T> layer(Weight<T>::owned(random_as<T>(d_out, d_in, 11)), bias, o, mode);
  layer.set_lora_weights(layer.lora_a(), random_as<T>(d_out, o.rank, 13));
  return layer;
}

template <typename T>
std::vector<std::string> names_of(hra::Layer<T>& layer) {
  std::vector<std::string> out;
  for (const auto& p : layer.parameters()) out.push_back(p.name);
  return out;
}

// Runs hra::check_gradients, prints one "GRADCHECK <config> <param> <relerr>" line per tensor,
// and requires every tensor to have a non-trivial gradient and a relative error below `bound`.
double gradcheck(const std::string& config, hra::Layer<double>& layer,
                 const std::vector<std::string>& expected_params, Index batch = 3,
                 double bound = 1e-6) {
  INFO(config);
  hra::GradientCheckOptions o;
  o.batch = batch;
  const auto report = hra::check_gradients(layer, o);
  std::vector<std::string> got;
  for (const auto& row : report.rows) {
    WARN("GRADCHECK " << config.c_str() << " " << row.name.c_str() << " "
                      << hra_test::sci(row.relative_error()));
    got.push_back(row.name);
    INFO(row.name);
    CHECK(row.checked > 0);
    CHECK(row.scale > 1e-3);  // the gradient is not trivially zero
    CHECK(row.relative_error() < bound);
  }
  std::vector<std::string> want = expected_params;
  want.push_back("input");
  CHECK(got == want);
  const double worst = report.worst_relative_error();
  CHECK(worst < bound);
  return worst;
}

}  // namespace

// --- Gradients against central differences ----------------------------------------------------

TEST_CASE("Layers: HRA gradients match central differences (double)", "[layers][gradient]") {
  SECTION("chain, random init, r = 4") {
    auto l = make_hra<double>(hra_options(4));
    gradcheck("hra_chain_random_r4", l, {"hra_u.default"});
  }
  SECTION("chain, symmetric init (H = I), r = 4") {
    auto l = make_hra<double>(hra_options(4, Variant::chain, Init::symmetric));
    gradcheck("hra_chain_symmetric_r4", l, {"hra_u.default"});
  }
  SECTION("Gram-Schmidt, random init, r = 4") {
    auto l = make_hra<double>(hra_options(4, Variant::gram_schmidt));
    gradcheck("hra_gs_random_r4", l, {"hra_u.default"});
  }
  SECTION("bias modes") {
    for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
      const std::string tag = v == Variant::chain ? "chain" : "gs";
      auto none = make_hra<double>(hra_options(4, v), BiasMode::none);
      gradcheck("hra_" + tag + "_bias_none", none, {"hra_u.default"});
      auto all = make_hra<double>(hra_options(4, v), BiasMode::all);
      gradcheck("hra_" + tag + "_bias_all", all, {"hra_u.default", "bias"});
      auto only = make_hra<double>(hra_options(4, v), BiasMode::adapter_only);
      gradcheck("hra_" + tag + "_bias_adapter_only", only, {"hra_u.default", "bias"});
      auto no_bias = make_hra<double>(hra_options(4, v), BiasMode::none, false);
      gradcheck("hra_" + tag + "_no_bias_vector", no_bias, {"hra_u.default"});
    }
  }
  SECTION("regulariser lambda > 0, both forms") {
    // lambda = 0.5 so that the regulariser's gradient is a sizeable part of the total.
    auto sq = make_hra<double>(hra_options(4, Variant::chain, Init::random, 7, 0.5));
    gradcheck("hra_chain_lambda0.5_squared", sq, {"hra_u.default"});
    auto unsq = make_hra<double>(
        hra_options(4, Variant::chain, Init::random, 7, 0.5, RegularizerForm::unsquared));
    gradcheck("hra_chain_lambda0.5_unsquared", unsq, {"hra_u.default"});
    auto sym = make_hra<double>(hra_options(4, Variant::chain, Init::symmetric, 7, 0.5));
    gradcheck("hra_chain_symmetric_lambda0.5_squared", sym, {"hra_u.default"});
    auto gs = make_hra<double>(
        hra_options(4, Variant::gram_schmidt, Init::random, 7, 0.5, RegularizerForm::unsquared),
        BiasMode::all);
    gradcheck("hra_gs_lambda0.5_unsquared_bias_all", gs, {"hra_u.default", "bias"});
  }
  SECTION("stacked adapters of different variants and ranks") {
    auto l = make_hra<double>(hra_options(4), BiasMode::all);
    l.add_adapter("second", hra_options(3, Variant::gram_schmidt, Init::random, 99, 0.25));
    l.add_adapter("third", hra_options(2, Variant::chain, Init::symmetric, 5));
    gradcheck("hra_stacked_chain4_gs3_chain2", l,
              {"hra_u.default", "hra_u.second", "hra_u.third", "bias"});
  }
  SECTION("stacked adapters, the first one merged") {
    auto l = make_hra<double>(hra_options(4));
    l.merge();
    l.add_adapter("second", hra_options(3, Variant::chain, Init::random, 99));
    gradcheck("hra_stacked_first_merged", l, {"hra_u.second"});
  }
  SECTION("odd rank with random init") {
    auto l = make_hra<double>(hra_options(3));
    gradcheck("hra_chain_odd_r3", l, {"hra_u.default"});
    auto g = make_hra<double>(hra_options(5, Variant::gram_schmidt));
    gradcheck("hra_gs_odd_r5", g, {"hra_u.default"});
  }
  SECTION("rank = d_in") {
    auto l = make_hra<double>(hra_options(kIn));
    gradcheck("hra_chain_r_eq_din", l, {"hra_u.default"});
    // Gram-Schmidt with r = d_in: Q spans R^d, so H = I - 2 Q Q^T = -I whatever U is, and
    // dL/dU is exactly 0 (central differences see only noise). Check that instead.
    auto g = make_hra<double>(hra_options(kIn, Variant::gram_schmidt), BiasMode::all);
    const MatD x = random_matrix(kIn, 3, 301), dy = random_matrix(kOut, 3, 302);
    const MatD w = g.weight();
    CHECK(rel_err(g.forward(x), affine<double>(-w, x, *g.bias())) <= 1e-14);
    const MatD dx = g.backward(dy);
    CHECK(rel_err(dx, -w.transpose() * dy) <= 1e-14);
    const double du = max_abs(g.adapter().gradient());
    WARN("GRADCHECK hra_gs_r_eq_din hra_u.default max|dU|=" << hra_test::sci(du)
                                                            << " (exact value 0: H = -I)");
    CHECK(du <= 1e-13);
  }
  SECTION("one sample (n = 1)") {
    auto l = make_hra<double>(hra_options(4), BiasMode::all);
    gradcheck("hra_chain_n1", l, {"hra_u.default", "bias"}, 1);
    auto g = make_hra<double>(hra_options(4, Variant::gram_schmidt));
    gradcheck("hra_gs_n1", g, {"hra_u.default"}, 1);
  }
  SECTION("blocked: block_size smaller than the rank") {
    auto o = hra_options(8, Variant::chain, Init::random, 7, 0.1);
    o.block_size = 3;  // blocks of 3, 3, 2 columns
    auto l = make_hra<double>(o, BiasMode::all, true, 5, 12);
    gradcheck("hra_chain_r8_block3", l, {"hra_u.default", "bias"});
    o.block_size = 1;
    auto one = make_hra<double>(o, BiasMode::none, true, 5, 12);
    gradcheck("hra_chain_r8_block1", one, {"hra_u.default"});
  }
}

TEST_CASE("Layers: LoRA and Linear gradients match central differences (double)",
          "[layers][gradient]") {
  SECTION("LoRA with B != 0, each bias mode") {
    auto none = make_lora<double>(lora_options(3, 6.0), BiasMode::none);
    gradcheck("lora_r3_bias_none", none, {"lora_A.default", "lora_B.default"});
    auto all = make_lora<double>(lora_options(3, 6.0), BiasMode::all);
    gradcheck("lora_r3_bias_all", all, {"lora_A.default", "lora_B.default", "bias"});
    auto only = make_lora<double>(lora_options(3, 6.0), BiasMode::adapter_only);
    gradcheck("lora_r3_bias_adapter_only", only, {"lora_A.default", "lora_B.default", "bias"});
  }
  SECTION("LoRA with dropout (mask reused across the evaluations)") {
    auto l = make_lora<double>(lora_options(4, 16.0, 0.3), BiasMode::all);
    l.set_reuse_dropout_mask(true);
    gradcheck("lora_r4_dropout0.3", l, {"lora_A.default", "lora_B.default", "bias"}, 5);
  }
  SECTION("LoRA, rank = min(d_out, d_in), n = 1") {
    auto l = make_lora<double>(lora_options(kOut));
    gradcheck("lora_r6_n1", l, {"lora_A.default", "lora_B.default"}, 1);
  }
  SECTION("Linear, trainable weight and bias") {
    hra::Lineard l(Weight<double>::owned(random_matrix(kOut, kIn, 21)),
                   random_vec<double>(kOut, 22), hra::LinearOptions{true}, BiasMode::all);
    gradcheck("linear_weight_bias", l, {"weight", "bias"});
  }
  SECTION("Linear, frozen weight, trainable bias") {
    hra::Lineard l(Weight<double>::owned(random_matrix(kOut, kIn, 21)),
                   random_vec<double>(kOut, 22), hra::LinearOptions{false}, BiasMode::all);
    gradcheck("linear_bias_only", l, {"bias"});
  }
}

TEST_CASE("Layers: the gradient checker catches a wrong gradient", "[layers][gradient]") {
  // A layer whose backward is deliberately off by 1% in one entry must fail the 1e-6 bound, so
  // the checks above can fail.
  class Broken final : public hra::Layer<double> {
   public:
    Broken() : inner_(make_hra<double>(hra_options(4))) {}
    Index input_dim() const override { return inner_.input_dim(); }
    Index output_dim() const override { return inner_.output_dim(); }
    const Matrix& forward(const ConstRef& x) override { return inner_.forward(x); }
    const Matrix& backward(const ConstRef& dy, bool in) override {
      const Matrix& dx = inner_.backward(dy, in);
      auto grad = inner_.parameter("hra_u.default").grad;
      grad(1, 2) += 0.01 * grad.cwiseAbs().maxCoeff();
      return dx;
    }
    void predict(const ConstRef& x, Matrix& y) const override { inner_.predict(x, y); }
    std::vector<hra::ParameterView<double>> parameters() override { return inner_.parameters(); }
    void merge() override {}
    void unmerge() override {}
    bool merged() const override { return false; }
    std::size_t saved_bytes() const override { return 0; }

   private:
    hra::HraLineard inner_;
  } broken;
  const auto report = hra::check_gradients(broken);
  CHECK(report.worst_relative_error() > 1e-4);
}

// One adapter and no input gradient: HraLinear skips W^T dY (ReflectorChain::backward_through),
// so dU agrees with the ordinary path up to rounding, not bit for bit.
TEST_CASE("Layers: HRA backward without the input gradient skips W^T dY, same dU",
          "[layers][gradient]") {
  const Index n = 5;
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    for (const Index block : {Index(32), Index(2)}) {
      INFO(hra::to_string(v) << " block " << block);
      HraOptions o = hra_options(5, v);
      o.block_size = block;
      auto dbl = make_hra<double>(o, BiasMode::all, true, kOut, kIn);
      auto flt = make_hra<float>(o, BiasMode::all, true, kOut, kIn);
      const MatD x = random_matrix(kIn, n, 41), g = random_matrix(kOut, n, 42);
      dbl.forward(x);
      dbl.backward(g, true);
      const MatD du_full = dbl.adapter().gradient();
      const MatD db_full = dbl.parameters().back().grad;  // "bias"
      dbl.forward(x);
      CHECK(dbl.backward(g, false).size() == 0);
      CHECK(max_abs(dbl.adapter().gradient() - du_full) <= 1e-13 * max_abs(du_full));
      CHECK(bitwise_equal(dbl.parameters().back().grad, db_full));
      flt.forward(x.cast<float>());
      CHECK(flt.backward(g.cast<float>(), false).size() == 0);
      CHECK(max_abs(flt.adapter().gradient().cast<double>() - du_full) <= 1e-4 * max_abs(du_full));
    }
  }
}

// --- HraLinear's two forms ---------------------------------------------------------------------

// The low-rank form W X - (W V) K (SPEC 10) against central differences, and against the chain
// form: the same outputs, dX and dU up to rounding, for both variants, with and without dX.
TEST_CASE("Layers: HRA low-rank form matches central differences and the chain form",
          "[layers][gradient][form]") {
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    const std::string tag = v == Variant::chain ? "chain" : "gs";
    for (const Index block : {Index(32), Index(2)}) {
      INFO(tag << " block " << block);
      auto o = hra_options(5, v, Init::random, 7, 0.25);
      o.block_size = block;
      auto low = make_hra<double>(o, BiasMode::all);
      low.set_form(hra::HraForm::low_rank);
      gradcheck("hra_" + tag + "_low_rank_block" + std::to_string(block), low,
                {"hra_u.default", "bias"});
      CHECK(low.last_form() == hra::HraForm::low_rank);

      auto chain = make_hra<double>(o, BiasMode::all);
      chain.set_form(hra::HraForm::chain);
      const MatD x = random_matrix(kIn, 7, 61), g = random_matrix(kOut, 7, 62);
      for (const bool with_dx : {true, false}) {
        INFO("input gradient " << with_dx);
        const MatD y_low = low.forward(x);
        const MatD dx_low = low.backward(g, with_dx);
        const MatD du_low = low.adapter().gradient();
        const MatD y_chain = chain.forward(x);
        const MatD dx_chain = chain.backward(g, with_dx);
        CHECK(chain.last_form() == hra::HraForm::chain);
        CHECK(rel_err(y_low, y_chain) <= 1e-13);
        CHECK(dx_low.size() == (with_dx ? kIn * 7 : 0));
        if (with_dx) CHECK(rel_err(dx_low, dx_chain) <= 1e-13);
        CHECK(rel_err(du_low, chain.adapter().gradient()) <= 1e-12);
        // Defined independently: the dense W H.
        const MatD wh = low.weight() * explicit_h(low.adapter().chain().reflectors(), v);
        CHECK(rel_err(y_low, affine<double>(wh, x, *low.bias())) <= 1e-13);
      }
      // predict() (always the chain form) agrees with the low-rank forward.
      MatD y_pred;
      low.predict(x, y_pred);
      CHECK(rel_err(y_pred, low.forward(x)) <= 1e-13);
    }
  }
}

TEST_CASE("Layers: float low-rank HRA gradients match the double analytic ones",
          "[layers][gradient][form]") {
  constexpr Index d_out = 12, d_in = 16, n = 5;
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    INFO(hra::to_string(v));
    const auto o = hra_options(6, v, Init::random, 3);
    auto ld = make_hra<double>(o, BiasMode::all, true, d_out, d_in);
    auto lf = make_hra<float>(o, BiasMode::all, true, d_out, d_in);
    lf.set_reflectors("default", ld.adapter().chain().reflectors().cast<float>());
    ld.set_form(hra::HraForm::low_rank);
    lf.set_form(hra::HraForm::low_rank);
    const MatD x = random_matrix(d_in, n, 71), g = random_matrix(d_out, n, 72);
    ld.forward(x);
    const MatD dx_d = ld.backward(g);
    lf.forward(x.cast<float>());
    const MatD dx_f = to_double(lf.backward(g.cast<float>()));
    const double e_u = rel_err(to_double(lf.adapter().gradient()), ld.adapter().gradient());
    const double e_x = rel_err(dx_f, dx_d);
    WARN("FLOAT_VS_DOUBLE hra_low_rank_" << hra::to_string(v) << " dU " << hra_test::sci(e_u)
                                         << " dX " << hra_test::sci(e_x));
    CHECK(e_u < 1e-4);
    CHECK(e_x < 1e-4);
  }
}

TEST_CASE("Layers: HRA picks its form by the cost model and says which", "[layers][form]") {
  auto check_model = [](hra::HraLineard& layer, Index n) {
    const double din = double(layer.weight().cols()), dout = double(layer.weight().rows());
    const double r = double(layer.adapter().rank()), nn = double(n);
    const double common = 6 * r * r * nn + 3 * din * r * r;
    CHECK(layer.estimated_flops(hra::HraForm::chain, n) == common + 12 * r * din * nn);
    CHECK(layer.estimated_flops(hra::HraForm::low_rank, n) ==
          common + 4 * din * dout * r + 6 * r * nn * (din + dout));
  };
  // 64 -> 8: the low-rank form wins once 3 n (64 - 8) > 2 * 64 * 8, i.e. for n >= 7.
  hra::HraLineard narrow(Weight<double>::owned(random_matrix(8, 64, 81)), std::nullopt,
                         hra_options(4), BiasMode::none);
  check_model(narrow, 6);
  check_model(narrow, 7);
  CHECK(narrow.form() == hra::HraForm::automatic);
  CHECK(narrow.form_for_batch(6) == hra::HraForm::chain);
  CHECK(narrow.form_for_batch(7) == hra::HraForm::low_rank);
  narrow.forward(random_matrix(64, 6, 82));
  CHECK(narrow.last_form() == hra::HraForm::chain);
  narrow.forward(random_matrix(64, 50, 83));
  CHECK(narrow.last_form() == hra::HraForm::low_rank);
  CHECK(narrow.estimated_flops(hra::HraForm::automatic, 50) ==
        narrow.estimated_flops(hra::HraForm::low_rank, 50));
  // A square layer never prefers it (d_in - d_out = 0).
  auto square = make_hra<double>(hra_options(4), BiasMode::none, false, kIn, kIn);
  CHECK(square.form_for_batch(100000) == hra::HraForm::chain);
  // Forced: chain stays chain; low-rank serves one adapter, so two stacked ones fall back.
  narrow.set_form(hra::HraForm::chain);
  CHECK(narrow.form_for_batch(50) == hra::HraForm::chain);
  narrow.set_form(hra::HraForm::low_rank);
  CHECK(narrow.form_for_batch(1) == hra::HraForm::low_rank);
  narrow.add_adapter("second", hra_options(2, Variant::gram_schmidt));
  CHECK(narrow.form_for_batch(50) == hra::HraForm::chain);
  CHECK(std::isinf(narrow.estimated_flops(hra::HraForm::low_rank, 50)));
  narrow.forward(random_matrix(64, 50, 84));
  CHECK(narrow.last_form() == hra::HraForm::chain);
  // set_form() forgets the pending forward, as every verb that changes what forward computes.
  expect_error<std::logic_error>(
      [&] {
        narrow.set_form(hra::HraForm::automatic);
        narrow.backward(random_matrix(8, 50, 85));
      },
      {"HraLinear::backward", "no forward()"});
  CHECK(std::string(hra::to_string(hra::HraForm::low_rank)) == "low_rank");
}

// The low-rank form given its own output back as input (d_in = d_out) and its own dX as dY.
TEST_CASE("Layers: HRA low-rank form is alias-safe", "[layers][form][misuse]") {
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    auto a = make_hra<double>(hra_options(4, v), BiasMode::all, true, kIn, kIn);
    auto b = make_hra<double>(hra_options(4, v), BiasMode::all, true, kIn, kIn);
    a.set_form(hra::HraForm::low_rank);
    b.set_form(hra::HraForm::low_rank);
    const MatD x = random_matrix(kIn, 5, 91);
    const MatD y1 = a.forward(x);
    b.forward(x);
    const MatD expected = b.forward(y1);      // a fresh copy as input
    const MatD y2 = a.forward(a.forward(x));  // the layer's own buffer as input
    CHECK(rel_err(y2, expected) <= 1e-15);
    const MatD g = random_matrix(kIn, 5, 92);
    const MatD dx_expected = b.backward(g);
    a.backward(g);
    a.forward(y1);
    const MatD& own = a.backward(g);
    CHECK(rel_err(own, dx_expected) <= 1e-15);
    a.forward(y1);
    const MatD dx_again = a.backward(own);  // its own dX as dY
    b.forward(y1);
    CHECK(rel_err(dx_again, b.backward(dx_expected)) <= 1e-15);
  }
}

TEST_CASE("Layers: backward without the input gradient assigns the same parameter gradients",
          "[layers][gradient]") {
  const MatD x = random_matrix(kIn, 4, 31), g = random_matrix(kOut, 4, 32);
  auto check = [&](hra::Layer<double>& layer) {
    layer.forward(x);
    const MatD dx = layer.backward(g, true);
    CHECK(dx.rows() == kIn);
    CHECK(dx.cols() == 4);
    std::vector<MatD> with;
    for (const auto& p : layer.parameters()) with.emplace_back(p.grad);
    layer.fill_gradients();
    layer.forward(x);
    const MatD& none = layer.backward(g, false);
    CHECK(none.size() == 0);
    const auto ps = layer.parameters();
    REQUIRE(ps.size() == with.size());
    for (std::size_t k = 0; k < ps.size(); ++k) CHECK(bitwise_equal(ps[k].grad, with[k]));
  };
  // Two adapters take the ordinary path (W^T dY, then each chain): bit for bit the same.
  auto h = make_hra<double>(hra_options(4), BiasMode::all);
  h.add_adapter("b", hra_options(2, Variant::gram_schmidt));
  check(h);
  auto l = make_lora<double>(lora_options(3), BiasMode::all);
  check(l);
  hra::Lineard d(Weight<double>::owned(random_matrix(kOut, kIn, 21)), random_vec<double>(kOut, 22),
                 hra::LinearOptions{true}, BiasMode::all);
  check(d);
}

// --- float against double ----------------------------------------------------------------------

TEST_CASE("Layers: float gradients match the double analytic ones", "[layers][gradient]") {
  constexpr Index d_out = 12, d_in = 16, n = 5;
  const MatD w = random_matrix(d_out, d_in, 41), x = random_matrix(d_in, n, 42),
             g = random_matrix(d_out, n, 43);
  const VecD b = random_vec<double>(d_out, 44);

  // Runs forward + backward (+ regulariser) and returns every gradient, then dX, in double.
  auto run = [&](auto& layer) {
    using T = typename std::decay_t<decltype(layer)>::Scalar;
    layer.fill_gradients();
    layer.forward(x.cast<T>());
    const Mat<T> dx = layer.backward(g.cast<T>());
    layer.add_regularizer();
    std::vector<MatD> out;
    for (const auto& p : layer.parameters()) out.push_back(to_double(p.grad));
    out.push_back(to_double(dx));
    return out;
  };
  auto compare = [&](const std::string& what, const std::vector<MatD>& f,
                     const std::vector<MatD>& d) {
    REQUIRE(f.size() == d.size());
    for (std::size_t k = 0; k < f.size(); ++k) {
      const double e = rel_err(f[k], d[k]);
      WARN("FLOAT_VS_DOUBLE " << what.c_str() << " tensor" << k << " " << hra_test::sci(e));
      INFO(what << " tensor " << k);
      CHECK(e < 1e-4);
    }
  };

  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    auto o = hra_options(6, v, Init::random, 3, 0.05);
    o.block_size = 4;
    hra::HraLineard ld(Weight<double>::owned(w), b, o, BiasMode::all);
    hra::HraLinearf lf(Weight<float>::owned(w.cast<float>()), Vec<float>(b.cast<float>()), o,
                       BiasMode::all);
    lf.set_reflectors("default", ld.adapter().chain().reflectors().cast<float>());
    compare(std::string("hra_") + hra::to_string(v), run(lf), run(ld));
  }
  {
    hra::LoraLineard ld(Weight<double>::owned(w), b, lora_options(4), BiasMode::all);
    hra::LoraLinearf lf(Weight<float>::owned(w.cast<float>()), Vec<float>(b.cast<float>()),
                        lora_options(4), BiasMode::all);
    ld.set_lora_weights(ld.lora_a(), random_matrix(d_out, 4, 45));
    lf.set_lora_weights(ld.lora_a().cast<float>(), ld.lora_b().cast<float>());
    compare("lora", run(lf), run(ld));
  }
}

// --- Symmetric initialisation ------------------------------------------------------------------

TEMPLATE_TEST_CASE("Layers: symmetric init starts equal to the frozen layer W x + b",
                   "[layers][init]", float, double) {
  using T = TestType;
  const Mat<T> x = random_as<T>(kIn, 7, 51);
  for (const Index r : {2, 4, 8}) {
    for (const Index block : {Index(32), Index(3)}) {
      auto o = hra_options(r, Variant::chain, Init::symmetric, 100 + static_cast<std::uint64_t>(r));
      o.block_size = block;
      auto layer = make_hra<T>(o, BiasMode::all);
      const Mat<T> frozen = affine<T>(layer.weight(), x, *layer.bias());
      const Mat<T> y = layer.forward(x);
      Mat<T> p;
      layer.predict(x, p);
      // H = I exactly in exact arithmetic; the UT form rounds (S^{-1} of duplicated columns), so
      // equality holds to a few ulps, not bit for bit.
      const double e = rel_err(y, frozen);
      WARN("SYMMETRIC_INIT " << (sizeof(T) == 4 ? "float" : "double") << " r="
                             << static_cast<long>(r) << " block=" << static_cast<long>(block)
                             << " max_rel_diff=" << hra_test::sci(e)
                             << " (eps=" << hra_test::sci(eps<T>()) << ")");
      INFO("r=" << r << " block=" << block);
      CHECK(e <= 4.0 * static_cast<double>(r) * eps<T>());
      CHECK(rel_err(p, frozen) <= 4.0 * static_cast<double>(r) * eps<T>());
    }
  }
  // LoRA starts at B = 0: the adapter path contributes exactly 0.
  auto lora = hra::LoraLinear<T>(Weight<T>::owned(random_as<T>(kOut, kIn, 11)),
                                 random_vec<T>(kOut, 12), lora_options(4));
  const Mat<T> frozen = affine<T>(lora.weight(), x, *lora.bias());
  CHECK(rel_err(lora.forward(x), frozen) <= 4.0 * eps<T>());
  // A random-init adapter does not start at the frozen output (so the check above can fail).
  auto moved = make_hra<T>(hra_options(4, Variant::chain, Init::random), BiasMode::all);
  const Mat<T> frozen2 = affine<T>(moved.weight(), x, *moved.bias());
  CHECK(rel_err(moved.forward(x), frozen2) > 1e-2);
}

// --- Merge / unmerge ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("Layers: HRA merge equals the unmerged forward, unmerge restores W",
                   "[layers][merge]", float, double) {
  using T = TestType;
  const Mat<T> x = random_as<T>(kIn, 5, 61);
  for (const Variant v : {Variant::chain, Variant::gram_schmidt})
    for (const BiasMode mode : {BiasMode::none, BiasMode::all}) {
      INFO(hra::to_string(v) << " bias mode " << static_cast<int>(mode));
      auto layer = make_hra<T>(hra_options(5, v, Init::random, 17), mode);
      const Mat<T> w0 = layer.weight();
      const MatD u = to_double(layer.adapter().chain().reflectors());
      const Mat<T> y0 = layer.forward(x);
      CHECK_FALSE(layer.merged());

      layer.merge();
      CHECK(layer.merged());
      CHECK(layer.adapter().merged());
      // W <- W H with H the explicit product.
      CHECK(rel_err(layer.weight(), to_double(w0) * explicit_h(u, v)) <= tol<T>(kIn, 5));
      const Mat<T> y1 = layer.forward(x);
      CHECK(rel_err(y1, y0) <= tol<T>(kIn, 5));
      // Once merged, forward is the plain product of the merged weight.
      const Mat<T> wm = layer.weight();
      const Mat<T> plain = affine<T>(wm, x, *layer.bias());
      CHECK(rel_err(y1, plain) <= 4.0 * eps<T>() * kIn);
      // The adapter is no longer a parameter; a trainable bias still is.
      if (mode == BiasMode::none)
        CHECK(names_of<T>(layer).empty());
      else
        CHECK(names_of<T>(layer) == std::vector<std::string>{"bias"});
      CHECK(layer.num_trainable_parameters() == (mode == BiasMode::none ? 0 : kOut));
      // backward still works and leaves only the bias gradient.
      layer.backward(random_as<T>(kOut, 5, 62));

      layer.unmerge();
      CHECK_FALSE(layer.merged());
      // W H H^T = W up to the rounding of the two passes, relative to W's scale (a fixed 1e-6
      // for float was 8 ulps of |W|, and -O2's rounding gave 9).
      const double unmerge_tol = tol<T>(kIn, 5) * max_abs(to_double(w0));
      CHECK(max_abs(to_double(layer.weight()) - to_double(w0)) <= unmerge_tol);
      CHECK(names_of<T>(layer).front() == "hra_u.default");
      CHECK(rel_err(layer.forward(x), y0) <= tol<T>(kIn, 5));
    }
}

TEMPLATE_TEST_CASE("Layers: stacked HRA adapters merge as W H_a H_b and unmerge last-in-first-out",
                   "[layers][merge]", float, double) {
  using T = TestType;
  const double unmerge_tol = sizeof(T) == 4 ? 1e-6 : 1e-12;
  const Mat<T> x = random_as<T>(kIn, 4, 71);
  auto layer = make_hra<T>(hra_options(4, Variant::chain, Init::random, 1), BiasMode::all);
  layer.add_adapter("b", hra_options(3, Variant::gram_schmidt, Init::random, 2));
  const Mat<T> w0 = layer.weight();
  const MatD ha =
      explicit_h(to_double(layer.adapter("default").chain().reflectors()), Variant::chain);
  const MatD hb =
      explicit_h(to_double(layer.adapter("b").chain().reflectors()), Variant::gram_schmidt);
  const VecD bias = to_double(*layer.bias());
  const MatD xd = to_double(x);
  const MatD want_y = affine<double>(to_double(w0) * ha * hb, xd, bias);
  // The layer applies the adapters in PEFT's order: W H_a H_b x (H_b touches x first).
  CHECK(rel_err(layer.forward(x), want_y) <= tol<T>(kIn, 7));
  CHECK(names_of<T>(layer) == std::vector<std::string>{"hra_u.default", "hra_u.b", "bias"});

  layer.merge();
  CHECK(layer.merged());
  CHECK(rel_err(layer.weight(), to_double(w0) * ha * hb) <= tol<T>(kIn, 7));
  CHECK(rel_err(layer.forward(x), want_y) <= tol<T>(kIn, 7));
  CHECK(names_of<T>(layer) == std::vector<std::string>{"bias"});

  // The first unmerge pops "b" (merged last): W = W0 H_a, and "b" trains again.
  layer.unmerge();
  CHECK_FALSE(layer.merged());
  CHECK(layer.adapter("default").merged());
  CHECK_FALSE(layer.adapter("b").merged());
  CHECK(rel_err(layer.weight(), to_double(w0) * ha) <= tol<T>(kIn, 7));
  CHECK(names_of<T>(layer) == std::vector<std::string>{"hra_u.b", "bias"});
  CHECK(rel_err(layer.forward(x), want_y) <= tol<T>(kIn, 7));

  // Merging again folds only the unmerged "b".
  layer.merge();
  CHECK(rel_err(layer.weight(), to_double(w0) * ha * hb) <= tol<T>(kIn, 7));
  layer.unmerge();
  layer.unmerge();
  CHECK_FALSE(layer.adapter("default").merged());
  CHECK(max_abs(to_double(layer.weight()) - to_double(w0)) <= unmerge_tol);
  CHECK(rel_err(layer.forward(x), want_y) <= tol<T>(kIn, 7));

  // Nothing left to unmerge: a logic_error, W untouched.
  const Mat<T> before = layer.weight();
  expect_error<std::logic_error>([&] { layer.unmerge(); }, {"no adapter is merged"});
  CHECK(bitwise_equal(layer.weight(), before));
}

TEMPLATE_TEST_CASE("Layers: merging a merged layer or unmerging an unmerged one throws",
                   "[layers][merge][errors]", float, double) {
  using T = TestType;
  const Mat<T> x = random_as<T>(kIn, 3, 81);
  auto hra_layer = make_hra<T>(hra_options(4));
  expect_error<std::logic_error>([&] { hra_layer.unmerge(); }, {"no adapter is merged"});
  // merge() changes W, so a forward made before it can no longer be differentiated.
  const Mat<T> g = random_as<T>(kOut, 3, 82);
  hra_layer.forward(x);
  hra_layer.merge();
  expect_error<std::logic_error>([&] { hra_layer.backward(g); }, {"no forward()"});
  const Mat<T> w = hra_layer.weight();
  const Mat<T> y = hra_layer.forward(x);
  expect_error<std::logic_error>([&] { hra_layer.merge(); }, {"already merged"});
  expect_error<std::logic_error>([&] { hra_layer.merge(hra::MergeCheck::safe); },
                                 {"already merged"});
  CHECK(bitwise_equal(hra_layer.weight(), w));
  CHECK(hra_layer.merged());
  CHECK(bitwise_equal(hra_layer.forward(x), y));

  auto lora = make_lora<T>(lora_options(3));
  const Mat<T> w0 = lora.weight();
  expect_error<std::logic_error>([&] { lora.unmerge(); }, {"not merged"});
  CHECK(bitwise_equal(lora.weight(), w0));
  lora.forward(x);
  lora.merge();
  expect_error<std::logic_error>([&] { lora.backward(g); }, {"no forward()"});
  lora.forward(x);
  lora.unmerge();
  expect_error<std::logic_error>([&] { lora.backward(g); }, {"no forward()"});
  lora.merge();
  const Mat<T> wl = lora.weight();
  expect_error<std::logic_error>([&] { lora.merge(); }, {"already merged"});
  CHECK(bitwise_equal(lora.weight(), wl));
  CHECK(lora.merged());
}

TEMPLATE_TEST_CASE("Layers: LoRA merge equals the unmerged forward, unmerge restores W",
                   "[layers][merge]", float, double) {
  using T = TestType;
  const double unmerge_tol = sizeof(T) == 4 ? 1e-6 : 1e-12;
  const Mat<T> x = random_as<T>(kIn, 5, 91);
  auto layer = make_lora<T>(lora_options(3, 12.0), BiasMode::all);
  const Mat<T> w0 = layer.weight();
  const Mat<T> y0 = layer.forward(x);
  // y = W x + (alpha / r) B A x + b, written out.
  const MatD want =
      affine<double>(to_double(w0) + 4.0 * to_double(layer.lora_b()) * to_double(layer.lora_a()),
                     to_double(x), to_double(*layer.bias()));
  CHECK(rel_err(y0, want) <= tol<T>(kIn, 3));
  layer.merge();
  CHECK(rel_err(layer.weight(), to_double(w0) + 4.0 * to_double(layer.lora_b()) *
                                                    to_double(layer.lora_a())) <= tol<T>(kIn, 3));
  CHECK(rel_err(layer.forward(x), y0) <= tol<T>(kIn, 3));
  CHECK(names_of<T>(layer) == std::vector<std::string>{"bias"});
  layer.unmerge();
  CHECK(max_abs(to_double(layer.weight()) - to_double(w0)) <= unmerge_tol);
  CHECK(names_of<T>(layer) == std::vector<std::string>{"lora_A.default", "lora_B.default", "bias"});
}

TEMPLATE_TEST_CASE("Layers: safe merge refuses a poisoned adapter and leaves W bit for bit",
                   "[layers][merge][errors]", float, double) {
  using T = TestType;
  // W's first row is (c, c, c, c) with c = 0.9 max: finite, but its norm 2c overflows. The
  // reflection along u = w/|w| - e_1 maps that row to |w| e_1, so W H is not finite.
  const T c = T(0.9) * std::numeric_limits<T>::max();
  Mat<T> w = random_as<T>(3, 4, 101);
  w.row(0).setConstant(c);
  Mat<T> u(4, 1);
  u << T(-0.5), T(0.5), T(0.5), T(0.5);
  auto make = [&] {
    hra::HraLinear<T> layer(Weight<T>::owned(w), std::nullopt, hra_options(1));
    layer.set_reflectors("default", u);
    return layer;
  };

  // The poison is real: the plain merge produces a non-finite weight.
  auto unsafe = make();
  unsafe.merge(hra::MergeCheck::in_place);
  CHECK_FALSE(unsafe.weight().allFinite());

  auto layer = make();
  const Mat<T> x = random_as<T>(4, 2, 102);
  expect_error<std::runtime_error>([&] { layer.merge(hra::MergeCheck::safe); },
                                   {"non-finite", "unchanged"});
  CHECK(bitwise_equal(layer.weight(), w));
  CHECK_FALSE(layer.merged());
  CHECK_FALSE(layer.adapter().merged());
  CHECK(names_of<T>(layer) == std::vector<std::string>{"hra_u.default"});
  expect_error<std::logic_error>([&] { layer.unmerge(); }, {"no adapter is merged"});

  // Stacked: a harmless adapter first, the poisoned one second: neither is merged.
  hra::HraLinear<T> stacked(Weight<T>::owned(w), std::nullopt, hra_options(2));
  stacked.add_adapter("poison", hra_options(1));
  stacked.set_reflectors("poison", u);
  expect_error<std::runtime_error>([&] { stacked.merge(hra::MergeCheck::safe); }, {"non-finite"});
  CHECK(bitwise_equal(stacked.weight(), w));
  CHECK_FALSE(stacked.adapter("default").merged());
  CHECK_FALSE(stacked.adapter("poison").merged());

  // LoRA: B A overflows although A and B are finite.
  hra::LoraLinear<T> lora(Weight<T>::owned(random_as<T>(3, 4, 103)), std::nullopt, lora_options(2));
  lora.set_lora_weights(Mat<T>::Constant(2, 4, T(1)), Mat<T>::Constant(3, 2, c));
  const Mat<T> wl = lora.weight();
  expect_error<std::runtime_error>([&] { lora.merge(hra::MergeCheck::safe); },
                                   {"non-finite", "unchanged"});
  CHECK(bitwise_equal(lora.weight(), wl));
  CHECK_FALSE(lora.merged());
}

TEMPLATE_TEST_CASE("Layers: merge refuses a non-finite or zero reflector before touching W",
                   "[layers][merge][errors]", float, double) {
  using T = TestType;
  for (const hra::MergeCheck safe : {hra::MergeCheck::in_place, hra::MergeCheck::safe}) {
    INFO("safe=" << (safe == hra::MergeCheck::safe));
    auto layer = make_hra<T>(hra_options(4));
    layer.add_adapter("b", hra_options(2));
    const Mat<T> w = layer.weight();
    // parameters() are the optimiser's mutable views: nothing checks them until the next use.
    layer.parameter("hra_u.b").value(3, 1) = std::numeric_limits<T>::quiet_NaN();
    expect_error<std::invalid_argument>([&] { layer.merge(safe); }, {"non-finite"});
    CHECK(bitwise_equal(layer.weight(), w));
    CHECK_FALSE(layer.adapter("default").merged());

    layer.parameter("hra_u.b").value.col(1).setZero();
    expect_error<std::invalid_argument>([&] { layer.merge(safe); }, {"column 1", "zero"});
    CHECK(bitwise_equal(layer.weight(), w));
    CHECK_FALSE(layer.adapter("default").merged());
  }
}

TEMPLATE_TEST_CASE("Layers: a viewed weight is not copied and merge writes into it",
                   "[layers][merge][view]", float, double) {
  using T = TestType;
  const double unmerge_tol = sizeof(T) == 4 ? 1e-6 : 1e-12;
  const Mat<T> x = random_as<T>(kIn, 3, 111);
  SECTION("a whole matrix") {
    Mat<T> w = random_as<T>(kOut, kIn, 112);
    const Mat<T> w0 = w;
    hra::HraLinear<T> layer(Weight<T>::view(w), std::nullopt, hra_options(4));
    CHECK(layer.weight().data() == w.data());
    const MatD h = explicit_chain(to_double(layer.adapter().chain().reflectors()));
    const Mat<T> y0 = layer.forward(x);
    layer.merge();
    CHECK(layer.weight().data() == w.data());
    CHECK(rel_err(w, to_double(w0) * h) <= tol<T>(kIn, 4));  // the caller's matrix changed
    CHECK(rel_err(layer.forward(x), y0) <= tol<T>(kIn, 4));
    layer.unmerge();
    CHECK(max_abs(to_double(w) - to_double(w0)) <= unmerge_tol);

    // LoRA and Linear view too.
    hra::LoraLinear<T> lora(Weight<T>::view(w), std::nullopt, lora_options(2));
    CHECK(lora.weight().data() == w.data());
    hra::Linear<T> lin(Weight<T>::view(w), std::nullopt, hra::LinearOptions{true});
    CHECK(lin.weight().data() == w.data());
    CHECK(lin.parameters().front().value.data() == w.data());
  }
  SECTION("a block of a larger matrix (outer stride != rows)") {
    Mat<T> big = random_as<T>(10, 13, 113);
    const Mat<T> big0 = big;
    auto block = big.block(2, 3, kOut, kIn);
    hra::HraLinear<T> layer(Weight<T>::view(block), random_vec<T>(kOut, 114), hra_options(4),
                            BiasMode::all);
    CHECK(layer.weight().data() == &big(2, 3));
    CHECK(layer.weight().outerStride() == 10);
    CHECK(bitwise_equal(layer.weight(), big0.block(2, 3, kOut, kIn)));
    const MatD h = explicit_chain(to_double(layer.adapter().chain().reflectors()));
    const Mat<T> y0 = layer.forward(x);
    const MatD want = affine<double>(to_double(big0.block(2, 3, kOut, kIn)) * h, to_double(x),
                                     to_double(*layer.bias()));
    CHECK(rel_err(y0, want) <= tol<T>(kIn, 4));
    layer.merge();
    CHECK(rel_err(big.block(2, 3, kOut, kIn), to_double(big0.block(2, 3, kOut, kIn)) * h) <=
          tol<T>(kIn, 4));
    // Everything outside the block is untouched.
    Mat<T> outside = big, outside0 = big0;
    outside.block(2, 3, kOut, kIn).setZero();
    outside0.block(2, 3, kOut, kIn).setZero();
    CHECK(bitwise_equal(outside, outside0));
    CHECK(rel_err(layer.forward(x), y0) <= tol<T>(kIn, 4));
    layer.unmerge();
    CHECK(max_abs(to_double(big) - to_double(big0)) <= unmerge_tol);

    // A trainable Linear cannot expose a strided view as one contiguous parameter.
    hra::Linear<T> lin(Weight<T>::view(block), std::nullopt, hra::LinearOptions{true});
    expect_error<std::logic_error>([&] { lin.parameters(); }, {"contiguous"});
  }
}

// --- Regulariser -------------------------------------------------------------------------------

TEST_CASE("Layers: regulariser value matches lambda |I - U^T U|_F (both forms)",
          "[layers][regularizer]") {
  for (const RegularizerForm form : {RegularizerForm::squared, RegularizerForm::unsquared}) {
    const char* fname = form == RegularizerForm::squared ? "squared" : "unsquared";
    INFO(fname);
    // Random U with columns of different lengths (the regulariser only sees directions).
    auto layer = make_hra<double>(hra_options(5, Variant::chain, Init::random, 3, 0.3, form));
    MatD u = layer.adapter().chain().reflectors();
    for (Index j = 0; j < u.cols(); ++j) u.col(j) *= 1.0 + static_cast<double>(j);
    layer.set_reflectors("default", u);
    const double want = explicit_regularizer(u, 0.3, form);
    CHECK(layer.regularizer() == Approx(want).epsilon(1e-13));
    CHECK(want > 0.01);

    // Stacked adapters add up; lambda = 0 contributes nothing.
    layer.add_adapter("b", hra_options(3, Variant::gram_schmidt, Init::random, 4, 0.7, form));
    layer.add_adapter("c", hra_options(2, Variant::chain, Init::random, 5, 0.0, form));
    const double want2 =
        want + explicit_regularizer(layer.adapter("b").chain().reflectors(), 0.7, form);
    CHECK(layer.regularizer() == Approx(want2).epsilon(1e-13));
    // Merged adapters are no longer regularised.
    layer.merge();
    CHECK(layer.regularizer() == 0.0);
    layer.unmerge();
    layer.unmerge();
    layer.unmerge();

    // regularizer() leaves gradients alone; add_regularizer() accumulates into them.
    const MatD x = random_matrix(kIn, 3, 121), g = random_matrix(kOut, 3, 122);
    layer.forward(x);
    layer.backward(g);
    std::vector<MatD> g0;
    for (const auto& p : layer.parameters()) g0.emplace_back(p.grad);
    CHECK(layer.regularizer() == Approx(want2).epsilon(1e-13));
    auto ps = layer.parameters();
    for (std::size_t k = 0; k < ps.size(); ++k) CHECK(bitwise_equal(ps[k].grad, g0[k]));
    CHECK(layer.add_regularizer() == Approx(want2).epsilon(1e-13));
    std::vector<MatD> g1;
    for (const auto& p : layer.parameters()) g1.emplace_back(p.grad);
    layer.add_regularizer();
    ps = layer.parameters();
    CHECK(max_abs(g1[0] - g0[0]) > 1e-3);  // the regulariser has a gradient
    CHECK(max_abs(g1[2] - g0[2]) == 0.0);  // lambda = 0: none
    for (std::size_t k = 0; k < ps.size(); ++k)
      CHECK(max_abs(MatD(ps[k].grad) - g1[k] - (g1[k] - g0[k])) <= 1e-12);
  }
}

TEST_CASE("Layers: regulariser at symmetric init sees the duplicated columns",
          "[layers][regularizer]") {
  // r = 2 symmetric: u_1 = u_2, so C = [[1, 1], [1, 1]], I - C = [[0, -1], [-1, 0]]:
  // |I - C|_F^2 = 2 exactly.
  auto sq = make_hra<double>(hra_options(2, Variant::chain, Init::symmetric, 9, 0.25));
  CHECK(sq.regularizer() == Approx(0.25 * 2.0).epsilon(1e-14));
  auto unsq = make_hra<double>(
      hra_options(2, Variant::chain, Init::symmetric, 9, 0.25, RegularizerForm::unsquared));
  CHECK(unsq.regularizer() == Approx(0.25 * std::sqrt(2.0)).epsilon(1e-14));

  // r = 4: two unit off-diagonal pairs, plus the cosines between the independent columns.
  auto four = make_hra<double>(hra_options(4, Variant::chain, Init::symmetric, 9, 1.0));
  const MatD u = four.adapter().chain().reflectors();
  REQUIRE(bitwise_equal(u.col(0), u.col(1)));
  REQUIRE(bitwise_equal(u.col(2), u.col(3)));
  const double c = u.col(0).dot(u.col(2)) / (u.col(0).norm() * u.col(2).norm());
  // I - C has -1 at (0,1), (1,0), (2,3), (3,2) and -c at the 8 cross entries.
  const double want = 4.0 + 8.0 * c * c;
  CHECK(four.regularizer() == Approx(want).epsilon(1e-13));
  CHECK(four.regularizer() == Approx(explicit_regularizer(u, 1.0, RegularizerForm::squared)));
}

// --- Bad input ---------------------------------------------------------------------------------

namespace {

struct Factory {
  std::string name;
  std::function<std::unique_ptr<hra::Layer<double>>()> make;
};

std::vector<Factory> factories() {
  return {
      {"HraLinear",
       [] {
         return std::make_unique<hra::HraLineard>(make_hra<double>(hra_options(4), BiasMode::all));
       }},
      {"HraLinear",
       [] {
         return std::make_unique<hra::HraLineard>(
             make_hra<double>(hra_options(3, Variant::gram_schmidt), BiasMode::none));
       }},
      {"LoraLinear",
       [] {
         return std::make_unique<hra::LoraLineard>(
             make_lora<double>(lora_options(3), BiasMode::all));
       }},
      {"Linear",
       [] {
         return std::make_unique<hra::Lineard>(Weight<double>::owned(random_matrix(kOut, kIn, 21)),
                                               random_vec<double>(kOut, 22),
                                               hra::LinearOptions{true}, BiasMode::all);
       }},
  };
}

std::vector<MatD> grads_of(hra::Layer<double>& layer) {
  std::vector<MatD> out;
  for (const auto& p : layer.parameters()) out.emplace_back(p.grad);
  return out;
}
std::vector<MatD> values_of(hra::Layer<double>& layer) {
  std::vector<MatD> out;
  for (const auto& p : layer.parameters()) out.emplace_back(p.value);
  return out;
}
bool same(const std::vector<MatD>& a, const std::vector<MatD>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t k = 0; k < a.size(); ++k)
    if (!bitwise_equal(a[k], b[k])) return false;
  return true;
}

}  // namespace

TEST_CASE("Layers: wrong shapes and non-finite values are clear errors, state unchanged",
          "[layers][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const MatD x = random_matrix(kIn, 3, 131), g = random_matrix(kOut, 3, 132);
  for (const auto& f : factories()) {
    INFO(f.name);
    const std::string fwd = f.name + "::forward";
    const std::string bwd = f.name + "::backward";

    // Reference: a fresh layer's output and gradients for (x, g).
    auto ref = f.make();
    const MatD y_ref = ref->forward(x);
    const MatD dx_ref = ref->backward(g);
    const auto grads_ref = grads_of(*ref);

    auto layer = f.make();
    const auto values0 = values_of(*layer);
    expect_error<std::logic_error>([&] { layer->backward(g); }, {bwd, "no forward()"});

    const MatD& y = layer->forward(x);
    REQUIRE(bitwise_equal(y, y_ref));
    // Bad forward inputs: the previous output and the pending backward survive.
    expect_error<std::invalid_argument>([&] { layer->forward(MatD::Zero(kIn - 1, 3)); },
                                        {fwd, "expected 8 rows", "7x3"});
    expect_error<std::invalid_argument>([&] { layer->forward(MatD::Zero(kIn + 2, 3)); },
                                        {"expected 8 rows", "10x3"});
    expect_error<std::invalid_argument>([&] { layer->forward(MatD::Zero(kIn, 0)); },
                                        {fwd, "empty batch"});
    MatD bad = x;
    bad(1, 2) = nan;
    expect_error<std::invalid_argument>([&] { layer->forward(bad); },
                                        {fwd, "non-finite", "(1, 2)", "8x3"});
    bad(1, 2) = inf;
    expect_error<std::invalid_argument>([&] { layer->forward(bad); }, {"non-finite", "inf"});
    MatD p;
    expect_error<std::invalid_argument>([&] { layer->predict(MatD::Zero(kIn - 1, 2), p); },
                                        {f.name + "::predict", "expected 8 rows", "7x2"});
    CHECK(bitwise_equal(y, y_ref));

    // Bad backward inputs: named sizes, and the forward is still there to differentiate.
    expect_error<std::invalid_argument>([&] { layer->backward(MatD::Zero(kOut - 1, 3)); },
                                        {bwd, "6x3", "5x3"});
    expect_error<std::invalid_argument>([&] { layer->backward(MatD::Zero(kOut, 4)); },
                                        {bwd, "6x3", "6x4"});
    MatD bad_g = g;
    bad_g(4, 0) = -inf;
    expect_error<std::invalid_argument>([&] { layer->backward(bad_g); },
                                        {bwd, "non-finite", "(4, 0)"});
    CHECK(same(values_of(*layer), values0));

    const MatD dx = layer->backward(g);
    CHECK(bitwise_equal(dx, dx_ref));
    CHECK(same(grads_of(*layer), grads_ref));

    // A second backward without a forward: refused, gradients kept.
    expect_error<std::logic_error>([&] { layer->backward(g); }, {bwd, "no forward()"});
    CHECK(same(grads_of(*layer), grads_ref));
    CHECK(same(values_of(*layer), values0));

    // And the layer keeps working.
    CHECK(bitwise_equal(layer->forward(x), y_ref));
    CHECK(bitwise_equal(layer->backward(g), dx_ref));
  }
}

TEST_CASE("Layers: bad construction arguments are clear errors", "[layers][errors]") {
  const MatD w = random_matrix(kOut, kIn, 141);
  auto owned = [&] { return Weight<double>::owned(w); };
  SECTION("bias of the wrong length") {
    expect_error<std::invalid_argument>(
        [&] {
          (void)hra::HraLineard(owned(), VecD::Zero(kOut - 1), hra_options(4), BiasMode::all);
        },
        {"HraLinear", "bias", "6x1", "5x1"});
    expect_error<std::invalid_argument>(
        [&] { (void)hra::LoraLineard(owned(), VecD::Zero(kOut + 1), lora_options(2)); },
        {"LoraLinear", "bias", "6x1", "7x1"});
    expect_error<std::invalid_argument>(
        [&] {
          (void)hra::Lineard(owned(), VecD::Zero(kIn), hra::LinearOptions{false}, BiasMode::all);
        },
        {"Linear", "6x1", "8x1"});
  }
  SECTION("a trainable bias without a bias") {
    for (const BiasMode mode : {BiasMode::all, BiasMode::adapter_only}) {
      expect_error<std::invalid_argument>(
          [&] { (void)hra::HraLineard(owned(), std::nullopt, hra_options(4), mode); },
          {"HraLinear", "bias mode", "has none"});
      expect_error<std::invalid_argument>(
          [&] { (void)hra::LoraLineard(owned(), std::nullopt, lora_options(2), mode); },
          {"LoraLinear", "bias mode", "has none"});
    }
    expect_error<std::invalid_argument>(
        [&] { (void)hra::Lineard(owned(), std::nullopt, hra::LinearOptions{true}, BiasMode::all); },
        {"Linear", "bias mode", "has none"});
  }
  SECTION("rank 0, rank > d_in, odd rank with symmetric init") {
    expect_error<std::invalid_argument>([&] { (void)hra::HraLineard(w, hra_options(0)); },
                                        {"rank r must be >= 1", "r=0"});
    expect_error<std::invalid_argument>([&] { (void)hra::HraLineard(w, hra_options(kIn + 1)); },
                                        {"r=9", "d=8"});
    expect_error<std::invalid_argument>(
        [&] { (void)hra::HraLineard(w, hra_options(3, Variant::chain, Init::symmetric)); },
        {"even rank", "r=3"});
    expect_error<std::invalid_argument>(
        [&] { (void)hra::HraLineard(w, hra_options(4, Variant::gram_schmidt, Init::symmetric)); },
        {"Gram-Schmidt", "Init::random"});
    expect_error<std::invalid_argument>([&] { (void)hra::LoraLineard(w, lora_options(0)); },
                                        {"rank r must be >= 1", "r=0"});
    expect_error<std::invalid_argument>([&] { (void)hra::LoraLineard(w, lora_options(kOut + 1)); },
                                        {"r=7", "min(d_out, d_in)=6"});
    expect_error<std::invalid_argument>(
        [&] { (void)hra::LoraLineard(w, lora_options(2, 8.0, 1.0)); }, {"dropout", "[0, 1)", "1"});
  }
  SECTION("negative or non-finite lambda, non-finite or empty W") {
    expect_error<std::invalid_argument>(
        [&] { (void)hra::HraLineard(w, hra_options(4, Variant::chain, Init::random, 1, -1.0)); },
        {"lambda", ">= 0", "-1"});
    expect_error<std::invalid_argument>(
        [&] {
          (void)hra::HraLineard(w, hra_options(4, Variant::chain, Init::random, 1,
                                               std::numeric_limits<double>::infinity()));
        },
        {"lambda", "inf"});
    MatD bad = w;
    bad(2, 5) = std::numeric_limits<double>::quiet_NaN();
    expect_error<std::invalid_argument>([&] { (void)hra::HraLineard(bad, hra_options(4)); },
                                        {"frozen weight W", "non-finite", "(2, 5)"});
    expect_error<std::invalid_argument>([&] { (void)hra::LoraLineard(bad, lora_options(2)); },
                                        {"frozen weight W", "non-finite", "(2, 5)"});
    expect_error<std::invalid_argument>([&] { (void)hra::HraLineard(MatD(0, 4), hra_options(1)); },
                                        {"empty", "0x4"});
  }
}

TEST_CASE("Layers: a refused add_adapter leaves the layer unchanged", "[layers][errors]") {
  auto layer = make_hra<double>(hra_options(4), BiasMode::all);
  layer.add_adapter("b", hra_options(2));
  const MatD x = random_matrix(kIn, 3, 151), g = random_matrix(kOut, 3, 152);
  const MatD y = layer.forward(x);
  const auto params = names_of<double>(layer);
  const auto values = values_of(layer);

  expect_error<std::invalid_argument>([&] { layer.add_adapter("b", hra_options(2)); },
                                      {"adapter 'b' already exists"});
  expect_error<std::invalid_argument>(
      [&] { layer.add_adapter("c", hra_options(2, Variant::chain, Init::random, 1, -0.5)); },
      {"lambda", "-0.5"});
  expect_error<std::invalid_argument>([&] { layer.add_adapter("c", hra_options(kIn + 1)); },
                                      {"r=9", "d=8"});
  expect_error<std::invalid_argument>(
      [&] { layer.add_adapter("c", hra_options(5, Variant::chain, Init::symmetric)); },
      {"even rank", "r=5"});
  expect_error<std::invalid_argument>([&] { layer.adapter("missing"); },
                                      {"no adapter named 'missing'"});
  CHECK(layer.adapters().size() == 2);
  CHECK(names_of<double>(layer) == params);
  CHECK(same(values_of(layer), values));
  CHECK(bitwise_equal(layer.forward(x), y));
  layer.backward(g);  // still a working layer
}

// --- Parameter counts and memory ---------------------------------------------------------------

TEST_CASE("Layers: trainable parameter counts", "[layers][count]") {
  for (const Index r : {1, 2, 4, 8}) {
    INFO("r=" << r);
    auto hra_none = make_hra<double>(hra_options(r), BiasMode::none);
    CHECK(hra_none.num_trainable_parameters() == kIn * r);
    auto hra_bias = make_hra<double>(hra_options(r), BiasMode::all);
    CHECK(hra_bias.num_trainable_parameters() == kIn * r + kOut);
    auto gs = make_hra<double>(hra_options(r, Variant::gram_schmidt), BiasMode::adapter_only);
    CHECK(gs.num_trainable_parameters() == kIn * r + kOut);
    if (r <= kOut) {
      auto lora = make_lora<double>(lora_options(r), BiasMode::none);
      CHECK(lora.num_trainable_parameters() == r * (kIn + kOut));
      auto lora_b = make_lora<double>(lora_options(r), BiasMode::all);
      CHECK(lora_b.num_trainable_parameters() == r * (kIn + kOut) + kOut);
    }
  }
  auto stacked = make_hra<double>(hra_options(4));
  stacked.add_adapter("b", hra_options(3));
  CHECK(stacked.num_trainable_parameters() == kIn * 7);
  hra::Lineard lin(Weight<double>::owned(random_matrix(kOut, kIn, 1)), random_vec<double>(kOut, 2),
                   hra::LinearOptions{true}, BiasMode::all);
  CHECK(lin.num_trainable_parameters() == kOut * kIn + kOut);
}

TEST_CASE("Layers: saved bytes are O((d_in + d_out + r) n + r d), never d x d",
          "[layers][memory]") {
  constexpr Index d_in = 2048, d_out = 64, r = 8, n = 4;
  const MatD w = random_matrix(d_out, d_in, 161), x = random_matrix(d_in, n, 162);
  const std::size_t sz = sizeof(double);
  const std::size_t dense = static_cast<std::size_t>(d_in * d_in) * sz;
  const std::size_t activations = static_cast<std::size_t>((d_in + d_out + 2 * r) * n) * sz;
  const std::size_t factors = static_cast<std::size_t>(2 * r * d_in) * sz;
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    INFO(hra::to_string(v));
    hra::HraLineard layer(w, hra_options(r, v));
    layer.forward(x);
    const std::size_t saved = layer.saved_bytes();
    WARN("SAVED_BYTES hra_" << hra::to_string(v) << " d_in=" << static_cast<long>(d_in)
                            << " d_out=" << static_cast<long>(d_out)
                            << " r=" << static_cast<long>(r) << " n=" << static_cast<long>(n)
                            << ": " << saved << " (d x d would be " << dense << ")");
    CHECK(saved >= static_cast<std::size_t>((d_in + d_out) * n) * sz);  // X' and Y at least
    CHECK(saved < activations + factors);
    CHECK(saved * 100 < dense);
  }
  hra::LoraLineard lora(w, lora_options(r));
  lora.forward(x);
  CHECK(lora.saved_bytes() < activations);
  CHECK(lora.saved_bytes() >= static_cast<std::size_t>((d_in + d_out) * n) * sz);
}
