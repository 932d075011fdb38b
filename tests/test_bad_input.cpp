// Bad input the conv layers, the adapter control and the exports must survive (issue #26): conv
// geometry whose sizes overflow a 64-bit index, conv layers given their own buffers (forward of
// its own output, predict(m, m), backward of its own dX, in every form), a LoRA merge whose
// finite factors overflow, an empty adapter name, a float U the layer cannot use, and strings
// that are not UTF-8 in a saved config. Each case gets a clear exception of the library's own
// kind with nothing changed, or the correct result.
#include <hra/hra.hpp>
#include <hra/io.hpp>

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace {

using hra::Conv2dGeometry;
using hra_test::expect_error;
using hra_test::Index;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::rel_err;
constexpr Index kMax = std::numeric_limits<Index>::max();

// --- Conv geometry ------------------------------------------------------------------------------

/// Every layer kind's constructor with `g` and a 1 x 1 weight: the geometry is validated before
/// the weight is looked at, so each must throw the geometry's error.
void expect_refused(const Conv2dGeometry& g, const std::string& part) {
  INFO("geometry: " << g.describe());
  const MatD w = MatD::Zero(1, 1);
  expect_error<std::invalid_argument>([&] { hra::Conv2dd layer(g, w); }, {"Conv2d: ", part});
  hra::HraOptions ho;
  ho.rank = 1;
  ho.init = hra::Init::random;
  expect_error<std::invalid_argument>([&] { hra::HraConv2dd layer(g, w, ho); },
                                      {"HraConv2d: ", part});
  hra::LoraOptions lo;
  lo.rank = 1;
  expect_error<std::invalid_argument>([&] { hra::LoraConv2dd layer(g, w, lo); },
                                      {"LoraConv2d: ", part});
}

TEST_CASE("bad input: conv geometries whose sizes overflow are refused by every layer",
          "[bad_input][conv]") {
  const Index big = Index(1) << 62, two32 = Index(1) << 32;
  expect_refused(Conv2dGeometry(1, 5, 5, 1, 3, 3).dilation(kMax / 2 + 1, 1),
                 "dilation_h (kernel_h - 1) = ");
  expect_refused(Conv2dGeometry(1, 5, 5, 1, 1, 3).dilation(1, big), "dilation_w (kernel_w - 1)");
  expect_refused(Conv2dGeometry(1, 5, 5, 1, 3, 3).pad(0, 0, kMax, 0), "H + top = ");
  expect_refused(Conv2dGeometry(1, 5, 5, 1, 3, 3).pad(0, 0, big, big),
                 "the padded height H + top + bottom");
  expect_refused(Conv2dGeometry(1, 5, 5, 1, 3, 3).pad(big, big, 0, 0),
                 "the padded width W + left + right");
  expect_refused(Conv2dGeometry(1, two32, two32, 1, 1, 1), "C_in H W = ");
  expect_refused(Conv2dGeometry(2, big, 4, 1, 1, 1), "C_in H = ");
  expect_refused(Conv2dGeometry(1, 5, 5, 1, two32, two32), "the taps kernel_h kernel_w");
  expect_refused(Conv2dGeometry(big, 1, 1, 4, 1, 1), "the weight C_out D");
  expect_refused(Conv2dGeometry(1, 1, 1, 4, 1, 1).pad(two32, two32, two32, two32),
                 "L = H_out W_out");
  expect_refused(Conv2dGeometry(1, two32, two32 / 4, 8, 1, 1), "C_out H_out W_out");
  // Messages describe such a geometry without computing its output size.
  CHECK_THAT(Conv2dGeometry(1, 5, 5, 1, 3, 3).pad(0, 0, big, big).describe(),
             Catch::Contains("-> C_out=1 (too large), kernel 3x3"));
  // Large strides and dilations that stay in range are fine: nothing is computed unchecked.
  const Conv2dGeometry fine = Conv2dGeometry(1, 5, 5, 1, 2, 2).stride(kMax, kMax);
  REQUIRE_NOTHROW(fine.validate("test"));
  CHECK(fine.out_positions() == 1);
}

// Geometries from fuzzed integers (fixed seed): validate() either throws std::invalid_argument
// or accepts a geometry whose every derived size, recomputed in 128-bit integers, is what the
// accessors return. Run under UBSan in CI, any unchecked signed overflow fails the test.
TEST_CASE("bad input: fuzzed conv geometries validate or throw, never overflow",
          "[bad_input][conv]") {
  const Index values[] = {
      -1,       0,        1,   2, 3, 7, 64, Index(1) << 31, Index(1) << 32, Index(1) << 62,
      kMax / 3, kMax - 1, kMax};
  std::mt19937_64 gen(26);
  const auto draw = [&] { return values[gen() % (sizeof values / sizeof values[0])]; };
  int accepted = 0, refused = 0;
  for (int round = 0; round < 4000; ++round) {
    // Mostly small valid values (sizes 1..4, paddings 0..3), one in 16 drawn from the extremes:
    // both outcomes stay common.
    const auto size = [&] { return gen() % 16 == 0 ? draw() : 1 + static_cast<Index>(gen() % 4); };
    const auto pad = [&] { return gen() % 16 == 0 ? draw() : static_cast<Index>(gen() % 4); };
    Conv2dGeometry g(size(), size(), size(), size(), size(), size());
    g.stride(size(), size()).pad(pad(), pad(), pad(), pad()).dilation(size(), size());
    g.groups(gen() % 16 == 0 ? draw() : 1 + static_cast<Index>(gen() % 2));
    try {
      g.validate("fuzz");
    } catch (const std::invalid_argument&) {
      ++refused;
      continue;
    }
    ++accepted;
    __extension__ typedef __int128 Wide;  // GCC and clang; -Wpedantic wants the marker
    const Wide eh = Wide(g.dilation_h()) * (g.kernel_h() - 1) + 1;
    const Wide ph = Wide(g.height()) + g.pad_top() + g.pad_bottom();
    const Wide ew = Wide(g.dilation_w()) * (g.kernel_w() - 1) + 1;
    const Wide pw = Wide(g.width()) + g.pad_left() + g.pad_right();
    const Wide oh = (ph - eh) / g.stride_h() + 1, ow = (pw - ew) / g.stride_w() + 1;
    CHECK(Wide(g.out_positions()) == oh * ow);
    CHECK(Wide(g.output_size()) == oh * ow * g.out_channels());
    CHECK(Wide(g.input_size()) == Wide(g.in_channels()) * g.height() * g.width());
    CHECK(Wide(g.fan_in()) == Wide(g.in_channels() / g.groups()) * g.kernel_h() * g.kernel_w());
  }
  INFO("accepted " << accepted << ", refused " << refused);
  CHECK(accepted > 500);
  CHECK(refused > 500);
}

// --- Conv layers given their own buffers --------------------------------------------------------

// A geometry whose output has as many rows as its input (so a layer's output can be its next
// input): 2 channels, 5 x 5, 3 x 3 kernel, padding 1.
Conv2dGeometry same_size() {
  return Conv2dGeometry(2, 5, 5, 2, 3, 3).padding(1);
}

/// One conv layer kind, built identically twice: `make()` returns a fresh layer and `name` says
/// which (the kind, its form or options).
struct ConvKind {
  std::string name;
  std::function<std::unique_ptr<hra::Layer<double>>()> make;
};

std::vector<ConvKind> conv_kinds() {
  const Conv2dGeometry g = same_size();
  const MatD w = hra_test::random_matrix(g.out_channels(), g.fan_in(), 3);
  const hra_test::VecD b = hra_test::random_vec<double>(g.out_channels(), 4);
  std::vector<ConvKind> kinds;
  for (const bool train : {false, true})
    kinds.push_back({train ? "Conv2d (trained W)" : "Conv2d (frozen W)", [=] {
                       hra::Conv2dOptions o;
                       o.train_weight = train;
                       return std::unique_ptr<hra::Layer<double>>(new hra::Conv2dd(
                           g, hra::WeightMatrix<double>::owned(w), b, o, hra::BiasMode::all));
                     }});
  for (const hra::HraForm form :
       {hra::HraForm::low_rank, hra::HraForm::weight, hra::HraForm::hybrid})
    for (const hra::Variant v : {hra::Variant::chain, hra::Variant::gram_schmidt})
      kinds.push_back(
          {std::string("HraConv2d ") + hra::to_string(form) + " " + hra::to_string(v), [=] {
             hra::HraOptions o;
             o.rank = 3;
             o.variant = v;
             o.init = hra::Init::random;
             o.seed = 5;
             auto l = std::make_unique<hra::HraConv2dd>(g, hra::WeightMatrix<double>::owned(w), b,
                                                        o, hra::BiasMode::all);
             l->set_form(form);
             return std::unique_ptr<hra::Layer<double>>(std::move(l));
           }});
  for (const double dropout : {0.0, 0.25})
    kinds.push_back({dropout > 0 ? "LoraConv2d (dropout)" : "LoraConv2d", [=] {
                       hra::LoraOptions o;
                       o.rank = 2;
                       o.dropout = dropout;
                       o.seed = 6;
                       auto l = std::make_unique<hra::LoraConv2dd>(
                           g, hra::WeightMatrix<double>::owned(w), b, o, hra::BiasMode::all);
                       // B = 0 would hide the adapter path: give it values.
                       l->set_lora_weights(l->lora_a(), hra_test::random_matrix(2, 2, 8));
                       return std::unique_ptr<hra::Layer<double>>(std::move(l));
                     }});
  return kinds;
}

/// Every gradient of `layer`, in parameters() order.
std::vector<MatD> gradients(hra::Layer<double>& layer) {
  std::vector<MatD> out;
  for (const auto& p : layer.parameters()) out.push_back(p.grad);
  return out;
}

TEST_CASE("bad input: conv layers given their own output or input gradient compute as with copies",
          "[bad_input][conv][aliasing]") {
  const Conv2dGeometry g = same_size();
  const MatD x = hra_test::random_matrix(g.input_size(), 3, 11);
  const MatD dy = hra_test::random_matrix(g.output_size(), 3, 12);
  int cases = 0;
  for (const ConvKind& kind : conv_kinds()) {
    INFO(kind.name);
    // forward(forward(x)): the argument is the layer's own output buffer.
    {
      auto a = kind.make(), b = kind.make();
      const MatD y1 = b->forward(x);
      const MatD expected = b->forward(MatD(y1));
      const MatD& own = a->forward(x);
      CHECK(rel_err(a->forward(own), expected) <= 1e-13);
      ++cases;
    }
    // predict(m, m): input and output are one matrix.
    {
      auto a = kind.make();
      MatD expected;
      a->predict(x, expected);
      MatD m = x;
      a->predict(m, m);
      CHECK(rel_err(m, expected) <= 1e-13);
      ++cases;
    }
    // backward(own dX), with and without the input gradient: dY is the layer's dX buffer.
    for (const bool want_dx : {true, false}) {
      INFO("compute_input_gradient " << want_dx);
      auto a = kind.make(), b = kind.make();
      for (auto* l : {a.get(), b.get()}) {
        l->forward(x);
        l->backward(dy);
        l->forward(x);
      }
      const MatD dx1 = b->backward(dy);  // what a's first backward left in its dX buffer
      b->forward(x);
      const MatD expected_dx = b->backward(dx1, want_dx);
      const std::vector<MatD> expected_grads = gradients(*b);
      // a: the same calls, the second backward given a's own dX buffer.
      const MatD& own_dx = a->backward(dy);
      a->forward(x);
      const MatD got_dx = a->backward(own_dx, want_dx);
      CHECK(got_dx.size() == expected_dx.size());
      if (want_dx) CHECK(rel_err(got_dx, expected_dx) <= 1e-13);
      const std::vector<MatD> got_grads = gradients(*a);
      REQUIRE(got_grads.size() == expected_grads.size());
      for (std::size_t k = 0; k < got_grads.size(); ++k)
        CHECK(rel_err(got_grads[k], expected_grads[k]) <= 1e-13);
      ++cases;
    }
  }
  CHECK(cases == 4 * 10);
}

// --- LoRA merge, adapter names ------------------------------------------------------------------

TEST_CASE("bad input: a LoRA merge whose finite factors overflow leaves W untouched",
          "[bad_input][lora]") {
  const MatD w = hra_test::random_matrix(4, 6, 1);
  hra::LoraOptions o;
  o.rank = 2;
  hra::LoraLineard dense(w, o);
  dense.set_lora_weights(MatD::Constant(2, 6, 1e200), MatD::Constant(4, 2, 1e200));
  const Conv2dGeometry g = same_size();
  const MatD wc = hra_test::random_matrix(g.out_channels(), g.fan_in(), 2);
  hra::LoraConv2dd conv(g, wc, o);
  conv.set_lora_weights(MatD::Constant(2, g.fan_in(), 1e200), MatD::Constant(2, 2, 1e200));
  for (const hra::MergeCheck safe : {hra::MergeCheck::in_place, hra::MergeCheck::safe}) {
    INFO("safe " << (safe == hra::MergeCheck::safe));
    expect_error<std::runtime_error>(
        [&] { dense.merge(safe); },
        {"LoraLinear::merge: the merged weight has non-finite values", "W is left unchanged"});
    CHECK(dense.weight() == w);
    CHECK_FALSE(dense.merged());
    expect_error<std::runtime_error>(
        [&] { conv.merge(safe); },
        {"LoraConv2d::merge: the merged weight has non-finite values", "W is left unchanged"});
    CHECK(conv.weight() == wc);
    CHECK_FALSE(conv.merged());
  }
}

TEST_CASE("bad input: an empty adapter name is refused (it names the base layer)",
          "[bad_input][adapters]") {
  hra::HraOptions o;
  o.rank = 2;
  hra::HraLineard dense(hra_test::random_matrix(4, 6, 1), o);
  const Conv2dGeometry g = same_size();
  hra::HraConv2dd conv(g, hra_test::random_matrix(g.out_channels(), g.fan_in(), 2), o);
  expect_error<std::invalid_argument>([&] { dense.add_adapter("", o); },
                                      {"HraLinear: an adapter name must not be empty"});
  expect_error<std::invalid_argument>([&] { conv.add_adapter("", o); },
                                      {"HraConv2d: an adapter name must not be empty"});
  CHECK(dense.adapters().size() == 1);
  CHECK(conv.adapters().size() == 1);
}

// --- Exports and saves --------------------------------------------------------------------------

TEST_CASE("bad input: a float U whose column's squared norm underflows is not saved or exported",
          "[bad_input][io]") {
  hra::HraOptions o;
  o.rank = 2;
  o.init = hra::Init::random;
  hra::HraLinearf layer(hra_test::random_as<float>(4, 6, 1), o);
  // An optimiser may write anything into U's memory; 1e-30 squared underflows in float (not in
  // double, where the export is computed).
  layer.parameters().front().value.col(1).setConstant(1e-30f);
  expect_error<std::invalid_argument>([&] { layer.forward(hra_test::random_as<float>(6, 2, 2)); },
                                      {"reflector column 1 is too small"});
  const hra_test::TempDir tmp("hra_test_bad_input");
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::peft::lora_export_files({{"fc", &layer}});
      },
      {"module 'fc'", "U of adapter 'default' is not usable by the layer",
       "reflector column 1 is too small"});
  expect_error<std::invalid_argument>(
      [&] {
        hra::peft::save_hra_adapters(tmp.path / "hra", {{"fc", &layer}});
      },
      {"module 'fc'", "U of adapter 'default' is not usable by the layer"});
  CHECK(tmp.entries().empty());
}

