// HRA adapters exported as the exact LoRA they are (hra/io/lora_export.hpp): the directory read
// back by hra's own LoRA loader computes the HRA layers' outputs, stacked adapters give one LoRA
// of the summed rank, the error report is what the stored tensors give, and every refusal. The
// fixture in tests/fixtures/lora_export/ (scripts/make_lora_export_fixture.py) applies PEFT's
// LoRA formula to an exported file in Python; here it is compared with the library's W H.
#include <hra/io.hpp>

#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace {

namespace peft = hra::peft;
namespace st = hra::safetensors;
using Eigen::Index;
using hra::BiasMode;
using hra::HraOptions;
using hra::Init;
using hra::Variant;
using hra_test::expect_error;
using hra_test::explicit_h;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::random_as;
using hra_test::rel_err;
using hra_test::to_double;
using hra_test::Vec;

HraOptions options(Index rank, Variant variant, std::uint64_t seed) {
  HraOptions o;
  o.rank = rank;
  o.variant = variant;
  o.init = Init::random;  // H != I, so an export that dropped the adapter would show
  o.seed = seed;
  return o;
}

/// Two trained layers: "net.fc1" (9 -> 7) with adapters default (chain, r = 3) and b
/// (Gram-Schmidt, r = 2) stacked, "net.fc2" (7 -> 5) with one chain adapter (r = 4).
template <typename T>
struct Model {
  hra::HraLinear<T> fc1, fc2;
  explicit Model(BiasMode bias_mode = BiasMode::all, double weight_scale = 1.0)
      : fc1(hra::WeightMatrix<T>::owned((weight_scale * random_as<double>(7, 9, 11)).cast<T>()),
            random_as<T>(7, 1, 12).col(0), options(3, Variant::chain, 13), bias_mode),
        fc2(hra::WeightMatrix<T>::owned((weight_scale * random_as<double>(5, 7, 21)).cast<T>()),
            random_as<T>(5, 1, 22).col(0), options(4, Variant::chain, 23), bias_mode) {
    fc1.add_adapter("b", options(2, Variant::gram_schmidt, 14));
  }
  peft::HraModules<T> modules() { return {{"net.fc1", &fc1}, {"net.fc2", &fc2}}; }
};

/// W H for the named adapters of `layer` (every applied one when empty), in double, from dense
/// explicit reflections.
template <typename T>
MatD dense_adapted(const hra::HraLinear<T>& layer, const std::vector<std::string>& names = {}) {
  MatD h = MatD::Identity(layer.input_dim(), layer.input_dim());
  for (const auto& a : layer.adapters()) {
    bool chosen = names.empty() ? a.active() : false;
    for (const auto& n : names) chosen = chosen || n == a.name();
    if (chosen) h = (h * explicit_h(to_double(a.chain().reflectors()), a.variant())).eval();
  }
  return to_double(layer.weight()) * h;
}

/// A LoRA layer over the HRA layer's W, scale alpha / r, ready to load an export of rank r
/// whose lora_alpha is `alpha`; its bias is the HRA layer's when frozen, zero when trainable (the
/// loaded one must replace it).
template <typename T>
hra::LoraLinear<T> lora_like(const hra::HraLinear<T>& layer, Index r, double alpha) {
  hra::LoraOptions o;
  o.rank = r;
  o.alpha = alpha;
  auto weight = hra::WeightMatrix<T>::owned(layer.weight());
  if (!layer.bias()) return hra::LoraLinear<T>(std::move(weight), std::nullopt, o);
  Vec<T> bias = *layer.bias();
  if (layer.bias_mode() != BiasMode::none) bias.setZero();
  return hra::LoraLinear<T>(std::move(weight), std::move(bias), o, layer.bias_mode());
}

/// The unit roundoff of what a dtype stores.
double unit_roundoff(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::F16:
      return 0x1p-11;
    case st::Dtype::BF16:
      return 0x1p-8;
    case st::Dtype::F32:
      return 0x1p-24;
    case st::Dtype::F64:
      return 0x1p-53;
  }
  return 1;
}

