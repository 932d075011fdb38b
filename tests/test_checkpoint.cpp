// Training checkpoints (hra/io/checkpoint.hpp): a bitwise round trip of parameters, optimiser
// state, learning rate, generators, tensors and metadata that resumes training exactly; restores
// that do not fit refused with nothing changed; malformed files and directories refused by name;
// saves killed at each step of the atomic writer (issue #26's checkpoint cases, #28's tier).
#include <hra/hash.hpp>
#include <hra/hra.hpp>
#include <hra/io.hpp>
#include <hra/io/checkpoint.hpp>

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace {

namespace fs = std::filesystem;
namespace ck = hra::checkpoint;
using hra_test::expect_error;
using hra_test::Index;
using hra_test::Mat;
using Matf = Mat<float>;

/// A small model of every layer kind that trains: an HRA layer with two adapters, a LoRA layer,
/// a trained dense head with a bias; Adam on the adapters, Sgd with momentum on the head. The
/// frozen weights come from `frozen` (a restarted program loads the same base model), every
/// trained value from `seed`.
struct Model {
  hra::HraLinearf hra;
  hra::LoraLinearf lora;
  hra::Linearf head;
  hra::Adam<float> adam = hra::Adam<float>::adamw(1e-2, 1e-3);
  hra::Sgd<float> sgd;
  std::mt19937_64 shuffle;

  explicit Model(std::uint64_t seed, std::uint64_t frozen = 1)
      : hra(hra_test::random_as<float>(8, 6, 100 + frozen), options(seed)),
        lora(hra_test::random_as<float>(8, 8, 200 + frozen), lora_options(seed)),
        head(hra::WeightMatrix<float>::owned(hra_test::random_as<float>(3, 8, seed + 2)),
             hra_test::random_vec<float>(3, seed + 3), hra::LinearOptions{}, hra::BiasMode::all),
        sgd(sgd_options()),
        shuffle(seed) {
    hra::HraOptions second = options(seed + 9);
    second.rank = 2;
    hra.add_adapter("second", second);
  }
  static hra::HraOptions options(std::uint64_t seed) {
    hra::HraOptions o;
    o.rank = 4;
    o.init = hra::Init::random;
    o.seed = seed;
    return o;
  }
  static hra::LoraOptions lora_options(std::uint64_t seed) {
    hra::LoraOptions o;
    o.rank = 2;
    o.seed = seed;
    o.dropout = 0.25;  // its mask generator is training state too
    return o;
  }
  static hra::SgdOptions sgd_options() {
    hra::SgdOptions o;
    o.lr = 0.05;
    o.momentum = 0.9;
    return o;
  }
  std::vector<hra::ParameterView<float>> adapters() {
    auto p = hra.parameters();
    for (auto& v : lora.parameters()) p.push_back(v);
    return p;
  }
  std::vector<hra::ParameterView<float>> heads() { return head.parameters(); }

  /// One training step on a batch drawn with `shuffle`; the lr decays per step (a schedule).
  void step() {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    Matf x(6, 5);
    for (Index i = 0; i < x.size(); ++i) x(i) = u(shuffle);
    const Matf& h = hra.forward(x);
    const Matf& l = lora.forward(h);
    const Matf& y = head.forward(l);
    const Matf& dl = head.backward(y / 5.0f);
    const Matf& dh = lora.backward(dl);
    hra.backward(dh, false);
    adam.step(adapters());
    sgd.step(heads());
    adam.set_lr(adam.lr() * 0.9);
  }

  ck::Writer<float> writer() {
    ck::Writer<float> w;
    w.parameters("adapters", adapters());
    w.parameters("head", heads());
    w.optimizer("adam", adam, adapters());
    w.optimizer("sgd", sgd, heads());
    w.rng("shuffle", shuffle);
    w.rng("lora.dropout", lora.dropout_engine());
    return w;
  }
  void restore(ck::Reader<float>& r) {
    r.parameters("adapters", adapters());
    r.parameters("head", heads());
    r.optimizer("adam", adam, adapters());
    r.optimizer("sgd", sgd, heads());
    r.rng("shuffle", shuffle);
    r.rng("lora.dropout", lora.dropout_engine());
  }
};

/// Every value a resumed run depends on, bit for bit.
struct Snapshot {
  std::vector<Matf> values, slots;
  std::vector<std::int64_t> steps;
  double adam_lr = 0, sgd_lr = 0;
  std::uint64_t next_random = 0, next_dropout = 0;
  explicit Snapshot(Model& m) {
    for (const auto& params : {m.adapters(), m.heads()})
      for (const auto& p : params) values.push_back(p.value);
    for (const auto& s : m.adam.state(m.adapters())) {
      steps.push_back(s.steps);
      for (const auto& slot : s.slots) slots.push_back(slot);
    }
    for (const auto& s : m.sgd.state(m.heads())) {
      steps.push_back(s.steps);
      for (const auto& slot : s.slots) slots.push_back(slot);
    }
    adam_lr = m.adam.lr();
    sgd_lr = m.sgd.lr();
    std::mt19937_64 copy = m.shuffle;
    next_random = copy();
    std::mt19937_64 dropout = m.lora.dropout_engine();
    next_dropout = dropout();
  }
  bool operator==(const Snapshot& o) const {
    const auto same = [](const std::vector<Matf>& a, const std::vector<Matf>& b) {
      if (a.size() != b.size()) return false;
      for (std::size_t i = 0; i < a.size(); ++i)
        if (!hra_test::bitwise_equal(a[i], b[i])) return false;
      return true;
    };
    return same(values, o.values) && same(slots, o.slots) && steps == o.steps &&
           adam_lr == o.adam_lr && sgd_lr == o.sgd_lr && next_random == o.next_random &&
           next_dropout == o.next_dropout;
  }
};

/// The live version's checkpoint.json of `dir`, rewritten by `edit` (the tensors are unchanged,
/// so the recorded hash still fits).
template <typename Edit>
void edit_state(const fs::path& dir, Edit edit) {
  const fs::path file = fs::canonical(dir / ck::state_file_name);
  nlohmann::json j = nlohmann::json::parse(hra_test::read_all(file));
  edit(j);
  hra_test::write_all(file, j.dump());
}

}  // namespace

