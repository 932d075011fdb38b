// Shared pieces of the hra benchmarks: cached operands, the naive algorithms the library is
// timed against (one reflection at a time, PEFT's dense-H algorithm) with their backward passes,
// and the flop models used by the benchmark counters.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "hra/hra.hpp"
#include "hra/reference.hpp"

namespace hra_bench {

using Index = Eigen::Index;
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// One benchmark case: W is d_out x d_in, the batch is d_in x n, the adapter has rank r.
struct Shape {
  Index d_in = 0, d_out = 0, r = 0, n = 0;
};

/// Deterministic uniform(-scale, scale) matrix (SplitMix64), independent of std::rand.
template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale) {
  Matrix<Scalar> m(rows, cols);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (Index i = 0; i < m.size(); ++i) {
    s += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const double u = static_cast<double>(z >> 11) * 0x1.0p-53;  // [0, 1)
    m(i) = static_cast<Scalar>(scale * (2.0 * u - 1.0));
  }
  return m;
}

/// Operands shared by every benchmark of one shape: generating a 4096 x 4096 weight costs more
/// than many of the timed operations, so each matrix is made once per process and reused.
template <typename Scalar>
struct Operands {
  /// Frozen weight d_out x d_in, entries ~ 1/sqrt(d_in) as a trained layer would have.
  static Matrix<Scalar>& weight(Index d_out, Index d_in) {
    static std::map<std::pair<Index, Index>, Matrix<Scalar>> cache;
    auto it = cache.find({d_out, d_in});
    if (it == cache.end())
      it = cache
               .emplace(std::make_pair(d_out, d_in),
                        random_matrix<Scalar>(d_out, d_in, 1, 1.0 / std::sqrt(double(d_in))))
               .first;
    return it->second;
  }
  /// A batch (rows x n); seed separates the input X from the upstream gradient dY.
  static const Matrix<Scalar>& batch(Index rows, Index n, std::uint64_t seed) {
    static std::map<std::tuple<Index, Index, std::uint64_t>, Matrix<Scalar>> cache;
    auto it = cache.find({rows, n, seed});
    if (it == cache.end())
      it = cache.emplace(std::make_tuple(rows, n, seed), random_matrix<Scalar>(rows, n, seed, 1.0))
               .first;
    return it->second;
  }
  /// Reflector columns U (d x r), plain random (no two columns equal, so H != I).
  static const Matrix<Scalar>& reflectors(Index d, Index r) {
    static std::map<std::pair<Index, Index>, Matrix<Scalar>> cache;
    auto it = cache.find({d, r});
    if (it == cache.end())
      it = cache.emplace(std::make_pair(d, r), random_matrix<Scalar>(d, r, 7, 1.0)).first;
    return it->second;
  }
};

// Runs `step` once untimed, then times it: the steady state of a training loop, whose buffers
// persist from step to step. Without the untimed step the first iteration pays for allocating
// and first-touching every buffer, ~12 us per 4 KiB page on the benchmark VM (25 ms per 8 MiB
// buffer), and at d = 4096, n = 512 a single iteration already exceeds --benchmark_min_time.
template <typename Step>
void run_timed(benchmark::State& state, Step&& step) {
  step();
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
}

// ------------------------------------------------------------------------------------------
// One reflection at a time: forward with hra::reference::apply_one_at_a_time, backward written
// here in the same unblocked style (rank-1 updates and GEMVs, one reflection per pass).
// ------------------------------------------------------------------------------------------

/// Backward of Y = H_1 ... H_r X processed one reflection at a time (H_1 first). On entry `y`
/// holds the forward output and `g` = dL/dY; on return `y` holds X (each reflection is its own
/// inverse, so block inputs are rebuilt rather than stored), `g` = dL/dX and `du` = dL/dU.
/// Per reflection, with v = u/|u|, t = v^T y, X_in = y - 2 v t and z = v^T g:
///   dv = 2 g t^T - 2 X_in z^T,  g <- g - 2 v z,  du = (I - v v^T) dv / |u|.
/// 12 d n flops per reflection (forward: 4 d n).
template <typename Scalar>
void one_at_a_time_backward(const Matrix<Scalar>& u, Matrix<Scalar>& y, Matrix<Scalar>& g,
                            Matrix<Scalar>& du) {
  du.resize(u.rows(), u.cols());
  RowVector<Scalar> t, z;
  Vector<Scalar> v, dv;
  for (Index i = 0; i < u.cols(); ++i) {
    const Scalar norm = u.col(i).norm();
    v = u.col(i) / norm;
    t.noalias() = v.transpose() * y;
    y.noalias() -= (Scalar(2) * v) * t;  // now the input of H_i
    z.noalias() = v.transpose() * g;
    dv.noalias() = Scalar(2) * g * t.transpose();
    dv.noalias() -= Scalar(2) * y * z.transpose();
    g.noalias() -= (Scalar(2) * v) * z;
    du.col(i) = (dv - v * v.dot(dv)) / norm;
  }
}

