// The benchmark cases of hra_bench (bench/bench_hra.cpp), shared by the per-scalar translation
// units bench_float.cpp and bench_double.cpp (split so that -j2 compiles them in parallel).
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <functional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "bench_support.hpp"
#include "hra/hra.hpp"
#include "hra/reference.hpp"

namespace hra_bench {

template <typename Scalar>
const char* scalar_name();
template <>
inline const char* scalar_name<float>() {
  return "float";
}
template <>
inline const char* scalar_name<double>() {
  return "double";
}

inline void set_flops(benchmark::State& state, double flops) {
  state.counters["flops"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}
inline void set_saved_bytes(benchmark::State& state, std::size_t bytes) {
  state.counters["saved_bytes"] = benchmark::Counter(static_cast<double>(bytes));
}

// Times forward() (pass fwd) or forward() + backward() with the input gradient (pass fwdbwd)
// of any hra::Layer; records the bytes the layer keeps between the two.
template <typename Scalar>
void time_layer(benchmark::State& state, hra::Layer<Scalar>& layer, const Shape& s, bool backward,
                double flops) {
  const auto& x = Operands<Scalar>::batch(s.d_in, s.n, 11);
  const auto& dy = Operands<Scalar>::batch(s.d_out, s.n, 12);
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
  set_flops(state, flops);
  if (backward) set_saved_bytes(state, saved);
}

template <typename Scalar>
hra::WeightMatrix<Scalar> frozen_view(const Shape& s) {
  return hra::WeightMatrix<Scalar>::view(Operands<Scalar>::weight(s.d_out, s.d_in));
}

template <typename Scalar>
void bm_frozen(benchmark::State& state, Shape s, bool backward) {
  hra::Linear<Scalar> layer(frozen_view<Scalar>(s), std::nullopt, hra::LinearOptions{false});
  time_layer<Scalar>(state, layer, s, backward, frozen_flops(s, backward));
}

template <typename Scalar>
void bm_lora(benchmark::State& state, Shape s, bool backward) {
  hra::LoraOptions opt;
  opt.rank = s.r;
  opt.alpha = static_cast<double>(s.r);
  hra::LoraLinear<Scalar> layer(frozen_view<Scalar>(s), std::nullopt, opt);
  // B starts at zero; give it values so nothing is special about the timed products.
  layer.set_lora_weights(layer.lora_a(), random_matrix<Scalar>(s.d_out, s.r, 5, 0.01));
  time_layer<Scalar>(state, layer, s, backward, lora_flops(s, backward));
}

template <typename Scalar>
hra::HraOptions hra_options(const Shape& s, hra::Variant variant) {
  hra::HraOptions opt;
  opt.rank = s.r;
  opt.variant = variant;
  opt.init = hra::Init::random;
  return opt;
}

template <typename Scalar>
void bm_hra(benchmark::State& state, Shape s, bool backward, hra::Variant variant) {
  hra::HraLinear<Scalar> layer(frozen_view<Scalar>(s), std::nullopt,
                               hra_options<Scalar>(s, variant));
  layer.set_reflectors("default", Operands<Scalar>::reflectors(s.d_in, s.r));
  time_layer<Scalar>(state, layer, s, backward, hra_flops(s, backward));
}

// HraLinear with its form forced (hra::HraForm::chain or low_rank); "hra" is automatic.
template <typename Scalar>
void bm_hra_form(benchmark::State& state, Shape s, bool backward, hra::HraForm form) {
  hra::HraLinear<Scalar> layer(frozen_view<Scalar>(s), std::nullopt,
                               hra_options<Scalar>(s, hra::Variant::chain));
  layer.set_reflectors("default", Operands<Scalar>::reflectors(s.d_in, s.r));
  layer.set_form(form);
  time_layer<Scalar>(state, layer, s, backward, hra_flops(s, backward));
  state.SetLabel(hra::to_string(layer.last_form()));
}

// The chain applied one reflection at a time (hra::reference::apply_one_at_a_time), then the
// frozen product; backward: W^T dY, then one_at_a_time_backward.
template <typename Scalar>
void bm_one_at_a_time(benchmark::State& state, Shape s, bool backward) {
  const auto& w = Operands<Scalar>::weight(s.d_out, s.d_in);
  const Matrix<Scalar>& u = Operands<Scalar>::reflectors(s.d_in, s.r);
  const auto& x = Operands<Scalar>::batch(s.d_in, s.n, 11);
  const auto& dy = Operands<Scalar>::batch(s.d_out, s.n, 12);
  Matrix<Scalar> hx, y, g, du;
  run_timed(state, [&] {
    hx = x;
    hra::reference::apply_one_at_a_time<Scalar>(u, hx);
    y.noalias() = w * hx;
    benchmark::DoNotOptimize(y.data());
    if (backward) {
      g.noalias() = w.transpose() * dy;
      one_at_a_time_backward(u, hx, g, du);
      benchmark::DoNotOptimize(g.data());
      benchmark::DoNotOptimize(du.data());
    }
  });
  set_flops(state, one_at_a_time_flops(s, backward));
  // Kept between the passes: H X and Y, as the HRA layer (no coefficients: they are recomputed).
  if (backward)
    set_saved_bytes(state, static_cast<std::size_t>(hx.size() + y.size()) * sizeof(Scalar));
}

// PEFT's algorithm: dense H by r rank-1 updates, W H, then the product; backward as autograd.
template <typename Scalar>
void bm_peft(benchmark::State& state, Shape s, bool backward) {
  const auto& w = Operands<Scalar>::weight(s.d_out, s.d_in);
  const Matrix<Scalar>& u = Operands<Scalar>::reflectors(s.d_in, s.r);
  const auto& x = Operands<Scalar>::batch(s.d_in, s.n, 11);
  const auto& dy = Operands<Scalar>::batch(s.d_out, s.n, 12);
  Matrix<Scalar> h, w_eff, y, dx, du;
  PeftState<Scalar> st;
  std::size_t saved = 0;
  run_timed(state, [&] {
    if (backward) {
      peft_forward_train(w, u, x, st, y);
      saved = st.bytes() + static_cast<std::size_t>(y.size()) * sizeof(Scalar);
      peft_backward(w, u, st, dy, dx, du);
      benchmark::DoNotOptimize(dx.data());
      benchmark::DoNotOptimize(du.data());
    } else {
      peft_forward(w, u, x, h, w_eff, y);
    }
    benchmark::DoNotOptimize(y.data());
  });
  set_flops(state, peft_flops(s, backward));
  if (backward) set_saved_bytes(state, saved);
}

// merge (W <- W H) or unmerge (W <- W H^T) of the HRA layer; the opposite operation runs with
// the timer paused so every iteration starts from the same state.
template <typename Scalar>
void bm_merge(benchmark::State& state, Shape s, bool unmerge) {
  hra::HraLinear<Scalar> layer(Matrix<Scalar>(Operands<Scalar>::weight(s.d_out, s.d_in)),
                               hra_options<Scalar>(s, hra::Variant::chain));
  layer.set_reflectors("default", Operands<Scalar>::reflectors(s.d_in, s.r));
  layer.merge();  // untimed round trip: first touch of every buffer (see run_timed)
  layer.unmerge();
  if (unmerge) layer.merge();
  for (auto _ : state) {
    if (unmerge) {
      layer.unmerge();
      benchmark::DoNotOptimize(layer.weight().data());
      state.PauseTiming();
      layer.merge();
      state.ResumeTiming();
    } else {
      layer.merge();
      benchmark::DoNotOptimize(layer.weight().data());
      state.PauseTiming();
      layer.unmerge();
      state.ResumeTiming();
    }
    benchmark::ClobberMemory();
  }
  set_flops(state, merge_flops(s));
}

// Memory-bandwidth reference: B <- A for a d_out x d_in matrix (one read and one write of the
// matrix), split by columns over `threads` std::threads. The floor of any merge, which has to
// read and write W at least once.
template <typename Scalar>
void bm_copy(benchmark::State& state, Shape s, int threads) {
  const auto& a = Operands<Scalar>::weight(s.d_out, s.d_in);
  Matrix<Scalar> b = Matrix<Scalar>::Zero(a.rows(), a.cols());
  const Index chunk = (a.cols() + threads - 1) / threads;
  run_timed(state, [&] {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&a, &b, chunk, t] {
        const Index c0 = t * chunk, w = std::min(chunk, a.cols() - c0);
        if (w > 0) b.middleCols(c0, w) = a.middleCols(c0, w);
      });
    for (auto& th : pool) th.join();
    benchmark::DoNotOptimize(b.data());
  });
  state.counters["bytes"] = benchmark::Counter(2.0 * static_cast<double>(a.size()) * sizeof(Scalar),
                                               benchmark::Counter::kIsIterationInvariantRate);
}

