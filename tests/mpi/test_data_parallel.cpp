// hra::mpi::DataParallel, run by mpirun on 2 ranks (the checks hold for any number of ranks;
// those that need a second rank are skipped on one).
//
// - Equivalence: P ranks, each with its n/P columns of every batch, train a two-layer network
//   (HRA chain, HRA Gram-Schmidt, LoRA; float and double) exactly like one process with all n
//   columns, which every rank also trains itself as the reference: within 1e-5 (float) and
//   1e-12 (double) after every step, and bitwise identical across ranks.
// - Weighting: unequal shards averaged with their sample counts equal the global mean; the
//   plain mean does not; a rank with no samples contributes nothing.
// - Errors every rank must agree on (MPI call failures, non-finite gradients, changed lists,
//   bad weights, divergence) are thrown on every rank, and the object stays usable.
// - Mismatch: ranks that build different layers all get the same mismatch_error, no hang.
#include <mpi.h>
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "hra/hra_linear.hpp"
#include "hra/lora_linear.hpp"
#include "hra/mpi/data_parallel.hpp"
#include "hra/optim.hpp"
#include "support/matrices.hpp"

// Every MPI_Allreduce of this program passes through here (MPI's profiling interface: the
// PMPI_ entry point does the work), so a test can count the calls one step makes.
namespace {
struct AllreduceLog {
  int calls = 0;
  bool all_in_place = true;
  long long last_count = 0;
  MPI_Datatype last_type = MPI_DATATYPE_NULL;
  void reset() { *this = AllreduceLog(); }
} allreduce_log;
}  // namespace

extern "C" int MPI_Allreduce(const void* sendbuf, void* recvbuf, int count, MPI_Datatype type,
                             MPI_Op op, MPI_Comm comm) {
  ++allreduce_log.calls;
  allreduce_log.all_in_place = allreduce_log.all_in_place && sendbuf == MPI_IN_PLACE;
  allreduce_log.last_count = count;
  allreduce_log.last_type = type;
  return PMPI_Allreduce(sendbuf, recvbuf, count, type, op, comm);
}

namespace {

using Catch::Matchers::Contains;
using Eigen::Index;
using MatD = Eigen::MatrixXd;
template <typename S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// True on every rank iff `s` equals rank 0's `s` on every rank.
bool same_on_every_rank(const std::string& s) {
  unsigned long long length = s.size();
  MPI_Bcast(&length, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
  std::string root = world_rank() == 0 ? s : std::string(length, '\0');
  MPI_Bcast(root.data(), static_cast<int>(length), MPI_CHAR, 0, MPI_COMM_WORLD);
  int same = root == s ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return same == 1;
}

using hra_test::random_matrix;  // the same on every platform and rank

enum class Kind { hra_chain, hra_gram_schmidt, lora };
const char* kind_name(Kind k) {
  return k == Kind::hra_chain ? "hra_chain" : k == Kind::hra_gram_schmidt ? "hra_gs" : "lora";
}

template <typename S>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double value = 1e-5;
  static constexpr const char* name = "float";
};
template <>
struct Tolerance<double> {
  static constexpr double value = 1e-12;
  static constexpr const char* name = "double";
};

constexpr Index kIn = 16, kHidden = 12, kOut = 8, kRank = 4, kBatch = 64;
constexpr int kSteps = 30;

// A frozen layer d_out x d_in adapted by `kind`. The frozen weight and bias depend only on
// `weight_seed` (every rank loads the same); the adapter's initialisation on `init_seed`.
template <typename S>
std::unique_ptr<hra::Layer<S>> make_layer(Kind kind, Index d_out, Index d_in, bool bias,
                                          std::uint64_t weight_seed, std::uint64_t init_seed,
                                          Index rank = kRank) {
  const Mat<S> w =
      (random_matrix(d_out, d_in, weight_seed) * std::sqrt(3.0 / static_cast<double>(d_in)))
          .template cast<S>();
  std::optional<Eigen::Matrix<S, Eigen::Dynamic, 1>> b;
  if (bias) b = (0.1 * random_matrix(d_out, 1, weight_seed + 1)).template cast<S>();
  const hra::BiasMode mode = bias ? hra::BiasMode::all : hra::BiasMode::none;
  if (kind == Kind::lora) {
    hra::LoraOptions o;
    o.rank = rank;
    o.alpha = static_cast<double>(rank);
    o.seed = init_seed;
    return std::make_unique<hra::LoraLinear<S>>(hra::WeightMatrix<S>::owned(w), b, o, mode);
  }
  hra::HraOptions o;
  o.rank = rank;
  o.seed = init_seed;
  // Gram-Schmidt needs independent columns, so not the symmetric (duplicated) start.
  o.variant = kind == Kind::hra_chain ? hra::Variant::chain : hra::Variant::gram_schmidt;
  o.init = kind == Kind::hra_chain ? hra::Init::symmetric : hra::Init::random;
  return std::make_unique<hra::HraLinear<S>>(hra::WeightMatrix<S>::owned(w), b, o, mode);
}

// y = L2(tanh(L1 x)): kIn -> kHidden (with a trainable bias) -> kOut.
template <typename S>
struct Net {
  std::unique_ptr<hra::Layer<S>> first, second;

