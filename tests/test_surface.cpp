// One naming scheme across the layers: setters on the default adapter, LoRA's A and B alone,
// gradients by parameter name, U given at construction for any r and variant, named merge
// checks, one form vocabulary, the conv geometry in nn.Conv2d's order with F.pad's padding, the
// conv_geometry() query, and the deprecated spellings of one release ago doing what they did.
// Expected values come from explicit reflections (tests/support/definitions.hpp) or from the
// other spelling of the same call, never from the call under test alone.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "hra/conv2d.hpp"
#include "hra/hra_conv2d.hpp"
#include "hra/hra_linear.hpp"
#include "hra/linear.hpp"
#include "hra/lora_conv2d.hpp"
#include "hra/lora_linear.hpp"
#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra::Conv2dGeometry;
using hra::HraForm;
using hra::HraOptions;
using hra::Init;
using hra::LoraOptions;
using hra::MergeCheck;
using hra::Variant;
using hra_test::expect_error;
using hra_test::MatD;
using hra_test::random_matrix;

MatD predicted(const hra::Layer<double>& layer, const MatD& x) {
  MatD y;
  layer.predict(x, y);
  return y;
}

HraOptions random_init(Index r, Variant v = Variant::chain) {
  HraOptions o;
  o.rank = r;
  o.init = Init::random;
  o.variant = v;
  return o;
}

}  // namespace

TEST_CASE("Surface: HraOptions::given takes U for odd r and Gram-Schmidt, checked",
          "[surface][hra]") {
  const Index din = 7, dout = 5;
  const MatD w = random_matrix(dout, din, 1), x = random_matrix(din, 4, 2);
  for (const Variant v : {Variant::chain, Variant::gram_schmidt}) {
    for (const Index r : {Index(1), Index(3), Index(4)}) {
      INFO("variant " << hra::to_string(v) << ", r " << r);
      const MatD u = random_matrix(din, r, 10 + std::uint64_t(r));
      hra::HraLineard given(w, HraOptions::given(u, v));
      CHECK(given.adapter().chain().reflectors() == u);
      CHECK(given.adapter().init() == Init::given);
      CHECK(given.adapter().variant() == v);
      // The same U set afterwards on a layer drawn at random: the same layer.
      hra::HraLineard set(w, random_init(r, v));
      set.set_reflectors(u);
      CHECK(given.forward(x) == set.forward(x));
      // And the expected value from the explicit reflections.
      const MatD expected = w * hra_test::explicit_h(u, v) * x;
      CHECK((given.forward(x) - expected).cwiseAbs().maxCoeff() < 1e-12);
    }
  }
  // U of the wrong shape, with a zero column, or dependent columns for Gram-Schmidt: refused.
  HraOptions wrong = HraOptions::given(random_matrix(din + 1, 2, 3));
  expect_error<std::invalid_argument>([&] { hra::HraLineard l(w, wrong); },
                                      {"HraLinear", "Init::given", "7x2", "got 8x2"});
  wrong = HraOptions::given(random_matrix(din, 2, 3));
  wrong.rank = 3;
  expect_error<std::invalid_argument>([&] { hra::HraLineard l(w, wrong); }, {"Init::given"});
  MatD zero = random_matrix(din, 3, 4);
  zero.col(1).setZero();
  expect_error<std::invalid_argument>([&] { hra::HraLineard l(w, HraOptions::given(zero)); },
                                      {"column 1"});
  MatD dependent = random_matrix(din, 2, 5);
  dependent.col(1) = 2 * dependent.col(0);
  expect_error<std::invalid_argument>(
      [&] { hra::HraLineard l(w, HraOptions::given(dependent, Variant::gram_schmidt)); }, {});
  // Given U on a convolution (D = C_in kh kw) and as a second adapter.
  const Conv2dGeometry g = Conv2dGeometry::conv2d(2, 3, 2).image(4, 4);
  const MatD uc = random_matrix(g.fan_in(), 3, 6);
  hra::HraConv2dd conv(g, random_matrix(3, g.fan_in(), 7), HraOptions::given(uc));
  CHECK(conv.adapter().chain().reflectors() == uc);
  hra::HraLineard two(w, random_init(2));
  two.add_adapter("b", HraOptions::given(random_matrix(din, 3, 8)));
  CHECK(two.adapter("b").chain().reflectors() == random_matrix(din, 3, 8));
  // The chain itself has no U to take.
  expect_error<std::invalid_argument>(
      [] { hra::ReflectorChain<double>::initialized(4, 2, Init::given, 0); }, {"Init::given"});
}

