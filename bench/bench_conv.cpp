// hra_bench_conv (issue #13): Google Benchmark timings of the convolution layers at ResNet-like
// shapes and the main job's CNN shapes: the frozen Conv2d (the baseline, to be compared with
// PyTorch's CPU conv from bench/torch_conv_reference.py at the same threads), a trainable
// Conv2d (full fine-tuning), HraConv2d in each of its three forms and as the cost model
// chooses, its Gram-Schmidt variant, and LoraConv2d at the same r; forward (fwd) and
// forward + backward with the input gradient (fwdbwd). Every case is named
//   <method>/<pass>/<scalar>/C_in:<>/H:<>/C_out:<>/k:<>/stride:<>/n:<>/r:<>
// (square images and kernels, padding k/2; r = 0 without an adapter). After the run a table
// of ratios (HRA / frozen, HRA / LoRA, fwd+bwd) is printed for every shape, from the same run.
// The `layout` cases time im2col + product for one image in the two patch layouts (T = P^T,
// what the library uses, and P with a transpose into C,H,W), the measurement behind the choice.
//
// Extra flags (before Google Benchmark's own):
//   --threads=N   threads of hra's pool (the conv layers' chunks) and of Eigen (under OpenMP);
//                 default $HRA_BENCH_THREADS or 2
//   --no-double   register the float cases only
//   --no-check    skip the start-up check (threaded layers against one worker)
// Short development run:
//   nice ./hra_bench_conv --benchmark_filter='/float/C_in:64/' --benchmark_min_time=0.1
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bench_support.hpp"
#include "hra/detail/im2col.hpp"
#include "hra/hra.hpp"

