// PEFT adapter directories of convolutions (issue #13): HraConv2d's hra_u (C_in/groups*kh*kw,
// r), LoraConv2d's lora_A (r, C_in, kh, kw) and lora_B (C_out, r, 1, 1) as PEFT's conv layers
// hold them, conv and linear layers in one directory, the export of an HRA conv as PEFT's LoRA
// conv, and the refusals: grouped LoRA convs (PEFT has no grouped form), tensors of another
// layer kind or geometry, each leaving the layers as they were.
#include <hra/io.hpp>

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cstdint>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace {

namespace peft = hra::peft;
namespace st = hra::safetensors;
using hra::BiasMode;
using hra::Conv2dGeometry;
using hra_test::expect_error;
using hra_test::MatD;
using hra_test::random_as;
using hra_test::random_matrix;
using hra_test::random_vec;
using hra_test::TempDir;
using hra_test::VecD;
using Shape = std::vector<std::int64_t>;

hra::HraOptions hra_options(Eigen::Index rank, std::uint64_t seed) {
  hra::HraOptions o;
  o.rank = rank;
  o.init = hra::Init::random;
  o.seed = seed;
  return o;
}

hra::LoraOptions lora_options(Eigen::Index rank, double alpha) {
  hra::LoraOptions o;
  o.rank = rank;
  o.alpha = alpha;
  return o;
}

// 4 -> 6 channels, 3x2 kernel, stride (2, 1), padding 1, groups 2: fan-in D = 2 * 3 * 2 = 12.
Conv2dGeometry grouped_geometry() {
  return Conv2dGeometry(4, 6, 5, 6, 3, 2).stride(2, 1).padding(1).groups(2);
}
// 3 -> 4 channels, 3x2 kernel, stride (1, 2), padding (1, 0): D = 18.
Conv2dGeometry plain_geometry() {
  return Conv2dGeometry(3, 7, 6, 4, 3, 2).stride(1, 2).padding(1, 0);
}
// The same with dilation (2, 1): HRA files hold it, PEFT's LoRA conv does not.
Conv2dGeometry dilated_geometry() {
  return plain_geometry().dilation(2, 1);
}

hra::HraConv2d<double> hra_conv(const Conv2dGeometry& g, Eigen::Index r, std::uint64_t seed) {
  return hra::HraConv2d<double>(
      g, hra::WeightMatrix<double>::owned(random_matrix(g.out_channels(), g.fan_in(), 11)),
      random_vec<double>(g.out_channels(), seed + 1), hra_options(r, seed), BiasMode::all);
}

hra::LoraConv2d<double> lora_conv(const Conv2dGeometry& g, Eigen::Index r, std::uint64_t seed) {
  hra::LoraConv2d<double> layer(
      g, hra::WeightMatrix<double>::owned(random_matrix(g.out_channels(), g.fan_in(), 11)),
      random_vec<double>(g.out_channels(), seed + 1), lora_options(r, 2.0 * static_cast<double>(r)),
      BiasMode::all);
  // A random B (PEFT's B = 0 would make every load look right) and a seeded A.
  layer.set_lora_weights(random_as<double>(r, g.fan_in(), seed + 2),
                         random_as<double>(g.out_channels(), r, seed + 3));
  return layer;
}

st::TensorFile saved_weights(const TempDir& tmp) {
  return st::load(tmp.path / peft::weights_file_name);
}

// U of the layer's adapter "default".
template <typename Layer>
MatD u_of(const Layer& layer) {
  return layer.adapters().front().chain().reflectors();
}

std::string tensor(const std::string& module, const std::string& what) {
  return std::string(peft::default_prefix) + module + "." + what;
}

}  // namespace