// The hash checkpoint.json records of its tensor file (hra/hash.hpp).
TEST_CASE("fnv1a64: the published FNV-1a test vectors, chaining, both overloads", "[hash]") {
  // From the FNV reference test suite (fnv64a_vector).
  static_assert(hra::fnv1a64(std::string_view()) == 0xcbf29ce484222325ull, "constexpr");
  CHECK(hra::fnv1a64("") == 0xcbf29ce484222325ull);
  CHECK(hra::fnv1a64("a") == 0xaf63dc4c8601ec8cull);
  CHECK(hra::fnv1a64("foobar") == 0x85944171f73967e8ull);
  const std::string text = "foobar";
  CHECK(hra::fnv1a64(text.data(), text.size()) == 0x85944171f73967e8ull);
  CHECK(hra::fnv1a64(text) == 0x85944171f73967e8ull);
  CHECK(hra::fnv1a64(nullptr, 0) == hra::fnv1a64_offset_basis);
  // A seed continues a hash: "foo" then "bar" is "foobar".
  CHECK(hra::fnv1a64(text.data() + 3, 3, hra::fnv1a64(text.data(), 3)) == 0x85944171f73967e8ull);
  // Bytes as they are in memory: one changed byte changes the hash.
  const float values[] = {1.0f, 2.0f};
  float changed[] = {1.0f, 2.0f};
  changed[1] = std::nextafter(changed[1], 3.0f);
  CHECK(hra::fnv1a64(values, sizeof values) != hra::fnv1a64(changed, sizeof changed));
}

