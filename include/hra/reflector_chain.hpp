// The Householder reflection chain H = H_1 H_2 ... H_r in compact WY (UT) form.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "detail/checks.hpp"
#include "detail/random.hpp"

namespace hra {

/// How the reflector columns U become an orthogonal matrix.
enum class Variant {
  chain,        ///< H = H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2 (PEFT apply_GS=False)
  gram_schmidt  ///< H = I - 2 Q Q^T, Q the orthonormal factor of U (PEFT apply_GS=True)
};

/// How reflector columns are drawn.
enum class Init {
  symmetric,  ///< PEFT init_weights=True: r/2 columns, each repeated twice, so H = I exactly
  random      ///< every column drawn independently (PEFT's fallback for odd r): H != I
};

inline const char* to_string(Variant v) {
  return v == Variant::chain ? "chain" : "gram_schmidt";
}

/// \brief A chain of r Householder reflections acting on R^d, stored as the columns of U (d x r).
///
/// Chain variant:  H = H_1 H_2 ... H_r,  H_i = I - 2 u_i u_i^T / |u_i|^2, applied without ever
/// forming H, in the compact WY / UT form  H = I - U S^{-1} U^T  with
/// S = striu(U^T U) + diag(U^T U)/2 (S^{-1} is LAPACK's dlarft T factor for tau_i = 2/|u_i|^2).
/// Columns are processed in blocks of `block_size` (each block has its own S), as in dlarfb, so
/// the r^2 d term and the r x r solve stay small for large r.
///
/// Gram-Schmidt variant: H = I - 2 Q Q^T with Q R = U the thin QR with positive diag(R).
///
/// All batches are column-major d x n (one sample per column). The chain is cheap to copy for
/// small r; derived factors are recomputed from U on every call (cost O(r b d)), so U may be
/// changed freely between calls, but not between a forward() and the backward() that uses it.
template <typename Scalar_>
class ReflectorChain : detail::ScalarCheck<Scalar_> {
 public:
  using Scalar = Scalar_;
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using ConstRef = Eigen::Ref<const Matrix>;

  static constexpr Index default_block_size = 32;

  /// Quantities derived from U once per call: one upper-triangular S per column block (chain),
  /// or Q (d x r) and R (r x r) (Gram-Schmidt).
  struct Factors {
    std::vector<Matrix> blocks;  ///< S_j, size b_j x b_j, block j = columns [j*b, j*b + b_j)
    Matrix q;                    ///< Gram-Schmidt only
    Matrix r;                    ///< Gram-Schmidt only, upper triangular with positive diagonal
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
    if (block_size_ < 1)
      detail::throw_invalid("ReflectorChain: block_size must be >= 1, got ", block_size_);
    check_columns(u_);
  }

