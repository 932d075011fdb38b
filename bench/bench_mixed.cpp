// hra_bench_mixed (issue #14): a batch whose columns name their own adapter over one frozen W.
// For the same W (d_out x d_in), batch X (d_in x n) and 8 adapters of rank r, float:
//   frozen   W X alone (the adapters disabled), the floor of every case below
//   single   predict() with one adapter on the whole batch
//   mixed    predict_mixed() with column j using adapter j mod 8 (the most scattered batch)
//   loop     the per-adapter baseline: for each adapter gather its columns, predict() with a
//            layer holding that adapter alone, scatter the outputs back
// Goal (issue #14): mixed <= 1.15 x single, and mixed faster than loop.
//
//   hra_bench_mixed [--threads=N] [Google Benchmark flags]
// --threads=N sets hra's product threads (default $HRA_NUM_THREADS or the hardware's). Run as
//   hra_bench_mixed --benchmark_enable_random_interleaving=true --benchmark_repetitions=9
//     --benchmark_report_aggregates_only=true          (one command line)
// and compare the medians.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench_support.hpp"
#include "hra/hra.hpp"

namespace {

using hra_bench::Index;
using hra_bench::Matrix;
using hra_bench::Operands;
using Layer = hra::HraLinear<float>;

constexpr int kAdapters = 8;

hra::HraOptions adapter_options(Index r, std::uint64_t seed) {
  hra::HraOptions o;
  o.rank = r;
  o.init = hra::Init::random;
  o.seed = seed;
  return o;
}

/// The layers of one shape, made once: `all` holds the 8 adapters (default, a1 ... a7) over W,
/// `alone[k]` adapter k by itself over the same W (a view: W is stored once).
struct Layers {
  std::unique_ptr<Layer> all;
  std::vector<std::unique_ptr<Layer>> alone;

  static Layers& get(Index d, Index r) {
    static std::unique_ptr<Layers> cached;
    static Index cached_d = 0, cached_r = 0;
    if (!cached || cached_d != d || cached_r != r) {
      cached = std::make_unique<Layers>();
      Matrix<float>& w = Operands<float>::weight(d, d);
      cached->all = std::make_unique<Layer>(hra::WeightMatrix<float>::view(w), std::nullopt,
                                            adapter_options(r, 100));
      cached->alone.push_back(std::make_unique<Layer>(hra::WeightMatrix<float>::view(w),
                                                      std::nullopt, adapter_options(r, 100)));
      for (int k = 1; k < kAdapters; ++k) {
        const std::string name = "a" + std::to_string(k);
        cached->all->add_adapter(name, adapter_options(r, 100 + k));
        cached->alone.push_back(std::make_unique<Layer>(hra::WeightMatrix<float>::view(w),
                                                        std::nullopt, adapter_options(r, 100 + k)));
      }
      cached_d = d;
      cached_r = r;
    }
    return *cached;
  }
};

std::vector<Index> interleaved(Index n) {
  std::vector<Index> column_adapter(static_cast<std::size_t>(n));
  for (Index j = 0; j < n; ++j) column_adapter[static_cast<std::size_t>(j)] = j % kAdapters;
  return column_adapter;
}

void set_counters(benchmark::State& state, Index d, Index n) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(d) * double(d) * double(n),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

void frozen(benchmark::State& state) {
  const Index d = state.range(0), r = state.range(1), n = state.range(2);
  Layer& layer = *Layers::get(d, r).alone[0];
  const Matrix<float>& x = Operands<float>::batch(d, n, 7);
  Matrix<float> y;
  layer.set_adapters_enabled(false);
  for (auto _ : state) {
    layer.predict(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  layer.set_adapters_enabled(true);
  set_counters(state, d, n);
}

void single(benchmark::State& state) {
  const Index d = state.range(0), r = state.range(1), n = state.range(2);
  const Layer& layer = *Layers::get(d, r).alone[0];
  const Matrix<float>& x = Operands<float>::batch(d, n, 7);
  Matrix<float> y;
  for (auto _ : state) {
    layer.predict(x, y);
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, d, n);
}

void mixed(benchmark::State& state) {
  const Index d = state.range(0), r = state.range(1), n = state.range(2);
  const Layer& layer = *Layers::get(d, r).all;
  const Matrix<float>& x = Operands<float>::batch(d, n, 7);
  const std::vector<Index> column_adapter = interleaved(n);
  Matrix<float> y;
  for (auto _ : state) {
    layer.predict_mixed(x, column_adapter, y);
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, d, n);
}

void loop(benchmark::State& state) {
  const Index d = state.range(0), r = state.range(1), n = state.range(2);
  const Layers& layers = Layers::get(d, r);
  const Matrix<float>& x = Operands<float>::batch(d, n, 7);
  const std::vector<Index> column_adapter = interleaved(n);
  Matrix<float> y(d, n), xa, ya;
  std::vector<Index> cols;
  for (auto _ : state) {
    for (int k = 0; k < kAdapters; ++k) {
      cols.clear();
      for (Index j = 0; j < n; ++j)
        if (column_adapter[static_cast<std::size_t>(j)] == k) cols.push_back(j);
      xa.resize(d, static_cast<Index>(cols.size()));
      for (std::size_t c = 0; c < cols.size(); ++c) xa.col(static_cast<Index>(c)) = x.col(cols[c]);
      layers.alone[static_cast<std::size_t>(k)]->predict(xa, ya);
      for (std::size_t c = 0; c < cols.size(); ++c) y.col(cols[c]) = ya.col(static_cast<Index>(c));
    }
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, d, n);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      hra::set_num_threads(std::atoi(argv[i] + 10));
      for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
      --argc;
      --i;
    }
  // d = d_in = d_out, r, n.
  for (auto* b : {benchmark::RegisterBenchmark("mixed_batch/frozen/float", frozen),
                  benchmark::RegisterBenchmark("mixed_batch/single/float", single),
                  benchmark::RegisterBenchmark("mixed_batch/mixed8/float", mixed),
                  benchmark::RegisterBenchmark("mixed_batch/loop8/float", loop)})
    b->ArgNames({"d", "r", "n"})
        ->Args({4096, 8, 512})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::AddCustomContext("hra_threads", std::to_string(hra::num_threads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