TEST_CASE("conv adapter files: HRA conv and linear layers share one directory, both ways",
          "[adapter_files][conv]") {
  const Conv2dGeometry g = grouped_geometry();
  auto conv = hra_conv(g, 3, 20);
  hra::HraLinear<double> fc(hra::WeightMatrix<double>::owned(random_matrix(5, 7, 12)),
                            random_vec<double>(5, 13), hra_options(3, 30), BiasMode::all);
  TempDir tmp("conv_hra_files");
  peft::save_hra_adapters(tmp.path,
                          peft::HraLayerModules<double>{{"net.conv", &conv}, {"net.fc", &fc}});

  const st::TensorFile weights = saved_weights(tmp);
  CHECK(weights.at(tensor("net.conv", "hra_u")).shape == Shape{12, 3});  // (C_in/g kh kw, r)
  CHECK(weights.at(tensor("net.conv", "base_layer.bias")).shape == Shape{6});
  CHECK(weights.at(tensor("net.fc", "hra_u")).shape == Shape{7, 3});
  CHECK(weights.get_matrix<double>(tensor("net.conv", "hra_u")) == u_of(conv));

  // Fresh layers over the same W with other U and bias receive exactly the saved ones.
  auto conv2 = hra_conv(g, 3, 40);
  hra::HraLinear<double> fc2(hra::WeightMatrix<double>::owned(random_matrix(5, 7, 12)),
                             random_vec<double>(5, 14), hra_options(3, 50), BiasMode::all);
  REQUIRE(u_of(conv2) != u_of(conv));
  peft::load_hra_adapters(tmp.path,
                          peft::HraLayerModules<double>{{"net.conv", &conv2}, {"net.fc", &fc2}});
  CHECK(u_of(conv2) == u_of(conv));
  CHECK(*conv2.bias() == *conv.bias());
  CHECK(u_of(fc2) == u_of(fc));
  const MatD x = random_matrix(g.input_size(), 3, 15);
  const MatD y = conv.forward(x);
  CHECK(conv2.forward(x) == y);

  // A map of HraConv2d alone works too (the layer type is a template parameter).
  auto conv3 = hra_conv(g, 3, 60);
  peft::load_hra_adapters(tmp.path,
                          std::map<std::string, hra::HraConv2d<double>*>{{"net.conv", &conv3}}, [] {
                            peft::LoadOptions o;
                            o.allow_unmapped_tensors = true;
                            return o;
                          }());
  CHECK(conv3.forward(x) == y);
}

TEST_CASE("conv adapter files: LoRA conv tensors have PEFT's conv shapes and round-trip",
          "[adapter_files][conv]") {
  const Conv2dGeometry g = plain_geometry();
  auto layer = lora_conv(g, 2, 70);
  TempDir tmp("conv_lora_files");
  peft::save_lora_adapters(tmp.path,
                           std::map<std::string, hra::LoraConv2d<double>*>{{"net.conv", &layer}});
  const st::TensorFile weights = saved_weights(tmp);
  const std::string name_a = tensor("net.conv", "lora_A.weight");
  const std::string name_b = tensor("net.conv", "lora_B.weight");
  REQUIRE(weights.at(name_a).shape == Shape{2, 3, 3, 2});  // nn.Conv2d(C_in, r, (3, 2)).weight
  REQUIRE(weights.at(name_b).shape == Shape{4, 2, 1, 1});  // nn.Conv2d(r, C_out, 1).weight
  // PyTorch's contiguous order: A[k, c, i, j] at ((k C_in + c) kh + i) kw + j, which is
  // column c kh kw + i kw + j of the r x D matrix.
  const std::vector<double> a = weights.get_array<double>(name_a);
  for (Eigen::Index k = 0; k < 2; ++k)
    for (Eigen::Index c = 0; c < 3; ++c)
      for (Eigen::Index i = 0; i < 3; ++i)
        for (Eigen::Index j = 0; j < 2; ++j)
          CHECK(a[static_cast<std::size_t>(((k * 3 + c) * 3 + i) * 2 + j)] ==
                layer.lora_a()(k, c * 6 + i * 2 + j));
  const std::vector<double> b = weights.get_array<double>(name_b);
  for (Eigen::Index o = 0; o < 4; ++o)
    for (Eigen::Index k = 0; k < 2; ++k)
      CHECK(b[static_cast<std::size_t>(o * 2 + k)] == layer.lora_b()(o, k));

  auto fresh = lora_conv(g, 2, 80);
  REQUIRE(fresh.lora_b() != layer.lora_b());
  peft::load_lora_adapters(tmp.path, peft::LoraLayerModules<double>{{"net.conv", &fresh}});
  CHECK(fresh.lora_a() == layer.lora_a());
  CHECK(fresh.lora_b() == layer.lora_b());
  CHECK(*fresh.bias() == *layer.bias());
  const MatD x = random_matrix(g.input_size(), 2, 16);
  CHECK(fresh.forward(x) == layer.forward(x));
}