// ------------------------------------------------------------------------------------------
// PEFT's algorithm (HraLayer.get_delta_weight + forward, apply_GS=False) restated in C++:
// the dense d_in x d_in H from r rank-1 updates H <- H - 2 (H v) v^T, then W H, then the
// product. The backward is what autograd runs on that graph.
// ------------------------------------------------------------------------------------------

/// State PEFT's graph keeps for its backward (autograd saves every intermediate H).
template <typename Scalar>
struct PeftState {
  std::vector<Matrix<Scalar>> h;  ///< h[0] = I, h[i+1] = h[i] - 2 a_i v_i^T  (r+1 of d x d)
  Matrix<Scalar> a;               ///< a_i = h[i] v_i, d x r
  Matrix<Scalar> v;               ///< normalised reflectors, d x r
  Matrix<Scalar> w_eff;           ///< W H, d_out x d_in
  Matrix<Scalar> x;               ///< the input (F.linear saves it for dW_eff)
  Matrix<Scalar> dw_eff, dh;      ///< backward work buffers (reused, not counted as saved)

  std::size_t bytes() const {
    std::size_t n = static_cast<std::size_t>(a.size() + v.size() + w_eff.size() + x.size());
    for (const auto& m : h) n += static_cast<std::size_t>(m.size());
    return n * sizeof(Scalar);
  }
};

/// Normalised columns of U (PEFT: opt_u / opt_u.norm(dim=0)).
template <typename Scalar>
void normalized_columns(const Matrix<Scalar>& u, Matrix<Scalar>& v) {
  v = u * u.colwise().norm().cwiseInverse().asDiagonal();
}

/// Inference forward: H in one d x d buffer, W_eff = W H, Y = W_eff X.
/// 4 r d_in^2 + 2 d_out d_in^2 + 2 d_out d_in n flops, O(d_in^2) memory, whatever n is.
template <typename Scalar, typename WeightT>
void peft_forward(const WeightT& w, const Matrix<Scalar>& u, const Matrix<Scalar>& x,
                  Matrix<Scalar>& h, Matrix<Scalar>& w_eff, Matrix<Scalar>& y) {
  const Index d = u.rows();
  Matrix<Scalar> v;
  normalized_columns(u, v);
  h.setIdentity(d, d);
  Vector<Scalar> a;
  for (Index i = 0; i < u.cols(); ++i) {
    a.noalias() = h * v.col(i);
    h.noalias() -= (Scalar(2) * a) * v.col(i).transpose();
  }
  w_eff.noalias() = w * h;
  y.noalias() = w_eff * x;
}

/// Training forward: as peft_forward but keeping every intermediate H (autograd's graph).
template <typename Scalar, typename WeightT>
void peft_forward_train(const WeightT& w, const Matrix<Scalar>& u, const Matrix<Scalar>& x,
                        PeftState<Scalar>& st, Matrix<Scalar>& y) {
  const Index d = u.rows(), r = u.cols();
  normalized_columns(u, st.v);
  st.h.resize(static_cast<std::size_t>(r + 1));
  st.a.resize(d, r);
  st.h[0].setIdentity(d, d);
  for (Index i = 0; i < r; ++i) {
    const auto k = static_cast<std::size_t>(i);
    st.a.col(i).noalias() = st.h[k] * st.v.col(i);
    st.h[k + 1] = st.h[k];
    st.h[k + 1].noalias() -= (Scalar(2) * st.a.col(i)) * st.v.col(i).transpose();
  }
  st.w_eff.noalias() = w * st.h.back();
  st.x = x;
  y.noalias() = st.w_eff * x;
}