TEST_CASE("bad input: a U that F16 would round to a zero column is not saved", "[bad_input][io]") {
  hra::HraOptions o;
  o.rank = 2;
  o.init = hra::Init::random;
  hra::HraLinearf layer(hra_test::random_as<float>(4, 6, 1), o);
  // 1e-9 is usable in float (squared 1e-18) but below F16's smallest subnormal (6e-8).
  layer.parameters().front().value.col(1).setConstant(1e-9f);
  CHECK_NOTHROW(layer.forward(hra_test::random_as<float>(6, 2, 2)));
  const hra_test::TempDir tmp("hra_test_bad_input");
  hra::peft::SaveOptions f16;
  f16.dtype = hra::safetensors::Dtype::F16;
  expect_error<std::invalid_argument>(
      [&] {
        hra::peft::save_hra_adapters(tmp.path / "hra", {{"fc", &layer}}, f16);
      },
      {"module 'fc'", "U would not load back from tensor 'base_model.model.fc.hra_u'",
       "reflector column 1"});
  CHECK(tmp.entries().empty());
  // In F32 the same U saves.
  CHECK_NOTHROW(hra::peft::save_hra_adapters(tmp.path / "hra", {{"fc", &layer}}));
}

TEST_CASE("bad input: strings that are not UTF-8 in a saved config are the library's errors",
          "[bad_input][io]") {
  hra::HraOptions o;
  o.rank = 2;
  hra::HraLinearf layer(hra_test::random_as<float>(4, 6, 1), o);
  const hra_test::TempDir tmp("hra_test_bad_input");
  hra::peft::SaveOptions bad_extra;
  bad_extra.extra_config["note"] = std::string("caf\xe9");  // Latin-1, not UTF-8
  hra::peft::LoraExportOptions bad_export;
  bad_export.extra_config = bad_extra.extra_config;
  expect_error<std::invalid_argument>(
      [&] {
        hra::peft::save_hra_adapters(tmp.path / "a", {{"fc", &layer}}, bad_extra);
      },
      {"SaveOptions::extra_config \"note\" holds a string that is not valid UTF-8"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::peft::export_lora_adapters(tmp.path / "b", {{"fc", &layer}}, bad_export);
      },
      {"SaveOptions::extra_config \"note\" holds a string that is not valid UTF-8"});
  hra::peft::SaveOptions bad_base;
  bad_base.base_model_name_or_path = std::string("model-\xff");
  expect_error<std::invalid_argument>(
      [&] {
        hra::peft::save_hra_adapters(tmp.path / "c", {{"fc", &layer}}, bad_base);
      },
      {"the adapter config has a string that is not valid UTF-8"});
  CHECK(tmp.entries().empty());
}

}  // namespace