template <typename T>
std::vector<st::Dtype> dtypes() {
  if (std::is_same<T, double>::value)
    return {st::Dtype::F64, st::Dtype::F32, st::Dtype::F16, st::Dtype::BF16};
  return {st::Dtype::F32, st::Dtype::F16, st::Dtype::BF16};
}

}  // namespace

TEMPLATE_TEST_CASE("an exported LoRA reloads into LoraLinear and computes the HRA layer",
                   "[export]", float, double) {
  using T = TestType;
  Model<T> model;
  const Mat<T> x = random_as<T>(9, 6, 31);
  Mat<T> hidden, y_hra;
  model.fc1.predict(x, hidden);
  model.fc2.predict(hidden, y_hra);

  for (const st::Dtype dtype : dtypes<T>()) {
    INFO("dtype " << st::to_string(dtype));
    const hra_test::TempDir tmp("hra_test_lora_export");
    peft::LoraExportOptions o;
    o.dtype = dtype;
    const peft::LoraExport exported = peft::export_lora_adapters(tmp.path, model.modules(), o);
    // The export goes through save_adapter_files(): its atomic layout, and nothing else.
    CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());

    // Stacked adapters: one LoRA of the summed rank (3 + 2), the other module r = 4.
    REQUIRE(exported.report.size() == 2);
    CHECK(exported.report[0].module == "net.fc1");
    CHECK(exported.report[0].rank == 5);
    CHECK(exported.report[0].adapters == std::vector<std::string>{"default", "b"});
    CHECK(exported.report[1].rank == 4);
    CHECK(exported.report[0].hra_numbers() == 9u * 5u);
    CHECK(exported.report[0].lora_numbers() == 5u * (9u + 7u));

    // One lora_alpha, fc1's R = 5: fc2 (R = 4) is read with scale 5 / 4 and stores B 4 / 5.
    CHECK(exported.report[0].scale == 1.0);
    CHECK(exported.report[1].scale == 1.25);
    auto lora1 = lora_like(model.fc1, 5, 5.0);
    auto lora2 = lora_like(model.fc2, 4, 5.0);
    const peft::AdapterConfig config =
        peft::load_lora_adapters(tmp.path, {{"net.fc1", &lora1}, {"net.fc2", &lora2}});
    CHECK(config.peft_type == peft::PeftType::lora);
    CHECK(config.lora_scaling_for("net.fc1") == 1.0);
    CHECK(config.lora_scaling_for("net.fc2") == 1.25);
    CHECK(config.bias == "all");

    // The trained bias travels with the adapter.
    CHECK(hra_test::bitwise_equal(*lora1.bias(), *model.fc1.bias()) ==
          (dtype == st::natural_dtype<T>()));

    const double u = std::max(unit_roundoff(dtype), hra_test::eps<T>());
    Mat<T> y_lora;
    lora1.predict(x, hidden);
    lora2.predict(hidden, y_lora);
    const double out_err = rel_err(y_lora, y_hra);
    INFO("output rel error " << hra_test::sci(out_err));
    CHECK(out_err <= 16.0 * u);

    // The report is the error of the stored tensors: W + s B A from what the loader read,
    // against W H from dense reflections.
    for (const auto& [lora, hra_layer, entry] :
         {std::tuple{&lora1, &model.fc1, &exported.report[0]},
          std::tuple{&lora2, &model.fc2, &exported.report[1]}}) {
      const MatD stored = to_double(lora->weight()) + static_cast<double>(lora->scaling()) *
                                                          to_double(lora->lora_b()) *
                                                          to_double(lora->lora_a());
      const MatD wh = dense_adapted(*hra_layer);
      const double err = hra_test::max_abs(stored - wh);
      INFO(entry->module << ": report " << hra_test::sci(entry->max_weight_error) << ", measured "
                         << hra_test::sci(err));
      CHECK(std::abs(entry->max_weight_error - err) <= 64 * 0x1p-53 * hra_test::max_abs(wh));
      CHECK(entry->max_weight == Approx(hra_test::max_abs(wh)).epsilon(1e-12));
      CHECK(entry->max_weight_error <= 8.0 * u * entry->max_weight);
      if (dtype == st::Dtype::F16 || dtype == st::Dtype::BF16)
        CHECK(entry->max_weight_error > 0.0);  // rounding to 16 bits must show
    }
  }
}