TEST_CASE("Surface: set_reflectors(U) sets the default adapter", "[surface][hra]") {
  const MatD w = random_matrix(4, 6, 1), u = random_matrix(6, 2, 2), x = random_matrix(6, 3, 3);
  hra::HraLineard a(w, random_init(2)), b(w, random_init(2));
  a.add_adapter("other", random_init(2));
  b.add_adapter("other", random_init(2));
  a.set_reflectors(u);
  b.set_reflectors("default", u);
  CHECK(a.adapter("default").chain().reflectors() == u);
  CHECK_FALSE(a.adapter("other").chain().reflectors() == u);
  CHECK(a.forward(x) == b.forward(x));
}

TEST_CASE("Surface: LoRA's A or B alone, and its parameter names", "[surface][lora]") {
  const MatD w = random_matrix(5, 6, 1), x = random_matrix(6, 3, 2);
  LoraOptions o;
  o.rank = 2;
  hra::LoraLineard lora(w, o);
  const MatD a0 = lora.lora_a(), b = random_matrix(5, 2, 3), a = random_matrix(2, 6, 4);
  lora.set_lora_b(b);
  CHECK(lora.lora_a() == a0);
  CHECK(lora.lora_b() == b);
  lora.set_lora_a(a);
  CHECK(lora.lora_a() == a);
  CHECK(lora.lora_b() == b);
  // Its own buffers passed back in.
  lora.set_lora_a(lora.lora_a());
  lora.set_lora_b(lora.lora_b());
  CHECK(lora.lora_a() == a);
  CHECK(lora.lora_b() == b);
  const MatD expected = w * x + (o.alpha / double(o.rank)) * b * a * x;
  CHECK((lora.forward(x) - expected).cwiseAbs().maxCoeff() < 1e-12);
  // Bad shapes and values: refused, nothing changed.
  expect_error<std::invalid_argument>([&] { lora.set_lora_b(random_matrix(5, 3, 5)); },
                                      {"set_lora_weights B"});
  MatD nan = a;
  nan(1, 2) = std::numeric_limits<double>::quiet_NaN();
  expect_error<std::invalid_argument>([&] { lora.set_lora_a(nan); }, {"set_lora_weights A"});
  CHECK(lora.lora_a() == a);
  CHECK(lora.lora_b() == b);
  std::vector<std::string> names;
  for (const auto& p : lora.parameters()) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"lora_A.default", "lora_B.default"});
  CHECK(std::string(hra::LoraLineard::adapter_name()) == "default");
  lora.merge();
  expect_error<std::logic_error>([&] { lora.set_lora_b(b); }, {"merged"});
}