namespace hra_bench {
namespace {

/// One convolution case: C_in x H x H images, C_out channels, a k x k kernel with padding k/2.
struct ConvShape {
  Index c_in = 0, h = 0, c_out = 0, k = 3, stride = 1, n = 0, r = 0;
  hra::Conv2dGeometry geometry() const {
    return hra::Conv2dGeometry(c_in, h, h, c_out, k, k).stride(stride).padding(k / 2);
  }
};

template <typename Scalar>
const char* scalar_name() {
  return std::is_same<Scalar, float>::value ? "float" : "double";
}

template <typename Scalar>
struct ConvOperands {
  static Matrix<Scalar>& weight(const hra::Conv2dGeometry& g) {
    static std::map<std::pair<Index, Index>, Matrix<Scalar>> cache;
    const auto key = std::make_pair(g.out_channels(), g.fan_in());
    auto it = cache.find(key);
    if (it == cache.end())
      it = cache
               .emplace(key, random_matrix<Scalar>(g.out_channels(), g.fan_in(), 1,
                                                   1.0 / std::sqrt(double(g.fan_in()))))
               .first;
    return it->second;
  }
  static const Matrix<Scalar>& batch(Index rows, Index n, std::uint64_t seed) {
    return Operands<Scalar>::batch(rows, n, seed);
  }
};

void set_counters(benchmark::State& state, const hra::Conv2dGeometry& g, Index n, bool backward,
                  std::size_t saved) {
  const double frozen =
      2.0 * double(n) * double(g.out_positions()) * double(g.fan_in()) * double(g.out_channels());
  state.counters["frozen_flops"] = benchmark::Counter(
      backward ? 2 * frozen : frozen, benchmark::Counter::kIsIterationInvariantRate);
  if (backward) state.counters["saved_bytes"] = benchmark::Counter(double(saved));
}

// Times forward() (fwd) or forward() + backward() with dX (fwdbwd) of any conv layer.
template <typename Scalar>
void time_layer(benchmark::State& state, hra::Layer<Scalar>& layer, const ConvShape& s,
                bool backward) {
  const auto g = s.geometry();
  const auto& x = ConvOperands<Scalar>::batch(g.input_size(), s.n, 11);
  const auto& dy = ConvOperands<Scalar>::batch(g.output_size(), s.n, 12);
  std::size_t saved = 0;
  run_timed(state, [&] {
    const auto& y = layer.forward(x);
    benchmark::DoNotOptimize(y.data());
    if (backward) {
      saved = layer.saved_bytes();
      const auto& dx = layer.backward(dy, true);
      benchmark::DoNotOptimize(dx.data());
    }
  });
  set_counters(state, g, s.n, backward, saved);
}

template <typename Scalar>
void bm_conv(benchmark::State& state, ConvShape s, bool backward, bool train_weight) {
  const auto g = s.geometry();
  hra::Conv2d<Scalar> layer(g, hra::WeightMatrix<Scalar>::view(ConvOperands<Scalar>::weight(g)),
                            std::nullopt, hra::Conv2dOptions{train_weight});
  time_layer<Scalar>(state, layer, s, backward);
}

template <typename Scalar>
void bm_hra(benchmark::State& state, ConvShape s, bool backward, hra::HraForm form,
            hra::Variant variant) {
  const auto g = s.geometry();
  hra::HraOptions opt;
  opt.rank = s.r;
  opt.variant = variant;
  opt.init = hra::Init::random;
  hra::HraConv2d<Scalar> layer(g, hra::WeightMatrix<Scalar>::view(ConvOperands<Scalar>::weight(g)),
                               std::nullopt, opt);
  layer.set_form(form);
  time_layer<Scalar>(state, layer, s, backward);
  state.SetLabel(hra::to_string(layer.last_form()));
}

template <typename Scalar>
void bm_lora(benchmark::State& state, ConvShape s, bool backward) {
  const auto g = s.geometry();
  hra::LoraOptions opt;
  opt.rank = s.r;
  opt.alpha = double(s.r);
  hra::LoraConv2d<Scalar> layer(g, hra::WeightMatrix<Scalar>::view(ConvOperands<Scalar>::weight(g)),
                                std::nullopt, opt);
  layer.set_lora_weights(layer.lora_a(), random_matrix<Scalar>(g.out_channels(), s.r, 5, 0.01));
  time_layer<Scalar>(state, layer, s, backward);
}

// The P layout: one patch per column (D x L per group), scattered writes.
template <typename Scalar>
void im2col_columns(const hra::Conv2dGeometry& g, const Scalar* image, Matrix<Scalar>& p) {
  const Index ho = g.out_height(), wo = g.out_width(), k = g.kernel_h();
  p.resize(g.in_channels() * g.taps(), ho * wo);
  for (Index oh = 0; oh < ho; ++oh)
    for (Index ow = 0; ow < wo; ++ow) {
      Scalar* col = p.col(oh * wo + ow).data();
      for (Index c = 0; c < g.in_channels(); ++c)
        for (Index i = 0; i < k; ++i) {
          const Index ih = oh * g.stride_h() - g.pad_top() + i;
          for (Index j = 0; j < k; ++j) {
            const Index iw = ow * g.stride_w() - g.pad_left() + j;
            *col++ = (ih < 0 || ih >= g.height() || iw < 0 || iw >= g.width())
                         ? Scalar(0)
                         : image[(c * g.height() + ih) * g.width() + iw];
          }
        }
    }
}

// im2col + product for one image (groups = 1): T layout (Y^T = T W^T straight into the C,H,W
// output) or P layout (Y = W P, then transposed into C,H,W).
template <typename Scalar>
void bm_layout(benchmark::State& state, ConvShape s, bool rows) {
  const auto g = s.geometry();
  const auto& w = ConvOperands<Scalar>::weight(g);
  const auto& x = ConvOperands<Scalar>::batch(g.input_size(), 1, 11);
  const Index l = g.out_positions();
  Matrix<Scalar> patches, y(l, g.out_channels()), yc;
  // One image is one worker's share of a batch: time it on one thread, as the layers run it.
  const int threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  run_timed(state, [&] {
    if (rows) {
      patches.resize(l, g.fan_in());
      hra::detail::im2col(g, x.data(), patches.data());
      y.noalias() = patches * w.transpose();
    } else {
      im2col_columns(g, x.data(), patches);
      yc.noalias() = w * patches;
      y = yc.transpose();
    }
    benchmark::DoNotOptimize(y.data());
  });
  Eigen::setNbThreads(threads);
  hra::set_num_threads(threads);  // the conv layers' chunks run on hra's pool
  set_counters(state, g, 1, false, 0);
}

template <typename Scalar>
void add(const std::string& method, const char* pass, const ConvShape& s,
         std::function<void(benchmark::State&)> fn) {
  const std::string name = method + "/" + pass + "/" + scalar_name<Scalar>();
  benchmark::RegisterBenchmark(name.c_str(), std::move(fn))
      ->Args({s.c_in, s.h, s.c_out, s.k, s.stride, s.n, s.r})
      ->ArgNames({"C_in", "H", "C_out", "k", "stride", "n", "r"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();  // OpenMP workers do the work: wall time is what counts
}

template <typename Scalar>
void register_shape(ConvShape s, Index r) {
  using hra::HraForm;
  for (bool bwd : {false, true}) {
    const char* pass = bwd ? "fwdbwd" : "fwd";
    ConvShape f = s;
    f.r = 0;
    add<Scalar>("frozen", pass, f,
                [f, bwd](benchmark::State& st) { bm_conv<Scalar>(st, f, bwd, false); });
    if (bwd)
      add<Scalar>("full", pass, f,
                  [f](benchmark::State& st) { bm_conv<Scalar>(st, f, true, true); });
    ConvShape a = s;
    a.r = r;
    const std::pair<const char*, HraForm> forms[] = {{"hra", HraForm::automatic},
                                                     {"hra_patch", HraForm::low_rank},
                                                     {"hra_hybrid", HraForm::hybrid},
                                                     {"hra_weight", HraForm::weight}};
    for (const auto& [name, form] : forms) {
      const HraForm fm = form;
      add<Scalar>(name, pass, a, [a, bwd, fm](benchmark::State& st) {
        bm_hra<Scalar>(st, a, bwd, fm, hra::Variant::chain);
      });
    }
    add<Scalar>("hra_gs", pass, a, [a, bwd](benchmark::State& st) {
      bm_hra<Scalar>(st, a, bwd, hra::HraForm::automatic, hra::Variant::gram_schmidt);
    });
    add<Scalar>("lora", pass, a, [a, bwd](benchmark::State& st) { bm_lora<Scalar>(st, a, bwd); });
  }
}

// The ResNet-like shapes of issue #13, a small CNN on 28 x 28 Fashion-MNIST images (conv 1->16
// 3x3 pad 1, 16->32 3x3 stride 2, 32->32 3x3 stride 2; batch 128; the main job's first CNN) and
// the main job's CNN as it is now (experiments/common/architecture.hpp: conv 1->8 and 8->16, 3x3
// stride 2 pad 1; batch 128).
const std::vector<ConvShape>& shapes() {
  static const std::vector<ConvShape> s = {
      {64, 56, 64, 3, 1, 32, 0},  {256, 14, 256, 3, 1, 32, 0}, {1, 28, 16, 3, 1, 128, 0},
      {16, 28, 32, 3, 2, 128, 0}, {32, 14, 32, 3, 2, 128, 0},  {1, 28, 8, 3, 2, 128, 0},
      {8, 14, 16, 3, 2, 128, 0},
  };
  return s;
}

constexpr Index kRank = 8;

// Start-up check: the layers run by OpenMP workers give the one-worker results.
bool check_workers() {
  const auto g = hra::Conv2dGeometry(6, 9, 8, 4, 3, 3).stride(2, 1).padding(1).groups(2);
  const Matrix<double> w = random_matrix<double>(g.out_channels(), g.fan_in(), 3, 0.3);
  const Matrix<double> x = random_matrix<double>(g.input_size(), 8, 4, 1.0);
  const Matrix<double> dy = random_matrix<double>(g.output_size(), 8, 5, 1.0);
  double worst = 0;
  const auto compare = [&](hra::Layer<double>& one, hra::Layer<double>& many) {
    const Matrix<double> y1 = one.forward(x), dx1 = one.backward(dy);
    const Matrix<double> y2 = many.forward(x), dx2 = many.backward(dy);
    const auto rel = [](const Matrix<double>& a, const Matrix<double>& b) {
      return (a - b).norm() / std::max(1e-300, b.norm());
    };
    worst = std::max({worst, rel(y2, y1), rel(dx2, dx1)});
    auto p1 = one.parameters(), p2 = many.parameters();
    for (std::size_t i = 0; i < p1.size(); ++i)
      worst = std::max(worst, rel(Matrix<double>(p2[i].grad), Matrix<double>(p1[i].grad)));
  };
  for (auto form : {hra::HraForm::low_rank, hra::HraForm::hybrid, hra::HraForm::weight}) {
    hra::HraOptions o;
    o.rank = 5;
    o.init = hra::Init::random;
    hra::HraConv2d<double> one(g, w, o), many(g, w, o);
    one.set_form(form);
    many.set_form(form);
    one.set_batch_chunks(1);
    many.set_batch_chunks(2);
    compare(one, many);
  }
  hra::LoraOptions lo;
  lo.rank = 3;
  hra::LoraConv2d<double> l1(g, w, lo), l2(g, w, lo);
  l1.set_lora_weights(l1.lora_a(), random_matrix<double>(g.out_channels(), 3, 6, 1.0));
  l2.set_lora_weights(l1.lora_a(), l1.lora_b());
  l1.set_batch_chunks(1);
  l2.set_batch_chunks(2);
  compare(l1, l2);
  hra::Conv2d<double> c1(g, w), c2(g, w);
  c1.set_batch_chunks(1);
  c2.set_batch_chunks(2);
  compare(c1, c2);
  if (!(worst < 1e-12)) {
    std::fprintf(stderr, "hra_bench_conv: 2 workers disagree with 1 (rel. error %.3g)\n", worst);
    return false;
  }
  return true;
}

// Prints, after the run, HRA / frozen and HRA / LoRA (fwd+bwd) for every shape and scalar.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs)
      if (!run.error_occurred && run.run_type == Run::RT_Iteration)
        ms_[run.benchmark_name()] = run.GetAdjustedRealTime();
    ConsoleReporter::ReportRuns(runs);
  }

  void print_ratios(Index r) const {
    std::printf("\nfwd+bwd ratios at r = %ld (same run, real time):\n", static_cast<long>(r));
    std::printf("%-60s %9s %8s %8s %8s %8s %8s\n", "shape", "frozen ms", "HRA/frz", "HRA/LoRA",
                "patch", "hybrid", "weight");
    for (const char* scalar : {"float", "double"})
      for (const auto& s : shapes()) {
        const std::string tail =
            std::string(scalar) + "/C_in:" + std::to_string(s.c_in) + "/H:" + std::to_string(s.h) +
            "/C_out:" + std::to_string(s.c_out) + "/k:" + std::to_string(s.k) +
            "/stride:" + std::to_string(s.stride) + "/n:" + std::to_string(s.n) + "/r:";
        const auto ms = [&](const char* method, Index rank) {
          const std::string key = std::string(method) + "/fwdbwd/" + tail + std::to_string(rank);
          for (const auto& [name, t] : ms_)
            if (name == key || name.rfind(key + "/", 0) == 0) return t;
          return 0.0;
        };
        const double frozen = ms("frozen", 0), hra = ms("hra", r), lora = ms("lora", r);
        if (frozen <= 0 || hra <= 0) continue;
        std::printf("%-60s %9.3f %8.3f %8.3f %8.3f %8.3f %8.3f\n", tail.c_str(), frozen,
                    hra / frozen, lora > 0 ? hra / lora : 0.0, ms("hra_patch", r) / frozen,
                    ms("hra_hybrid", r) / frozen, ms("hra_weight", r) / frozen);
      }
  }

 private:
  std::map<std::string, double> ms_;
};

}  // namespace
}  // namespace hra_bench