  Net(Kind kind, std::uint64_t init_seed)
      : first(make_layer<S>(kind, kHidden, kIn, true, 11, init_seed)),
        second(make_layer<S>(kind, kOut, kHidden, false, 13, init_seed + 7)) {}

  std::vector<hra::Layer<S>*> layers() { return {first.get(), second.get()}; }
  std::vector<hra::ParameterView<S>> parameters() {
    auto out = first->parameters();
    for (auto& p : second->parameters()) out.push_back(p);
    return out;
  }
  std::vector<S> values() {
    std::vector<S> out;
    for (const auto& p : parameters())
      out.insert(out.end(), p.value.data(), p.value.data() + p.value.size());
    return out;
  }
  std::vector<S> grads() {
    std::vector<S> out;
    for (const auto& p : parameters())
      out.insert(out.end(), p.grad.data(), p.grad.data() + p.grad.size());
    return out;
  }

  // L = mean over the columns and outputs of (y - t)^2; assigns every parameter gradient.
  void loss_and_gradients(const Mat<S>& x, const Mat<S>& t) {
    const Mat<S> h = first->forward(x).array().tanh().matrix();
    const Mat<S> r = second->forward(h) - t;
    const Mat<S> dy = (S(2) / static_cast<S>(r.size())) * r;
    const Mat<S> dh = second->backward(dy, true);
    first->backward(dh.cwiseProduct((S(1) - h.array().square()).matrix()), false);
  }
};

template <typename S>
double max_abs_diff(const std::vector<S>& a, const std::vector<S>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

template <typename S>
bool bitwise_same_on_every_rank(const std::vector<S>& v) {
  return same_on_every_rank(
      std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(S)));
}

// Batch s (kIn x kBatch, the same on every rank) and its target: a fixed linear teacher.
template <typename S>
Mat<S> batch(int s) {
  return random_matrix(kIn, kBatch, 100 + static_cast<std::uint64_t>(s)).template cast<S>();
}
template <typename S>
Mat<S> target(const Mat<S>& x) {
  return (random_matrix(kOut, kIn, 7) * x.template cast<double>()).template cast<S>();
}

template <typename S>
hra::Adam<S> make_adam() {
  return hra::Adam<S>({1e-2, 0.9, 0.999, 1e-8, 0.0, false});
}

// The exception message of `f()` if it throws E (empty if it throws nothing).
template <typename E, typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return {};
}