TEST_CASE("the exported config is a LoraConfig with one lora_alpha, as llama.cpp reads it",
          "[export]") {
  Model<float> model;
  const peft::LoraExport e = peft::lora_export_files(model.modules());
  const auto& c = e.files.config;
  CHECK(c["peft_type"] == "LORA");
  CHECK(c["r"] == 5);  // ties: the first module's
  CHECK(c["lora_alpha"] == 5);
  CHECK(c["rank_pattern"] == nlohmann::json{{"net\\.fc2", 4}});
  // No alpha_pattern: llama.cpp's convert_lora_to_gguf.py takes the top-level lora_alpha for
  // every tensor and scales by lora_alpha / the tensor's rank (llama_adapter_lora_weight::
  // get_scale). What both PEFT and llama.cpp then compute, W + (5 / R) B A, is W H.
  CHECK(c["alpha_pattern"].empty());
  for (const auto& [module, layer] : model.modules()) {
    const std::string prefix = "base_model.model." + module;
    const MatD a = e.files.weights.get_matrix<double>(prefix + ".lora_A.weight");
    const MatD b = e.files.weights.get_matrix<double>(prefix + ".lora_B.weight");
    const double scale = 5.0 / static_cast<double>(a.rows());
    INFO(module << ": R = " << a.rows());
    CHECK(rel_err(to_double(layer->weight()) + scale * b * a, dense_adapted(*layer)) <= 1e-6);
  }
  CHECK(c["target_modules"] == nlohmann::json{"net.fc1", "net.fc2"});
  CHECK(c["use_rslora"] == false);
  CHECK(c["use_dora"] == false);
  CHECK(c["lora_dropout"] == 0.0);
  CHECK(c["fan_in_fan_out"] == false);
  CHECK(e.dtype == st::Dtype::F32);
  CHECK(e.files.weights.names() ==
        std::vector<std::string>{
            "base_model.model.net.fc1.base_layer.bias", "base_model.model.net.fc1.lora_A.weight",
            "base_model.model.net.fc1.lora_B.weight", "base_model.model.net.fc2.base_layer.bias",
            "base_model.model.net.fc2.lora_A.weight", "base_model.model.net.fc2.lora_B.weight"});
  CHECK(e.files.weights.at("base_model.model.net.fc1.lora_A.weight").shape ==
        std::vector<std::int64_t>{5, 9});
  CHECK(e.files.weights.at("base_model.model.net.fc1.lora_B.weight").shape ==
        std::vector<std::int64_t>{7, 5});
  CHECK(e.files.weights.metadata().at("format") == "pt");

  peft::LoraExportOptions o;
  o.base_model_name_or_path = "tiny/model";
  o.extra_config = {{"task_type", "CAUSAL_LM"}};
  o.prefix = "model.";
  const peft::LoraExport named = peft::lora_export_files(model.modules(), o);
  CHECK(named.files.config["base_model_name_or_path"] == "tiny/model");
  CHECK(named.files.config["task_type"] == "CAUSAL_LM");
  CHECK(named.files.weights.contains("model.net.fc2.lora_B.weight"));

  // Equal ranks: no patterns.
  model.fc1.delete_adapter("b");
  model.fc1.add_adapter("c", options(1, Variant::chain, 15));
  const peft::LoraExport equal = peft::lora_export_files(model.modules());
  CHECK(equal.files.config["r"] == 4);
  CHECK(equal.files.config["rank_pattern"].empty());
  CHECK(equal.files.config["alpha_pattern"].empty());
}

