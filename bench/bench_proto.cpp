// Times the prototypes of bench/chain_prototype.hpp (proposed ReflectorChain changes) against the
// library, in the same binary: the HRA layer's forward+backward, the chain alone, and
// merge+unmerge. Names: <what>/<impl>/d_in:../d_out:../r:../n:../w:.. (w = panel width in
// columns, or rows for merge; 0 = the library).
//   --threads=N       Eigen/OpenMP threads; default 2
//   --blas-threads=N  OpenBLAS threads in OpenBLAS builds; default: as --threads
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench_support.hpp"
#include "chain_prototype.hpp"
#include "hra/hra.hpp"

#ifdef HRA_BENCH_OPENBLAS
extern "C" void openblas_set_num_threads(int);
#endif

namespace hra_bench {
namespace {

using Mf = Matrix<float>;

hra::ReflectorChain<float> make_chain(Index d, Index r) {
  return hra::ReflectorChain<float>(Operands<float>::reflectors(d, r), hra::Variant::chain);
}

// The HRA layer's forward+backward with the library (width 0) or with the fused panels: the
// same steps as HraLinear::forward/backward (input checks, H X, W H X, W^T dY, chain backward).
void bm_layer(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2), state.range(3)};
  const Index width = state.range(4);
  auto& w = Operands<float>::weight(s.d_out, s.d_in);
  const auto& x = Operands<float>::batch(s.d_in, s.n, 11);
  const auto& dy = Operands<float>::batch(s.d_out, s.n, 12);
  if (width == 0) {
    hra::HraOptions opt;
    opt.rank = s.r;
    opt.init = hra::Init::random;
    hra::HraLinear<float> layer(hra::WeightMatrix<float>::view(w), std::nullopt, opt);
    layer.set_reflectors("default", Operands<float>::reflectors(s.d_in, s.r));
    run_timed(state, [&] {
      benchmark::DoNotOptimize(layer.forward(x).data());
      benchmark::DoNotOptimize(layer.backward(dy, true).data());
    });
  } else {
    const auto chain = make_chain(s.d_in, s.r);
    Mf hx, y, dx, coeffs, du;
    run_timed(state, [&] {
      if (!x.allFinite()) state.SkipWithError("x");
      const auto f = chain.factorize();
      proto::forward(chain, f, x, hx, coeffs, width);
      y.noalias() = w * hx;
      benchmark::DoNotOptimize(y.data());
      if (!dy.allFinite()) state.SkipWithError("dy");
      dx.noalias() = w.transpose() * dy;
      proto::backward_in_place(chain, f, coeffs, hx, dx, du, width);
      benchmark::DoNotOptimize(dx.data());
      benchmark::DoNotOptimize(du.data());
    });
  }
}

void bm_frozen(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), 0, state.range(3)};
  hra::Linear<float> layer(hra::WeightMatrix<float>::view(Operands<float>::weight(s.d_out, s.d_in)),
                           std::nullopt, hra::LinearOptions{false});
  const auto& x = Operands<float>::batch(s.d_in, s.n, 11);
  const auto& dy = Operands<float>::batch(s.d_out, s.n, 12);
  run_timed(state, [&] {
    benchmark::DoNotOptimize(layer.forward(x).data());
    benchmark::DoNotOptimize(layer.backward(dy, true).data());
  });
}

// The chain alone: Y = H X, then the backward from Y with G (a copy of the upstream gradient,
// made in both variants).
void bm_chain(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2), state.range(3)};
  const Index width = state.range(4);
  const auto chain = make_chain(s.d_in, s.r);
  const auto& x = Operands<float>::batch(s.d_in, s.n, 11);
  const auto& g0 = Operands<float>::batch(s.d_in, s.n, 13);
  Mf y, g, du, coeffs;
  hra::ReflectorChain<float>::ForwardCache cache;
  run_timed(state, [&] {
    if (width == 0) {
      y = x;
      chain.forward_in_place(y, cache);
      g = g0;
      chain.backward_in_place(y, g, cache, du);
    } else {
      const auto f = chain.factorize();
      proto::forward(chain, f, x, y, coeffs, width);
      g = g0;
      proto::backward_in_place(chain, f, coeffs, y, g, du, width);
    }
    benchmark::DoNotOptimize(g.data());
    benchmark::DoNotOptimize(du.data());
  });
}