TEST_CASE("conv adapter files: an HRA conv exports as PEFT's LoRA conv, exactly",
          "[adapter_files][conv][export]") {
  const Conv2dGeometry g = plain_geometry();
  auto conv = hra_conv(g, 2, 90);  // R = 2 + 2 <= C_out, as LoraConv2d needs
  conv.add_adapter("second", hra_options(2, 91));
  TempDir tmp("conv_export");
  const peft::LoraExport out =
      peft::export_lora_adapters(tmp.path, peft::HraLayerModules<double>{{"net.conv", &conv}});
  REQUIRE(out.report.size() == 1);
  CHECK(out.report[0].rank == 4);
  CHECK(out.report[0].input_dim == 18);
  CHECK(out.report[0].output_dim == 4);
  CHECK(out.report[0].max_weight_error < 1e-13 * out.report[0].max_weight);
  const st::TensorFile weights = saved_weights(tmp);
  CHECK(weights.at(tensor("net.conv", "lora_A.weight")).shape == Shape{4, 3, 3, 2});
  CHECK(weights.at(tensor("net.conv", "lora_B.weight")).shape == Shape{4, 4, 1, 1});

  // PEFT's LoRA conv (scale lora_alpha / r = 1) over the same W computes the HRA layer.
  hra::LoraConv2d<double> lora(
      g, hra::WeightMatrix<double>::owned(random_matrix(g.out_channels(), g.fan_in(), 11)),
      VecD::Zero(g.out_channels()), lora_options(4, 4.0), BiasMode::all);
  peft::load_lora_adapters(tmp.path, peft::LoraLayerModules<double>{{"net.conv", &lora}});
  const MatD x = random_matrix(g.input_size(), 3, 17);
  const MatD expected = conv.forward(x);
  CHECK(hra_test::rel_err(lora.forward(x), expected) < 1e-13);
}

