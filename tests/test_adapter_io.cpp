// PEFT adapter directories: round trips C++ -> files -> C++ for HRA (chain, Gram-Schmidt,
// stacked adapters) and LoRA in every dtype, agreement with the adapters written by
// scripts/make_peft_adapter_fixture.py as PEFT saves them, every rejection of a crafted file
// (by its message, with the layers checked unchanged) and saves that fail without damage.
#include <hra/io.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
namespace st = hra::safetensors;
namespace peft = hra::peft;
using Catch::Matchers::Contains;
using hra_test::abs_err;
using hra_test::expect_error;
using hra_test::Mat;
using hra_test::read_all;
using hra_test::Vec;
using hra_test::write_all;

namespace {

const std::vector<st::Dtype> all_dtypes = {st::Dtype::F16, st::Dtype::BF16, st::Dtype::F32,
                                           st::Dtype::F64};

/// Relative rounding error bound of a dtype (half a unit in the last place).
double unit_roundoff(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::F16:
      return std::ldexp(1.0, -11);
    case st::Dtype::BF16:
      return std::ldexp(1.0, -8);
    case st::Dtype::F32:
      return std::ldexp(1.0, -24);
    case st::Dtype::F64:
      return std::ldexp(1.0, -53);
  }
  return 1;
}

/// max |a - b| / max(|b|, tiny), elementwise.
template <typename A, typename B>
double max_relative_error(const A& a, const B& b) {
  const Eigen::MatrixXd da = a.template cast<double>();
  const Eigen::MatrixXd db = b.template cast<double>();
  REQUIRE(da.rows() == db.rows());
  REQUIRE(da.cols() == db.cols());
  return ((da - db).array().abs() / db.array().abs().max(1e-30)).maxCoeff();
}

/// An HRA layer d_in -> d_out with random W, random (non-symmetric) U and optionally a bias.
template <typename Scalar>
hra::HraLinear<Scalar> make_hra(Eigen::Index d_in, Eigen::Index d_out, Eigen::Index r,
                                std::uint64_t seed, hra::Variant variant = hra::Variant::chain,
                                std::optional<hra::BiasMode> bias_mode = std::nullopt) {
  hra::HraOptions o;
  o.rank = r;
  o.variant = variant;
  o.init = hra::Init::random;
  o.seed = seed;
  std::optional<Vec<Scalar>> bias;
  if (bias_mode) bias = hra_test::random_as<Scalar>(d_out, 1, seed + 7);
  return hra::HraLinear<Scalar>(
      hra::WeightMatrix<Scalar>::owned(hra_test::random_as<Scalar>(d_out, d_in, seed)), bias, o,
      bias_mode.value_or(hra::BiasMode::none));
}

/// A LoRA layer with random W, A and a non-zero B (as after training).
template <typename Scalar>
hra::LoraLinear<Scalar> make_lora(Eigen::Index d_in, Eigen::Index d_out, Eigen::Index r,
                                  double alpha, std::uint64_t seed,
                                  std::optional<hra::BiasMode> bias_mode = std::nullopt) {
  hra::LoraOptions o;
  o.rank = r;
  o.alpha = alpha;
  o.dropout = 0.05;
  o.seed = seed;
  std::optional<Vec<Scalar>> bias;
  if (bias_mode) bias = hra_test::random_as<Scalar>(d_out, 1, seed + 7);
  hra::LoraLinear<Scalar> layer(
      hra::WeightMatrix<Scalar>::owned(hra_test::random_as<Scalar>(d_out, d_in, seed)), bias, o,
      bias_mode.value_or(hra::BiasMode::none));
  layer.set_lora_weights(layer.lora_a(), hra_test::random_as<Scalar>(d_out, r, seed + 3));
  return layer;
}

/// Everything a load may change in an HRA layer, to check that a failed load changed nothing.
template <typename Scalar>
struct HraState {
  Mat<Scalar> w;
  std::optional<Vec<Scalar>> bias;
  std::vector<Mat<Scalar>> u;
  std::vector<bool> merged;
  explicit HraState(const hra::HraLinear<Scalar>& l) : w(l.weight()), bias(l.bias()) {
    for (const auto& a : l.adapters()) {
      u.push_back(a.chain().reflectors());
      merged.push_back(a.merged());
    }
  }
  bool operator==(const HraState& o) const {
    return w == o.w && bias.has_value() == o.bias.has_value() && (!bias || *bias == *o.bias) &&
           u == o.u && merged == o.merged;
  }
};

template <typename Scalar>
struct LoraState {
  Mat<Scalar> w, a, b;
  std::optional<Vec<Scalar>> bias;
  explicit LoraState(const hra::LoraLinear<Scalar>& l)
      : w(l.weight()), a(l.lora_a()), b(l.lora_b()), bias(l.bias()) {}
  bool operator==(const LoraState& o) const {
    return w == o.w && a == o.a && b == o.b && bias.has_value() == o.bias.has_value() &&
           (!bias || *bias == *o.bias);
  }
};

/// Two HRA layers as in the fixture's model ("net.fc1" 6 -> 5, "net.fc2" 5 -> 3) and helpers to
/// write a good adapter directory, corrupt it, and check a failed load left them untouched.
struct HraPair {
  hra::HraLinear<double> fc1, fc2;
  explicit HraPair(std::uint64_t seed, Eigen::Index r = 3, hra::Variant v = hra::Variant::chain,
                   std::optional<hra::BiasMode> bias = std::nullopt)
      : fc1(make_hra<double>(6, 5, r, seed, v, bias)),
        fc2(make_hra<double>(5, 3, r, seed + 100, v, bias)) {}
  peft::HraModules<double> modules() { return {{"net.fc1", &fc1}, {"net.fc2", &fc2}}; }
  std::pair<HraState<double>, HraState<double>> state() const {
    return {HraState<double>(fc1), HraState<double>(fc2)};
  }
};

/// The config and weights of `dir`, to edit and write back.
struct DirEditor {
  fs::path dir;
  nlohmann::json config;
  st::TensorFile weights;
  explicit DirEditor(fs::path d)
      : dir(std::move(d)),
        config(nlohmann::json::parse(read_all(dir / peft::config_file_name))),
        weights(st::load(dir / peft::weights_file_name)) {}
  void write() const {
    write_all(dir / peft::config_file_name, config.dump(2));
    st::save(dir / peft::weights_file_name, weights);
  }
};

/// Loading `dir` into a fresh pair must throw E with `part` in its message and change nothing.
template <typename E>
void expect_hra_load_fails(const fs::path& dir, const std::string& part,
                           const peft::LoadOptions& options = {},
                           hra::Variant variant = hra::Variant::chain, Eigen::Index r = 3,
                           std::optional<hra::BiasMode> bias = std::nullopt) {
  HraPair target(999, r, variant, bias);
  const auto before = target.state();
  expect_error<E>([&] { peft::load_hra_adapters(dir, target.modules(), options); }, {part});
  CHECK(target.state() == before);
}