  /// A d x r chain drawn with `init` from a generator seeded with `seed`, as PEFT does:
  /// uniform in +-1/sqrt(fan) with fan = r/2 (symmetric) or r (random).
  /// Symmetric init needs an even r and is refused for the Gram-Schmidt variant, whose
  /// duplicated columns would be linearly dependent.
  static ReflectorChain initialized(Index dim, Index rank, Init init, std::uint64_t seed,
                                    Variant variant = Variant::chain,
                                    Index block_size = default_block_size) {
    check_rank(dim, rank);
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

  Index dim() const { return u_.rows(); }
  Index rank() const { return u_.cols(); }
  Variant variant() const { return variant_; }
  Index block_size() const { return block_size_; }

  /// U, d x r. Column i is u_i (its length is irrelevant: only its direction is used).
  const Matrix& reflectors() const { return u_; }
  /// Mutable U for optimisers. Keep the shape; values are validated on the next use.
  Matrix& reflectors() { return u_; }

  /// Replaces U after checking shape (must stay d x r), finiteness and non-zero columns.
  /// On error the chain is unchanged.
  void set_reflectors(const ConstRef& u) {
    detail::check_shape(u, dim(), rank(), "ReflectorChain::set_reflectors");
    check_columns(u);
    u_ = u;
  }

  void set_block_size(Index b) {
    if (b < 1) detail::throw_invalid("ReflectorChain: block_size must be >= 1, got ", b);
    block_size_ = b;
  }

  /// Derives the factors of the current U. Throws std::invalid_argument for a zero or
  /// non-finite column and, for Gram-Schmidt, for linearly dependent columns.
  Factors factorize() const {
    Factors f;
    if (variant_ == Variant::chain) {
      for (Index c0 = 0; c0 < rank(); c0 += block_size_) {
        const Index b = std::min(block_size_, rank() - c0);
        const auto ub = u_.middleCols(c0, b);
        Matrix s(b, b);
        s.template triangularView<Eigen::Upper>() = ub.transpose() * ub;  // symmetric: upper half
        for (Index i = 0; i < b; ++i) {
          check_norm2(s(i, i), c0 + i);
          s(i, i) *= Scalar(0.5);
        }
        s.template triangularView<Eigen::StrictlyLower>().setZero();
        f.blocks.push_back(std::move(s));
      }
    } else {
      gram_schmidt(f.q, f.r);
    }
    return f;
  }

  /// Y = H X for a d x n block X (Y may not alias X; use apply_in_place for that).
  void apply(const ConstRef& x, Matrix& y) const {
    detail::check_shape(x, dim(), x.cols(), "ReflectorChain::apply (input rows must equal d)");
    y = x;
    apply_in_place(y);
  }

  /// X <- H X in place.
  void apply_in_place(Matrix& x) const {
    check_rows(x.rows(), "ReflectorChain::apply_in_place");
    Matrix coeffs;
    apply_impl(factorize(), x, coeffs, false);
  }

  /// Y = H^T X (= H^{-1} X).
  void apply_transpose(const ConstRef& x, Matrix& y) const {
    detail::check_shape(x, dim(), x.cols(),
                        "ReflectorChain::apply_transpose (input rows must equal d)");
    y = x;
    apply_transpose_in_place(y);
  }

  /// X <- H^T X in place.
  void apply_transpose_in_place(Matrix& x) const {
    check_rows(x.rows(), "ReflectorChain::apply_transpose_in_place");
    apply_transpose_impl(factorize(), x);
  }

  /// W <- W H for W with d columns: W - (W U) S^{-1} U^T block by block, O(rows d r).
  void apply_right(Eigen::Ref<Matrix> w) const { apply_right_impl(factorize(), w, false); }

  /// W <- W H^T (undoes apply_right up to rounding).
  void apply_transpose_right(Eigen::Ref<Matrix> w) const { apply_right_impl(factorize(), w, true); }

  /// The dense d x d H, for tests and debugging only (O(d^2 r)).
  Matrix dense() const {
    Matrix h = Matrix::Identity(dim(), dim());
    apply_in_place(h);
    return h;
  }

  /// Training forward: Y = H X, keeping O(r n) coefficients and the factors in `cache`.
  void forward(const ConstRef& x, Matrix& y, ForwardCache& cache) const {
    detail::check_shape(x, dim(), x.cols(), "ReflectorChain::forward (input rows must equal d)");
    Factors f = factorize();
    y = x;
    apply_impl(f, y, cache.coeffs, true);
    cache.factors = std::move(f);
  }

  /// Training forward in place: X <- H X, keeping the cache (as forward()).
  void forward_in_place(Matrix& x, ForwardCache& cache) const {
    check_rows(x.rows(), "ReflectorChain::forward_in_place");
    Factors f = factorize();
    apply_impl(f, x, cache.coeffs, true);
    cache.factors = std::move(f);
  }

  /// Training backward for Y = H X. Given the forward input X and G = dL/dY (both d x n) and the
  /// cache of that forward, *assigns* dX = dL/dX = H^T G (d x n) and dU = dL/dU (d x r).
  /// dU already accounts for the normalisation of every column, so u_i^T dU_i = 0.
  void backward(const ConstRef& x, const ConstRef& g, const ForwardCache& cache, Matrix& dx,
                Matrix& du) const {
    detail::check_shape(x, dim(), x.cols(), "ReflectorChain::backward input X");
    check_cache(cache, x.cols());
    // The output is X - (sum over blocks of U_j K_j) = X - U K for the chain, X - 2 Q P for GS.
    Matrix y = x;
    if (variant_ == Variant::chain)
      y.noalias() -= u_ * cache.coeffs;
    else
      y.noalias() -= Scalar(2) * cache.factors.q * cache.coeffs;
    dx = g;
    backward_in_place(y, dx, cache, du);
  }

  /// Backward from the forward *output*, without any d x n copy: on entry `y` holds Y = H X and
  /// `g` holds dL/dY; on return `y` holds the input X (rebuilt from Y and the cache, exact up to
  /// rounding), `g` holds dL/dX = H^T G, and dU = dL/dU is assigned. This is what layers use: they
  /// keep the chain's output (needed anyway for W H X) plus the r x n cache, nothing else.
  void backward_in_place(Matrix& y, Matrix& g, const ForwardCache& cache, Matrix& du) const {
    detail::check_shape(y, dim(), y.cols(), "ReflectorChain::backward output Y");
    detail::check_shape(g, dim(), y.cols(), "ReflectorChain::backward gradient G");
    check_cache(cache, y.cols());
    du.resize(dim(), rank());
    if (variant_ == Variant::chain)
      backward_chain(y, g, cache, du);
    else
      backward_gram_schmidt(y, g, cache, du);
  }

  /// dU alone, for a loss that sees the chain's output Y only through a fixed matrix W
  /// (d_out x d): with E = dL/d(W Y) (d_out x n), the chain's output gradient is G = W^T E, but
  /// G is never formed. Only W U (d_out x r) and W^T (E K^T) (d x r) are, O(d_out d r + d_out n r)
  /// instead of the O(d_out d n) of W^T E. This is the backward of a layer y = W H x that needs
  /// no input gradient (a network's first layer). `y` is as in backward_in_place: Y on entry, the
  /// rebuilt input X on return. dU equals backward_in_place's up to rounding. As in backward(),
  /// shapes are checked here but values are not (HraLinear checks W once and dY on every call).
  void backward_through(const ConstRef& w, const ConstRef& e, Matrix& y, const ForwardCache& cache,
                        Matrix& du) const {
    detail::check_shape(y, dim(), y.cols(), "ReflectorChain::backward_through output Y");
    if (w.cols() != dim())
      detail::throw_invalid("ReflectorChain::backward_through: W is ",
                            detail::shape(w.rows(), w.cols()), " but needs d=", dim(), " columns");
    detail::check_shape(e, w.rows(), y.cols(),
                        "ReflectorChain::backward_through gradient E (d_out x n)");
    check_cache(cache, y.cols());
    du.resize(dim(), rank());
    if (variant_ == Variant::chain)
      backward_chain_through(w, e, y, cache, du);
    else
      backward_gram_schmidt_through(w, e, y, cache, du);
  }

  /// Relative threshold under which a Gram-Schmidt pivot R_ii / |u_i| counts as dependent.
  static Scalar dependence_tolerance(Index d) {
    return Scalar(16) * std::sqrt(static_cast<Scalar>(d)) * std::numeric_limits<Scalar>::epsilon();
  }

 private:
  static void check_rank(Index d, Index r) {
    if (d < 1) detail::throw_invalid("ReflectorChain: dimension d must be >= 1, got d=", d);
    if (r < 1) detail::throw_invalid("ReflectorChain: rank r must be >= 1, got r=", r);
    if (r > d)
      detail::throw_invalid("ReflectorChain: rank r=", r, " exceeds the dimension d=", d,
                            " (at most d reflections are meaningful)");
  }

  void check_rows(Index rows, const char* what) const {
    if (rows != dim())
      detail::throw_invalid(what, ": the input has ", rows,
                            " rows but the chain acts on d=", dim());
  }

  void check_norm2(Scalar norm2, Index col) const {
    if (!std::isfinite(static_cast<double>(norm2))) {
      // Searches all of U so the message names the entry's (row, column) and U's shape; the
      // columns before `col` passed this check, so the first non-finite entry is in `col`.
      detail::check_finite(u_, "ReflectorChain: reflectors U");
      // Finite entries whose squares overflow.
      detail::throw_invalid("ReflectorChain: reflector column ", col,
                            " is too large: its squared norm overflows");
    }
    if (!(norm2 > Scalar(0))) throw_degenerate_column(u_.col(col), col);
  }

  // A column whose squared norm is 0: truly zero, or so small that its square underflows.
  template <typename Derived>
  [[noreturn]] static void throw_degenerate_column(const Eigen::MatrixBase<Derived>& column,
                                                   Index col) {
    if (column.isZero(0))
      detail::throw_invalid("ReflectorChain: reflector column ", col,
                            " is zero (a reflection needs a non-zero direction)");
    detail::throw_invalid("ReflectorChain: reflector column ", col,
                          " is too small: its squared norm underflows to 0 (largest entry ",
                          static_cast<double>(column.cwiseAbs().maxCoeff()), "); rescale it");
  }

  template <typename Derived>
  static void check_columns(const Eigen::MatrixBase<Derived>& u) {
    detail::check_finite(u, "ReflectorChain: reflectors U");
    for (Index j = 0; j < u.cols(); ++j)
      if (u.col(j).squaredNorm() == Scalar(0)) throw_degenerate_column(u.col(j), j);
  }

  // Modified Gram-Schmidt with one re-orthogonalisation pass ("twice is enough"), so Q stays
  // orthonormal to working precision even for ill-conditioned U.
  void gram_schmidt(Matrix& q, Matrix& r) const {
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

  // H X: blocks from last to first (H_r touches x first). Stores S_j^{-1} U_j^T (input of
  // block j) into the rows of `coeffs` when keep is true.
  void apply_impl(const Factors& f, Matrix& x, Matrix& coeffs, bool keep) const {
    if (variant_ == Variant::gram_schmidt) {
      Matrix p;
      p.noalias() = f.q.transpose() * x;
      x.noalias() -= Scalar(2) * f.q * p;
      if (keep) coeffs = std::move(p);
      return;
    }
    if (keep) coeffs.resize(rank(), x.cols());
    Matrix k;
    for (Index j = static_cast<Index>(f.blocks.size()) - 1; j >= 0; --j) {
      const Index c0 = j * block_size_;
      const auto& s = f.blocks[static_cast<std::size_t>(j)];
      const auto ub = u_.middleCols(c0, s.rows());
      k.noalias() = ub.transpose() * x;
      s.template triangularView<Eigen::Upper>().solveInPlace(k);
      x.noalias() -= ub * k;
      if (keep) coeffs.middleRows(c0, s.rows()) = k;
    }
  }

  // H^T X: blocks from first to last, each with S_j^{-T}.
  void apply_transpose_impl(const Factors& f, Matrix& x) const {
    if (variant_ == Variant::gram_schmidt) {
      Matrix c;
      apply_impl(f, x, c, false);  // symmetric
      return;
    }
    Matrix k;
    for (std::size_t j = 0; j < f.blocks.size(); ++j) {
      const auto& s = f.blocks[j];
      const auto ub = u_.middleCols(static_cast<Index>(j) * block_size_, s.rows());
      k.noalias() = ub.transpose() * x;
      s.transpose().template triangularView<Eigen::Lower>().solveInPlace(k);
      x.noalias() -= ub * k;
    }
  }

  // W H = W B_1 ... B_m (first block first); W H^T = W B_m^T ... B_1^T (last block first).
  void apply_right_impl(const Factors& f, Eigen::Ref<Matrix> w, bool transpose) const {
    if (w.cols() != dim())
      detail::throw_invalid("ReflectorChain::apply_right: the matrix has ", w.cols(),
                            " columns but the chain acts on d=", dim());
    Matrix t;
    if (variant_ == Variant::gram_schmidt) {
      t.noalias() = w * f.q;
      w.noalias() -= Scalar(2) * t * f.q.transpose();
      return;
    }
    const Index m = static_cast<Index>(f.blocks.size());
    for (Index step = 0; step < m; ++step) {
      const Index j = transpose ? m - 1 - step : step;
      const auto& s = f.blocks[static_cast<std::size_t>(j)];
      const auto ub = u_.middleCols(j * block_size_, s.rows());
      t.noalias() = w * ub;
      if (transpose)
        s.transpose()
            .template triangularView<Eigen::Lower>()
            .template solveInPlace<Eigen::OnTheRight>(t);
      else
        s.template triangularView<Eigen::Upper>().template solveInPlace<Eigen::OnTheRight>(t);
      w.noalias() -= t * ub.transpose();
    }
  }

  void check_cache(const ForwardCache& cache, Index n) const {
    if (cache.coeffs.rows() != rank() || cache.coeffs.cols() != n)
      detail::throw_invalid("ReflectorChain::backward: the cache holds ",
                            detail::shape(cache.coeffs.rows(), cache.coeffs.cols()),
                            " coefficients but r x n is ", detail::shape(rank(), n),
                            " (was forward() called with this batch?)");
    bool chain_ok = variant_ == Variant::chain && static_cast<Index>(cache.factors.blocks.size()) ==
                                                      (rank() + block_size_ - 1) / block_size_;
    // The count alone is not enough (r = 4: blocks of 3 + 1 and of 2 + 2): check every size.
    for (std::size_t j = 0; chain_ok && j < cache.factors.blocks.size(); ++j)
      chain_ok = cache.factors.blocks[j].rows() ==
                 std::min(block_size_, rank() - static_cast<Index>(j) * block_size_);
    const bool gs_ok = variant_ == Variant::gram_schmidt && cache.factors.q.rows() == dim() &&
                       cache.factors.q.cols() == rank();
    if (!chain_ok && !gs_ok)
      detail::throw_invalid(
          "ReflectorChain::backward: the cache was made by a chain of another variant or block "
          "size");
  }

  // Per block j (from the output side, j = 1..m) with block input X_j, K_j and G_j:
  //   Z = S^{-T} U^T G,  M = Z K^T,  G_{j+1} = G - U Z,
  //   dU_j = -G K^T - X_j Z^T + U (striu(M) + striu(M)^T + diag(M)).
  // Block inputs come from the output: X_1 = Y + U_1 K_1, X_{j+1} = X_j + U_{j+1} K_{j+1}.
  // G enters dU_j only through U_j^T G_j and G_j K_j^T; block_gradient() takes those two.
  void backward_chain(Matrix& x, Matrix& g, const ForwardCache& cache, Matrix& du) const {
    const auto& blocks = cache.factors.blocks;
    Matrix z, gk;
    for (std::size_t j = 0; j < blocks.size(); ++j) {
      const Index c0 = static_cast<Index>(j) * block_size_;
      const Index b = blocks[j].rows();
      const auto ub = u_.middleCols(c0, b);
      const auto kb = cache.coeffs.middleRows(c0, b);
      x.noalias() += ub * kb;
      z.noalias() = ub.transpose() * g;
      gk.noalias() = g * kb.transpose();
      block_gradient(blocks[j], c0, kb, x, z, gk, du);
      g.noalias() -= ub * z;
    }
  }

  // The chain's dU when G_1 = W^T E: U_j^T G_j and G_j K_j^T from W U, E and the earlier Z's:
  //   G_j = G_1 - U_{<j} Z_{<j}, so  U_j^T G_j = (W U_j)^T E - U_j^T U_{<j} Z_{<j}  and
  //   G_j K_j^T = W^T (E K_j^T) - U_{<j} (Z_{<j} K_j^T).
  void backward_chain_through(const ConstRef& w, const ConstRef& e, Matrix& x,
                              const ForwardCache& cache, Matrix& du) const {
    const auto& blocks = cache.factors.blocks;
    // U^T G_1 and G_1 K^T for all blocks at once: W is read twice, whatever the block count.
    Matrix ug, gk_all;
    {
      Matrix wu, ek;
      wu.noalias() = w * u_;                        // d_out x r
      ek.noalias() = e * cache.coeffs.transpose();  // d_out x r
      ug.noalias() = wu.transpose() * e;            // r x n
      gk_all.noalias() = w.transpose() * ek;        // d x r
    }
    Matrix zs(rank(), x.cols()), z, gk;
    for (std::size_t j = 0; j < blocks.size(); ++j) {
      const Index c0 = static_cast<Index>(j) * block_size_;
      const Index b = blocks[j].rows();
      const auto ub = u_.middleCols(c0, b);
      const auto kb = cache.coeffs.middleRows(c0, b);
      x.noalias() += ub * kb;
      z = ug.middleRows(c0, b);
      gk = gk_all.middleCols(c0, b);
      if (c0 > 0) {
        const auto before = u_.leftCols(c0);
        const auto zb = zs.topRows(c0);
        z.noalias() -= (ub.transpose() * before) * zb;
        gk.noalias() -= before * (zb * kb.transpose());
      }
      block_gradient(blocks[j], c0, kb, x, z, gk, du);
      zs.middleRows(c0, b) = z;
    }
  }

  // One block's dU from its input X_j, Z <- S^{-T} U_j^T G_j (on entry U_j^T G_j) and
  // GK = G_j K_j^T.
  template <typename Coeffs>
  void block_gradient(const Matrix& s, Index c0, const Coeffs& kb, const Matrix& x, Matrix& z,
                      const Matrix& gk, Matrix& du) const {
    const Index b = s.rows();
    const auto ub = u_.middleCols(c0, b);
    s.transpose().template triangularView<Eigen::Lower>().solveInPlace(z);
    Matrix mm, sym;
    mm.noalias() = z * kb.transpose();
    sym = mm.template triangularView<Eigen::StrictlyUpper>();
    sym += mm.template triangularView<Eigen::StrictlyUpper>().transpose();
    sym.diagonal() = mm.diagonal();
    auto dub = du.middleCols(c0, b);
    dub.noalias() = ub * sym;
    dub -= gk;
    dub.noalias() -= x * z.transpose();
  }

  // X = Y + 2 Q P with P = Q^T X; dQ = -2 (G P^T + X (Q^T G)^T); through the QR:
  // dU = (dQ - Q sym(Q^T dQ)) R^{-T}, sym(M) = triu(M) + striu(M)^T.
  void backward_gram_schmidt(Matrix& x, Matrix& g, const ForwardCache& cache, Matrix& du) const {
    const Matrix& q = cache.factors.q;
    x.noalias() += Scalar(2) * q * cache.coeffs;
    Matrix qg, gp;
    qg.noalias() = q.transpose() * g;
    gp.noalias() = g * cache.coeffs.transpose();
    g.noalias() -= Scalar(2) * q * qg;
    gram_schmidt_gradient(x, qg, gp, cache, du);
  }

  // As backward_gram_schmidt for G = W^T E: Q^T G = (W Q)^T E and G P^T = W^T (E P^T).
  void backward_gram_schmidt_through(const ConstRef& w, const ConstRef& e, Matrix& x,
                                     const ForwardCache& cache, Matrix& du) const {
    const Matrix& q = cache.factors.q;
    x.noalias() += Scalar(2) * q * cache.coeffs;
    Matrix wq, qg, ep, gp;
    wq.noalias() = w * q;
    qg.noalias() = wq.transpose() * e;
    ep.noalias() = e * cache.coeffs.transpose();
    gp.noalias() = w.transpose() * ep;
    gram_schmidt_gradient(x, qg, gp, cache, du);
  }

  // dU from the input X, Q^T G and G P^T.
  void gram_schmidt_gradient(const Matrix& x, const Matrix& qg, const Matrix& gp,
                             const ForwardCache& cache, Matrix& du) const {
    const Matrix& q = cache.factors.q;
    const Matrix& r = cache.factors.r;
    du.noalias() = Scalar(-2) * gp;
    du.noalias() -= Scalar(2) * x * qg.transpose();
    Matrix mm;
    mm.noalias() = q.transpose() * du;
    Matrix sym = mm.template triangularView<Eigen::Upper>();
    sym += mm.template triangularView<Eigen::StrictlyUpper>().transpose();
    du.noalias() -= q * sym;
    r.transpose().template triangularView<Eigen::Lower>().template solveInPlace<Eigen::OnTheRight>(
        du);
  }

  Matrix u_;
  Variant variant_ = Variant::chain;
  Index block_size_ = default_block_size;
};

using ReflectorChainf = ReflectorChain<float>;
using ReflectorChaind = ReflectorChain<double>;

}  // namespace hra