TEST_CASE("which adapters are exported, and which bias", "[export]") {
  Model<double> model(BiasMode::adapter_only);
  const Mat<double> x = random_as<double>(9, 4, 41);

  // Named adapters: any subset, composed in stacking order whatever the order named.
  peft::LoraExportOptions only_b;
  only_b.adapters = {"b"};
  peft::HraModules<double> fc1_only{{"net.fc1", &model.fc1}};
  const peft::LoraExport b = peft::lora_export_files(fc1_only, only_b);
  CHECK(b.report[0].rank == 2);
  const auto a_b = b.files.weights.get_matrix<double>("base_model.model.net.fc1.lora_A.weight");
  const auto b_b = b.files.weights.get_matrix<double>("base_model.model.net.fc1.lora_B.weight");
  CHECK(rel_err(to_double(model.fc1.weight()) + b_b * a_b, dense_adapted(model.fc1, {"b"})) <=
        1e-13);
  peft::LoraExportOptions reversed;
  reversed.adapters = {"b", "default"};
  const peft::LoraExport both = peft::lora_export_files(fc1_only, reversed);
  CHECK(both.report[0].adapters == std::vector<std::string>{"default", "b"});
  CHECK(both.max_relative_weight_error() <= 1e-13);

  // Default: the active adapters, i.e. what forward() applies.
  model.fc1.set_active_adapters({"default"});
  const peft::LoraExport active = peft::lora_export_files(fc1_only);
  CHECK(active.report[0].adapters == std::vector<std::string>{"default"});
  CHECK(active.report[0].rank == 3);

  // BiasMode::adapter_only is PEFT's "lora_only".
  CHECK(active.files.config["bias"] == "lora_only");
  CHECK(active.files.weights.contains("base_model.model.net.fc1.base_layer.bias"));

  // A frozen bias belongs to the base model: not written, bias "none".
  Model<double> frozen(BiasMode::none);
  const peft::LoraExport f = peft::lora_export_files(frozen.modules());
  CHECK(f.files.config["bias"] == "none");
  CHECK(f.files.weights.size() == 4);
  auto lora1 = lora_like(frozen.fc1, 5, 5.0);
  auto lora2 = lora_like(frozen.fc2, 4, 5.0);
  peft::load_lora_adapters(peft::parse_config(f.files.config_text()), f.files.weights,
                           {{"net.fc1", &lora1}, {"net.fc2", &lora2}});
  Mat<double> y_hra, y_lora;
  frozen.fc1.predict(x, y_hra);
  lora1.predict(x, y_lora);
  CHECK(rel_err(y_lora, y_hra) <= 1e-13);
}