/// `load(modules)` with the map {"net.fc1": &l1, "net.fc2": &l2} must throw E with `part` in its
/// message and leave both layers as they were (State: their snapshot, HraState or LoraState).
template <typename E, typename State, typename Layer, typename Load>
void expect_pair_load_fails(Layer& l1, Layer& l2, Load&& load, const std::string& part) {
  const State b1(l1), b2(l2);
  expect_error<E>(
      [&] {
        load(std::map<std::string, Layer*>{{"net.fc1", &l1}, {"net.fc2", &l2}});
      },
      {part});
  CHECK(State(l1) == b1);
  CHECK(State(l2) == b2);
}

/// Loading the HRA directory `dir` into a fresh float pair (6 -> 5 and 5 -> 3, r = 3) must throw
/// E with `part` in its message and change nothing.
template <typename E>
void expect_float_hra_load_fails(const fs::path& dir, const std::string& part) {
  auto f1 = make_hra<float>(6, 5, 3, 1);
  auto f2 = make_hra<float>(5, 3, 3, 2);
  expect_pair_load_fails<E, HraState<float>>(
      f1, f2, [&](const auto& modules) { peft::load_hra_adapters(dir, modules); }, part);
}

/// Loading the LoRA directory `dir` into a fresh pair ("net.fc1" 6 -> 5 of rank 2, "net.fc2"
/// 5 -> 3 of rank `r2`) must throw E with `part` in its message and change nothing.
template <typename E>
void expect_lora_load_fails(const fs::path& dir, const std::string& part, Eigen::Index r2 = 2) {
  auto t1 = make_lora<double>(6, 5, 2, 4.0, 11);
  auto t2 = make_lora<double>(5, 3, r2, 2.0 * static_cast<double>(r2), 12);
  expect_pair_load_fails<E, LoraState<double>>(
      t1, t2, [&](const auto& modules) { peft::load_lora_adapters(dir, modules); }, part);
}

}  // namespace

TEST_CASE("adapter_io: rank/alpha pattern keys are matched as PEFT's re.match((.*\\.)?(key)$)",
          "[adapter_io]") {
  using hra::detail::pattern_matches;
  using hra::detail::pattern_supported;
  CHECK(pattern_matches("fc1", "fc1"));
  CHECK(pattern_matches("fc1", "net.fc1"));
  CHECK(pattern_matches("net.fc1", "model.net.fc1"));
  CHECK_FALSE(pattern_matches("fc1", "net.xfc1"));  // the prefix must end with a '.'
  CHECK_FALSE(pattern_matches("fc1", "net.fc10"));  // anchored at the end
  CHECK(pattern_matches("net.fc1", "netXfc1"));     // '.' is any character, as in Python
  CHECK_FALSE(pattern_matches("net\\.fc1", "netXfc1"));
  CHECK(pattern_matches(hra::detail::escape_pattern("a.b[0]"), "a.b[0]"));
  CHECK_FALSE(pattern_matches(hra::detail::escape_pattern("a.b"), "aXb"));
  CHECK(pattern_supported("layers.0.q_proj"));
  CHECK(pattern_supported("a\\.b\\[0\\]"));
  CHECK_FALSE(pattern_supported(".*q_proj"));
  CHECK_FALSE(pattern_supported("q_proj|v_proj"));
  CHECK_FALSE(pattern_supported("\\d"));
  CHECK_FALSE(pattern_supported(""));
}

TEMPLATE_TEST_CASE("adapter_io: HRA round trip C++ -> files -> C++ in every dtype",
                   "[adapter_io][hra]", float, double) {
  using Scalar = TestType;
  for (const hra::Variant variant : {hra::Variant::chain, hra::Variant::gram_schmidt}) {
    for (const st::Dtype dtype : all_dtypes) {
      DYNAMIC_SECTION(hra::to_string(variant) << " " << st::to_string(dtype)) {
        const hra_test::TempDir tmp("hra_test_adapter_io");
        auto fc1 = make_hra<Scalar>(6, 5, 3, 11, variant);
        auto fc2 = make_hra<Scalar>(5, 3, 3, 12, variant);
        peft::SaveOptions save;
        save.dtype = dtype;
        save.base_model_name_or_path = "tiny/net";
        peft::save_hra_adapters(tmp.path, {{"net.fc1", &fc1}, {"net.fc2", &fc2}}, save);
        CHECK(hra_test::adapter_dir_entries(tmp.path) == hra_test::saved_adapter_dir());

        // What PEFT reads: its tensor names and shapes, its config fields.
        const st::TensorFile file = st::load(tmp.path / "adapter_model.safetensors");
        CHECK(file.names() == std::vector<std::string>{"base_model.model.net.fc1.hra_u",
                                                       "base_model.model.net.fc2.hra_u"});
        CHECK(file.at("base_model.model.net.fc1.hra_u").shape == std::vector<std::int64_t>{6, 3});
        CHECK(file.at("base_model.model.net.fc2.hra_u").shape == std::vector<std::int64_t>{5, 3});
        CHECK(file.at("base_model.model.net.fc1.hra_u").dtype == dtype);
        CHECK(file.metadata().at("format") == "pt");
        const auto config = nlohmann::json::parse(read_all(tmp.path / "adapter_config.json"));
        CHECK(config["peft_type"] == "HRA");
        CHECK(config["r"] == 3);
        CHECK(config["apply_GS"] == (variant == hra::Variant::gram_schmidt));
        CHECK(config["bias"] == "none");
        CHECK(config["init_weights"] == false);
        CHECK(config["inference_mode"] == true);
        CHECK(config["base_model_name_or_path"] == "tiny/net");
        CHECK(config["target_modules"] == nlohmann::json::array({"net.fc1", "net.fc2"}));
        for (const char* key : {"auto_mapping", "revision", "task_type", "modules_to_save",
                                "layers_to_transform", "layers_pattern", "exclude_modules"}) {
          INFO(key);
          CHECK(config.contains(key));
        }

        // Same W, another U: only the load can make them equal.
        auto back1 = make_hra<Scalar>(6, 5, 3, 11, variant);
        auto back2 = make_hra<Scalar>(5, 3, 3, 12, variant);
        back1.set_reflectors("default", Scalar(-2) * back1.adapter().chain().reflectors());
        back2.set_reflectors("default", Scalar(-2) * back2.adapter().chain().reflectors());
        const peft::AdapterConfig loaded =
            peft::load_hra_adapters(tmp.path, {{"net.fc1", &back1}, {"net.fc2", &back2}});
        CHECK(loaded.r == 3);
        CHECK(loaded.apply_gs == (variant == hra::Variant::gram_schmidt));
        CHECK(loaded.json["base_model_name_or_path"] == "tiny/net");
        // Float data through F64 and F32, double data through F64, come back exactly.
        const double tol =
            std::max(unit_roundoff(dtype), unit_roundoff(st::natural_dtype<Scalar>()));
        const bool exact = dtype == st::Dtype::F64 || dtype == st::natural_dtype<Scalar>();
        const double e1 = max_relative_error(back1.adapter().chain().reflectors(),
                                             fc1.adapter().chain().reflectors());
        const double e2 = max_relative_error(back2.adapter().chain().reflectors(),
                                             fc2.adapter().chain().reflectors());
        if (exact) {
          CHECK(e1 == 0.0);
          CHECK(e2 == 0.0);
        } else {
          CHECK(e1 <= tol);
          CHECK(e2 <= tol);
          CHECK(e1 > 0.0);  // the rounding happened: the dtype really was used
        }
        // The adapted functions agree: merge both and compare the weights.
        back1.merge();
        fc1.merge();
        CHECK(abs_err(back1.weight(), fc1.weight()) <= 200 * tol);
      }
    }
  }
}