TEST_CASE("Surface: gradient(name) is the gradient backward() wrote, for every layer kind",
          "[surface][gradients]") {
  const MatD x = random_matrix(6, 3, 1), dy = random_matrix(4, 3, 2);
  const MatD w = random_matrix(4, 6, 3);
  const Eigen::VectorXd bias = random_matrix(4, 1, 4);

  hra::HraLineard h(hra::WeightMatrix<double>::owned(w), bias, random_init(2), hra::BiasMode::all);
  h.forward(x);
  h.backward(dy);
  CHECK(MatD(h.gradient("hra_u.default")) == h.adapter().gradient());
  // db = dY 1: the expected value does not come from the layer.
  CHECK((MatD(h.gradient("bias")) - dy.rowwise().sum()).cwiseAbs().maxCoeff() < 1e-14);

  LoraOptions lo;
  lo.rank = 2;
  hra::LoraLineard l(w, lo);
  l.set_lora_b(random_matrix(4, 2, 5));
  l.forward(x);
  l.backward(dy);
  // dB = s dY (A x)^T, dA = s B^T dY x^T.
  const double s = lo.alpha / double(lo.rank);
  const MatD db = s * dy * (l.lora_a() * x).transpose();
  const MatD da = s * l.lora_b().transpose() * dy * x.transpose();
  CHECK((MatD(l.gradient("lora_B.default")) - db).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((MatD(l.gradient("lora_A.default")) - da).cwiseAbs().maxCoeff() < 1e-12);

  hra::Lineard dense(hra::WeightMatrix<double>::owned(w), std::nullopt);
  dense.forward(x);
  dense.backward(dy);
  CHECK((MatD(dense.gradient("weight")) - dy * x.transpose()).cwiseAbs().maxCoeff() < 1e-12);

  // parameter(name) gives the value view too, writable like parameters()'s.
  h.parameter("hra_u.default").value(0, 0) = 0.25;
  CHECK(h.adapter().chain().reflectors()(0, 0) == 0.25);

  expect_error<std::invalid_argument>(
      [&] { (void)h.gradient("lora_A.default"); },
      {"no trainable parameter named 'lora_A.default'", "hra_u.default, bias"});
  expect_error<std::invalid_argument>([&] { (void)l.gradient("lora_A"); },
                                      {"'lora_A'", "lora_A.default, lora_B.default"});
}

TEST_CASE("Surface: MergeCheck names what the old bool said", "[surface][merge]") {
  const MatD w = random_matrix(4, 6, 1), x = random_matrix(6, 3, 2);
  for (const MergeCheck check : {MergeCheck::in_place, MergeCheck::safe}) {
    hra::HraLineard h(w, random_init(2));
    const MatD before = predicted(h, x);
    h.merge(check);
    CHECK(h.merged());
    CHECK((predicted(h, x) - before).cwiseAbs().maxCoeff() < 1e-12);
    h.unmerge();
    h.merge({"default"}, check);
    CHECK(h.merged());
  }
  // safe: a merged weight that overflows is refused and W is untouched.
  // Rows of equal 1e308 entries: an H that mixes the columns sums them past the double range.
  hra::HraLineard big(MatD::Constant(4, 6, 1e308), random_init(2));
  const MatD w_big = big.weight();
  expect_error<std::runtime_error>([&] { big.merge(MergeCheck::safe); }, {"non-finite"});
  CHECK(MatD(big.weight()) == w_big);
  CHECK_FALSE(big.merged());
}

TEST_CASE("Surface: one form vocabulary; a layer refuses the forms it has not",
          "[surface][forms]") {
  CHECK(std::string(hra::to_string(HraForm::low_rank)) == "low_rank");
  CHECK(std::string(hra::to_string(HraForm::hybrid)) == "hybrid");
  hra::HraLineard lin(random_matrix(4, 6, 1), random_init(2));
  for (const HraForm f : {HraForm::automatic, HraForm::chain, HraForm::low_rank}) {
    lin.set_form(f);
    CHECK(lin.form() == f);
  }
  for (const HraForm f : {HraForm::weight, HraForm::hybrid})
    expect_error<std::invalid_argument>([&] { lin.set_form(f); },
                                        {"HraLinear::set_form", "no ", hra::to_string(f)});
  CHECK(lin.form() == HraForm::low_rank);  // unchanged by the refusals

  const Conv2dGeometry g = Conv2dGeometry::conv2d(2, 3, 3).image(5, 5).padding(1);
  hra::HraConv2dd conv(g, random_matrix(3, g.fan_in(), 2), random_init(2));
  const MatD x = random_matrix(g.input_size(), 2, 3);
  MatD y_low, y_hybrid;
  conv.set_form(HraForm::low_rank);
  y_low = conv.forward(x);
  CHECK(conv.last_form() == HraForm::low_rank);
  conv.set_form(HraForm::hybrid);
  y_hybrid = conv.forward(x);
  CHECK((y_low - y_hybrid).cwiseAbs().maxCoeff() < 1e-12);
  expect_error<std::invalid_argument>([&] { conv.set_form(HraForm::chain); },
                                      {"HraConv2d::set_form", "no chain form"});
  CHECK(conv.form() == HraForm::hybrid);
}

TEST_CASE("Surface: Conv2dGeometry in nn.Conv2d's order, padding in F.pad's", "[surface][conv]") {
  // nn.Conv2d(4, 6, (3, 2)) on 9 x 8 images == the image-first constructor.
  CHECK(Conv2dGeometry::conv2d(4, 6, 3, 2).image(9, 8) == Conv2dGeometry(4, 9, 8, 6, 3, 2));
  CHECK(Conv2dGeometry::conv2d(3, 5, 3).image(7, 7) == Conv2dGeometry(3, 7, 7, 5, 3, 3));
  // F.pad(x, (left=1, right=2, top=3, bottom=4)).
  const Conv2dGeometry p = Conv2dGeometry::conv2d(1, 1, 3).image(6, 6).pad(1, 2, 3, 4);
  CHECK(p.pad_left() == 1);
  CHECK(p.pad_right() == 2);
  CHECK(p.pad_top() == 3);
  CHECK(p.pad_bottom() == 4);
  CHECK(p.out_height() == 6 + 3 + 4 - 2);
  CHECK(p.out_width() == 6 + 1 + 2 - 2);
  // padding(ph, pw) is nn.Conv2d's (rows above and below, columns left and right).
  const Conv2dGeometry q = Conv2dGeometry::conv2d(1, 1, 3).image(6, 6).padding(2, 1);
  CHECK(q == Conv2dGeometry::conv2d(1, 1, 3).image(6, 6).pad(1, 1, 2, 2));
  // Without an image size: a clear refusal from every layer.
  const Conv2dGeometry no_image = Conv2dGeometry::conv2d(2, 3, 3);
  expect_error<std::invalid_argument>([&] { hra::Conv2dd c(no_image, random_matrix(3, 18, 1)); },
                                      {"Conv2d", "image size is not set", ".image(H, W)"});
}

TEST_CASE("Surface: conv_geometry() tells convolutions from dense layers without a cast",
          "[surface][conv]") {
  const Conv2dGeometry g = Conv2dGeometry::conv2d(2, 3, 3).image(5, 5);
  const MatD wc = random_matrix(3, g.fan_in(), 1);
  LoraOptions lo;
  lo.rank = 2;
  hra::Conv2dd c(g, wc);
  hra::HraConv2dd hc(g, wc, random_init(2));
  hra::LoraConv2dd lc(g, wc, lo);
  for (const hra::Layer<double>* l : std::vector<const hra::Layer<double>*>{&c, &hc, &lc}) {
    REQUIRE(l->conv_geometry() != nullptr);
    CHECK(*l->conv_geometry() == g);
  }
  hra::HraLineard h(random_matrix(3, 4, 2), random_init(2));
  hra::LoraLineard l(random_matrix(3, 4, 2), lo);
  hra::Lineard d(hra::WeightMatrix<double>::owned(random_matrix(3, 4, 2)), std::nullopt);
  CHECK(h.conv_geometry() == nullptr);
  CHECK(l.conv_geometry() == nullptr);
  CHECK(d.conv_geometry() == nullptr);
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
TEST_CASE("Surface: the spellings of one release ago still do what they did",
          "[surface][deprecated]") {
  const MatD w = random_matrix(4, 6, 1), x = random_matrix(6, 3, 2);
  hra::HraLineard a(w, random_init(2)), b(w, random_init(2));
  a.merge(true);
  b.merge(MergeCheck::safe);
  CHECK(MatD(a.weight()) == MatD(b.weight()));
  a.unmerge();
  a.merge({"default"}, false);
  CHECK(a.merged());

  CHECK(hra::HraConvForm::patch == HraForm::low_rank);
  CHECK(hra::HraLinearForm::low_rank == HraForm::low_rank);
  CHECK(Conv2dGeometry(1, 6, 6, 1, 3, 3).padding(3, 4, 1, 2) ==
        Conv2dGeometry(1, 6, 6, 1, 3, 3).pad(1, 2, 3, 4));

  const Conv2dGeometry g = Conv2dGeometry::conv2d(2, 3, 3).image(5, 5);
  hra::Conv2dd c(g, random_matrix(3, g.fan_in(), 3));
  c.set_threads(2);
  CHECK(c.batch_chunks() == 2);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