TEST_CASE("export refuses what would not be the HRA layers' LoRA", "[export][errors]") {
  using E = std::invalid_argument;
  const hra_test::TempDir tmp("hra_test_lora_export");
  const auto no_files = [&] { CHECK(tmp.entries().empty()); };

  SECTION("a merged adapter") {
    Model<float> model;
    model.fc2.merge();
    expect_error<std::logic_error>([&] { peft::export_lora_adapters(tmp.path, model.modules()); },
                                   {"export_lora_adapters", "module 'net.fc2'", "adapter 'default'",
                                    "merged into W", "unmerge()"});
    // Even when the merged adapter is not the one asked for: W is not the base weight.
    Model<float> partly;
    partly.fc1.merge({"default"}, hra::MergeCheck::in_place);
    peft::LoraExportOptions o;
    o.adapters = {"b"};
    peft::HraModules<float> fc1{{"net.fc1", &partly.fc1}};
    expect_error<std::logic_error>([&] { peft::export_lora_adapters(tmp.path, fc1, o); },
                                   {"module 'net.fc1'", "adapter 'default'", "merged into W"});
    no_files();
  }
  SECTION("unknown, repeated or no adapters") {
    Model<float> model;
    peft::LoraExportOptions o;
    o.adapters = {"default", "nope"};
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules(), o); },
                    {"module 'net.fc1'", "no adapter 'nope'", "adapters: default, b"});
    o.adapters = {"b"};  // fc2 has only "default"
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules(), o); },
                    {"module 'net.fc2'", "no adapter 'b'", "adapters: default"});
    o.adapters = {"default", "default"};
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules(), o); },
                    {"module 'net.fc1'", "adapter 'default' is named twice"});
    model.fc2.set_adapters_enabled(false);
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules()); },
                    {"module 'net.fc2'", "no adapter to export", "adapters are disabled"});
    model.fc2.set_adapters_enabled(true);
    model.fc2.set_active_adapters({});
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules()); },
                    {"module 'net.fc2'", "no adapter to export", "none is active"});
    no_files();
  }
  SECTION("a value the dtype cannot hold") {
    // |W| ~ 1e5: B = -(W U) S^-1 is beyond F16's 65504 (fine in BF16 and F32).
    Model<float> model(BiasMode::all, 1e5);
    peft::LoraExportOptions o;
    o.dtype = st::Dtype::F16;
    hra_test::expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules(), o); },
                              {"export_lora_adapters", "module 'net.fc1'",
                               "tensor 'base_model.model.net.fc1.lora_B.weight' entry [",
                               "does not fit in F16", "largest finite value 65504"});
    try {
      peft::export_lora_adapters(tmp.path, model.modules(), o);
    } catch (const E& e) {
      const std::string what = e.what();
      CHECK(what.find("inf") == std::string::npos);
    }
    no_files();
    o.dtype = st::Dtype::BF16;
    CHECK(peft::lora_export_files(model.modules(), o).max_relative_weight_error() < 0x1p-6);

    // A bias beyond F16 is named too.
    Model<float> biased;
    biased.fc2.set_bias(Vec<float>::Constant(5, 1e6f));
    o.dtype = st::Dtype::F16;
    expect_error<E>(
        [&] { peft::export_lora_adapters(tmp.path, biased.modules(), o); },
        {"module 'net.fc2'", "tensor 'base_model.model.net.fc2.base_layer.bias' entry [0]", "1e+06",
         "does not fit in F16"});
    // A double layer exported as F32 overflows the same way.
    Model<double> huge(BiasMode::none, 1e300);
    peft::LoraExportOptions f32;
    f32.dtype = st::Dtype::F32;
    expect_error<E>([&] { peft::lora_export_files(huge.modules(), f32); },
                    {"module 'net.fc1'", "does not fit in F32"});
    no_files();
  }
  SECTION("the module map, the biases and the config") {
    Model<float> model;
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, peft::HraModules<float>{}); },
                    {"export_lora_adapters", "no modules to export"});
    expect_error<E>(
        [&] {
          peft::export_lora_adapters(
              tmp.path,
              {{"net.fc1", &model.fc1}, {"net.fc2", static_cast<hra::HraLinear<float>*>(nullptr)}});
        },
        {"module 'net.fc2'", "null layer"});
    hra::HraLinear<float> other(hra::WeightMatrix<float>::owned(random_as<float>(5, 7, 51)),
                                random_as<float>(5, 1, 52).col(0), options(4, Variant::chain, 53),
                                BiasMode::adapter_only);
    expect_error<E>(
        [&] {
          peft::export_lora_adapters(tmp.path, {{"net.fc1", &model.fc1}, {"net.fc2", &other}});
        },
        {"net.fc1", "net.fc2", "train their biases differently"});
    peft::LoraExportOptions o;
    o.extra_config = {{"lora_alpha", 1}};
    expect_error<E>([&] { peft::export_lora_adapters(tmp.path, model.modules(), o); },
                    {"may not set \"lora_alpha\""});
    // fc2's rank_pattern key "fc2" would also match "net.fc2", whose rank is r = 5.
    expect_error<E>(
        [&] {
          peft::export_lora_adapters(
              tmp.path, {{"a", &model.fc1}, {"fc2", &model.fc2}, {"net.fc2", &model.fc1}});
        },
        {"module 'net.fc2'", "rank_pattern"});
    no_files();
  }
}