TEST_CASE("adapter_io: stacked adapters are saved and loaded by name", "[adapter_io][hra]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  auto source = make_hra<double>(6, 5, 2, 1);
  hra::HraOptions second;
  second.rank = 4;
  second.init = hra::Init::random;
  second.seed = 77;
  source.add_adapter("second", second);
  peft::SaveOptions save;
  save.adapter_name = "second";
  peft::save_hra_adapters(tmp.path, {{"net.fc1", &source}}, save);
  CHECK(peft::read_config(tmp.path).r == 4);

  auto target = make_hra<double>(6, 5, 2, 5);
  second.seed = 78;
  target.add_adapter("second", second);
  const Eigen::MatrixXd default_before = target.adapter("default").chain().reflectors();
  peft::LoadOptions load;
  load.adapter_name = "second";
  peft::load_hra_adapters(tmp.path, {{"net.fc1", &target}}, load);
  CHECK(target.adapter("second").chain().reflectors() ==
        source.adapter("second").chain().reflectors());
  CHECK(target.adapter("default").chain().reflectors() == default_before);

  SECTION("the default adapter has another rank") {
    const HraState<double> before(target);
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_hra_adapters(tmp.path, {{"net.fc1", &target}});
        },
        {"module 'net.fc1': the config has r = 4, the layer's adapter 'default' has rank 2"});
    CHECK(HraState<double>(target) == before);
  }
  SECTION("an adapter name the layer does not have") {
    load.adapter_name = "third";
    const HraState<double> before(target);
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_hra_adapters(tmp.path, {{"net.fc1", &target}}, load);
        },
        {"the layer has no adapter 'third'"});
    CHECK(HraState<double>(target) == before);
    save.adapter_name = "third";
    expect_error<std::invalid_argument>(
        [&] {
          peft::save_hra_adapters(tmp.path, {{"net.fc1", &source}}, save);
        },
        {"has no adapter 'third'"});
  }
  SECTION("a merged adapter") {
    target.merge();
    const HraState<double> before(target);
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_hra_adapters(tmp.path, {{"net.fc1", &target}}, load);
        },
        {"adapter 'second' is merged into W; unmerge() it"});
    CHECK(HraState<double>(target) == before);
  }
}

TEMPLATE_TEST_CASE("adapter_io: LoRA round trip C++ -> files -> C++ in every dtype",
                   "[adapter_io][lora]", float, double) {
  using Scalar = TestType;
  for (const st::Dtype dtype : all_dtypes) {
    DYNAMIC_SECTION(st::to_string(dtype)) {
      const hra_test::TempDir tmp("hra_test_adapter_io");
      // Different ranks and alphas: rank_pattern / alpha_pattern carry the second module's.
      auto fc1 = make_lora<Scalar>(6, 5, 2, 4.0, 31, hra::BiasMode::all);
      auto fc2 = make_lora<Scalar>(5, 3, 3, 1.5, 32, hra::BiasMode::all);
      peft::SaveOptions save;
      save.dtype = dtype;
      save.extra_config["task_type"] = "CAUSAL_LM";
      peft::save_lora_adapters(tmp.path, {{"net.fc1", &fc1}, {"net.fc2", &fc2}}, save);

      const st::TensorFile file = st::load(tmp.path / "adapter_model.safetensors");
      CHECK(file.names() == std::vector<std::string>{"base_model.model.net.fc1.base_layer.bias",
                                                     "base_model.model.net.fc1.lora_A.weight",
                                                     "base_model.model.net.fc1.lora_B.weight",
                                                     "base_model.model.net.fc2.base_layer.bias",
                                                     "base_model.model.net.fc2.lora_A.weight",
                                                     "base_model.model.net.fc2.lora_B.weight"});
      CHECK(file.at("base_model.model.net.fc1.lora_A.weight").shape ==
            std::vector<std::int64_t>{2, 6});
      CHECK(file.at("base_model.model.net.fc1.lora_B.weight").shape ==
            std::vector<std::int64_t>{5, 2});
      CHECK(file.at("base_model.model.net.fc2.base_layer.bias").shape ==
            std::vector<std::int64_t>{3});
      const auto config = nlohmann::json::parse(read_all(tmp.path / "adapter_config.json"));
      CHECK(config["peft_type"] == "LORA");
      CHECK(config["r"] == 2);
      CHECK(config["lora_alpha"] == 4);
      CHECK(config["lora_alpha"].is_number_integer());  // as Python writes an int
      CHECK(config["rank_pattern"] == nlohmann::json{{"net\\.fc2", 3}});
      CHECK(config["alpha_pattern"] == nlohmann::json{{"net\\.fc2", 1.5}});
      CHECK(config["bias"] == "all");
      CHECK(config["use_rslora"] == false);
      CHECK(config["fan_in_fan_out"] == false);
      CHECK(config["task_type"] == "CAUSAL_LM");
      CHECK(config["lora_dropout"].get<double>() == Approx(0.05));

      auto back1 = make_lora<Scalar>(6, 5, 2, 4.0, 41, hra::BiasMode::all);
      auto back2 = make_lora<Scalar>(5, 3, 3, 1.5, 42, hra::BiasMode::all);
      const peft::AdapterConfig loaded =
          peft::load_lora_adapters(tmp.path, {{"net.fc1", &back1}, {"net.fc2", &back2}});
      CHECK(loaded.rank_for("net.fc2") == 3);
      CHECK(loaded.lora_scaling_for("net.fc2") == Approx(0.5));
      const double tol = std::max(unit_roundoff(dtype), unit_roundoff(st::natural_dtype<Scalar>()));
      CHECK(max_relative_error(back1.lora_a(), fc1.lora_a()) <= tol);
      CHECK(max_relative_error(back1.lora_b(), fc1.lora_b()) <= tol);
      CHECK(max_relative_error(back2.lora_a(), fc2.lora_a()) <= tol);
      CHECK(max_relative_error(back2.lora_b(), fc2.lora_b()) <= tol);
      CHECK(max_relative_error(*back2.bias(), *fc2.bias()) <= tol);
      if (dtype == st::Dtype::F64 || dtype == st::natural_dtype<Scalar>()) {
        CHECK(back1.lora_a() == fc1.lora_a());
        CHECK(*back1.bias() == *fc1.bias());
      }
    }
  }
}

