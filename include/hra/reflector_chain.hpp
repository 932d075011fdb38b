// The Householder reflection chain H = H_1 H_2 ... H_r in compact WY (UT) form.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "detail/checks.hpp"
#include "detail/gemm.hpp"
#include "detail/random.hpp"
#include "detail/right_update.hpp"

namespace hra {

namespace detail {

/// T = S^{-1} for an upper-triangular S with a non-zero diagonal (T is upper triangular, zero
/// below the diagonal), column by column as LAPACK's dlarft builds its T factor:
/// T(0:j, j) = -T(0:j, 0:j) S(0:j, j) / S(j, j), T(j, j) = 1 / S(j, j). O(b^3 / 3); the strictly
/// lower part of S is not read.
template <typename Matrix>
Matrix upper_inverse(const Matrix& s) {
  using Scalar = typename Matrix::Scalar;
  const Eigen::Index b = s.rows();
  Matrix t = Matrix::Zero(b, b);
  for (Eigen::Index j = 0; j < b; ++j) {
    t(j, j) = Scalar(1) / s(j, j);
    for (Eigen::Index i = 0; i < j; ++i) {
      Scalar sum(0);
      for (Eigen::Index k = i; k < j; ++k) sum += t(i, k) * s(k, j);
      t(i, j) = -t(j, j) * sum;
    }
  }
  return t;
}

/// sym(M) = triu(M) + striu(M)^T (the upper part of M made symmetric), for a square M.
template <typename Matrix>
Matrix upper_symmetrised(const Matrix& m) {
  Matrix sym(m.rows(), m.cols());
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i) sym(i, j) = i <= j ? m(i, j) : m(j, i);
  return sym;
}

}  // namespace detail

/// How the reflector columns U become an orthogonal matrix.
enum class Variant {
  chain,        ///< H = H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2 (PEFT apply_GS=False)
  gram_schmidt  ///< H = I - 2 Q Q^T, Q the orthonormal factor of U (PEFT apply_GS=True)
};

/// How reflector columns are drawn.
enum class Init {
  symmetric,  ///< PEFT init_weights=True: r/2 columns, each repeated twice, so H = I exactly
  random,     ///< every column drawn independently (PEFT's fallback for odd r): H != I
  given       ///< U is the caller's (HraOptions::given): any r and variant, nothing drawn
};

/// Which of H and H^T (= H^{-1}) a kernel applies.
enum class Apply { h, transpose };

inline const char* to_string(Variant v) {
  return v == Variant::chain ? "chain" : "gram_schmidt";
}

/// \brief A chain of r Householder reflections acting on R^d, stored as the columns of U (d x r).
///
/// Chain variant:  H = H_1 H_2 ... H_r,  H_i = I - 2 u_i u_i^T / |u_i|^2, applied without ever
/// forming H, in the compact WY / UT form  H = I - U S^{-1} U^T  with
/// S = striu(U^T U) + diag(U^T U)/2 (S^{-1} is LAPACK's dlarft T factor for tau_i = 2/|u_i|^2).
/// Columns are processed in blocks of `block_size` (each block has its own S), as in dlarfb, so
/// the r^2 d term and the r x r factor stay small for large r. As LAPACK does (dlarft, then
/// dlarfb's TRMM), each block's T = S^{-1} is formed once per factorisation (O(b^3/3)) by the
/// triangular recurrence and applied by products: for r x n coefficients a small product is
/// several times faster than a triangular solve (Eigen's TRSM at r = 32, n = 64: 5.6 and 11 us
/// against 1-2 us for the product).
///
/// Gram-Schmidt variant: H = I - 2 Q Q^T with Q R = U the thin QR with positive diag(R).
///
/// All batches are column-major d x n (one sample per column). Two tiers of entry points:
/// - the checked ones (apply, forward, backward_in_place, ...) validate shapes and the cache and
///   throw std::invalid_argument naming both sizes; they derive the factors of U on each call
///   (O(r b d)), so U may change freely between calls, but not between a forward and the
///   backward that uses its cache;
/// - the factor-level ones take the Factors of factorize() (the only place U's values are
///   validated) and assume consistent shapes, checked by HRA_ASSERT only: they are for layers
///   that validate once at their own entry and reuse one factorisation.
template <typename Scalar_>
class ReflectorChain : public detail::ScalarTypes<Scalar_> {
  using Types = detail::ScalarTypes<Scalar_>;

 public:
  HRA_LAYER_TYPES(Types);

  static constexpr Index default_block_size = 32;

  /// What a factorisation depends on besides U's values: the variant, r and the block size.
  struct Layout {
    Variant variant = Variant::chain;
    Index rank = 0;
    Index block_size = 0;
    friend bool operator==(const Layout& a, const Layout& b) {
      return a.variant == b.variant && a.rank == b.rank && a.block_size == b.block_size;
    }
    friend bool operator!=(const Layout& a, const Layout& b) { return !(a == b); }
  };