// --- The Python fixture ------------------------------------------------------------------------
//
// tests/fixtures/lora_export/hra.safetensors (F64) holds, per module, "<module>.weight" and
// "<module>.hra_u.<adapter>" (metadata "<module>": the adapters in stacking order as
// "name:chain" / "name:gs", comma-separated); lora/ is the F64 LoRA export of those layers;
// expected.safetensors holds "<module>.lora_merged" = W + (lora_alpha / r) B A (PEFT's scale,
// with rank_pattern / alpha_pattern), "<module>.llama_cpp_merged" = W + (lora_alpha / rank) B A
// (llama.cpp's: the top-level lora_alpha, the tensor's rank), computed by
// scripts/make_lora_export_fixture.py in torch float64 from lora/, and
// "<module>.peft_hra_merged" = W @ H with PEFT's HRA get_delta_weight.

namespace {

const std::filesystem::path fixture_dir = std::filesystem::path(HRA_TEST_FIXTURES) / "lora_export";

/// The fixture's HRA layers (double), built from hra.safetensors.
struct FixtureModel {
  std::vector<std::string> names;
  std::vector<std::unique_ptr<hra::HraLinear<double>>> layers;

  explicit FixtureModel(const st::TensorFile& file) {
    for (const auto& [module, spec] : file.metadata()) {
      if (module == "format") continue;
      const MatD w = file.get_matrix<double>(module + ".weight");
      std::unique_ptr<hra::HraLinear<double>> layer;
      std::size_t start = 0;
      while (start < spec.size()) {
        std::size_t end = spec.find(',', start);
        if (end == std::string::npos) end = spec.size();
        const std::string item = spec.substr(start, end - start);
        const std::string adapter = item.substr(0, item.find(':'));
        const Variant variant =
            item.substr(item.find(':') + 1) == "gs" ? Variant::gram_schmidt : Variant::chain;
        const MatD u = file.get_matrix<double>(module + ".hra_u." + adapter);
        const HraOptions o = options(u.cols(), variant, 1);
        if (!layer) {
          REQUIRE(adapter == "default");
          layer = std::make_unique<hra::HraLinear<double>>(w, o);
        } else {
          layer->add_adapter(adapter, o);
        }
        layer->set_reflectors(adapter, u);
        start = end + 1;
      }
      names.push_back(module);
      layers.push_back(std::move(layer));
    }
  }
  peft::HraModules<double> modules() {
    peft::HraModules<double> m;
    for (std::size_t i = 0; i < names.size(); ++i) m[names[i]] = layers[i].get();
    return m;
  }
};

}  // namespace