TEST_CASE("adapter_io: LoRA scaling (use_rslora, lora_alpha) must match the layer or rescale B",
          "[adapter_io][lora]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  auto source = make_lora<double>(6, 5, 4, 8.0, 1);
  peft::save_lora_adapters(tmp.path, {{"net.fc1", &source}});
  DirEditor edit(tmp.path);
  edit.config["use_rslora"] = true;  // scaling 8 / sqrt(4) = 4 instead of 8 / 4 = 2
  edit.write();

  auto target = make_lora<double>(6, 5, 4, 8.0, 2);
  const LoraState<double> before(target);
  expect_error<peft::mismatch_error>(
      [&] {
        peft::load_lora_adapters(tmp.path, {{"net.fc1", &target}});
      },
      {"module 'net.fc1': the config's scaling is 4 (lora_alpha 8 / sqrt(r)), the layer's is 2 "
       "(alpha 8 / r)"});
  CHECK(LoraState<double>(target) == before);

  peft::LoadOptions rescale;
  rescale.rescale_lora_b = true;
  peft::load_lora_adapters(tmp.path, {{"net.fc1", &target}}, rescale);
  CHECK(target.lora_a() == source.lora_a());
  CHECK(max_relative_error(target.lora_b(), (2.0 * source.lora_b()).eval()) < 1e-15);

  // A layer built with alpha = 16 has scaling 16 / 4 = 4: the file loads as it is.
  auto matching = make_lora<double>(6, 5, 4, 16.0, 3);
  peft::load_lora_adapters(tmp.path, {{"net.fc1", &matching}});
  CHECK(matching.lora_b() == source.lora_b());
}

namespace {

template <typename Scalar>
struct FixtureModel {
  st::TensorFile expected;
  std::vector<std::string> names{"net.fc1", "net.fc2"};
  explicit FixtureModel(const std::string& name)
      : expected(st::load(fs::path(HRA_TEST_FIXTURES) / "peft_adapter" /
                          (name + ".expected.safetensors"))) {}
  Mat<Scalar> weight(const std::string& m) const {
    return expected.get_matrix<Scalar>(m + ".weight");
  }
  Vec<Scalar> bias(const std::string& m) const { return expected.get_vector<Scalar>(m + ".bias"); }
  /// y (d_out x n, one sample per column) of fc2(fc1(x)).
  template <typename Layer>
  Mat<Scalar> forward(const Layer& fc1, const Layer& fc2) const {
    const Mat<Scalar> x = expected.get_matrix<Scalar>("x").transpose();
    Mat<Scalar> h, y;
    fc1.predict(x, h);
    fc2.predict(h, y);
    return y;
  }
  Eigen::MatrixXd y() const { return expected.get_matrix<double>("y").transpose(); }
};

/// The tolerance for float32 data: inputs are float32 values, so a float layer's result is off
/// by O(1e-7) relative per operation; 1e-6 absolute on O(1) weights.
template <typename Scalar>
double fixture_tolerance() {
  return std::is_same<Scalar, float>::value ? 1e-6 : 1e-12;
}

}  // namespace

TEMPLATE_TEST_CASE("adapter_io: PEFT HRA fixtures load, merge and match PEFT's merged weight",
                   "[adapter_io][fixture]", float, double) {
  using Scalar = TestType;
  for (const std::string name : {"hra_chain", "hra_gs"}) {
    DYNAMIC_SECTION(name) {
      const bool gs = name == "hra_gs";
      const Eigen::Index r = gs ? 3 : 4;
      const hra::Variant variant = gs ? hra::Variant::gram_schmidt : hra::Variant::chain;
      const FixtureModel<Scalar> model(name);
      hra::HraOptions o;
      o.rank = r;
      o.variant = variant;
      o.init = hra::Init::random;
      hra::HraLinear<Scalar> fc1(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc1")),
                                 model.bias("net.fc1"), o);
      hra::HraLinear<Scalar> fc2(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc2")),
                                 model.bias("net.fc2"), o);
      const fs::path dir = fs::path(HRA_TEST_FIXTURES) / "peft_adapter" / name;
      const peft::AdapterConfig config =
          peft::load_hra_adapters(dir, {{"net.fc1", &fc1}, {"net.fc2", &fc2}});
      CHECK(config.r == r);
      CHECK(config.apply_gs == gs);
      CHECK(config.json["target_modules"] == nlohmann::ordered_json::array({"fc1", "fc2"}));
      CHECK(config.json["peft_version"] == "0.20.0");  // unknown fields are kept

      // Unmerged forward against PEFT's F.linear(x, W @ H, b), then the merged weights.
      const double y_error = abs_err(model.forward(fc1, fc2), model.y());
      CHECK(y_error <= 10 * fixture_tolerance<Scalar>());
      fc1.merge();
      fc2.merge();
      const double w1_error = abs_err(
          fc1.weight(), model.expected.template get_matrix<double>("net.fc1.merged_weight"));
      const double w2_error = abs_err(
          fc2.weight(), model.expected.template get_matrix<double>("net.fc2.merged_weight"));
      CHECK(w1_error <= fixture_tolerance<Scalar>());
      CHECK(w2_error <= fixture_tolerance<Scalar>());
      // Merging really changed W (the fixture's H is far from I).
      CHECK(abs_err(fc1.weight(), model.weight("net.fc1")) > 0.05);

      // Saved back from float layers, the tensors are PEFT's bytes again.
      if (std::is_same<Scalar, float>::value) {
        fc1.unmerge();
        fc2.unmerge();
        const hra_test::TempDir tmp("hra_test_adapter_io");
        peft::save_hra_adapters(tmp.path,
                                peft::HraModules<Scalar>{{"net.fc1", &fc1}, {"net.fc2", &fc2}});
        const st::TensorFile ours = st::load(tmp.path / peft::weights_file_name);
        const st::TensorFile theirs = st::load(dir / peft::weights_file_name);
        CHECK(ours.tensors() == theirs.tensors());
        CHECK(ours.metadata() == theirs.metadata());
      }
    }
  }
}

TEMPLATE_TEST_CASE("adapter_io: PEFT LoRA fixture (bias \"all\") loads and matches PEFT's merge",
                   "[adapter_io][fixture]", float, double) {
  using Scalar = TestType;
  const FixtureModel<Scalar> model("lora");
  hra::LoraOptions o;
  o.rank = 2;
  o.alpha = 4.0;
  hra::LoraLinear<Scalar> fc1(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc1")),
                              model.bias("net.fc1"), o, hra::BiasMode::all);
  hra::LoraLinear<Scalar> fc2(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc2")),
                              model.bias("net.fc2"), o, hra::BiasMode::all);
  const fs::path dir = fs::path(HRA_TEST_FIXTURES) / "peft_adapter" / "lora";
  const peft::AdapterConfig config =
      peft::load_lora_adapters(dir, {{"net.fc1", &fc1}, {"net.fc2", &fc2}});
  CHECK(config.bias == "all");
  CHECK(config.lora_dropout == Approx(0.1));
  CHECK(abs_err(*fc1.bias(), model.expected.template get_vector<double>("net.fc1.trained_bias")) ==
        0.0);
  CHECK(abs_err(model.forward(fc1, fc2), model.y()) <= 10 * fixture_tolerance<Scalar>());
  fc1.merge();
  fc2.merge();
  CHECK(abs_err(fc1.weight(), model.expected.template get_matrix<double>(
                                  "net.fc1.merged_weight")) <= fixture_tolerance<Scalar>());
  CHECK(abs_err(fc2.weight(), model.expected.template get_matrix<double>(
                                  "net.fc2.merged_weight")) <= fixture_tolerance<Scalar>());

  // Without a trainable bias the trained biases in the file are refused, nothing changes.
  hra::LoraLinear<Scalar> frozen1(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc1")),
                                  model.bias("net.fc1"), o);
  hra::LoraLinear<Scalar> frozen2(hra::WeightMatrix<Scalar>::owned(model.weight("net.fc2")),
                                  model.bias("net.fc2"), o);
  const LoraState<Scalar> before1(frozen1), before2(frozen2);
  expect_error<peft::mismatch_error>(
      [&] {
        peft::load_lora_adapters(dir, {{"net.fc1", &frozen1}, {"net.fc2", &frozen2}});
      },
      {"module 'net.fc1': tensor 'base_model.model.net.fc1.base_layer.bias' is a trained bias "
       "(config bias \"all\"), but the layer's bias is frozen"});
  CHECK(LoraState<Scalar>(frozen1) == before1);
  CHECK(LoraState<Scalar>(frozen2) == before2);
}