  /// Quantities derived from U by factorize(): one upper-triangular T = S^{-1} per column block
  /// (chain),
  /// or Q (d x r) and R (r x r) (Gram-Schmidt), and the layout they were made for.
  struct Factors {
    Layout layout;
    /// T_j = S_j^{-1}, b_j x b_j (zero below the diagonal), block j = columns [j*b, j*b + b_j)
    std::vector<Matrix> blocks;
    Matrix q;  ///< Gram-Schmidt only
    Matrix r;  ///< Gram-Schmidt only, upper triangular with positive diagonal
  };

  /// What forward() keeps for backward(): r x n coefficients plus the factors of U.
  /// chain: coeffs = S_j^{-1} U_j^T (block input), stacked by block; GS: coeffs = Q^T X.
  struct ForwardCache {
    Matrix coeffs;
    Factors factors;
    /// Bytes held (what a layer keeps between forward and backward for the chain itself).
    std::size_t bytes() const {
      std::size_t n = static_cast<std::size_t>(coeffs.size() + factors.q.size() + factors.r.size());
      for (const auto& s : factors.blocks) n += static_cast<std::size_t>(s.size());
      return n * sizeof(Scalar);
    }
  };

  ReflectorChain() = default;

  /// Wraps the reflector columns U (d x r, 1 <= r <= d). Throws std::invalid_argument on
  /// r = 0, r > d, block_size < 1, non-finite entries or a zero column.
  explicit ReflectorChain(Matrix reflectors, Variant variant = Variant::chain,
                          Index block_size = default_block_size)
      : u_(std::move(reflectors)), variant_(variant), block_size_(block_size) {
    check_rank(u_.rows(), u_.cols());
    check_block_size(block_size_);
    check_columns(u_);
  }

  /// A d x r chain drawn with `init` from a generator seeded with `seed`, as PEFT does:
  /// uniform in +-1/sqrt(fan) with fan = r/2 (symmetric) or r (random).
  /// Symmetric init needs an even rank and is refused for the Gram-Schmidt variant, whose
  /// duplicated columns would be linearly dependent.
  static ReflectorChain initialized(Index dim, Index rank, Init init, std::uint64_t seed,
                                    Variant variant = Variant::chain,
                                    Index block_size = default_block_size);

  Index dim() const { return u_.rows(); }
  Index rank() const { return u_.cols(); }
  Variant variant() const { return variant_; }
  Index block_size() const { return block_size_; }
  Layout layout() const { return {variant_, rank(), block_size_}; }

  /// U, d x r. Column i is u_i (its length is irrelevant: only its direction is used).
  const Matrix& reflectors() const { return u_; }
  /// U's values for optimisers: a d x r view that cannot change the shape. Values are
  /// validated by the next factorize().
  Eigen::Map<Matrix> reflector_values() { return {u_.data(), u_.rows(), u_.cols()}; }

  /// Replaces U after checking shape (must stay d x r), finiteness and non-zero columns.
  /// On error the chain is unchanged.
  void set_reflectors(const ConstRef& u) {
    detail::check_shape(u, dim(), rank(), "ReflectorChain::set_reflectors");
    check_columns(u);
    u_ = u;
  }

  void set_block_size(Index b) {
    check_block_size(b);
    block_size_ = b;
  }

  /// Derives the factors of the current U. Throws std::invalid_argument for a zero or
  /// non-finite column, a column whose squared norm over- or underflows, and, for
  /// Gram-Schmidt, for linearly dependent columns.
  Factors factorize() const;

  // --- Checked entry points ----------------------------------------------------------------

  /// Y = H X for a d x n block X (Y may not alias X; use apply_in_place for that).
  void apply(const ConstRef& x, Matrix& y) const;

  /// X <- H X in place.
  void apply_in_place(Matrix& x) const {
    check_rows(x.rows(), "ReflectorChain::apply_in_place");
    apply(factorize(), x, Apply::h);
  }

  /// Y = H^T X (= H^{-1} X).
  void apply_transpose(const ConstRef& x, Matrix& y) const {
    detail::check_shape(x, dim(), x.cols(),
                        "ReflectorChain::apply_transpose (input rows must equal d)");
    y = x;
    apply(factorize(), y, Apply::transpose);
  }

  /// X <- H^T X in place.
  void apply_transpose_in_place(Matrix& x) const {
    check_rows(x.rows(), "ReflectorChain::apply_transpose_in_place");
    apply(factorize(), x, Apply::transpose);
  }

  /// W <- W H for W with d columns: W - (W U) S^{-1} U^T block by block, O(rows d r).
  void apply_right(Eigen::Ref<Matrix> w) const;

  /// W <- W H^T (undoes apply_right up to rounding).
  void apply_transpose_right(Eigen::Ref<Matrix> w) const {
    check_columns_of(w.cols(), "ReflectorChain::apply_transpose_right");
    apply_right(factorize(), w, Apply::transpose);
  }