TEST_CASE("conv adapter files: what PEFT cannot hold or the layer cannot take is refused",
          "[adapter_files][conv][errors]") {
  TempDir tmp("conv_refusals");
  // Grouped, or dilated along a kernel axis longer than 1: PEFT's LoRA conv has no such form.
  const std::vector<std::pair<Conv2dGeometry, std::vector<std::string>>> refused = {
      {grouped_geometry(), {"groups = 2"}},
      {dilated_geometry(), {"dilation (2, 1)", "kernel 3x2", "not its dilation"}}};
  SECTION(
      "a grouped or dilated LoRA conv is not saved nor exported from HRA, no directory appears") {
    for (const auto& [geometry, values] : refused) {
      INFO(values.front());
      auto lora = lora_conv(geometry, 2, 100);
      auto hra_layer = hra_conv(geometry, 3, 110);
      std::vector<std::string> save_message = {"net.conv", "no PEFT LoRA form", "save it as HRA"};
      std::vector<std::string> export_message = {"export_lora_adapters", "net.conv"};
      save_message.insert(save_message.end(), values.begin(), values.end());
      export_message.insert(export_message.end(), values.begin(), values.end());
      expect_error<std::invalid_argument>(
          [&] {
            peft::save_lora_adapters(tmp.path / "refused",
                                     peft::LoraLayerModules<double>{{"net.conv", &lora}});
          },
          save_message);
      expect_error<std::invalid_argument>(
          [&] {
            peft::export_lora_adapters(tmp.path / "refused",
                                       peft::HraLayerModules<double>{{"net.conv", &hra_layer}});
          },
          export_message);
      CHECK_FALSE(std::filesystem::exists(tmp.path / "refused"));
    }
  }
  SECTION("a dilated HRA conv saves and loads as HRA") {
    auto hra_layer = hra_conv(dilated_geometry(), 3, 104);
    peft::save_hra_adapters(tmp.path / "dilated",
                            peft::HraLayerModules<double>{{"net.conv", &hra_layer}});
    auto fresh = hra_conv(dilated_geometry(), 3, 106);
    REQUIRE(u_of(fresh) != u_of(hra_layer));
    peft::load_hra_adapters(tmp.path / "dilated",
                            peft::HraLayerModules<double>{{"net.conv", &fresh}});
    CHECK(u_of(fresh) == u_of(hra_layer));
  }
  SECTION("dilation along a 1-long kernel axis changes nothing and is not refused") {
    auto lora = lora_conv(Conv2dGeometry(3, 7, 6, 4, 3, 1).dilation(1, 3), 2, 108);
    peft::save_lora_adapters(tmp.path / "k3x1",
                             peft::LoraLayerModules<double>{{"net.conv", &lora}});
    CHECK(std::filesystem::exists(tmp.path / "k3x1" / peft::weights_file_name));
  }
  SECTION("a linear layer's LoRA tensors do not load into a conv of the same fan-in") {
    // LoraLinear 4 x 18 saves lora_A (2, 18); the conv expects (2, 3, 3, 2).
    hra::LoraLinear<double> fc(hra::WeightMatrix<double>::owned(random_matrix(4, 18, 11)),
                               random_vec<double>(4, 3), lora_options(2, 4.0), BiasMode::all);
    fc.set_lora_weights(fc.lora_a(), random_as<double>(4, 2, 5));
    peft::save_lora_adapters(tmp.path / "linear", peft::LoraModules<double>{{"net.conv", &fc}});
    auto conv = lora_conv(plain_geometry(), 2, 120);
    const MatD a = conv.lora_a(), b = conv.lora_b();
    const VecD bias = *conv.bias();
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_lora_adapters(tmp.path / "linear",
                                   peft::LoraLayerModules<double>{{"net.conv", &conv}});
        },
        {"net.conv", "lora_A.weight", "[2, 18]", "expected [2, 3, 3, 2]",
         "(r, in_channels, kh, kw)"});
    CHECK(conv.lora_a() == a);
    CHECK(conv.lora_b() == b);
    CHECK(*conv.bias() == bias);
  }
  SECTION("an HRA conv file does not load into a conv of another kernel") {
    auto saved = hra_conv(plain_geometry(), 3, 130);
    peft::save_hra_adapters(tmp.path / "k3x2", peft::HraLayerModules<double>{{"net.conv", &saved}});
    auto other = hra_conv(Conv2dGeometry(3, 7, 6, 4, 3, 3).padding(1), 3, 140);  // D = 27
    const MatD u = u_of(other);
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_hra_adapters(tmp.path / "k3x2",
                                  peft::HraLayerModules<double>{{"net.conv", &other}});
        },
        {"net.conv", "hra_u", "[18, 3]", "expected [27, 3]", "in_channels/groups*kh*kw"});
    CHECK(u_of(other) == u);
  }
  SECTION("a LoRA file does not load into a grouped or dilated LoRA conv") {
    auto plain = lora_conv(Conv2dGeometry(4, 6, 5, 6, 3, 2).padding(1), 2, 150);  // D = 24
    peft::save_lora_adapters(tmp.path / "plain",
                             peft::LoraLayerModules<double>{{"net.conv", &plain}});
    for (const auto& [geometry, refusal] : {std::pair{grouped_geometry(), "groups = 2"},
                                            std::pair{dilated_geometry(), "dilation (2, 1)"}}) {
      auto layer = lora_conv(geometry, 2, 160);
      const MatD a = layer.lora_a(), b = layer.lora_b();
      expect_error<peft::mismatch_error>(
          [&] {
            peft::load_lora_adapters(tmp.path / "plain",
                                     peft::LoraLayerModules<double>{{"net.conv", &layer}});
          },
          {"net.conv", refusal});
      CHECK(layer.lora_a() == a);
      CHECK(layer.lora_b() == b);
    }
  }
}