TEST_CASE("adapter_io: the config file is written as PEFT writes it", "[adapter_io]") {
  HraPair pair(5, 2);
  const peft::AdapterFiles files = peft::hra_adapter_files(pair.modules());
  const std::string text = files.config_text();
  // json.dumps(indent=2, sort_keys=True): sorted keys, two-space indent, ": " separators.
  CHECK_THAT(text, Contains("{\n  \"apply_GS\": false,\n  \"auto_mapping\": null,\n"));
  CHECK_THAT(text, Contains("\"target_modules\": [\n    \"net.fc1\",\n    \"net.fc2\"\n  ],"));
  CHECK(text.back() == '}');
  // Read back by the memory-level entry points, it loads.
  const peft::AdapterConfig config = peft::parse_config(text, "mem");
  HraPair target(6, 2);
  peft::load_hra_adapters(config, st::parse(st::serialize(files.weights)), target.modules());
  CHECK(target.fc2.adapter().chain().reflectors() == pair.fc2.adapter().chain().reflectors());
}

TEST_CASE("adapter_io: HRA biases are saved and loaded for trainable biases", "[adapter_io][hra]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  HraPair source(1, 2, hra::Variant::chain, hra::BiasMode::adapter_only);
  peft::save_hra_adapters(tmp.path, source.modules());
  CHECK(peft::read_config(tmp.path).bias == "hra_only");
  CHECK(st::load(tmp.path / peft::weights_file_name)
            .contains("base_model.model.net.fc2.base_layer.bias"));
  HraPair target(2, 2, hra::Variant::chain, hra::BiasMode::all);
  peft::load_hra_adapters(tmp.path, target.modules());
  CHECK(*target.fc2.bias() == *source.fc2.bias());
  // A PEFT-written HRA directory has no bias tensor (PEFT saves only "hra_" keys): the layer's
  // bias stays as it is.
  DirEditor edit(tmp.path);
  edit.weights.erase("base_model.model.net.fc1.base_layer.bias");
  edit.weights.erase("base_model.model.net.fc2.base_layer.bias");
  edit.write();
  HraPair third(3, 2, hra::Variant::chain, hra::BiasMode::all);
  const Eigen::VectorXd bias_before = *third.fc1.bias();
  peft::load_hra_adapters(tmp.path, third.modules());
  CHECK(*third.fc1.bias() == bias_before);
  CHECK(third.fc1.adapter().chain().reflectors() == source.fc1.adapter().chain().reflectors());

  HraPair mixed(4, 2, hra::Variant::chain, hra::BiasMode::all);
  hra::HraOptions o;
  o.rank = 2;
  o.init = hra::Init::random;
  hra::HraLinear<double> frozen_bias(hra::WeightMatrix<double>::owned(Eigen::MatrixXd::Ones(3, 5)),
                                     Eigen::VectorXd::Ones(3), o, hra::BiasMode::none);
  expect_error<std::invalid_argument>(
      [&] {
        peft::save_hra_adapters(tmp.path, {{"net.fc1", &mixed.fc1}, {"net.fc2", &frozen_bias}});
      },
      {"train their biases differently"});
}