  /// The dense d x d H, for tests and debugging only (O(d^2 r)).
  Matrix dense() const {
    Matrix h = Matrix::Identity(dim(), dim());
    apply_in_place(h);
    return h;
  }

  /// Training forward: Y = H X, keeping O(r n) coefficients and the factors in `cache`.
  void forward(const ConstRef& x, Matrix& y, ForwardCache& cache) const;

  /// Training forward in place: X <- H X, keeping the cache (as forward()).
  void forward_in_place(Matrix& x, ForwardCache& cache) const;

  /// Training backward for Y = H X. Given the forward input X and G = dL/dY (both d x n) and the
  /// cache of that forward, *assigns* dX = dL/dX = H^T G (d x n) and dU = dL/dU (d x r).
  /// dU already accounts for the normalisation of every column, so u_i^T dU_i = 0.
  /// Built on the in-place backward: it starts from the output Y = X - U K (one product with the
  /// coefficients of every block).
  void backward(const ConstRef& x, const ConstRef& g, const ForwardCache& cache, Matrix& dx,
                Matrix& du) const;

  /// Backward from the forward *output*, without any d x n copy: on entry `y` holds Y = H X and
  /// `g` holds dL/dY; on return `y` holds the input X (rebuilt from Y and the cache, exact up to
  /// rounding), `g` holds dL/dX = H^T G, and dU = dL/dU is assigned.
  void backward_in_place(Matrix& y, Matrix& g, const ForwardCache& cache, Matrix& du) const;

  /// dU alone, for a loss that sees the chain's output Y only through a fixed matrix W
  /// (d_out x d): with E = dL/d(W Y) (d_out x n), the chain's output gradient is G = W^T E, but
  /// G is never formed. Only W U (d_out x r) and W^T (E K^T) (d x r) are, O(d_out d r + d_out n r)
  /// instead of the O(d_out d n) of W^T E. This is the backward of a layer y = W H x that needs
  /// no input gradient (a network's first layer). `y` is as in backward_in_place: Y on entry, the
  /// rebuilt input X on return. dU equals backward_in_place's up to rounding. Shapes are checked
  /// here but values are not (layers check W once and dY on every call).
  void backward_through(const ConstRef& w, const ConstRef& e, Matrix& y, const ForwardCache& cache,
                        Matrix& du) const;

  // --- Factor-level entry points (preconditions asserted, not checked) ---------------------

  /// X <- H X (op h) or H^T X (op transpose) with the factors `f` of this chain's U; X has d
  /// rows. With `coeffs` (op h only), also stores the r x n coefficients a backward needs:
  /// S_j^{-1} U_j^T (input of block j) stacked by block (chain) or Q^T X (Gram-Schmidt).
  void apply(const Factors& f, Matrix& x, Apply op, Matrix* coeffs = nullptr) const;

  /// W <- W H (op h: first block first) or W H^T (op transpose: last block first) with the
  /// factors `f`; W has d columns. O(rows(W) d r). Per block, W <- W - (W U_j) T_j U_j^T (T_j^T
  /// for op transpose; Gram-Schmidt: W - 2 (W Q) Q^T) by detail::RightUpdate, which reads and
  /// writes W in two streamed passes per block on hra's thread pool (the result does not depend
  /// on the thread count).
  void apply_right(const Factors& f, Eigen::Ref<Matrix> w, Apply op) const;

  /// What the `x` of a factor-level backward holds on entry.
  enum class State {
    output,  ///< the forward's output Y = H X (rebuilt into X on the way)
    input    ///< the forward's input X (overwritten with intermediate block inputs)
  };

  /// Backward with the factors and coefficients of a forward of this chain: on entry `g` is
  /// dL/dY and `x` is what `state` says (both d x n); on return `g` holds dL/dX = H^T G and dU
  /// (d x r) is assigned. With `restore_input`, `x` holds the input X on return (up to
  /// rounding); without it, `x` is left in an unspecified state and one d x n x r product is
  /// saved (a layer that keeps only H X for its backward passes false).
  void backward(const Factors& f, const Matrix& coeffs, Matrix& x, Matrix& g, Matrix& du,
                State state, bool restore_input = true) const;

  /// backward_through() with the factors and coefficients of a forward of this chain;
  /// `restore_input` as in backward().
  void backward_through(const Factors& f, const Matrix& coeffs, const ConstRef& w,
                        const ConstRef& e, Matrix& y, Matrix& du, bool restore_input = true) const;

  /// Relative threshold under which a Gram-Schmidt pivot R_ii / |u_i| counts as dependent.
  static Scalar dependence_tolerance(Index d) {
    return Scalar(16) * std::sqrt(static_cast<Scalar>(d)) * std::numeric_limits<Scalar>::epsilon();
  }

 private:
  using Op = detail::Op;

