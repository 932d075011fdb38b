// hra_bench (issue #4): Google Benchmark timings of the frozen product, LoRA, the HRA chain in
// compact WY form, its Gram-Schmidt variant, the same chain one reflection at a time, PEFT's
// dense-H algorithm in C++, and merge/unmerge, forward and forward+backward, for the same
// frozen weight and batch. The cases are in bench_cases.hpp, registered per scalar by
// bench_float.cpp and bench_double.cpp; this file has main() and the start-up check.
// Every case is named
//   <method>/<pass>/<scalar>/d_in:<d_in>/d_out:<d_out>/r:<r>/n:<n>
// (pass = fwd | fwdbwd | op; r = 0 for the frozen layer; n = 0 for merge/unmerge), so one
// --benchmark_filter regex selects a subset and scripts/bench_report.py parses the JSON.
//
// Extra flags (before Google Benchmark's own):
//   --threads=N       Eigen (OpenMP) threads, or hra's pool without OpenMP; default
//                     $HRA_BENCH_THREADS or 2
//   --blas-threads=N  OpenBLAS threads (OpenBLAS builds); default: the same as --threads
//   --reps=N          repetitions of the headline cases (median reported); default 5
//   --no-double       register the float cases only
//   --no-check        skip the start-up check of the naive backward passes
//   --forms           instead of the sweep, HraLinear's chain and low-rank forms where the
//                     cost model switches (register_forms in bench_cases.hpp)
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <hra/parallel.hpp>
#include <iostream>
#include <string>
#include <vector>

#include "bench_cases.hpp"
#include "bench_support.hpp"
#include "hra/hra.hpp"

#ifdef HRA_BENCH_OPENBLAS
extern "C" {
void openblas_set_num_threads(int);
char* openblas_get_config(void);
char* openblas_get_corename(void);
}
#endif

namespace hra_bench {
namespace {

// ------------------------------------------------------------------------------------------
// Start-up check: the naive backward passes written here must agree with the library.
// ------------------------------------------------------------------------------------------

double rel_err(const Matrix<double>& a, const Matrix<double>& b) {
  return (a - b).norm() / std::max(1e-300, b.norm());
}

void check_naive_backward() {
  const Shape s{40, 24, 6, 5};
  Matrix<double> w = random_matrix<double>(s.d_out, s.d_in, 21, 0.3);
  const Matrix<double> u = random_matrix<double>(s.d_in, s.r, 22, 1.0);
  const Matrix<double> x = random_matrix<double>(s.d_in, s.n, 23, 1.0);
  const Matrix<double> dy = random_matrix<double>(s.d_out, s.n, 24, 1.0);

  hra::HraLinear<double> layer(w, hra_options<double>(s, hra::Variant::chain));
  layer.set_reflectors("default", u);
  const Matrix<double> y_ref = layer.forward(x);
  const Matrix<double> dx_ref = layer.backward(dy, true);
  const Matrix<double> du_ref = layer.adapter().gradient();

  Matrix<double> hx = x, y, g, du;
  hra::reference::apply_one_at_a_time<double>(u, hx);
  y = w * hx;
  g = w.transpose() * dy;
  one_at_a_time_backward(u, hx, g, du);
  const double e1 =
      std::max({rel_err(y, y_ref), rel_err(g, dx_ref), rel_err(du, du_ref), rel_err(hx, x)});

  PeftState<double> st;
  Matrix<double> dx2, du2;
  peft_forward_train(w, u, x, st, y);
  peft_backward(w, u, st, dy, dx2, du2);
  const double e2 = std::max(
      {rel_err(y, y_ref), rel_err(dx2, dx_ref), rel_err(du2, du_ref),
       rel_err(st.h.back(), hra::reference::peft_delta_weight<double>(u, hra::Variant::chain))});
  if (!(e1 < 1e-10) || !(e2 < 1e-10)) {
    std::fprintf(stderr,
                 "hra_bench: the naive backward passes disagree with hra::HraLinear "
                 "(one-at-a-time rel. error %.3g, PEFT %.3g)\n",
                 e1, e2);
    std::exit(1);
  }
}

}  // namespace
}  // namespace hra_bench

int main(int argc, char** argv) {
  using namespace hra_bench;
  Config cfg;
  cfg.threads = take_threads_flag(argc, argv, cfg.threads);
  std::string value;
  if (take_flag(argc, argv, "--blas-threads=", &value)) cfg.blas_threads = std::atoi(value.c_str());
  if (take_flag(argc, argv, "--reps=", &value)) cfg.reps = std::atoi(value.c_str());
  if (take_flag(argc, argv, "--no-double", nullptr)) cfg.with_double = false;
  if (take_flag(argc, argv, "--no-check", nullptr)) cfg.check = false;
  const bool forms = take_flag(argc, argv, "--forms", nullptr);
  if (cfg.blas_threads == 0) cfg.blas_threads = cfg.threads;
  if (cfg.threads < 1 || cfg.blas_threads < 1 || cfg.reps < 1) {
    std::fprintf(stderr, "hra_bench: --threads, --blas-threads and --reps must be >= 1\n");
    return 2;
  }

  Eigen::setNbThreads(cfg.threads);
  // Without OpenMP Eigen is single-threaded and hra's pool splits the large products instead.
  hra::set_num_threads(cfg.threads);
#ifdef HRA_BENCH_OPENBLAS
  openblas_set_num_threads(cfg.blas_threads);
#endif
  if (cfg.check) check_naive_backward();
  if (forms) {
    register_forms<float>(cfg);
  } else {
    register_float(cfg);
    if (cfg.with_double) register_double(cfg);
  }

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::AddCustomContext("hra_threads", std::to_string(cfg.threads));
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("hra_pool_threads", std::to_string(hra::num_threads()));
#ifdef HRA_BENCH_OPENBLAS
  benchmark::AddCustomContext("blas_threads", std::to_string(cfg.blas_threads));
#endif
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#ifdef _OPENMP
  benchmark::AddCustomContext("openmp", "on");
#else
  benchmark::AddCustomContext("openmp", "off");
#endif
#ifdef HRA_BENCH_OPENBLAS
  benchmark::AddCustomContext("blas", std::string("OpenBLAS (") + openblas_get_config() +
                                          ", core " + openblas_get_corename() + ")");
#elif defined(EIGEN_USE_BLAS)
  benchmark::AddCustomContext("blas", "generic BLAS");
#else
  benchmark::AddCustomContext("blas", "none (Eigen's own kernels)");
#endif
  benchmark::AddCustomContext("compiler", std::string("g++/clang ") + __VERSION__);
#ifdef HRA_BENCH_CXX_FLAGS
  benchmark::AddCustomContext("cxx_flags", HRA_BENCH_CXX_FLAGS);
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