// --- Directories written by PyTorch --------------------------------------------------------------

namespace {

// tests/fixtures/peft_adapter/{hra,lora}_conv: scripts/make_peft_adapter_fixture.py's CNN,
// "net.conv" (3 -> 4 channels, 3x3, padding 1, on 3x5x5 images) and "net.fc" (100 -> 3).
Conv2dGeometry fixture_geometry() {
  return Conv2dGeometry(3, 5, 5, 4, 3, 3).padding(1);
}

struct ConvFixture {
  explicit ConvFixture(const std::string& name)
      : dir(std::filesystem::path(HRA_TEST_FIXTURES) / "peft_adapter" / name),
        expected(st::load(std::filesystem::path(HRA_TEST_FIXTURES) / "peft_adapter" /
                          (name + ".expected.safetensors"))) {}
  MatD get(const std::string& tensor) const { return expected.get_matrix<double>(tensor); }
  VecD bias(const std::string& module) const {
    return expected.get_vector<double>(module + ".bias");
  }
  hra::WeightMatrix<double> weight(const std::string& module) const {
    return hra::WeightMatrix<double>::owned(get(module + ".weight"));
  }
  std::filesystem::path dir;
  st::TensorFile expected;
};

// The loaded layers compute the fixture's y = fc(flatten(conv(x))) (x: one NCHW image per
// column) and, merged, its merged weights, to 1e-12 relative.
template <typename Conv, typename Fc>
void expect_pytorch_results(const ConvFixture& f, Conv& conv, Fc& fc) {
  const MatD x = f.get("x").transpose();
  const MatD y = fc.forward(conv.forward(x));
  const double err = hra_test::rel_err(y, f.get("y").transpose());
  INFO("relative error " << err);
  CHECK(err < 1e-12);
  conv.merge();
  fc.merge();
  CHECK(hra_test::rel_err(conv.weight(), f.get("net.conv.merged_weight")) < 1e-12);
  CHECK(hra_test::rel_err(fc.weight(), f.get("net.fc.merged_weight")) < 1e-12);
}

}  // namespace

TEST_CASE(
    "conv adapter files: PEFT-layout HRA and LoRA directories written by PyTorch compute "
    "PyTorch's outputs",
    "[adapter_files][conv][fixtures]") {
  const Conv2dGeometry g = fixture_geometry();
  REQUIRE(g.output_size() == 100);

  SECTION("HRA: hra_u (27, 3) of the conv, (100, 3) of the linear layer") {
    const ConvFixture f("hra_conv");
    hra::HraConv2d<double> conv(g, f.weight("net.conv"), f.bias("net.conv"), hra_options(3, 1));
    hra::HraLinear<double> fc(f.weight("net.fc"), f.bias("net.fc"), hra_options(3, 2));
    const peft::AdapterConfig config = peft::load_hra_adapters(
        f.dir, peft::HraLayerModules<double>{{"net.conv", &conv}, {"net.fc", &fc}});
    CHECK(config.r == 3);
    expect_pytorch_results(f, conv, fc);
  }
  SECTION(
      "LoRA: lora_A (2, 3, 3, 3) and lora_B (4, 2, 1, 1) of the conv, PEFT's unmerged forward") {
    const ConvFixture f("lora_conv");
    hra::LoraConv2d<double> conv(g, f.weight("net.conv"), f.bias("net.conv"), lora_options(2, 4));
    hra::LoraLinear<double> fc(f.weight("net.fc"), f.bias("net.fc"), lora_options(2, 4));
    peft::load_lora_adapters(f.dir,
                             peft::LoraLayerModules<double>{{"net.conv", &conv}, {"net.fc", &fc}});
    REQUIRE(conv.lora_b().squaredNorm() > 0);
    expect_pytorch_results(f, conv, fc);
  }
}