template <typename S>
void check_equivalence(Kind kind) {
  const int rank = world_rank(), size = world_size();
  const double tol = Tolerance<S>::value;
  INFO("rank " << rank << " of " << size << ", " << kind_name(kind) << ", " << Tolerance<S>::name);
  Net<S> reference(kind, 1);             // rank 0's start, trained here on all n columns
  Net<S> local(kind, 1 + 1000u * rank);  // another start on the other ranks, until broadcast
  const std::vector<S> start = reference.values();
  if (rank > 0) CHECK(max_abs_diff(local.values(), start) > 1e-3);

  hra::mpi::DataParallel<S> dp(local.layers());
  CHECK(local.values() == start);  // rank 0's values, bit for bit
  CHECK(dp.num_values() == static_cast<Index>(start.size()));
  CHECK(dp.bytes_per_step() == (start.size() + hra::mpi::DataParallel<S>::kSlots) * sizeof(S));
  CHECK(dp.parameter_names().front().rfind("layers[0].", 0) == 0);

  auto ref_opt = make_adam<S>(), local_opt = make_adam<S>();
  // Equal shards (the plain mean is the global mean only then): n = kBatch rounded down to P.
  const Index n = kBatch / size * size, begin = n / size * rank, end = begin + n / size;
  double grad_diff_first = 0, shard_vs_full = 0, param_diff_max = 0;
  for (int s = 0; s < kSteps; ++s) {
    const Mat<S> x = batch<S>(s).leftCols(n), t = target<S>(x);
    reference.loss_and_gradients(x, t);
    local.loss_and_gradients(x.middleCols(begin, end - begin), t.middleCols(begin, end - begin));
    if (s == 1) shard_vs_full = max_abs_diff(local.grads(), reference.grads());
    allreduce_log.reset();
    dp.average_gradients();
    // One fused in-place reduction per step: every gradient plus the kSlots flags.
    CHECK(allreduce_log.calls == 1);
    CHECK(allreduce_log.all_in_place);
    CHECK(allreduce_log.last_count == dp.num_values() + hra::mpi::DataParallel<S>::kSlots);
    CHECK(allreduce_log.last_type == (sizeof(S) == 4 ? MPI_FLOAT : MPI_DOUBLE));
    if (s == 0) grad_diff_first = max_abs_diff(local.grads(), reference.grads());
    ref_opt.step(reference.parameters());
    local_opt.step(local.parameters());
    param_diff_max = std::max(param_diff_max, max_abs_diff(local.values(), reference.values()));
  }
  const double param_diff = max_abs_diff(local.values(), reference.values());
  const double moved = max_abs_diff(local.values(), start);
  if (rank == 0)
    std::printf(
        "MPI_EQUIV %-9s %-6s P=%d n=%ld steps=%d: max|P ranks - 1 process| params %.3e (worst "
        "step %.3e), grad at step 0 %.3e; shard grad vs full %.3e; moved %.3e; tol %.0e\n",
        kind_name(kind), Tolerance<S>::name, size, static_cast<long>(n), kSteps, param_diff,
        param_diff_max, grad_diff_first, shard_vs_full, moved, tol);
  CHECK(grad_diff_first <= tol);
  CHECK(param_diff_max <= tol);
  CHECK(moved > 1e-2);                                // training did change the parameters
  if (size > 1) CHECK(shard_vs_full > 1000.0 * tol);  // so the averaging is what matches
  CHECK(bitwise_same_on_every_rank(local.values()));
  CHECK_NOTHROW(dp.check_consistency());
  CHECK(dp.steps() == kSteps);
  CHECK(dp.total_weight() == static_cast<double>(size));
}

}  // namespace

TEMPLATE_TEST_CASE("DataParallel: P ranks with n/P samples each train like one process with n",
                   "[mpi][equivalence]", float, double) {
  for (const Kind kind : {Kind::hra_chain, Kind::hra_gram_schmidt, Kind::lora})
    check_equivalence<TestType>(kind);
}