  static void check_rank(Index d, Index r) {
    if (d < 1) detail::throw_invalid("ReflectorChain: dimension d must be >= 1, got d=", d);
    if (r < 1) detail::throw_invalid("ReflectorChain: rank r must be >= 1, got r=", r);
    if (r > d)
      detail::throw_invalid("ReflectorChain: rank r=", r, " exceeds the dimension d=", d,
                            " (at most d reflections are meaningful)");
  }

  static void check_block_size(Index b) {
    if (b < 1) detail::throw_invalid("ReflectorChain: block_size must be >= 1, got ", b);
  }

  // Width of the block that starts at column c0 (never overflows, whatever block_size_ is).
  Index block_width(Index c0) const { return std::min(block_size_, rank() - c0); }

  void check_rows(Index rows, const char* what) const {
    if (rows != dim())
      detail::throw_invalid(what, ": the input has ", rows,
                            " rows but the chain acts on d=", dim());
  }

  void check_columns_of(Index cols, const char* what) const {
    if (cols != dim())
      detail::throw_invalid(what, ": the matrix has ", cols,
                            " columns but the chain acts on d=", dim());
  }

  void check_norm2(Scalar norm2, Index col) const;

  // A column whose squared norm is 0 (truly zero, or so small that its square underflows) or
  // so small that 1/|u|^2, which S^{-1} holds, overflows.
  template <typename Derived>
  [[noreturn]] static void throw_degenerate_column(const Eigen::MatrixBase<Derived>& column,
                                                   Index col, Scalar norm2);

  template <typename Derived>
  static void check_columns(const Eigen::MatrixBase<Derived>& u);

  // The user-facing cache check: the coefficients are r x n and the factors fit this chain.
  void check_cache(const ForwardCache& cache, Index n) const;

  // Modified Gram-Schmidt with one re-orthogonalisation pass ("twice is enough"), so Q stays
  // orthonormal to working precision even for ill-conditioned U.
  void gram_schmidt(Matrix& q, Matrix& r) const;

  // Per block j (from the output side, j = 1..m) with block output Y_j (Y_1 = Y), K_j, G_j:
  //   Z = S^{-T} U^T G,  M = Z K^T,  G_{j+1} = G - U Z,
  //   dU_j = -G K^T - X_j Z^T + U (striu(M) + striu(M)^T + diag(M))
  //        = -G K^T - Y_j Z^T + U (striu(M) - striu(M^T)),
  // since the block input is X_j = Y_j + U K and (U K) Z^T = U M^T. So X_j is only needed as
  // the next block's output, Y_{j+1} = X_j: the last block's input is rebuilt only on request.
  // From the input X, Y = X - U K (every block) first.
  // G enters dU_j only through U_j^T G_j and G_j K_j^T; block_gradient() takes those two.
  void backward_chain(const Factors& f, const Matrix& coeffs, Matrix& x, Matrix& g, Matrix& du,
                      State state, bool restore_input) const;

  // The chain's dU when G_1 = W^T E: U_j^T G_j and G_j K_j^T from W U, E and the earlier Z's:
  //   G_j = G_1 - U_{<j} Z_{<j}, so  U_j^T G_j = (W U_j)^T E - U_j^T U_{<j} Z_{<j}  and
  //   G_j K_j^T = W^T (E K_j^T) - U_{<j} (Z_{<j} K_j^T).
  void backward_chain_through(const Factors& f, const Matrix& coeffs, const ConstRef& w,
                              const ConstRef& e, Matrix& x, Matrix& du, bool restore_input) const;

  // One block's dU from its output Y_j, Z <- T^T U_j^T G_j = S^{-T} U_j^T G_j (on entry
  // U_j^T G_j) and
  // GK = G_j K_j^T: dU_j = U (striu(M) - striu(M^T)) - GK - Y_j Z^T with M = Z K^T.
  template <typename Coeffs>
  void block_gradient(const Matrix& t, Index c0, const Coeffs& kb, const Matrix& y, Matrix& z,
                      const Matrix& gk, Matrix& du) const;

  // X = Y + 2 Q P with P = Q^T X; dQ = -2 (G P^T + X (Q^T G)^T); through the QR:
  // dU = (dQ - Q sym(Q^T dQ)) R^{-T}, sym(M) = triu(M) + striu(M)^T. X (Q^T G)^T is computed
  // as Y (Q^T G)^T + 2 Q (P (Q^T G)^T), so X itself is only rebuilt on request.
  void backward_gram_schmidt(const Factors& f, const Matrix& coeffs, Matrix& x, Matrix& g,
                             Matrix& du, State state, bool restore_input) const;

  // As backward_gram_schmidt for G = W^T E: Q^T G = (W Q)^T E and G P^T = W^T (E P^T).
  void backward_gram_schmidt_through(const Factors& f, const Matrix& coeffs, const ConstRef& w,
                                     const ConstRef& e, Matrix& x, Matrix& du,
                                     bool restore_input) const;