TEST_CASE(
    "adapter_io: every malformed or mismatched adapter directory is refused, layers unchanged",
    "[adapter_io][reject]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  HraPair good(1);
  const fs::path dir = tmp.path / "adapter";
  peft::save_hra_adapters(dir, good.modules());
  const auto edit = [&](const std::function<void(DirEditor&)>& change) {
    DirEditor e(dir);
    change(e);
    e.write();
  };
  const std::string config_path = (dir / "adapter_config.json").string();
  const std::string weights_path = (dir / "adapter_model.safetensors").string();

  SECTION("no directory / no config file / no weights file") {
    expect_hra_load_fails<peft::io_error>(tmp.path / "nowhere",
                                          "adapter_config.json: cannot open: no such file");
    fs::remove(dir / "adapter_model.safetensors");
    expect_hra_load_fails<st::io_error>(dir, weights_path + ": cannot open: no such file");
    fs::remove(dir / "adapter_config.json");
    expect_hra_load_fails<peft::io_error>(dir, config_path + ": cannot open: no such file");
  }
  SECTION("invalid JSON config") {
    write_all(dir / "adapter_config.json", "{\"peft_type\": \"HRA\", \"r\": 3,");
    expect_hra_load_fails<peft::config_error>(dir, config_path + ": not valid JSON");
    write_all(dir / "adapter_config.json", "[\"HRA\"]");
    expect_hra_load_fails<peft::config_error>(dir, "the config is a JSON array, not an object");
    write_all(dir / "adapter_config.json",
              "{\"peft_type\": \"HRA\", \"r\": 3, \"apply_GS\": false, \"r\": 2}");
    expect_hra_load_fails<peft::config_error>(dir, "key \"r\" appears more than once");
    write_all(dir / "adapter_config.json", std::string(100, '[') + std::string(100, ']'));
    expect_hra_load_fails<peft::config_error>(dir, "JSON nests deeper than 32 levels");
  }
  SECTION("missing required fields") {
    for (const char* field : {"peft_type", "r", "apply_GS"}) {
      DYNAMIC_SECTION(field) {
        edit([&](DirEditor& e) { e.config.erase(field); });
        expect_hra_load_fails<peft::config_error>(
            dir, config_path + ": required field \"" + field + "\" is missing");
      }
    }
  }
  SECTION("fields of the wrong type or value") {
    edit([](DirEditor& e) { e.config["r"] = "three"; });
    expect_hra_load_fails<peft::config_error>(
        dir, config_path + ": field \"r\" must be a positive integer, got \"three\"");
    edit([](DirEditor& e) { e.config["r"] = 2.5; });
    expect_hra_load_fails<peft::config_error>(dir,
                                              "field \"r\" must be a positive integer, got 2.5");
    edit([](DirEditor& e) { e.config["r"] = 0; });
    expect_hra_load_fails<peft::config_error>(dir, "field \"r\" must be a positive integer, got 0");
    edit([](DirEditor& e) {
      e.config["r"] = 3;
      e.config["apply_GS"] = "false";
    });
    expect_hra_load_fails<peft::config_error>(dir, "field \"apply_GS\" must be true or false");
    edit([](DirEditor& e) {
      e.config["apply_GS"] = false;
      e.config["bias"] = "lora_only";
    });
    expect_hra_load_fails<peft::config_error>(
        dir, "field \"bias\" must be \"none\", \"all\" or \"hra_only\", got \"lora_only\"");
  }
  SECTION("another peft_type") {
    edit([](DirEditor& e) {
      e.config["peft_type"] = "LORA";
      e.config["lora_alpha"] = 8;
    });
    expect_hra_load_fails<peft::config_error>(
        dir, config_path + ": peft_type is \"LORA\", expected \"HRA\"");
    edit([](DirEditor& e) { e.config["peft_type"] = "IA3"; });
    expect_hra_load_fails<peft::config_error>(
        dir, "peft_type \"IA3\" is not supported (hra reads \"HRA\" and \"LORA\")");
    edit([](DirEditor& e) { e.config["peft_type"] = 3; });
    expect_hra_load_fails<peft::config_error>(dir, "field \"peft_type\" must be a string, got 3");
  }
  SECTION("rank mismatch between the config and the layers") {
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        config_path +
            ": module 'net.fc1': the config has r = 3, the layer's adapter 'default' has rank 2",
        {}, hra::Variant::chain, 2);
  }
  SECTION("variant mismatch (apply_GS)") {
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "module 'net.fc1': the config has apply_GS = false, the layer's adapter 'default' uses "
        "the gram_schmidt variant",
        {}, hra::Variant::gram_schmidt);
  }
  SECTION("in_features mismatch") {
    // Layers 7 -> 5 and 5 -> 3: the file's fc1 tensor is (6, 3).
    hra::HraLinear<double> wide = make_hra<double>(7, 5, 3, 5);
    HraPair target(9);
    const HraState<double> before_wide(wide);
    const auto before = target.state();
    expect_error<peft::mismatch_error>(
        [&] {
          peft::load_hra_adapters(dir, {{"net.fc1", &wide}, {"net.fc2", &target.fc2}});
        },
        {weights_path + ": module 'net.fc1': tensor 'base_model.model.net.fc1.hra_u' has shape [6, "
                        "3], expected [7, 3] (in_features, r): the layer's in_features is 7"});
    CHECK(HraState<double>(wide) == before_wide);
    CHECK(target.state() == before);
  }
  SECTION("a tensor of the wrong shape for the config's r") {
    edit([](DirEditor& e) {
      e.weights.put_matrix("base_model.model.net.fc2.hra_u", Eigen::MatrixXf::Ones(5, 2));
    });
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "module 'net.fc2': tensor 'base_model.model.net.fc2.hra_u' has shape [5, 2], "
        "expected [5, 3]");
    edit([](DirEditor& e) {
      e.weights.put_array<float>("base_model.model.net.fc2.hra_u", {15}, std::vector<float>(15, 1));
    });
    expect_hra_load_fails<peft::mismatch_error>(dir, "has shape [15], expected [5, 3]");
  }
  SECTION("a mapped module missing from the file") {
    edit([](DirEditor& e) { e.weights.erase("base_model.model.net.fc2.hra_u"); });
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        weights_path + ": module 'net.fc2': tensor 'base_model.model.net.fc2.hra_u' is missing");
    peft::LoadOptions other_prefix;
    other_prefix.prefix = "model.";
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "tensor 'model.net.fc1.hra_u' is missing (the file has 1 tensors; is the prefix right?)",
        other_prefix);
  }
  SECTION("a tensor of a module that is not mapped") {
    edit([](DirEditor& e) {
      e.weights.put_matrix("base_model.model.head.hra_u", Eigen::MatrixXf::Ones(3, 3));
    });
    expect_hra_load_fails<peft::mismatch_error>(
        dir, weights_path +
                 ": tensor 'base_model.model.head.hra_u' belongs to no mapped module "
                 "(mapped: net.fc1, net.fc2); set LoadOptions::allow_unmapped_tensors");
    // Allowed explicitly, the extra tensor is ignored and the mapped ones load.
    peft::LoadOptions lax;
    lax.allow_unmapped_tensors = true;
    HraPair target(9);
    peft::load_hra_adapters(dir, target.modules(), lax);
    CHECK(target.fc2.adapter().chain().reflectors() == good.fc2.adapter().chain().reflectors());
  }
  SECTION("an unknown tensor under a mapped module, even with unmapped tensors allowed") {
    edit([](DirEditor& e) {
      e.weights.put_matrix("base_model.model.net.fc2.lora_A.weight", Eigen::MatrixXf::Ones(3, 5));
    });
    peft::LoadOptions lax;
    lax.allow_unmapped_tensors = true;
    expect_hra_load_fails<peft::mismatch_error>(
        dir, "module 'net.fc2': unexpected tensor 'base_model.model.net.fc2.lora_A.weight'", lax);
  }
  SECTION("non-finite values") {
    for (const double bad :
         {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      edit([&](DirEditor& e) {
        Eigen::MatrixXd u = good.fc2.adapter().chain().reflectors();
        u(4, 2) = bad;
        e.weights.put_matrix("base_model.model.net.fc2.hra_u", u);
      });
      expect_hra_load_fails<st::tensor_error>(
          dir, weights_path + ": tensor 'base_model.model.net.fc2.hra_u': non-finite value " +
                   (std::isnan(bad) ? "nan" : "inf") + " (F64) at index [4, 2]");
    }
    // Finite in F64 but beyond float's range: refused when read into float layers.
    edit([&](DirEditor& e) {
      Eigen::MatrixXd u = good.fc2.adapter().chain().reflectors();
      u(0, 0) = 1e300;
      e.weights.put_matrix("base_model.model.net.fc2.hra_u", u);
    });
    expect_float_hra_load_fails<st::tensor_error>(dir, "out of range of the requested type");
    // In double its squared norm overflows: not a usable U.
    expect_hra_load_fails<peft::mismatch_error>(dir,
                                                "is not a usable U: ReflectorChain: reflector "
                                                "column 0 is too large");
  }
  SECTION("a column too small for 1/|u|^2 (1e-160 in double, 1e-21 in float)") {
    // Not zero, so not caught as such: its squared norm (1e-320 in double, 1e-42 in float) is a
    // positive subnormal whose inverse, which S^{-1} holds, overflows.
    const auto tiny_column = [&](double scale) {
      edit([&](DirEditor& e) {
        Eigen::MatrixXd u = good.fc2.adapter().chain().reflectors();
        u.col(1) = u.col(1).normalized() * scale;
        e.weights.put_matrix("base_model.model.net.fc2.hra_u", u);
      });
    };
    tiny_column(1e-160);
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "module 'net.fc2': tensor 'base_model.model.net.fc2.hra_u' is not a usable U: "
        "ReflectorChain: reflector column 1 is too small");
    tiny_column(1e-21);
    expect_float_hra_load_fails<peft::mismatch_error>(
        dir, "is not a usable U: ReflectorChain: reflector column 1 is too small");
  }
  SECTION("a zero column, and dependent columns for Gram-Schmidt") {
    edit([&](DirEditor& e) {
      Eigen::MatrixXd u = good.fc2.adapter().chain().reflectors();
      u.col(1).setZero();
      e.weights.put_matrix("base_model.model.net.fc2.hra_u", u);
    });
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "module 'net.fc2': tensor 'base_model.model.net.fc2.hra_u' is not a usable U: "
        "ReflectorChain: reflector column 1 is zero");
    edit([&](DirEditor& e) {
      e.config["apply_GS"] = true;
      Eigen::MatrixXd u = good.fc2.adapter().chain().reflectors();
      u.col(2) = 2.0 * u.col(0) - u.col(1);
      e.weights.put_matrix("base_model.model.net.fc2.hra_u", u);
    });
    expect_hra_load_fails<peft::mismatch_error>(dir, "is not a usable U", {},
                                                hra::Variant::gram_schmidt);
  }
  SECTION("truncated, malformed and wrongly typed weights files") {
    const std::string bytes = read_all(dir / "adapter_model.safetensors");
    write_all(dir / "adapter_model.safetensors", bytes.substr(0, bytes.size() - 5));
    expect_hra_load_fails<st::format_error>(
        dir, weights_path + ": tensor 'base_model.model.net.fc2.hra_u': \"data_offsets\"");
    write_all(dir / "adapter_model.safetensors", bytes.substr(0, 6));
    expect_hra_load_fails<st::format_error>(dir, "too short for the 8-byte header length");
    write_all(dir / "adapter_model.safetensors", bytes.substr(0, 40));
    expect_hra_load_fails<st::format_error>(dir, "runs past the end of the file");
    // The fc2 tensor declared as I32 (same byte count as F32).
    std::string header_i32 = bytes;
    const std::size_t at = header_i32.find("\"F64\"", header_i32.find("net.fc2"));
    REQUIRE(at != std::string::npos);
    header_i32.replace(at, 5, "\"I32\"");
    write_all(dir / "adapter_model.safetensors", header_i32);
    expect_hra_load_fails<st::format_error>(
        dir, "tensor 'base_model.model.net.fc2.hra_u': unsupported dtype 'I32'");
  }
  SECTION("a trained bias for a layer whose bias is not trainable, or with bias \"none\"") {
    edit([](DirEditor& e) {
      e.config["bias"] = "all";
      e.weights.put_vector("base_model.model.net.fc2.base_layer.bias", Eigen::VectorXd::Ones(3));
    });
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "module 'net.fc2': tensor 'base_model.model.net.fc2.base_layer.bias' is a trained bias "
        "(config bias \"all\"), but the layer's bias is absent");
    expect_hra_load_fails<peft::mismatch_error>(dir,
                                                "but the layer's bias is frozen (BiasMode::none)",
                                                {}, hra::Variant::chain, 3, hra::BiasMode::none);
    edit([](DirEditor& e) { e.config["bias"] = "none"; });
    expect_hra_load_fails<peft::mismatch_error>(
        dir, "is a trained bias, but " + config_path + " has bias \"none\"", {},
        hra::Variant::chain, 3, hra::BiasMode::all);
    edit([](DirEditor& e) {
      e.config["bias"] = "all";
      e.weights.put_vector("base_model.model.net.fc2.base_layer.bias", Eigen::VectorXd::Ones(4));
    });
    expect_hra_load_fails<peft::mismatch_error>(
        dir,
        "tensor 'base_model.model.net.fc2.base_layer.bias' has shape [4], expected [3] "
        "(out_features,)",
        {}, hra::Variant::chain, 3, hra::BiasMode::all);
  }
  SECTION("null layers and loading an HRA directory as LoRA") {
    hra::HraLinear<double>* none = nullptr;
    expect_error<std::invalid_argument>(
        [&] {
          peft::load_hra_adapters(dir, {{"net.fc1", none}});
        },
        {"module 'net.fc1': null layer"});
    auto lora = make_lora<double>(6, 5, 3, 3.0, 1);
    const LoraState<double> before(lora);
    expect_error<peft::config_error>(
        [&] {
          peft::load_lora_adapters(dir, {{"net.fc1", &lora}});
        },
        {"peft_type is \"HRA\", expected \"LORA\""});
    CHECK(LoraState<double>(lora) == before);
  }
}