TEST_CASE("PEFT's LoRA formula on an exported file gives the library's W H (Python fixture)",
          "[export][fixture]") {
  const st::TensorFile hra_file = st::load(fixture_dir / "hra.safetensors");
  const st::TensorFile expected = st::load(fixture_dir / "expected.safetensors");
  FixtureModel model(hra_file);
  REQUIRE(model.names.size() == 2);
  for (std::size_t i = 0; i < model.names.size(); ++i) {
    const std::string& module = model.names[i];
    hra::HraLinear<double>& layer = *model.layers[i];
    const MatD lora_merged = expected.get_matrix<double>(module + ".lora_merged");
    const MatD llama_cpp = expected.get_matrix<double>(module + ".llama_cpp_merged");
    const MatD peft_hra = expected.get_matrix<double>(module + ".peft_hra_merged");
    const MatD base = layer.weight();
    layer.merge();  // the library's W H (SPEC §7), not the export
    const MatD wh = layer.weight();
    layer.unmerge_all();
    const double vs_lora = rel_err(lora_merged, wh);
    const double vs_llama = rel_err(llama_cpp, wh);
    const double vs_peft = rel_err(peft_hra, wh);
    INFO(module << ": Python W + s B A vs library W H " << hra_test::sci(vs_lora) << " (PEFT's s), "
                << hra_test::sci(vs_llama) << " (llama.cpp's s), PEFT's dense W @ H vs library W H "
                << hra_test::sci(vs_peft));
    CHECK(vs_lora <= 1e-12);
    CHECK(vs_llama <= 1e-12);
    CHECK(vs_peft <= 1e-12);
    CHECK(rel_err(lora_merged, base) > 1e-2);  // the adapters change W: the check can fail
  }
  // The exporter still writes what the fixture was made from.
  const peft::LoraExport again = peft::lora_export_files(model.modules());
  const st::TensorFile committed = st::load(fixture_dir / "lora" / peft::weights_file_name);
  CHECK(again.files.weights.names() == committed.names());
  for (const auto& name : committed.names())
    CHECK(rel_err(again.files.weights.get_matrix<double>(name),
                  committed.get_matrix<double>(name)) <= 1e-13);
  const peft::AdapterConfig config = peft::read_config(fixture_dir / "lora");
  CHECK(config.alpha_pattern.empty());
  for (std::size_t i = 0; i < model.names.size(); ++i)
    CHECK(config.lora_scaling_for(model.names[i]) ==
          config.lora_alpha / static_cast<double>(again.report[i].rank));
}

// Run by scripts/make_lora_export_fixture.py (hidden: not part of the test run). Writes
// hra.safetensors and the F64 export lora/ into tests/fixtures/lora_export/.
TEST_CASE("write the LoRA-export fixture", "[.make_lora_export_fixture]") {
  hra::HraLinear<double> fc1(random_as<double>(6, 10, 101), options(3, Variant::chain, 1));
  fc1.set_reflectors("default", random_as<double>(10, 3, 102));
  fc1.add_adapter("b", options(2, Variant::gram_schmidt, 1));
  fc1.set_reflectors("b", random_as<double>(10, 2, 103));
  hra::HraLinear<double> fc2(random_as<double>(4, 6, 201), options(4, Variant::chain, 1));
  fc2.set_reflectors("default", random_as<double>(6, 4, 202));

  st::TensorFile hra_file;
  hra_file.metadata()["net.fc1"] = "default:chain,b:gs";
  hra_file.metadata()["net.fc2"] = "default:chain";
  hra_file.put_matrix("net.fc1.weight", fc1.weight());
  hra_file.put_matrix("net.fc1.hra_u.default", fc1.adapter("default").chain().reflectors());
  hra_file.put_matrix("net.fc1.hra_u.b", fc1.adapter("b").chain().reflectors());
  hra_file.put_matrix("net.fc2.weight", fc2.weight());
  hra_file.put_matrix("net.fc2.hra_u.default", fc2.adapter("default").chain().reflectors());
  std::filesystem::create_directories(fixture_dir);
  st::save(fixture_dir / "hra.safetensors", hra_file);
  peft::LoraExportOptions o;
  o.dtype = st::Dtype::F64;
  const peft::LoraExport e = peft::lora_export_files({{"net.fc1", &fc1}, {"net.fc2", &fc2}}, o);
  CHECK(e.max_relative_weight_error() <= 1e-14);
  // Plain files, as committed (export_lora_adapters() would write its symlinked layout).
  const std::filesystem::path lora_dir = fixture_dir / "lora";
  std::filesystem::remove_all(lora_dir);
  std::filesystem::create_directories(lora_dir);
  st::save(lora_dir / peft::weights_file_name, e.files.weights);
  std::ofstream(lora_dir / peft::config_file_name, std::ios::binary) << e.files.config_text();
}