  // dU from the output Y, P, Q^T G and G P^T.
  void gram_schmidt_gradient(const Factors& f, const Matrix& p, const Matrix& y, const Matrix& qg,
                             const Matrix& gp, Matrix& du) const;

  Matrix u_;
  Variant variant_ = Variant::chain;
  Index block_size_ = default_block_size;
};

template <typename Scalar_>
auto ReflectorChain<Scalar_>::initialized(Index dim, Index rank, Init init, std::uint64_t seed,
                                          Variant variant, Index block_size) -> ReflectorChain {
  check_rank(dim, rank);
  if (init == Init::given)
    detail::throw_invalid(
        "ReflectorChain::initialized: Init::given draws nothing; construct the chain from U "
        "(ReflectorChain(u, variant)) or give a layer its U with HraOptions::given(u)");
  detail::Random rng(seed);
  Matrix u(dim, rank);
  if (init == Init::symmetric) {
    if (rank % 2 != 0)
      detail::throw_invalid("ReflectorChain: symmetric initialisation needs an even rank, got r=",
                            rank, " (use Init::random for odd r; H then starts != I)");
    if (variant == Variant::gram_schmidt)
      detail::throw_invalid(
          "ReflectorChain: symmetric initialisation repeats every column, which makes the "
          "Gram-Schmidt variant degenerate (linearly dependent columns); use Init::random");
    const double bound = 1.0 / std::sqrt(static_cast<double>(rank / 2));
    for (Index j = 0; j < rank / 2; ++j) {
      for (Index i = 0; i < dim; ++i) u(i, 2 * j) = static_cast<Scalar>(rng.uniform(bound));
      u.col(2 * j + 1) = u.col(2 * j);
    }
  } else {
    const double bound = 1.0 / std::sqrt(static_cast<double>(rank));
    for (Index j = 0; j < rank; ++j)
      for (Index i = 0; i < dim; ++i) u(i, j) = static_cast<Scalar>(rng.uniform(bound));
  }
  return ReflectorChain(std::move(u), variant, block_size);
}