TEST_CASE("adapter_io: malformed or mismatched LoRA directories are refused, layers unchanged",
          "[adapter_io][reject][lora]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  auto fc1 = make_lora<double>(6, 5, 2, 4.0, 1);
  auto fc2 = make_lora<double>(5, 3, 2, 4.0, 2);
  peft::save_lora_adapters(tmp.path, {{"net.fc1", &fc1}, {"net.fc2", &fc2}});
  const std::string config_path = (tmp.path / "adapter_config.json").string();
  const auto edit = [&](const std::function<void(DirEditor&)>& change) {
    DirEditor e(tmp.path);
    change(e);
    e.write();
  };

  SECTION("missing lora_alpha / r") {
    edit([](DirEditor& e) { e.config.erase("lora_alpha"); });
    expect_lora_load_fails<peft::config_error>(
        tmp.path, config_path + ": required field \"lora_alpha\" is missing (peft_type LORA)");
    edit([](DirEditor& e) {
      e.config["lora_alpha"] = 4;
      e.config.erase("r");
    });
    expect_lora_load_fails<peft::config_error>(tmp.path, "required field \"r\" is missing");
  }
  SECTION("options hra does not compute") {
    edit([](DirEditor& e) { e.config["fan_in_fan_out"] = true; });
    expect_lora_load_fails<peft::config_error>(
        tmp.path, "field \"fan_in_fan_out\": true (weights stored as (in, out)");
    edit([](DirEditor& e) {
      e.config["fan_in_fan_out"] = false;
      e.config["use_dora"] = true;
    });
    expect_lora_load_fails<peft::config_error>(tmp.path,
                                               "field \"use_dora\": true (DoRA) is not supported");
    edit([](DirEditor& e) {
      e.config["use_dora"] = false;
      e.config["rank_pattern"] = {{".*fc2", 3}};
    });
    expect_lora_load_fails<peft::config_error>(
        tmp.path, "field \"rank_pattern\": key \".*fc2\" uses regular-expression syntax");
    edit([](DirEditor& e) { e.config["rank_pattern"] = {{"fc2", -1}}; });
    expect_lora_load_fails<peft::config_error>(
        tmp.path, "field \"rank_pattern[\"fc2\"]\" must be a positive integer, got -1");
    edit([](DirEditor& e) {
      e.config["rank_pattern"] = nlohmann::json::object();
      e.config["lora_dropout"] = 1.5;
    });
    expect_lora_load_fails<peft::config_error>(
        tmp.path, "field \"lora_dropout\" must be a probability in [0, 1), got 1.5");
  }
  SECTION("rank mismatch through rank_pattern") {
    edit([](DirEditor& e) { e.config["rank_pattern"] = {{"fc2", 3}}; });
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path,
        config_path +
            ": module 'net.fc2': the config gives r = 3 (rank_pattern), the layer has rank 2");
  }
  SECTION("wrong tensor shapes") {
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path, "module 'net.fc2': the config gives r = 2, the layer has rank 3", 3);
    edit([](DirEditor& e) {
      e.weights.put_matrix("base_model.model.net.fc2.lora_B.weight", Eigen::MatrixXd::Ones(4, 2));
    });
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path,
        "tensor 'base_model.model.net.fc2.lora_B.weight' has shape [4, 2], expected [3, 2] "
        "(out_features, r): the layer's out_features is 3");
    edit([](DirEditor& e) {
      e.weights.put_matrix("base_model.model.net.fc2.lora_A.weight", Eigen::MatrixXd::Ones(5, 2));
    });
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path,
        "tensor 'base_model.model.net.fc2.lora_A.weight' has shape [5, 2], expected [2, 5] "
        "(r, in_features)");
  }
  SECTION("missing, extra and non-finite tensors") {
    edit([](DirEditor& e) { e.weights.erase("base_model.model.net.fc2.lora_B.weight"); });
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path, "module 'net.fc2': tensor 'base_model.model.net.fc2.lora_B.weight' is missing");
    edit([&](DirEditor& e) {
      e.weights.put_matrix("base_model.model.net.fc2.lora_B.weight", fc2.lora_b());
      e.weights.put_vector("base_model.model.head.bias", Eigen::VectorXd::Ones(2));
    });
    expect_lora_load_fails<peft::mismatch_error>(
        tmp.path, "tensor 'base_model.model.head.bias' belongs to no mapped module");
    edit([&](DirEditor& e) {
      e.weights.erase("base_model.model.head.bias");
      Eigen::MatrixXd b = fc2.lora_b();
      b(1, 1) = -std::numeric_limits<double>::infinity();
      e.weights.put_matrix("base_model.model.net.fc2.lora_B.weight", b);
    });
    expect_lora_load_fails<st::tensor_error>(
        tmp.path,
        "tensor 'base_model.model.net.fc2.lora_B.weight': non-finite value -inf (F64) at "
        "index [1, 1]");
  }
}