TEMPLATE_TEST_CASE("DataParallel: unequal shards weighted by sample count give the global mean",
                   "[mpi][weighting]", float, double) {
  using S = TestType;
  const int rank = world_rank(), size = world_size();
  const double tol = Tolerance<S>::value;
  INFO("rank " << rank << " of " << size << ", " << Tolerance<S>::name);
  // Rank p holds columns [n p^2 / P^2, n (p+1)^2 / P^2): 16 and 48 of 64 on two ranks.
  const Index begin = kBatch * rank * rank / (size * size);
  const Index end = kBatch * (rank + 1) * (rank + 1) / (size * size);
  const double count = static_cast<double>(end - begin);

  Net<S> reference(Kind::hra_chain, 3), weighted(Kind::hra_chain, 3), plain(Kind::hra_chain, 3);
  // Over views this time (the layers own the memory and outlive dp).
  hra::mpi::DataParallel<S> dp(weighted.parameters());
  hra::mpi::DataParallel<S> dp_plain(plain.layers());
  auto ref_opt = make_adam<S>(), opt = make_adam<S>();
  double grad_diff_first = 0, plain_diff_first = 0, param_diff_max = 0;
  for (int s = 0; s < kSteps; ++s) {
    const Mat<S> x = batch<S>(s), t = target<S>(x);
    reference.loss_and_gradients(x, t);
    weighted.loss_and_gradients(x.middleCols(begin, end - begin), t.middleCols(begin, end - begin));
    dp.average_gradients(count);
    CHECK(dp.total_weight() == static_cast<double>(kBatch));
    if (s == 0) {
      grad_diff_first = max_abs_diff(weighted.grads(), reference.grads());
      plain.loss_and_gradients(x.middleCols(begin, end - begin), t.middleCols(begin, end - begin));
      dp_plain.average_gradients();
      plain_diff_first = max_abs_diff(plain.grads(), reference.grads());
    }
    ref_opt.step(reference.parameters());
    opt.step(weighted.parameters());
    param_diff_max = std::max(param_diff_max, max_abs_diff(weighted.values(), reference.values()));
  }
  if (rank == 0)
    std::printf(
        "MPI_WEIGHTED hra_chain %-6s P=%d shards %ld..%ld of %ld: max|weighted - 1 process| "
        "params %.3e, grad at step 0 %.3e; plain mean's grad error %.3e; tol %.0e\n",
        Tolerance<S>::name, size, static_cast<long>(kBatch / (size * size)),
        static_cast<long>(kBatch - kBatch * (size - 1) * (size - 1) / (size * size)),
        static_cast<long>(kBatch), param_diff_max, grad_diff_first, plain_diff_first, tol);
  CHECK(grad_diff_first <= tol);
  CHECK(param_diff_max <= tol);
  if (size > 1) CHECK(plain_diff_first > 1000.0 * tol);  // unequal shards: the plain mean is off
  CHECK(bitwise_same_on_every_rank(weighted.values()));

  // A rank without samples (the last) passes weight 0; its gradients are never read, even NaN.
  if (size > 1) {
    const Index b = kBatch * rank / (size - 1), e = kBatch * (rank + 1) / (size - 1);
    Net<S> full(Kind::hra_chain, 5), sharded(Kind::hra_chain, 5);
    hra::mpi::DataParallel<S> dp_empty(sharded.layers());
    const Mat<S> x = batch<S>(0), t = target<S>(x);
    full.loss_and_gradients(x, t);
    if (rank == size - 1) {
      for (auto* layer : sharded.layers()) layer->fill_gradients();  // NaN: backward never ran
      dp_empty.average_gradients(0.0);
    } else {
      sharded.loss_and_gradients(x.middleCols(b, e - b), t.middleCols(b, e - b));
      dp_empty.average_gradients(static_cast<double>(e - b));
    }
    CHECK(max_abs_diff(sharded.grads(), full.grads()) <= tol);
    CHECK(dp_empty.total_weight() == static_cast<double>(kBatch));
  }
}