template <typename Scalar_>
auto ReflectorChain<Scalar_>::factorize() const -> Factors {
  Factors f;
  f.layout = layout();
  if (variant_ == Variant::chain) {
    for (Index c0 = 0; c0 < rank(); c0 += block_width(c0)) {
      const Index b = block_width(c0);
      const auto ub = u_.middleCols(c0, b);
      Matrix s;
      detail::serial_product(s, ub, Op::t, ub, Op::n);  // upper_inverse reads its upper half
      for (Index i = 0; i < b; ++i) {
        check_norm2(s(i, i), c0 + i);
        s(i, i) *= Scalar(0.5);
      }
      f.blocks.push_back(detail::upper_inverse(s));
    }
  } else {
    gram_schmidt(f.q, f.r);
  }
  return f;
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::apply(const ConstRef& x, Matrix& y) const {
  detail::check_shape(x, dim(), x.cols(), "ReflectorChain::apply (input rows must equal d)");
  y = x;
  apply(factorize(), y, Apply::h);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::apply_right(Eigen::Ref<Matrix> w) const {
  check_columns_of(w.cols(), "ReflectorChain::apply_right");
  apply_right(factorize(), w, Apply::h);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::forward(const ConstRef& x, Matrix& y, ForwardCache& cache) const {
  detail::check_shape(x, dim(), x.cols(), "ReflectorChain::forward (input rows must equal d)");
  Factors f = factorize();
  y = x;
  apply(f, y, Apply::h, &cache.coeffs);
  cache.factors = std::move(f);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::forward_in_place(Matrix& x, ForwardCache& cache) const {
  check_rows(x.rows(), "ReflectorChain::forward_in_place");
  Factors f = factorize();
  apply(f, x, Apply::h, &cache.coeffs);
  cache.factors = std::move(f);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward(const ConstRef& x, const ConstRef& g,
                                       const ForwardCache& cache, Matrix& dx, Matrix& du) const {
  detail::check_shape(x, dim(), x.cols(), "ReflectorChain::backward input X");
  detail::check_shape(g, dim(), x.cols(), "ReflectorChain::backward gradient G");
  check_cache(cache, x.cols());
  Matrix state = x;
  dx = g;
  backward(cache.factors, cache.coeffs, state, dx, du, State::input, /*restore_input=*/false);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_in_place(Matrix& y, Matrix& g, const ForwardCache& cache,
                                                Matrix& du) const {
  detail::check_shape(y, dim(), y.cols(), "ReflectorChain::backward output Y");
  detail::check_shape(g, dim(), y.cols(), "ReflectorChain::backward gradient G");
  check_cache(cache, y.cols());
  backward(cache.factors, cache.coeffs, y, g, du, State::output);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_through(const ConstRef& w, const ConstRef& e, Matrix& y,
                                               const ForwardCache& cache, Matrix& du) const {
  detail::check_shape(y, dim(), y.cols(), "ReflectorChain::backward_through output Y");
  if (w.cols() != dim())
    detail::throw_invalid("ReflectorChain::backward_through: W is ",
                          detail::shape(w.rows(), w.cols()), " but needs d=", dim(), " columns");
  detail::check_shape(e, w.rows(), y.cols(),
                      "ReflectorChain::backward_through gradient E (d_out x n)");
  check_cache(cache, y.cols());
  backward_through(cache.factors, cache.coeffs, w, e, y, du);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::apply(const Factors& f, Matrix& x, Apply op, Matrix* coeffs) const {
  HRA_ASSERT(f.layout == layout() && x.rows() == dim());
  HRA_ASSERT(coeffs == nullptr || op == Apply::h);
  if (variant_ == Variant::gram_schmidt) {  // symmetric: H^T = H
    Matrix p;
    detail::thin_product(p, f.q, Op::t, x, Op::n);
    detail::thin_product(x, f.q, Op::n, p, Op::n, Scalar(-2), true);
    if (coeffs) *coeffs = std::move(p);
    return;
  }
  // H = B_1 ... B_m: H X applies the last block first, H^T X = B_m^T ... B_1^T X the first.
  if (coeffs) coeffs->resize(rank(), x.cols());
  const Index m = static_cast<Index>(f.blocks.size());
  Matrix p, k;
  for (Index step = 0; step < m; ++step) {
    const Index j = op == Apply::h ? m - 1 - step : step;
    const auto& t = f.blocks[static_cast<std::size_t>(j)];
    const auto ub = u_.middleCols(j * block_size_, t.rows());
    detail::thin_product(p, ub, Op::t, x, Op::n);
    detail::serial_product(k, t, op == Apply::h ? Op::n : Op::t, p, Op::n);
    detail::thin_product(x, ub, Op::n, k, Op::n, Scalar(-1), true);
    if (coeffs) coeffs->middleRows(j * block_size_, t.rows()) = k;
  }
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::apply_right(const Factors& f, Eigen::Ref<Matrix> w, Apply op) const {
  HRA_ASSERT(f.layout == layout() && w.cols() == dim());
  if (variant_ == Variant::gram_schmidt) {
    detail::RightUpdate<Scalar>::run(w, f.q, Matrix(Scalar(2) * Matrix::Identity(rank(), rank())));
    return;
  }
  const Index m = static_cast<Index>(f.blocks.size());
  for (Index step = 0; step < m; ++step) {
    const Index j = op == Apply::transpose ? m - 1 - step : step;
    const Matrix& t = f.blocks[static_cast<std::size_t>(j)];
    const auto ub = u_.middleCols(j * block_size_, t.rows());
    if (op == Apply::transpose)
      detail::RightUpdate<Scalar>::run(w, ub, t.transpose());
    else
      detail::RightUpdate<Scalar>::run(w, ub, t);
  }
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward(const Factors& f, const Matrix& coeffs, Matrix& x, Matrix& g,
                                       Matrix& du, State state, bool restore_input) const {
  HRA_ASSERT(f.layout == layout() && x.rows() == dim() && g.rows() == dim());
  HRA_ASSERT(g.cols() == x.cols() && coeffs.rows() == rank() && coeffs.cols() == x.cols());
  du.resize(dim(), rank());
  if (variant_ == Variant::chain)
    backward_chain(f, coeffs, x, g, du, state, restore_input);
  else
    backward_gram_schmidt(f, coeffs, x, g, du, state, restore_input);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_through(const Factors& f, const Matrix& coeffs,
                                               const ConstRef& w, const ConstRef& e, Matrix& y,
                                               Matrix& du, bool restore_input) const {
  HRA_ASSERT(f.layout == layout() && y.rows() == dim() && w.cols() == dim());
  HRA_ASSERT(e.rows() == w.rows() && e.cols() == y.cols());
  HRA_ASSERT(coeffs.rows() == rank() && coeffs.cols() == y.cols());
  du.resize(dim(), rank());
  if (variant_ == Variant::chain)
    backward_chain_through(f, coeffs, w, e, y, du, restore_input);
  else
    backward_gram_schmidt_through(f, coeffs, w, e, y, du, restore_input);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::check_norm2(Scalar norm2, Index col) const {
  if (!std::isfinite(norm2)) {
    // Searches all of U so the message names the entry's (row, column) and U's shape; the
    // columns before `col` passed this check, so the first non-finite entry is in `col`.
    detail::check_finite(u_, "ReflectorChain: reflectors U");
    // Finite entries whose squares overflow.
    detail::throw_invalid("ReflectorChain: reflector column ", col,
                          " is too large: its squared norm overflows");
  }
  if (!(norm2 > Scalar(0)) || !std::isfinite(Scalar(1) / norm2))
    throw_degenerate_column(u_.col(col), col, norm2);
}

template <typename Scalar_>
template <typename Derived>
void ReflectorChain<Scalar_>::throw_degenerate_column(const Eigen::MatrixBase<Derived>& column,
                                                      Index col, Scalar norm2) {
  if (column.isZero(0))
    detail::throw_invalid("ReflectorChain: reflector column ", col,
                          " is zero (a reflection needs a non-zero direction)");
  if (norm2 > Scalar(0))
    detail::throw_invalid(
        "ReflectorChain: reflector column ", col, " is too small: its squared norm ", norm2,
        " has no finite inverse (largest entry ", column.cwiseAbs().maxCoeff(), "); rescale it");
  detail::throw_invalid("ReflectorChain: reflector column ", col,
                        " is too small: its squared norm underflows to 0 (largest entry ",
                        column.cwiseAbs().maxCoeff(), "); rescale it");
}

template <typename Scalar_>
template <typename Derived>
void ReflectorChain<Scalar_>::check_columns(const Eigen::MatrixBase<Derived>& u) {
  detail::check_finite(u, "ReflectorChain: reflectors U");
  for (Index j = 0; j < u.cols(); ++j) {
    const Scalar norm2 = u.col(j).squaredNorm();
    if (!(norm2 > Scalar(0)) || !std::isfinite(Scalar(1) / norm2))
      throw_degenerate_column(u.col(j), j, norm2);
  }
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::check_cache(const ForwardCache& cache, Index n) const {
  if (cache.coeffs.rows() != rank() || cache.coeffs.cols() != n)
    detail::throw_invalid("ReflectorChain::backward: the cache holds ",
                          detail::shape(cache.coeffs.rows(), cache.coeffs.cols()),
                          " coefficients but r x n is ", detail::shape(rank(), n),
                          " (was forward() called with this batch?)");
  if (cache.factors.layout != layout())
    detail::throw_invalid(
        "ReflectorChain::backward: the cache was made by a chain of another variant or block "
        "size");
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::gram_schmidt(Matrix& q, Matrix& r) const {
  const Index d = dim(), k = rank();
  q = u_;
  r.setZero(k, k);
  const Scalar tol = dependence_tolerance(d);
  for (Index i = 0; i < k; ++i) {
    const Scalar norm_in = q.col(i).norm();
    check_norm2(norm_in * norm_in, i);
    for (int pass = 0; pass < 2; ++pass) {
      for (Index j = 0; j < i; ++j) {
        const Scalar c = q.col(j).dot(q.col(i));
        r(j, i) += c;
        q.col(i) -= c * q.col(j);
      }
    }
    const Scalar rii = q.col(i).norm();
    if (!(rii > tol * norm_in))
      detail::throw_invalid("ReflectorChain (gram_schmidt): reflector column ", i,
                            " is linearly dependent on the previous ones (R_ii/|u_i| = ",
                            static_cast<double>(rii / norm_in), " <= tolerance ",
                            static_cast<double>(tol), "); the Gram-Schmidt variant is undefined");
    r(i, i) = rii;
    q.col(i) /= rii;
  }
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_chain(const Factors& f, const Matrix& coeffs, Matrix& x,
                                             Matrix& g, Matrix& du, State state,
                                             bool restore_input) const {
  const auto& blocks = f.blocks;
  if (state == State::input) detail::thin_product(x, u_, Op::n, coeffs, Op::n, Scalar(-1), true);
  Matrix z, gk;
  for (std::size_t j = 0; j < blocks.size(); ++j) {
    const Index c0 = static_cast<Index>(j) * block_size_;
    const Index b = blocks[j].rows();
    const auto ub = u_.middleCols(c0, b);
    const auto kb = coeffs.middleRows(c0, b);
    detail::thin_product(z, ub, Op::t, g, Op::n);
    detail::thin_product(gk, g, Op::n, kb, Op::t);
    block_gradient(blocks[j], c0, kb, x, z, gk, du);
    detail::thin_product(g, ub, Op::n, z, Op::n, Scalar(-1), true);
    if (restore_input || j + 1 < blocks.size())
      detail::thin_product(x, ub, Op::n, kb, Op::n, Scalar(1), true);
  }
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_chain_through(const Factors& f, const Matrix& coeffs,
                                                     const ConstRef& w, const ConstRef& e,
                                                     Matrix& x, Matrix& du,
                                                     bool restore_input) const {
  const auto& blocks = f.blocks;
  // U^T G_1 and G_1 K^T for all blocks at once: W is read twice, whatever the block count.
  Matrix ug, gk_all;
  {
    Matrix wu, ek;
    detail::serial_product(wu, w, Op::n, u_, Op::n);      // d_out x r
    detail::serial_product(ek, e, Op::n, coeffs, Op::t);  // d_out x r
    detail::serial_product(ug, wu, Op::t, e, Op::n);      // r x n
    detail::serial_product(gk_all, w, Op::t, ek, Op::n);  // d x r
  }
  Matrix zs(rank(), x.cols()), z, gk;
  for (std::size_t j = 0; j < blocks.size(); ++j) {
    const Index c0 = static_cast<Index>(j) * block_size_;
    const Index b = blocks[j].rows();
    const auto ub = u_.middleCols(c0, b);
    const auto kb = coeffs.middleRows(c0, b);
    z = ug.middleRows(c0, b);
    gk = gk_all.middleCols(c0, b);
    if (c0 > 0) {
      const auto before = u_.leftCols(c0);
      const auto zb = zs.topRows(c0);
      Matrix ub_before, zk;
      detail::serial_product(ub_before, ub, Op::t, before, Op::n);
      detail::serial_product(z, ub_before, Op::n, zb, Op::n, Scalar(-1), true);
      detail::serial_product(zk, zb, Op::n, kb, Op::t);
      detail::serial_product(gk, before, Op::n, zk, Op::n, Scalar(-1), true);
    }
    block_gradient(blocks[j], c0, kb, x, z, gk, du);
    zs.middleRows(c0, b) = z;
    if (restore_input || j + 1 < blocks.size())
      detail::serial_product(x, ub, Op::n, kb, Op::n, Scalar(1), true);
  }
}

template <typename Scalar_>
template <typename Coeffs>
void ReflectorChain<Scalar_>::block_gradient(const Matrix& t, Index c0, const Coeffs& kb,
                                             const Matrix& y, Matrix& z, const Matrix& gk,
                                             Matrix& du) const {
  const Index b = t.rows();
  const auto ub = u_.middleCols(c0, b);
  const Matrix ug = std::move(z);
  detail::serial_product(z, t, Op::t, ug, Op::n);
  Matrix mm;
  detail::serial_product(mm, z, Op::n, kb, Op::t);
  Matrix skew = Matrix::Zero(b, b);  // striu(M) - striu(M^T)
  for (Index j = 1; j < b; ++j)
    for (Index i = 0; i < j; ++i) skew(i, j) = mm(i, j) - mm(j, i);
  auto dub = du.middleCols(c0, b);
  detail::serial_product(dub, ub, Op::n, skew, Op::n);
  dub -= gk;
  detail::thin_product(dub, y, Op::n, z, Op::t, Scalar(-1), true);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_gram_schmidt(const Factors& f, const Matrix& coeffs,
                                                    Matrix& x, Matrix& g, Matrix& du, State state,
                                                    bool restore_input) const {
  if (state == State::input) detail::thin_product(x, f.q, Op::n, coeffs, Op::n, Scalar(-2), true);
  Matrix qg, gp;
  detail::thin_product(qg, f.q, Op::t, g, Op::n);
  detail::thin_product(gp, g, Op::n, coeffs, Op::t);
  detail::thin_product(g, f.q, Op::n, qg, Op::n, Scalar(-2), true);
  gram_schmidt_gradient(f, coeffs, x, qg, gp, du);
  if (restore_input) detail::thin_product(x, f.q, Op::n, coeffs, Op::n, Scalar(2), true);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::backward_gram_schmidt_through(const Factors& f, const Matrix& coeffs,
                                                            const ConstRef& w, const ConstRef& e,
                                                            Matrix& x, Matrix& du,
                                                            bool restore_input) const {
  Matrix wq, qg, ep, gp;
  detail::serial_product(wq, w, Op::n, f.q, Op::n);
  detail::serial_product(qg, wq, Op::t, e, Op::n);
  detail::serial_product(ep, e, Op::n, coeffs, Op::t);
  detail::serial_product(gp, w, Op::t, ep, Op::n);
  gram_schmidt_gradient(f, coeffs, x, qg, gp, du);
  if (restore_input) detail::thin_product(x, f.q, Op::n, coeffs, Op::n, Scalar(2), true);
}

template <typename Scalar_>
void ReflectorChain<Scalar_>::gram_schmidt_gradient(const Factors& f, const Matrix& p,
                                                    const Matrix& y, const Matrix& qg,
                                                    const Matrix& gp, Matrix& du) const {
  du = Scalar(-2) * gp;
  detail::thin_product(du, y, Op::n, qg, Op::t, Scalar(-2), true);
  Matrix pq;
  detail::serial_product(pq, p, Op::n, qg, Op::t);
  detail::serial_product(du, f.q, Op::n, pq, Op::n, Scalar(-4), true);
  Matrix mm;
  detail::serial_product(mm, f.q, Op::t, du, Op::n);
  const Matrix sym = detail::upper_symmetrised(mm);
  detail::serial_product(du, f.q, Op::n, sym, Op::n, Scalar(-1), true);
  detail::Kernels<Scalar>::solve_right_upper(Op::t, f.r, du);
}

using ReflectorChainf = ReflectorChain<float>;
using ReflectorChaind = ReflectorChain<double>;

}  // namespace hra