/// Autograd's backward through peft_forward_train: dW_eff = dY X^T, dX = W_eff^T dY,
/// dH = W^T dW_eff, then through the rank-1 updates from the last to the first:
///   da = -2 dH v,  dv = -2 dH^T a + H_prev^T da,  dH_prev = dH + da v^T,
/// and the normalisation du = (I - v v^T) dv / |u|. W is frozen, so no dW.
/// 4 d_out d_in n + 2 d_out d_in^2 + 8 r d_in^2 flops.
template <typename Scalar, typename WeightT>
void peft_backward(const WeightT& w, const Matrix<Scalar>& u, PeftState<Scalar>& st,
                   const Matrix<Scalar>& dy, Matrix<Scalar>& dx, Matrix<Scalar>& du) {
  const Index r = u.cols();
  Matrix<Scalar>& dw_eff = st.dw_eff;
  Matrix<Scalar>& dh = st.dh;
  dw_eff.noalias() = dy * st.x.transpose();
  dx.noalias() = st.w_eff.transpose() * dy;
  dh.noalias() = w.transpose() * dw_eff;
  Vector<Scalar> da, dv;
  du.resize(u.rows(), r);
  for (Index i = r - 1; i >= 0; --i) {
    const auto k = static_cast<std::size_t>(i);
    da.noalias() = Scalar(-2) * dh * st.v.col(i);
    dv.noalias() = Scalar(-2) * dh.transpose() * st.a.col(i);
    dv.noalias() += st.h[k].transpose() * da;
    // H_0 = I does not require grad: autograd stops there.
    if (i > 0) dh.noalias() += da * st.v.col(i).transpose();
    const Scalar norm = u.col(i).norm();
    du.col(i) = (dv - st.v.col(i) * st.v.col(i).dot(dv)) / norm;
  }
}

// ------------------------------------------------------------------------------------------
// Flop models (multiply-add = 2 flops), for the GFLOP/s counters.
// ------------------------------------------------------------------------------------------

inline double frozen_flops(const Shape& s, bool backward) {
  return (backward ? 4.0 : 2.0) * double(s.d_out) * double(s.d_in) * double(s.n);
}
inline double lora_flops(const Shape& s, bool backward) {
  const double r = double(s.r), n = double(s.n), di = double(s.d_in), dout = double(s.d_out);
  return frozen_flops(s, backward) + 2.0 * r * n * (di + dout) * (backward ? 3.0 : 1.0);
}
inline double hra_flops(const Shape& s, bool backward) {
  const double r = double(s.r), n = double(s.n), di = double(s.d_in);
  return frozen_flops(s, backward) + (backward ? 14.0 : 4.0) * r * di * n + r * r * di;
}
inline double one_at_a_time_flops(const Shape& s, bool backward) {
  const double r = double(s.r), n = double(s.n), di = double(s.d_in);
  return frozen_flops(s, backward) + (backward ? 16.0 : 4.0) * r * di * n;
}
inline double peft_flops(const Shape& s, bool backward) {
  const double r = double(s.r), di = double(s.d_in), dout = double(s.d_out);
  const double fwd = 4.0 * r * di * di + 2.0 * dout * di * di;
  const double bwd = backward ? 2.0 * dout * di * di + 8.0 * r * di * di : 0.0;
  return frozen_flops(s, backward) + fwd + bwd;
}
inline double merge_flops(const Shape& s) {
  const double r = double(s.r), di = double(s.d_in), dout = double(s.d_out);
  return 4.0 * dout * di * r + r * r * di;
}

/// Removes the first argument starting with `prefix` from argv (before Google Benchmark sees
/// it); true if there was one, its remainder in *value (when value is not null).
inline bool take_flag(int& argc, char** argv, const char* prefix, std::string* value) {
  const std::size_t len = std::strlen(prefix);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix, len) == 0) {
      if (value) *value = argv[i] + len;
      for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
      --argc;
      return true;
    }
  }
  return false;
}

/// The benchmark threads: --threads=N (taken from argv), else $HRA_BENCH_THREADS, else
/// `fallback`.
inline int take_threads_flag(int& argc, char** argv, int fallback) {
  int threads = fallback;
  if (const char* env = std::getenv("HRA_BENCH_THREADS")) threads = std::atoi(env);
  std::string value;
  if (take_flag(argc, argv, "--threads=", &value)) threads = std::atoi(value.c_str());
  return threads;
}

}  // namespace hra_bench