TEST_CASE("DataParallel: errors are thrown on every rank and leave the object usable",
          "[mpi][errors]") {
  using S = double;
  const int rank = world_rank(), size = world_size();
  const bool last = rank == size - 1;
  INFO("rank " << rank << " of " << size);
  Net<S> net(Kind::hra_chain, 9);
  hra::mpi::DataParallel<S> dp(net.layers());
  auto opt = make_adam<S>();
  const Index begin = kBatch * rank / size, end = kBatch * (rank + 1) / size;
  const Mat<S> x = batch<S>(0).middleCols(begin, end - begin),
               t = target<S>(batch<S>(0)).middleCols(begin, end - begin);

  SECTION("a failing MPI call is an hra::mpi::error that names the call") {
    int error_class = MPI_SUCCESS;
    std::string call;
    const std::string what = message_of<hra::mpi::error>([&] {
      try {
        dp.broadcast_parameters(size + 5);  // no such rank: MPI_ERR_ROOT
      } catch (const hra::mpi::error& e) {
        error_class = e.error_class();
        call = e.call();
        throw;
      }
    });
    INFO(what);
    CHECK(call == "MPI_Bcast");
    CHECK(error_class == MPI_ERR_ROOT);
    CHECK_THAT(what, Contains("broadcast_parameters: MPI_Bcast failed: MPI_ERR_ROOT"));
    CHECK(same_on_every_rank(what));
    CHECK_NOTHROW(hra::mpi::check(MPI_SUCCESS, "MPI_Barrier"));
    // The communicator is still fine: a step afterwards works.
    net.loss_and_gradients(x, t);
    CHECK_NOTHROW(dp.average_gradients());
  }

  SECTION("a non-finite gradient on one rank stops every rank's step") {
    net.loss_and_gradients(x, t);
    if (last) net.parameters()[1].grad(2, 0) = std::numeric_limits<S>::quiet_NaN();
    const std::vector<S> before = net.values();
    const std::string what = message_of<std::invalid_argument>([&] { dp.average_gradients(); });
    INFO(what);
    if (size > 1)
      CHECK_THAT(what, Contains("non-finite gradient on 1 of " + std::to_string(size) +
                                " ranks (rank " + std::to_string(size - 1) + ")") &&
                           Contains("every gradient is set to NaN"));
    CHECK(same_on_every_rank(what));
    bool all_nan = true;
    for (const S g : net.grads()) all_nan = all_nan && std::isnan(g);
    CHECK(all_nan);
    // The optimisers refuse the step on every rank, as they refuse any non-finite gradient.
    CHECK_THROWS_AS(opt.step(net.parameters()), std::invalid_argument);
    CHECK(net.values() == before);
    // The next, finite step goes through.
    net.loss_and_gradients(x, t);
    CHECK_NOTHROW(dp.average_gradients());
    opt.step(net.parameters());
    CHECK(bitwise_same_on_every_rank(net.values()));
  }

  SECTION("a negative weight, a zero total weight, or mixed overloads fail on every rank") {
    net.loss_and_gradients(x, t);
    std::string what = message_of<std::invalid_argument>(
        [&] { dp.average_gradients(last ? -1.0 : static_cast<double>(end - begin)); });
    INFO(what);
    CHECK_THAT(what, Contains("invalid weight on 1 of " + std::to_string(size) + " ranks (rank " +
                              std::to_string(size - 1) + ")"));
    if (last) CHECK_THAT(what, Contains("must be finite and >= 0") && Contains("got -1"));

    net.loss_and_gradients(x, t);
    what = message_of<std::invalid_argument>([&] { dp.average_gradients(0.0); });
    CHECK_THAT(what, Contains("the weights sum to 0"));
    CHECK(same_on_every_rank(what));

    if (size > 1) {
      net.loss_and_gradients(x, t);
      what = message_of<std::logic_error>([&] {
        if (rank == 0)
          dp.average_gradients();
        else
          dp.average_gradients(static_cast<double>(end - begin));
      });
      CHECK_THAT(what, Contains("every rank must call the same overload"));
      CHECK(same_on_every_rank(what));
    }
    net.loss_and_gradients(x, t);
    CHECK_NOTHROW(dp.average_gradients(static_cast<double>(end - begin)));
  }

  SECTION("a parameter list that changed on one rank is a logic_error on every rank") {
    if (last) net.first->merge();  // its U is folded into W: no longer a parameter
    net.loss_and_gradients(x, t);
    const std::string what = message_of<std::logic_error>([&] { dp.average_gradients(); });
    INFO(what);
    const std::string common = what.substr(0, what.find("; on this rank"));
    CHECK_THAT(common, Contains("the parameter list changed since construction on 1 of " +
                                std::to_string(size) + " ranks"));
    if (last)
      CHECK_THAT(what, Contains("on this rank (" + std::to_string(rank) +
                                "): there are 2 parameter tensors, there were 3"));
    CHECK(same_on_every_rank(common));
    const std::string bcast = message_of<std::logic_error>([&] { dp.broadcast_parameters(); });
    CHECK_THAT(bcast, Contains("broadcast_parameters: the parameter list changed"));
    if (last) net.first->unmerge();
    net.loss_and_gradients(x, t);
    CHECK_NOTHROW(dp.average_gradients());
  }

  SECTION("diverged parameters are a divergence_error on every rank, naming rank and tensor") {
    CHECK_NOTHROW(dp.check_consistency());
    auto u = net.parameters()[0].value;
    if (last && size > 1) u(3, 1) = std::nextafter(u(3, 1), S(10));  // one ulp
    const std::string what =
        message_of<hra::mpi::divergence_error>([&] { dp.check_consistency(); });
    INFO(what);
    if (size > 1) {
      CHECK_THAT(what, Contains("1 of " + std::to_string(size) + " ranks differ from rank 0") &&
                           Contains("rank " + std::to_string(size - 1) +
                                    ", differs in 'layers[0].hra_u.default' (16x4)"));
      CHECK(same_on_every_rank(what));
    }
    dp.broadcast_parameters(0);  // rank 0's values again
    CHECK_NOTHROW(dp.check_consistency());

    // The same check every k-th step from inside average_gradients().
    hra::mpi::DataParallelOptions o;
    o.check_every = 1;
    Net<S> other(Kind::lora, 21);
    hra::mpi::DataParallel<S> checked(other.layers(), MPI_COMM_WORLD, o);
    other.loss_and_gradients(x, t);
    CHECK_NOTHROW(checked.average_gradients());  // the first call has nothing to check
    if (last && size > 1) other.parameters()[1].value(0, 0) += S(1e-3);
    other.loss_and_gradients(x, t);
    const std::string periodic =
        message_of<hra::mpi::divergence_error>([&] { checked.average_gradients(); });
    if (size > 1) CHECK_THAT(periodic, Contains("differs in 'layers[0].lora_B.default' (12x4)"));
    bool all_nan = true;  // as after every failed step: no optimiser may use these gradients
    for (const S g : other.grads()) all_nan = all_nan && std::isnan(g);
    if (size > 1) CHECK(all_nan);
  }
}