TEST_CASE("checkpoint: a save and a restore resume training bit for bit", "[checkpoint]") {
  const hra_test::TempDir tmp("hra_test_checkpoint");
  Model trained(1);
  for (int s = 0; s < 3; ++s) trained.step();
  ck::Writer<float> w = trained.writer();
  w.metadata()["epoch"] = 2;
  w.metadata()["schedule"] = {{"step", 3}, {"lr", trained.adam.lr()}};
  w.tensor("ema", hra_test::random_as<float>(2, 3, 7));
  w.save(tmp.path / "ckpt");
  const Snapshot saved(trained);

  Model fresh(99);  // the same frozen weights; other trained values, no optimiser state
  CHECK_FALSE(Snapshot(fresh) == saved);
  auto r = ck::Reader<float>::load(tmp.path / "ckpt");
  REQUIRE(r);
  fresh.restore(*r);
  CHECK_FALSE(Snapshot(fresh) == saved);  // staged only
  r->apply();
  CHECK(Snapshot(fresh) == saved);
  CHECK(r->metadata().at("epoch") == 2);
  CHECK(r->metadata().at("schedule").at("step") == 3);
  CHECK(hra_test::bitwise_equal(r->tensor("ema"), hra_test::random_as<float>(2, 3, 7)));
  // Both go on training identically.
  for (int s = 0; s < 3; ++s) {
    trained.step();
    fresh.step();
  }
  CHECK(Snapshot(fresh) == Snapshot(trained));
}

TEST_CASE("checkpoint: a restore that does not fit throws before anything changes",
          "[checkpoint]") {
  const hra_test::TempDir tmp("hra_test_checkpoint");
  const fs::path dir = tmp.path / "ckpt";
  Model trained(1);
  trained.step();

  SECTION("a parameter of another name, shape or count") {
    trained.writer().save(dir);
    hra::HraOptions o = Model::options(1);
    Model other(5);
    other.hra.delete_adapter("second");
    o.rank = 3;  // "second" again, another rank
    other.hra.add_adapter("second", o);
    const Snapshot before(other);
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    expect_error<ck::error>([&] { r->parameters("adapters", other.adapters()); },
                            {"parameters 'adapters': parameter 1 'hra_u.second'", "shape"});
    expect_error<ck::error>([&] { r->parameters("head", other.adapters()); },
                            {"parameters 'head': 2 saved, 4 given"});
    expect_error<ck::error>([&] { r->parameters("model", other.adapters()); },
                            {"holds no parameters entry 'model'"});
    r->apply();  // nothing staged
    CHECK(Snapshot(other) == before);
  }
  SECTION("a negative step count, another optimiser kind, a zero U column") {
    trained.writer().save(dir);
    Model target(5);
    target.step();
    const Snapshot before(target);
    edit_state(dir,
               [](nlohmann::json& j) { j["optimizers"]["adam"]["parameters"][0]["steps"] = -3; });
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    r->parameters("adapters", target.adapters());  // fits: staged, not applied
    expect_error<ck::error>([&] { r->optimizer("adam", target.adam, target.adapters()); },
                            {"optimizer 'adam'", "negative step count -3"});
    expect_error<ck::error>([&] { r->optimizer("adam", target.sgd, target.heads()); },
                            {"optimizer 'adam' is Adam, restored into Sgd"});
    CHECK(Snapshot(target) == before);  // the staged parameters were not written

    Model zero(1);
    zero.step();
    zero.hra.parameters()[0].value.col(2).setZero();
    zero.writer().save(tmp.path / "zero");
    auto z = ck::Reader<float>::load(tmp.path / "zero");
    REQUIRE(z);
    expect_error<ck::error>([&] { z->parameters("adapters", target.adapters()); },
                            {"'hra_u.default' is not a usable U", "reflector column 2 is zero"});
    CHECK(Snapshot(target) == before);
  }
  SECTION("optimiser state for other parameters, a slot of the wrong shape") {
    trained.writer().save(dir);
    Model target(5);
    target.step();
    const Snapshot before(target);
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    expect_error<ck::error>([&] { r->optimizer("sgd", target.sgd, target.adapters()); },
                            {"optimizer 'sgd': state of 2 parameters saved, 4 given"});
    // A head of another width: the same names, momentum of another shape.
    hra::Linearf narrow(hra::WeightMatrix<float>::owned(hra_test::random_as<float>(3, 5, 1)),
                        hra_test::random_vec<float>(3, 2), hra::LinearOptions{},
                        hra::BiasMode::all);
    expect_error<ck::error>([&] { r->optimizer("sgd", target.sgd, narrow.parameters()); },
                            {"optimizer 'sgd'", "parameter 'weight' is 3x5 but its state is 3x8"});
    CHECK(Snapshot(target) == before);
  }
  SECTION("a generator state that does not parse") {
    trained.writer().save(dir);
    edit_state(dir, [](nlohmann::json& j) { j["rng"]["shuffle"] = "12 not a state"; });
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    std::mt19937_64 g(4);
    const std::mt19937_64 before = g;
    expect_error<ck::error>([&] { r->rng("shuffle", g); },
                            {"rng 'shuffle' is not the state of this kind of generator"});
    CHECK(g == before);
  }
}