// ------------------------------------------------------------------------------------------
// The sweep.
// ------------------------------------------------------------------------------------------

struct Config {
  int threads = 2;
  int blas_threads = 0;  // 0: as threads
  int reps = 5;
  bool with_double = true;
  bool check = true;
};

inline bool is_headline(const Shape& s) {
  return s.d_in == 4096 && s.d_out == 4096 && (s.n == 512 || s.n == 0) &&
         (s.r == 0 || s.r == 8 || s.r == 32);
}

template <typename Scalar>
void add(const Config& cfg, const std::string& method, const char* pass, const Shape& s,
         std::function<void(benchmark::State&)> fn, bool repeat = true) {
  const std::string name = method + "/" + pass + "/" + scalar_name<Scalar>();
  auto* b = benchmark::RegisterBenchmark(name.c_str(), std::move(fn));
  b->Args({s.d_in, s.d_out, s.r, s.n})
      ->ArgNames({"d_in", "d_out", "r", "n"})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();  // Eigen/OpenBLAS threads do the work: wall time is what counts
  if (repeat && cfg.reps > 1 && std::is_same<Scalar, float>::value && is_headline(s))
    b->Repetitions(cfg.reps)->ReportAggregatesOnly(true);
}

// PEFT's dense algorithm costs O(r d_in^2 + d_out d_in^2) whatever n is (about 1 s forward and
// 2.5 s forward+backward at d = 4096 on 2 cores) and keeps r + 1 dense d_in x d_in matrices
// for its backward (2.2 GB at d = 4096, r = 32 in float). At d_in = 4096 it is therefore timed
// at n = 512 and r in {8, 32} only, in float only, with one repetition.
inline bool peft_included(const Shape& s, bool is_float) {
  if (s.d_in <= 1024) return true;
  return is_float && s.n == 512 && (s.r == 8 || s.r == 32);
}