TEST_CASE("DataParallel: ranks that build different layers all get the same mismatch_error",
          "[mpi][mismatch]") {
  const int rank = world_rank(), size = world_size();
  if (size < 2) {
    WARN("needs at least 2 ranks");
    return;
  }
  const bool last = rank == size - 1;
  const std::string k = std::to_string(size - 1);
  INFO("rank " << rank << " of " << size);
  struct Case {
    const char* what;
    std::string (*build)(bool last);
    std::vector<std::string> expected;
  };
  using hra::mpi::mismatch_error;
  const std::vector<Case> cases = {
      {"a different rank r",
       [](bool l) {
         auto a = make_layer<float>(Kind::hra_chain, kHidden, kIn, false, 1, 2, l ? 6 : 4);
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp({a.get()}); });
       },
       {"tensor 0 is 'layers[0].hra_u.default' 16x6 on rank " + k +
        " but 'layers[0].hra_u.default' 16x4 on rank 0"}},
      {"an extra tensor (a trainable bias)",
       [](bool l) {
         auto a = make_layer<float>(Kind::hra_chain, kHidden, kIn, l, 1, 2);
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp({a.get()}); });
       },
       {"rank " + k + " has 2 parameter tensors, rank 0 has 1; the first 1 agree, then rank " + k +
        " has 'layers[0].bias' 12x1"}},
      {"another kind of layer",
       [](bool l) {
         auto a = make_layer<float>(l ? Kind::lora : Kind::hra_chain, kHidden, kIn, false, 1, 2);
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp({a.get()}); });
       },
       {"tensor 0 is 'layers[0].lora_A.default' 4x16 on rank " + k +
        " but 'layers[0].hra_u.default' 16x4 on rank 0"}},
      {"another name",
       [](bool l) {
         Eigen::MatrixXf v = Eigen::MatrixXf::Zero(3, 2), g = v;
         std::vector<hra::ParameterView<float>> views = {
             {l ? "w" : "u", {v.data(), 3, 2}, {g.data(), 3, 2}}};
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp(views); });
       },
       {"tensor 0 is 'w' 3x2 on rank " + k + " but 'u' 3x2 on rank 0"}},
      {"another scalar type",
       [](bool l) {
         if (l) {
           auto a = make_layer<double>(Kind::hra_chain, kHidden, kIn, false, 1, 2);
           return message_of<mismatch_error>([&] { hra::mpi::DataParalleld dp({a.get()}); });
         }
         auto a = make_layer<float>(Kind::hra_chain, kHidden, kIn, false, 1, 2);
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp({a.get()}); });
       },
       {"rank " + k + " holds double parameters, rank 0 float"}},
      {"other options",
       [](bool l) {
         auto a = make_layer<float>(Kind::hra_chain, kHidden, kIn, false, 1, 2);
         hra::mpi::DataParallelOptions o;
         o.check_every = l ? 5 : 0;
         return message_of<mismatch_error>(
             [&] { hra::mpi::DataParallelf dp({a.get()}, MPI_COMM_WORLD, o); });
       },
       {"rank " + k + " has options root=0 check_every=5, rank 0 root=0 check_every=0"}},
      {"a null layer on one rank",
       [](bool l) {
         auto a = make_layer<float>(Kind::hra_chain, kHidden, kIn, false, 1, 2);
         auto b = make_layer<float>(Kind::hra_chain, kOut, kHidden, false, 3, 4);
         return message_of<mismatch_error>([&] {
           hra::mpi::DataParallelf dp({a.get(), l ? nullptr : b.get()});
         });
       },
       {"rank " + k + ": layers[1] is a null pointer"}},
      {"a gradient of another shape on one rank",
       [](bool l) {
         Eigen::MatrixXf v = Eigen::MatrixXf::Zero(3, 2), g = Eigen::MatrixXf::Zero(3, l ? 1 : 2);
         std::vector<hra::ParameterView<float>> views = {
             {"u", {v.data(), 3, 2}, {g.data(), g.rows(), g.cols()}}};
         return message_of<mismatch_error>([&] { hra::mpi::DataParallelf dp(views); });
       },
       {"rank " + k + ": parameter 'u' has a 3x2 value but a 3x1 gradient"}},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    const std::string what = c.build(last);
    INFO(what);
    CHECK_THAT(what, Contains("hra::mpi::DataParallel: the ranks hold different parameter lists"));
    CHECK_THAT(what, Contains(std::string("1 of ") + std::to_string(size) +
                              " ranks differ from rank 0: " + k));
    for (const auto& e : c.expected) CHECK_THAT(what, Contains(e));
    CHECK(same_on_every_rank(what));
  }
  const std::string example = cases.front().build(last);
  if (rank == 0) std::printf("MPI_MISMATCH example: %s\n", example.c_str());

  // Nothing is left pending: matching layers afterwards train normally.
  Net<float> net(Kind::lora, 1);
  hra::mpi::DataParallelf dp(net.layers());
  net.loss_and_gradients(batch<float>(0), target<float>(batch<float>(0)));
  CHECK_NOTHROW(dp.average_gradients());
  CHECK(bitwise_same_on_every_rank(net.values()));
}