TEST_CASE("checkpoint: malformed files and directories are refused by name", "[checkpoint]") {
  const hra_test::TempDir tmp("hra_test_checkpoint");
  const fs::path dir = tmp.path / "ckpt";
  Model m(1);
  m.step();
  const auto load = [&] { (void)ck::Reader<float>::load(dir); };

  SECTION("no checkpoint yet: a missing or empty directory") {
    CHECK_FALSE(ck::Reader<float>::load(dir));
    fs::create_directories(dir);
    CHECK_FALSE(ck::Reader<float>::load(dir));
  }
  SECTION("a directory of something else, one file only, a file that is a directory") {
    fs::create_directories(dir);
    hra_test::write_all(dir / "current", "snapshot-3");  // the examples' old layout
    expect_error<ck::error>(load, {"holds no checkpoint", "'current'", "not a checkpoint"});
    fs::remove(dir / "current");
    fs::create_directories(dir / ck::state_file_name);
    expect_error<ck::error>(load, {"checkpoint.json: not a regular file"});
    fs::remove(dir / ck::state_file_name);
    hra_test::write_all(dir / ck::state_file_name, "{}");
    expect_error<ck::error>(load, {"checkpoint.safetensors is missing"});
    hra_test::write_all(tmp.path / "plain", "x");
    expect_error<ck::error>([&] { (void)ck::Reader<float>::load(tmp.path / "plain"); },
                            {"plain: not a directory"});
  }
  SECTION("checkpoint.json that is not a checkpoint's") {
    m.writer().save(dir);
    const auto refused = [&](const std::function<void(nlohmann::json&)>& edit,
                             const std::vector<std::string>& parts) {
      m.writer().save(dir);
      edit_state(dir, edit);
      expect_error<ck::error>(load, parts);
    };
    refused([](nlohmann::json& j) { j.erase("tensors_file"); },
            {"checkpoint.json", "the field \"tensors_file\" is missing"});
    refused([](nlohmann::json& j) { j["tensors_file"]["bytes"] = "many"; },
            {"tensors_file", "the field \"bytes\" is string"});
    refused([](nlohmann::json& j) { j = nlohmann::json::array(); },
            {"expected a JSON object, got array"});
    refused([](nlohmann::json& j) { j["version"] = 7; }, {"version 7"});
    refused([](nlohmann::json& j) { j["format"] = "other"; }, {"not an hra checkpoint"});
    refused([](nlohmann::json& j) { j["scalar"] = "double"; },
            {"saved with double values, read as float"});
    refused([](nlohmann::json& j) { j["tensors_file"]["bytes"] = 3; },
            {"checkpoint.json records 3"});
    refused([](nlohmann::json& j) { j["tensors_file"]["fnv1a"] = 12345; }, {"its hash differs"});
    refused([](nlohmann::json& j) { j.erase("optimizers"); },
            {"the field \"optimizers\" is missing"});
    m.writer().save(dir);
    hra_test::write_all(fs::canonical(dir / ck::state_file_name), "{not json");
    expect_error<ck::error>(load, {"checkpoint.json: not valid JSON"});
  }
  SECTION("a leftover of an interrupted save does not change what is restored") {
    m.writer().save(dir);
    // A marked version directory with the largest counter, holding another checkpoint.
    Model other(3);
    other.writer().save(tmp.path / "other");
    const fs::path leftover = dir / "..2099_12_31_23_59_59.99999_18446744073709551615_99999";
    fs::copy(fs::canonical(tmp.path / "other" / ck::state_file_name).parent_path(), leftover);
    m.step();
    m.writer().save(dir);
    CHECK_FALSE(fs::exists(leftover));
    Model target(7);
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    target.restore(*r);
    r->apply();
    CHECK(Snapshot(target) == Snapshot(m));
  }
}