TEST_CASE("adapter_io: a failed save leaves an existing adapter directory intact",
          "[adapter_io][save]") {
  const hra_test::TempDir tmp("hra_test_adapter_io");
  HraPair good(1, 1);
  peft::save_hra_adapters(tmp.path, good.modules());
  const std::string old_config = read_all(tmp.path / "adapter_config.json");
  const std::string old_weights = read_all(tmp.path / "adapter_model.safetensors");
  const std::vector<std::string> old_entries = tmp.entries();  // the same version directory
  const auto intact = [&] {
    CHECK(read_all(tmp.path / "adapter_config.json") == old_config);
    CHECK(read_all(tmp.path / "adapter_model.safetensors") == old_weights);
    CHECK(tmp.entries() == old_entries);
  };

  SECTION("layers a PEFT config cannot describe: refused before any file is touched") {
    auto other = make_hra<double>(5, 3, 2, 9);
    expect_error<std::invalid_argument>(
        [&] {
          peft::save_hra_adapters(tmp.path, {{"net.fc1", &good.fc1}, {"net.fc2", &other}});
        },
        {"module 'net.fc2': r = 2 differs from module 'net.fc1' (r = 1); PEFT's HRAConfig has one "
         "r for every module"});
    intact();
    auto gs = make_hra<double>(5, 3, 1, 9, hra::Variant::gram_schmidt);
    expect_error<std::invalid_argument>(
        [&] {
          peft::save_hra_adapters(tmp.path, {{"net.fc1", &good.fc1}, {"net.fc2", &gs}});
        },
        {"one apply_GS for every module"});
    intact();
    expect_error<std::invalid_argument>(
        [&] { peft::save_hra_adapters(tmp.path, peft::HraModules<double>{}); },
        {"no modules to save"});
    intact();
  }
  SECTION("values a dtype cannot hold, and protected config fields") {
    HraPair big(2, 1);
    Eigen::MatrixXd u = big.fc2.adapter().chain().reflectors();
    u(0, 0) = 1e6;  // beyond F16's 65504
    big.fc2.set_reflectors("default", u);
    peft::SaveOptions f16;
    f16.dtype = st::Dtype::F16;
    expect_error<std::invalid_argument>(
        [&] { peft::save_hra_adapters(tmp.path, big.modules(), f16); },
        {"module 'net.fc2': cannot save tensor 'base_model.model.net.fc2.hra_u' as F16"});
    intact();
    peft::SaveOptions extra;
    extra.extra_config["r"] = 4;
    expect_error<std::invalid_argument>(
        [&] { peft::save_hra_adapters(tmp.path, good.modules(), extra); },
        {"SaveOptions::extra_config may not set \"r\""});
    intact();
  }
  SECTION("the config cannot be written: the new version is dropped, the old one stays live") {
    HraPair larger(3, 2);
    peft::SaveOptions save;
    save.dtype = st::Dtype::F16;
    save.extra_config["modules_to_save"] = {std::string(1000, 'x')};  // a config larger than both
    const peft::AdapterFiles files = peft::hra_adapter_files(larger.modules(), save);
    const std::string new_weights = st::serialize(files.weights);
    const std::string new_config = files.config_text();
    REQUIRE(new_weights.size() < new_config.size());
    REQUIRE(old_weights.size() < new_config.size());
    expect_error<peft::io_error>(
        [&] {
          // Files may grow to the size of the new weights but not to that of the config.
          const hra_test::FileSizeLimit limit(std::max(new_weights.size(), old_weights.size()) + 1);
          peft::save_hra_adapters(tmp.path, larger.modules(), save);
        },
        {"adapter_config.json: write failed (new version in ", "File too large",
         "the previous files are left as they were"});
    intact();
  }
  SECTION("the weights cannot be written") {
    expect_error<peft::io_error>(
        [&] {
          // Room for a new version's marker (its first file), not for the weights.
          const hra_test::FileSizeLimit limit(hra::detail::version_marker_text.size());
          peft::save_hra_adapters(tmp.path, good.modules());
        },
        {"adapter_model.safetensors: write failed", "File too large",
         "the previous files are left as they were"});
    intact();
  }
  SECTION("the target is not a directory") {
    write_all(tmp.path / "file", "x");
    expect_error<peft::io_error>(
        [&] { peft::save_hra_adapters(tmp.path / "file", good.modules()); },
        {"cannot create the directory"});
  }
  SECTION("a directory where a file goes: refused before anything is written") {
    const fs::path fresh = tmp.path / "fresh";
    fs::create_directories(fresh / "adapter_config.json" / "blocker");
    expect_error<peft::io_error>(
        [&] { peft::save_hra_adapters(fresh, good.modules()); },
        {"fresh/adapter_config.json: exists and is neither a regular file nor a symlink"});
    // Refused before the lock file is made: nothing was added.
    CHECK(tmp.entries("fresh") == std::vector<std::string>{"adapter_config.json"});
  }
}