template <typename Scalar>
void register_shape(const Config& cfg, Index d_in, Index d_out, const std::vector<Index>& ranks,
                    const std::vector<Index>& batches, bool with_peft) {
  constexpr bool is_float = std::is_same<Scalar, float>::value;
  for (Index n : batches) {
    const Shape f{d_in, d_out, 0, n};
    add<Scalar>(cfg, "frozen", "fwd", f,
                [f](benchmark::State& st) { bm_frozen<Scalar>(st, f, false); });
    add<Scalar>(cfg, "frozen", "fwdbwd", f,
                [f](benchmark::State& st) { bm_frozen<Scalar>(st, f, true); });
    for (Index r : ranks) {
      const Shape s{d_in, d_out, r, n};
      for (bool bwd : {false, true}) {
        const char* pass = bwd ? "fwdbwd" : "fwd";
        add<Scalar>(cfg, "lora", pass, s,
                    [s, bwd](benchmark::State& st) { bm_lora<Scalar>(st, s, bwd); });
        add<Scalar>(cfg, "hra", pass, s, [s, bwd](benchmark::State& st) {
          bm_hra<Scalar>(st, s, bwd, hra::Variant::chain);
        });
        add<Scalar>(cfg, "hra_gs", pass, s, [s, bwd](benchmark::State& st) {
          bm_hra<Scalar>(st, s, bwd, hra::Variant::gram_schmidt);
        });
        add<Scalar>(cfg, "one_at_a_time", pass, s,
                    [s, bwd](benchmark::State& st) { bm_one_at_a_time<Scalar>(st, s, bwd); });
        if (with_peft && peft_included(s, is_float))
          add<Scalar>(
              cfg, "peft_cpp", pass, s,
              [s, bwd](benchmark::State& st) { bm_peft<Scalar>(st, s, bwd); }, false);
      }
    }
  }
  for (Index r : ranks) {
    const Shape m{d_in, d_out, r, 0};
    add<Scalar>(cfg, "merge", "op", m,
                [m](benchmark::State& st) { bm_merge<Scalar>(st, m, false); });
    add<Scalar>(cfg, "unmerge", "op", m,
                [m](benchmark::State& st) { bm_merge<Scalar>(st, m, true); });
  }
}

/// HraLinear's two forms (SPEC 10, #11) where the cost model switches: a narrowing layer
/// 4096 -> 1024 at r = 8, n = 512 (chain form cheaper) and n = 2048 (low-rank form cheaper,
/// from n > 910), fwd+bwd: frozen, LoRA, HRA automatic and both forms forced.
template <typename Scalar>
void register_forms(const Config& cfg) {
  for (Index n : {512, 2048}) {
    const Shape f{4096, 1024, 0, n}, s{4096, 1024, 8, n};
    if (n != 512) {  // the sweep has these at n = 512
      add<Scalar>(cfg, "frozen", "fwdbwd", f,
                  [f](benchmark::State& st) { bm_frozen<Scalar>(st, f, true); });
      add<Scalar>(cfg, "lora", "fwdbwd", s,
                  [s](benchmark::State& st) { bm_lora<Scalar>(st, s, true); });
      add<Scalar>(cfg, "hra", "fwdbwd", s,
                  [s](benchmark::State& st) { bm_hra<Scalar>(st, s, true, hra::Variant::chain); });
    }
    add<Scalar>(cfg, "hra_chain", "fwdbwd", s, [s](benchmark::State& st) {
      bm_hra_form<Scalar>(st, s, true, hra::HraForm::chain);
    });
    add<Scalar>(cfg, "hra_low_rank", "fwdbwd", s, [s](benchmark::State& st) {
      bm_hra_form<Scalar>(st, s, true, hra::HraForm::low_rank);
    });
  }
}

/// Registers the float sweep (bench_float.cpp) / the double sweep (bench_double.cpp).
void register_float(const Config& cfg);
void register_double(const Config& cfg);

}  // namespace hra_bench