int main(int argc, char** argv) {
  using namespace hra_bench;
  const int threads = take_threads_flag(argc, argv, 2);
  const bool with_double = !take_flag(argc, argv, "--no-double", nullptr);
  const bool check = !take_flag(argc, argv, "--no-check", nullptr);
  if (threads < 1) {
    std::fprintf(stderr, "hra_bench_conv: --threads must be >= 1\n");
    return 2;
  }
  Eigen::setNbThreads(threads);
  if (check && !check_workers()) return 1;

  for (const auto& s : shapes()) {
    register_shape<float>(s, kRank);
    if (with_double) register_shape<double>(s, kRank);
    for (bool rows : {true, false})
      add<float>(rows ? "layout_T" : "layout_P", "fwd", s,
                 [s, rows](benchmark::State& st) { bm_layout<float>(st, s, rows); });
  }

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::AddCustomContext("hra_threads", std::to_string(threads));
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#ifdef _OPENMP
  benchmark::AddCustomContext("openmp", "on");
#else
  benchmark::AddCustomContext("openmp", "off");
#endif
#ifdef HRA_BENCH_CXX_FLAGS
  benchmark::AddCustomContext("cxx_flags", HRA_BENCH_CXX_FLAGS);
#endif
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios(kRank);
  benchmark::Shutdown();
  return 0;
}