// A save killed at each step of the atomic writer (the fault-injection hook of
// detail/atomic_dir.hpp): the directory then loads as the old checkpoint before the commit and
// as the new one from it on; the next save goes through.
namespace {
hra::detail::AtomicDirStep checkpoint_kill_step;
void checkpoint_kill(hra::detail::AtomicDirStep step) {
  if (step == checkpoint_kill_step) std::raise(SIGKILL);
}
}  // namespace

TEST_CASE("checkpoint: a save killed at each of its steps leaves the old or the new checkpoint",
          "[checkpoint][kill]") {
  using Step = hra::detail::AtomicDirStep;
  const hra_test::TempDir tmp("hra_test_checkpoint_kill");
  Model a(1), b(2);
  a.step();
  b.step();
  b.step();
  int kills = 0;
  for (const Step step :
       {Step::locked, Step::cleaned, Step::version_made, Step::marker_opened, Step::file_written,
        Step::version_written, Step::committed, Step::synced, Step::done}) {
    INFO("killed at step " << static_cast<int>(step));
    const fs::path dir = tmp.path / std::to_string(static_cast<int>(step));
    a.writer().save(dir);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      checkpoint_kill_step = step;
      hra::detail::testing::atomic_dir_fault_hook = checkpoint_kill;
      try {
        b.writer().save(dir);
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    ++kills;
    Model target(9);
    auto r = ck::Reader<float>::load(dir);
    REQUIRE(r);
    target.restore(*r);
    r->apply();
    CHECK(Snapshot(target) == Snapshot(step >= Step::committed ? b : a));
    b.writer().save(dir);  // the dead saver's lock is gone
    auto again = ck::Reader<float>::load(dir);
    REQUIRE(again);
  }
  CHECK(kills == 9);
}

TEST_CASE("checkpoint: a container's prefixed U is checked like a layer's own",
          "[checkpoint][sequential]") {
  hra_test::TempDir tmp;
  const auto make = [](std::uint64_t seed) {
    hra::Sequential<float> model;
    model.emplace<hra::HraLinearf>("fc1", hra_test::random_as<float>(5, 6, 11),
                                   Model::options(seed));
    return model;
  };
  hra::Sequential<float> saved = make(3);
  saved.parameters()[0].value.col(1).setZero();  // "fc1.hra_u.default": not a usable U
  REQUIRE(saved.parameters()[0].name == "fc1.hra_u.default");
  ck::Writer<float> w;
  w.parameters("model", saved.parameters());
  w.save(tmp.path / "ckpt");

  hra::Sequential<float> target = make(4);
  const Matf before = target.parameters()[0].value;
  auto r = ck::Reader<float>::load(tmp.path / "ckpt");
  REQUIRE(r);
  expect_error<ck::error>([&] { r->parameters("model", target.parameters()); },
                          {"'fc1.hra_u.default' is not a usable U", "reflector column 1 is zero"});
  CHECK(Matf(target.parameters()[0].value) == before);
}