// merge then unmerge (W <- W H, W <- W H^T) on a private copy of W.
void bm_merge(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2), 0};
  const Index rows = state.range(4);
  const auto chain = make_chain(s.d_in, s.r);
  Mf w = Operands<float>::weight(s.d_out, s.d_in);
  run_timed(state, [&] {
    if (rows == 0) {
      chain.apply_right(w);
      chain.apply_transpose_right(w);
    } else {
      const auto f = chain.factorize();
      proto::apply_right(chain, f, w, false, rows);
      proto::apply_right(chain, f, w, true, rows);
    }
    benchmark::DoNotOptimize(w.data());
  });
}

void check() {
  const Index d = 70, r = 40, n = 37;  // two blocks of 32, ragged panels
  const Matrix<double> u = random_matrix<double>(d, r, 3, 1.0);
  const Matrix<double> x = random_matrix<double>(d, n, 4, 1.0);
  const Matrix<double> g0 = random_matrix<double>(d, n, 5, 1.0);
  const hra::ReflectorChain<double> chain(u);
  hra::ReflectorChain<double>::ForwardCache cache;
  Matrix<double> y_ref, g_ref = g0, du_ref;
  chain.forward(x, y_ref, cache);
  Matrix<double> x_ref = y_ref;
  chain.backward_in_place(x_ref, g_ref, cache, du_ref);
  const auto f = chain.factorize();
  Matrix<double> y, coeffs, g = g0, du;
  proto::forward(chain, f, x, y, coeffs, 8);
  const double e_fwd = (y - y_ref).norm() / y_ref.norm() + (coeffs - cache.coeffs).norm();
  proto::backward_in_place(chain, f, coeffs, y, g, du, 8);
  const double e_bwd = (g - g_ref).norm() / g_ref.norm() + (du - du_ref).norm() / du_ref.norm() +
                       (y - x).norm() / x.norm();
  Matrix<double> w_ref = random_matrix<double>(23, d, 6, 1.0), w = w_ref;
  chain.apply_right(w_ref);
  proto::apply_right(chain, f, w, false, 8);
  double e_merge = (w - w_ref).norm() / w_ref.norm();
  chain.apply_transpose_right(w_ref);
  proto::apply_right(chain, f, w, true, 8);
  e_merge += (w - w_ref).norm() / w_ref.norm();
  if (!(e_fwd < 1e-12 && e_bwd < 1e-12 && e_merge < 1e-12)) {
    std::fprintf(stderr, "hra_bench_proto: prototype disagrees with the library (%g %g %g)\n",
                 e_fwd, e_bwd, e_merge);
    std::exit(1);
  }
}

}  // namespace
}  // namespace hra_bench

int main(int argc, char** argv) {
  using namespace hra_bench;
  int threads = 2, blas_threads = 0;
  for (int i = 1; i < argc;) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads = std::atoi(argv[i] + 10);
    } else if (std::strncmp(argv[i], "--blas-threads=", 15) == 0) {
      blas_threads = std::atoi(argv[i] + 15);
    } else {
      ++i;
      continue;
    }
    for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
    --argc;
  }
  Eigen::setNbThreads(threads);
#ifdef HRA_BENCH_OPENBLAS
  openblas_set_num_threads(blas_threads > 0 ? blas_threads : threads);
#else
  (void)blas_threads;
#endif
  check();
  const std::vector<std::vector<int64_t>> shapes{
      {4096, 4096, 8, 512}, {4096, 4096, 32, 512}, {4096, 4096, 8, 64}, {1024, 1024, 8, 512}};
  for (const auto& sh : shapes) {
    auto add = [&](const char* name, void (*fn)(benchmark::State&), std::vector<int64_t> widths) {
      for (int64_t wd : widths) {
        auto args = sh;
        if (fn == bm_merge) args[3] = 0;
        args.push_back(wd);
        benchmark::RegisterBenchmark(name, fn)
            ->Args(args)
            ->ArgNames({"d_in", "d_out", "r", "n", "w"})
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
      }
    };
    add("frozen", bm_frozen, {0});
    add("layer", bm_layer, {0, 16, 32, 64});
    add("chain", bm_chain, {0, 16, 32, 64});
    if (sh[3] == 512) add("merge_unmerge", bm_merge, {0, 16, 32, 64});
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
