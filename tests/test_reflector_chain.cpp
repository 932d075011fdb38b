// hra::ReflectorChain: invariants, agreement with the explicit product of reflections, gradients
// against central differences, and every user error. Expected values come from definitions
// written out here (dense products of explicit reflections, Eigen's Householder QR), never from
// the code under test.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hra/gradient_check.hpp"
#include "hra/reference.hpp"
#include "hra/reflector_chain.hpp"
#include "support/definitions.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra::Init;
using hra::Variant;
using hra_test::abs_err;
using hra_test::eps;
using hra_test::expect_error;
using hra_test::explicit_chain;
using hra_test::explicit_gram_schmidt;
using hra_test::explicit_h;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::max_abs;
using hra_test::orthonormal_basis;
using hra_test::random_as;
using hra_test::random_matrix;
using hra_test::rel_err;
using hra_test::to_double;
using hra_test::tol;
template <typename T>
using Chain = hra::ReflectorChain<T>;

const Variant kVariants[] = {Variant::chain, Variant::gram_schmidt};

// Shapes (d, r, n, block) covering r = 1, odd r, r = d, n = 1, several blocks and a large r.
struct Shape {
  Index d, r, n, block;
};
const Shape kShapes[] = {{1, 1, 1, 32}, {5, 1, 3, 32}, {6, 3, 1, 32},  {7, 7, 4, 32},  {7, 7, 2, 3},
                         {12, 5, 3, 2}, {20, 9, 1, 4}, {16, 16, 1, 5}, {96, 80, 4, 16}};

std::string describe(Variant v, const Shape& s) {
  return std::string(hra::to_string(v)) + " d=" + std::to_string(s.d) +
         " r=" + std::to_string(s.r) + " n=" + std::to_string(s.n) +
         " block=" + std::to_string(s.block);
}

// H does not depend on U when d = 1 (H = -1) or for Gram-Schmidt with r = d (H = -I): there
// dL/dU is zero and only an absolute check makes sense.
bool du_vanishes(Variant v, const Shape& s) {
  return s.d == 1 || (v == Variant::gram_schmidt && s.r == s.d);
}

std::uint64_t seed_of(const Shape& s, std::uint64_t salt) {
  return 1000003u * static_cast<std::uint64_t>(s.d) + 1009u * static_cast<std::uint64_t>(s.r) +
         17u * static_cast<std::uint64_t>(s.n) + salt;
}

}  // namespace

// --- Invariants --------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("ReflectorChain: H is orthogonal and preserves norms", "[chain][invariants]",
                   float, double) {
  using T = TestType;
  for (const Variant v : kVariants)
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      const Chain<T> chain(random_as<T>(s.d, s.r, seed_of(s, 1)), v, s.block);
      const Mat<T> h = chain.dense();
      const MatD eye = MatD::Identity(s.d, s.d);
      CHECK(rel_err(to_double(h.transpose() * h), eye) <= tol<T>(s.d, s.r));
      CHECK(rel_err(to_double(h * h.transpose()), eye) <= tol<T>(s.d, s.r));
      const Mat<T> x = random_as<T>(s.d, s.n, seed_of(s, 2));
      Mat<T> y;
      chain.apply(x, y);
      REQUIRE(y.rows() == s.d);
      REQUIRE(y.cols() == s.n);
      for (Index j = 0; j < s.n; ++j) {
        const double nx = static_cast<double>(x.col(j).norm());
        CHECK(std::abs(static_cast<double>(y.col(j).norm()) - nx) <= tol<T>(s.d, s.r) * nx);
      }
    }
}

TEMPLATE_TEST_CASE("ReflectorChain: apply / apply_transpose equal H X / H^T X and undo each other",
                   "[chain][invariants]", float, double) {
  using T = TestType;
  for (const Variant v : kVariants)
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      const Mat<T> u = random_as<T>(s.d, s.r, seed_of(s, 3));
      const Chain<T> chain(u, v, s.block);
      const MatD h = explicit_h(to_double(u), v);
      const Mat<T> x = random_as<T>(s.d, s.n, seed_of(s, 4));
      const double t = tol<T>(s.d, s.r);

      Mat<T> y, z, back;
      chain.apply(x, y);
      chain.apply_transpose(x, z);
      CHECK(rel_err(y, h * to_double(x)) <= t);
      CHECK(rel_err(z, h.transpose() * to_double(x)) <= t);
      chain.apply_transpose(y, back);  // H^T H X = X
      CHECK(rel_err(back, x) <= t);
      chain.apply(z, back);  // H H^T X = X
      CHECK(rel_err(back, x) <= t);

      // In-place variants give the same results and round-trip too.
      Mat<T> w = x;
      chain.apply_in_place(w);
      CHECK(rel_err(w, y) <= t);
      chain.apply_transpose_in_place(w);
      CHECK(rel_err(w, x) <= t);
      w = x;
      chain.apply_transpose_in_place(w);
      CHECK(rel_err(w, z) <= t);

      // The training forward computes the same H X, out of place and in place.
      typename Chain<T>::ForwardCache cache;
      Mat<T> yf;
      chain.forward(x, yf, cache);
      CHECK(rel_err(yf, y) <= t);
      w = x;
      chain.forward_in_place(w, cache);
      CHECK(rel_err(w, y) <= t);
      CHECK(cache.bytes() > 0);
    }
}

TEMPLATE_TEST_CASE("ReflectorChain: apply_right equals W H, apply_transpose_right W H^T",
                   "[chain][invariants]", float, double) {
  using T = TestType;
  for (const Variant v : kVariants)
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      const Chain<T> chain(random_as<T>(s.d, s.r, seed_of(s, 5)), v, s.block);
      const MatD h = explicit_h(to_double(chain.reflectors()), v);
      const Mat<T> dense = chain.dense();
      const Mat<T> w0 = random_as<T>(s.d + 3, s.d, seed_of(s, 6));  // rows != d on purpose
      const double t = tol<T>(s.d, s.r);

      Mat<T> w = w0;
      chain.apply_right(w);
      CHECK(rel_err(w, to_double(w0) * h) <= t);
      CHECK(rel_err(w, w0 * dense) <= t);
      chain.apply_transpose_right(w);  // (W H) H^T = W
      CHECK(rel_err(w, w0) <= t);

      w = w0;
      chain.apply_transpose_right(w);
      CHECK(rel_err(w, to_double(w0) * h.transpose()) <= t);
      CHECK(rel_err(w, w0 * dense.transpose()) <= t);
      chain.apply_right(w);  // (W H^T) H = W
      CHECK(rel_err(w, w0) <= t);

      // It works on a block of a larger matrix (a weight slice) without touching the rest.
      Mat<T> big = Mat<T>::Zero(s.d + 3, s.d + 2);
      big.leftCols(s.d) = w0;
      chain.apply_right(big.leftCols(s.d));
      CHECK(rel_err(big.leftCols(s.d), to_double(w0) * h) <= t);
      CHECK((big.rightCols(2).array() == T(0)).all());
    }
}

TEMPLATE_TEST_CASE("ReflectorChain: dense() is the product of explicit reflections in PEFT's order",
                   "[chain][reference]", float, double) {
  using T = TestType;
  for (const Shape& s : kShapes) {
    INFO(describe(Variant::chain, s));
    const Mat<T> u = random_as<T>(s.d, s.r, seed_of(s, 7));
    const Chain<T> chain(u, Variant::chain, s.block);
    const Mat<T> h = chain.dense();
    const MatD expected = explicit_chain(to_double(u));
    const MatD expected_reverse = explicit_chain(to_double(u), true);
    const double t = tol<T>(s.d, s.r);
    CHECK(rel_err(h, expected) <= t);
    // The order matters (so the check above can tell H_1..H_r from H_r..H_1) ...
    if (s.r >= 2) CHECK(rel_err(expected_reverse, expected) > 1e-2);
    // ... and the reverse product is H^T = H^{-1}, which is what PEFT's unmerge uses.
    CHECK(rel_err(MatD(expected_reverse.transpose()), expected) <= 1e-13);
    // The library's restatement of PEFT agrees, in both orders.
    const Mat<T> peft = hra::reference::peft_delta_weight<T>(u, Variant::chain);
    const Mat<T> peft_reverse = hra::reference::peft_delta_weight<T>(u, Variant::chain, true);
    CHECK(rel_err(peft, expected) <= t);
    CHECK(rel_err(peft_reverse, expected_reverse) <= t);
    CHECK(rel_err(peft_reverse, Mat<T>(h.transpose())) <= t);
    // One reflection at a time (no blocking, no S) agrees as well.
    Mat<T> one_at_a_time = Mat<T>::Identity(s.d, s.d);
    hra::reference::apply_one_at_a_time<T>(u, one_at_a_time);
    CHECK(rel_err(one_at_a_time, expected) <= t);
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: Gram-Schmidt variant is I - 2QQ^T, symmetric, involutory",
                   "[chain][gram_schmidt]", float, double) {
  using T = TestType;
  for (const Shape& s : kShapes) {
    INFO(describe(Variant::gram_schmidt, s));
    const Mat<T> u = random_as<T>(s.d, s.r, seed_of(s, 8));
    const Chain<T> chain(u, Variant::gram_schmidt, s.block);
    const Mat<T> h = chain.dense();
    const double t = tol<T>(s.d, s.r);
    CHECK(rel_err(h, explicit_gram_schmidt(to_double(u))) <= t);
    CHECK(rel_err(Mat<T>(h.transpose()), h) <= t);         // symmetric
    CHECK(rel_err(h * h, MatD::Identity(s.d, s.d)) <= t);  // its own inverse
    CHECK(rel_err(hra::reference::peft_delta_weight<T>(u, Variant::gram_schmidt), h) <= t);
    // H depends on span(U) only: reversing the column order gives the same H ...
    const Chain<T> reversed(u.rowwise().reverse(), Variant::gram_schmidt, s.block);
    CHECK(rel_err(reversed.dense(), h) <= t);
    // ... and with r = d the span is everything, so H = -I.
    if (s.r == s.d) CHECK(rel_err(h, -MatD::Identity(s.d, s.d)) <= t);
    // The chain variant of the same U is a different matrix (unless r = 1, where both are H_1).
    const Mat<T> hc = Chain<T>(u, Variant::chain, s.block).dense();
    if (s.r == 1)
      CHECK(rel_err(hc, h) <= t);
    else
      CHECK(rel_err(hc, h) > 1e-2);
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: block size does not change results", "[chain][blocking]", float,
                   double) {
  using T = TestType;
  struct Case {
    Index d, r, n;
  };
  const Case cases[] = {{9, 7, 3}, {33, 32, 2}, {96, 80, 5}};
  for (const Variant v : kVariants)
    for (const Case& c : cases) {
      const Mat<T> u = random_as<T>(c.d, c.r, 11 + static_cast<std::uint64_t>(c.r));
      const Mat<T> x = random_as<T>(c.d, c.n, 12 + static_cast<std::uint64_t>(c.r));
      const Mat<T> g = random_as<T>(c.d, c.n, 13 + static_cast<std::uint64_t>(c.r));
      const Mat<T> w0 = random_as<T>(4, c.d, 14 + static_cast<std::uint64_t>(c.r));
      const MatD h = explicit_h(to_double(u), v);
      // Single-block results are the reference for the gradients (checked against finite
      // differences below); every other quantity is compared with the explicit H.
      const Chain<T> single(u, v, c.r);
      typename Chain<T>::ForwardCache cache1;
      Mat<T> y1, dx1, du1;
      single.forward(x, y1, cache1);
      single.backward(x, g, cache1, dx1, du1);
      const double t = tol<T>(c.d, c.r);
      for (const Index b : {Index(1), Index(3), Index(16), Index(32), c.r, c.r + 100}) {
        INFO(hra::to_string(v) << " d=" << c.d << " r=" << c.r << " block=" << b);
        Chain<T> chain(u, v, b);
        REQUIRE(chain.block_size() == b);
        if (v == Variant::chain) {
          const auto f = chain.factorize();
          CHECK(static_cast<Index>(f.blocks.size()) == (c.r + b - 1) / b);
        }
        CHECK(rel_err(chain.dense(), h) <= t);
        Mat<T> y, z, w = w0;
        chain.apply(x, y);
        CHECK(rel_err(y, h * to_double(x)) <= t);
        chain.apply_transpose(x, z);
        CHECK(rel_err(z, h.transpose() * to_double(x)) <= t);
        chain.apply_right(w);
        CHECK(rel_err(w, to_double(w0) * h) <= t);
        chain.apply_transpose_right(w);
        CHECK(rel_err(w, w0) <= t);
        typename Chain<T>::ForwardCache cache;
        Mat<T> yf, dx, du;
        chain.forward(x, yf, cache);
        chain.backward(x, g, cache, dx, du);
        CHECK(rel_err(yf, y1) <= t);
        CHECK(rel_err(dx, dx1) <= t);
        CHECK(rel_err(du, du1) <= 4 * t);
        // set_block_size on an existing chain is the same as constructing with it.
        Chain<T> resized(u, v, 7);
        resized.set_block_size(b);
        Mat<T> y2;
        resized.apply(x, y2);
        CHECK(rel_err(y2, y) <= t);
      }
    }
}

TEMPLATE_TEST_CASE("ReflectorChain: symmetric initialisation starts at H = I", "[chain][init]",
                   float, double) {
  using T = TestType;
  double worst = 0;
  for (const Index r : {Index(2), Index(4), Index(8), Index(40)}) {
    const Index d = r + 9;
    INFO("d=" << d << " r=" << r);
    const auto chain = Chain<T>::initialized(d, r, Init::symmetric, 42);
    REQUIRE(chain.dim() == d);
    REQUIRE(chain.rank() == r);
    REQUIRE(chain.variant() == Variant::chain);
    const Mat<T>& u = chain.reflectors();
    // Columns come in identical pairs, drawn uniformly in +-1/sqrt(r/2) (PEFT's kaiming bound).
    const double bound = 1.0 / std::sqrt(static_cast<double>(r / 2));
    for (Index j = 0; j < r; j += 2) {
      CHECK((u.col(j).array() == u.col(j + 1).array()).all());
      CHECK(u.col(j).norm() > T(0));
      if (j + 2 < r) CHECK(!(u.col(j).array() == u.col(j + 2).array()).all());
    }
    CHECK(to_double(u).cwiseAbs().maxCoeff() <= bound);
    CHECK(to_double(u).cwiseAbs().maxCoeff() > 0.5 * bound);
    // H_i H_i = I exactly in exact arithmetic; in floating point H = I only up to rounding
    // (the pair's coefficients in S^{-1} U^T cancel only approximately), so this is a
    // tolerance check, not an equality.
    const MatD err = to_double(chain.dense()) - MatD::Identity(d, d);
    const double e = max_abs(err);
    worst = std::max(worst, e);
    CHECK(e <= tol<T>(d, r));
    Mat<T> x = random_as<T>(d, 3, 5), y;
    chain.apply(x, y);
    CHECK(rel_err(y, x) <= tol<T>(d, r));
  }
  WARN("INIT symmetric scalar=" << (eps<T>() < 1e-10 ? "double" : "float")
                                << " max|H - I| = " << hra_test::sci(worst)
                                << " (eps = " << hra_test::sci(eps<T>()) << ")");
  // A random initialisation (PEFT's odd-r fallback) does not start at I.
  const auto random_chain = Chain<T>::initialized(12, 3, Init::random, 42);
  CHECK(max_abs(to_double(random_chain.dense()) - MatD::Identity(12, 12)) > 0.1);
  CHECK(to_double(random_chain.reflectors()).cwiseAbs().maxCoeff() <= 1.0 / std::sqrt(3.0));
}

TEMPLATE_TEST_CASE("ReflectorChain: initialisation is a function of the seed", "[chain][init]",
                   float, double) {
  using T = TestType;
  for (const Init init : {Init::symmetric, Init::random}) {
    for (const Variant v : kVariants) {
      if (init == Init::symmetric && v == Variant::gram_schmidt) continue;  // refused, see below
      const auto a = Chain<T>::initialized(10, 4, init, 7, v);
      const auto b = Chain<T>::initialized(10, 4, init, 7, v);
      const auto c = Chain<T>::initialized(10, 4, init, 8, v);
      CHECK((a.reflectors().array() == b.reflectors().array()).all());
      CHECK(max_abs(to_double(a.reflectors()) - to_double(c.reflectors())) > 1e-2);
      CHECK(a.variant() == v);
    }
  }
  // The seeded draw is the same for both scalars (float is the double draw, rounded).
  const auto d = Chain<double>::initialized(10, 4, Init::random, 7);
  const auto f = Chain<T>::initialized(10, 4, Init::random, 7);
  CHECK(rel_err(f.reflectors(), d.reflectors()) <= eps<T>());
}

// --- Gradients ---------------------------------------------------------------------------------

namespace {

// L(U, X) = <G, H(U) X>, computed from the definitions: for the chain one reflection at a time
// (H_r first), for Gram-Schmidt X - 2 Q (Q^T X) with Q from Eigen's Householder QR.
double loss(const MatD& u, const MatD& x, const MatD& g, Variant v) {
  MatD y = x;
  if (v == Variant::chain) {
    for (Index i = u.cols() - 1; i >= 0; --i) {
      const Eigen::VectorXd ui = u.col(i);
      const Eigen::RowVectorXd proj = ui.transpose() * y;
      y -= (2.0 / ui.squaredNorm()) * ui * proj;
    }
  } else {
    const MatD q = orthonormal_basis(u);
    y -= 2.0 * q * (q.transpose() * x);
  }
  return (g.array() * y.array()).sum();
}

// Entries to perturb: all of them for small matrices; otherwise `per_col` random rows of
// every column (so every reflector and every block is probed).
std::vector<std::pair<Index, Index>> probes(Index rows, Index cols, std::uint64_t seed) {
  std::vector<std::pair<Index, Index>> out;
  if (rows * cols <= 160) {
    for (Index j = 0; j < cols; ++j)
      for (Index i = 0; i < rows; ++i) out.emplace_back(i, j);
    return out;
  }
  std::mt19937_64 gen(seed);
  const Index per_col = std::max<Index>(2, 160 / cols);
  for (Index j = 0; j < cols; ++j)
    for (Index k = 0; k < per_col; ++k)
      out.emplace_back(static_cast<Index>(gen() % static_cast<std::uint64_t>(rows)), j);
  return out;
}

// Largest |analytic - central difference| over the probed entries of U (perturb_u) or X,
// relative to the max-abs of the analytic gradient; fd_max receives the largest |difference
// quotient| (used where the true gradient is zero). The differences are hra::check_entries'.
double fd_error(const MatD& u, const MatD& x, const MatD& g, Variant v, const MatD& analytic,
                bool perturb_u, double& fd_max) {
  MatD up = u, xp = x;
  MatD& arg = perturb_u ? up : xp;
  std::vector<Index> entries;
  for (const auto& [i, j] : probes(arg.rows(), arg.cols(), perturb_u ? 71 : 72))
    entries.push_back(i + j * arg.rows());
  const auto row = hra::check_entries(
      perturb_u ? "U" : "X", [&] { return loss(up, xp, g, v); }, arg, analytic, entries, 1e-6);
  fd_max = row.scale;
  return row.max_abs_error / std::max(max_abs(analytic), std::numeric_limits<double>::min());
}

// Forward + backward through the chain; dx and du are pre-filled with NaN and a wrong size so
// that an entry the backward fails to assign shows up. Also checks backward_in_place against it.
template <typename T>
void analytic_gradients(const Chain<T>& chain, const Mat<T>& x, const Mat<T>& g, Mat<T>& dx,
                        Mat<T>& du) {
  typename Chain<T>::ForwardCache cache;
  Mat<T> y;
  chain.forward(x, y, cache);
  dx = Mat<T>::Constant(1, 1, std::numeric_limits<T>::quiet_NaN());
  du = Mat<T>::Constant(2, 3, std::numeric_limits<T>::quiet_NaN());
  chain.backward(x, g, cache, dx, du);
  REQUIRE(dx.rows() == x.rows());
  REQUIRE(dx.cols() == x.cols());
  REQUIRE(du.rows() == chain.dim());
  REQUIRE(du.cols() == chain.rank());
  REQUIRE(dx.allFinite());
  REQUIRE(du.allFinite());
  // The layers' path, backward from the output in place, rebuilds X and gives the same gradients.
  Mat<T> x_rebuilt = y, g_in_place = g, du_in_place;
  chain.backward_in_place(x_rebuilt, g_in_place, cache, du_in_place);
  const double t = tol<T>(chain.dim(), chain.rank());
  CHECK(rel_err(x_rebuilt, x) <= t);
  CHECK(rel_err(g_in_place, dx) <= t);
  CHECK(max_abs(to_double(du_in_place - du)) <= t * std::max(max_abs(to_double(du)), 1.0));
  // Without restoring the input (the layers' call: they keep only H X) the gradients are the
  // same; only the state left in the first argument differs.
  Mat<T> y_scratch = y, g_scratch = g, du_scratch;
  chain.backward(cache.factors, cache.coeffs, y_scratch, g_scratch, du_scratch,
                 Chain<T>::State::output, /*restore_input=*/false);
  CHECK(rel_err(g_scratch, dx) <= t);
  CHECK(max_abs(to_double(du_scratch - du)) <= t * std::max(max_abs(to_double(du)), 1.0));
}

}  // namespace

TEST_CASE("ReflectorChain: gradients match central differences (double)", "[chain][gradient]") {
  const double kRelTol = 1e-7;
  for (const Variant v : kVariants) {
    double worst_u = 0, worst_x = 0;
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      const MatD u = random_matrix(s.d, s.r, seed_of(s, 21));
      const MatD x = random_matrix(s.d, s.n, seed_of(s, 22));
      const MatD g = random_matrix(s.d, s.n, seed_of(s, 23));
      const Chain<double> chain(u, v, s.block);
      MatD dx, du;
      analytic_gradients(chain, x, g, dx, du);
      double fd_max = 0;
      const double ex = fd_error(u, x, g, v, dx, false, fd_max);
      CHECK(ex <= kRelTol);
      worst_x = std::max(worst_x, ex);
      // dX = H^T G exactly (not only to first order): compare with the explicit H too.
      CHECK(rel_err(dx, explicit_h(u, v).transpose() * g) <= 1e-13);
      const double eu = fd_error(u, x, g, v, du, true, fd_max);
      if (du_vanishes(v, s)) {
        CHECK(max_abs(du) <= 1e-13 * max_abs(dx));
        CHECK(fd_max <= 1e-8 * max_abs(dx));
      } else {
        CHECK(eu <= kRelTol);
        worst_u = std::max(worst_u, eu);
      }
    }
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=double wrt=U max_rel_err=" << hra_test::sci(worst_u)
                              << " (central diff, h=1e-6, tol " << hra_test::sci(kRelTol) << ")");
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=double wrt=X max_rel_err=" << hra_test::sci(worst_x)
                              << " (central diff, h=1e-6, tol " << hra_test::sci(kRelTol) << ")");
  }
}

TEST_CASE("ReflectorChain: float gradients match the double analytic ones", "[chain][gradient]") {
  const double kRelTol = 1e-4;
  for (const Variant v : kVariants) {
    double worst_u = 0, worst_x = 0;
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      // The same inputs for both scalars: the float values, widened.
      const Mat<float> uf = random_as<float>(s.d, s.r, seed_of(s, 31));
      const Mat<float> xf = random_as<float>(s.d, s.n, seed_of(s, 32));
      const Mat<float> gf = random_as<float>(s.d, s.n, seed_of(s, 33));
      Mat<float> dxf, duf;
      MatD dxd, dud;
      analytic_gradients(Chain<float>(uf, v, s.block), xf, gf, dxf, duf);
      analytic_gradients(Chain<double>(to_double(uf), v, s.block), to_double(xf), to_double(gf),
                         dxd, dud);
      const double ex = rel_err(dxf, dxd);
      CHECK(ex <= kRelTol);
      worst_x = std::max(worst_x, ex);
      if (du_vanishes(v, s)) {
        CHECK(max_abs(to_double(duf)) <= 1e-5 * max_abs(dxd));  // zero up to float rounding
      } else {
        const double eu = rel_err(duf, dud);
        CHECK(eu <= kRelTol);
        worst_u = std::max(worst_u, eu);
      }
    }
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=float  wrt=U max_rel_err=" << hra_test::sci(worst_u)
                              << " (vs double analytic, tol " << hra_test::sci(kRelTol) << ")");
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=float  wrt=X max_rel_err=" << hra_test::sci(worst_x)
                              << " (vs double analytic, tol " << hra_test::sci(kRelTol) << ")");
  }
}

// backward_through(W, E) must give dL/dU for L = <E, W H X> without forming W^T E. That loss is
// <W^T E, H X>, so the central differences of fd_error() with G = W^T E apply unchanged.
TEST_CASE("ReflectorChain: backward_through matches central differences (double)",
          "[chain][gradient]") {
  const double kRelTol = 1e-7;
  for (const Variant v : kVariants) {
    double worst = 0, worst_vs_full = 0;
    for (const Shape& s : kShapes) {
      for (const Index d_out : {Index(3), 2 * s.d + 1}) {
        INFO(describe(v, s) << " d_out=" << d_out);
        const MatD u = random_matrix(s.d, s.r, seed_of(s, 51));
        const MatD x = random_matrix(s.d, s.n, seed_of(s, 52));
        const MatD w = random_matrix(d_out, s.d, seed_of(s, 53));
        const MatD e = random_matrix(d_out, s.n, seed_of(s, 54));
        const Chain<double> chain(u, v, s.block);
        typename Chain<double>::ForwardCache cache;
        MatD y;
        chain.forward(x, y, cache);
        MatD du = MatD::Constant(2, 3, std::numeric_limits<double>::quiet_NaN());
        chain.backward_through(w, e, y, cache, du);
        REQUIRE(du.rows() == s.d);
        REQUIRE(du.cols() == s.r);
        REQUIRE(du.allFinite());
        CHECK(rel_err(y, x) <= tol<double>(s.d, s.r));  // the input is rebuilt in place
        // The same numbers as the ordinary backward with G = W^T E, up to rounding.
        const MatD g = w.transpose() * e;
        MatD dx_full, du_full;
        chain.backward(x, g, cache, dx_full, du_full);
        const double scale = std::max(max_abs(du_full), max_abs(dx_full));
        const double vs_full = max_abs(du - du_full) / scale;
        CHECK(vs_full <= tol<double>(s.d + d_out, s.r));
        worst_vs_full = std::max(worst_vs_full, vs_full);
        double fd_max = 0;
        const double err = fd_error(u, x, g, v, du, true, fd_max);
        if (du_vanishes(v, s)) {
          CHECK(max_abs(du) <= 1e-13 * scale);
          CHECK(fd_max <= 1e-8 * scale);
        } else {
          CHECK(err <= kRelTol);
          worst = std::max(worst, err);
        }
      }
    }
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=double wrt=U via backward_through max_rel_err="
                              << hra_test::sci(worst) << " (central diff, tol "
                              << hra_test::sci(kRelTol) << "); vs backward(W^T E) "
                              << hra_test::sci(worst_vs_full));
  }
}

TEST_CASE("ReflectorChain: float backward_through matches the double analytic dU",
          "[chain][gradient]") {
  const double kRelTol = 1e-4;
  for (const Variant v : kVariants) {
    double worst = 0;
    for (const Shape& s : kShapes) {
      if (du_vanishes(v, s)) continue;  // covered in double above
      INFO(describe(v, s));
      const Index d_out = s.d + 3;
      const Mat<float> uf = random_as<float>(s.d, s.r, seed_of(s, 61));
      const Mat<float> xf = random_as<float>(s.d, s.n, seed_of(s, 62));
      const Mat<float> wf = random_as<float>(d_out, s.d, seed_of(s, 63));
      const Mat<float> ef = random_as<float>(d_out, s.n, seed_of(s, 64));
      const Chain<float> chain(uf, v, s.block);
      typename Chain<float>::ForwardCache cache;
      Mat<float> y, duf;
      chain.forward(xf, y, cache);
      chain.backward_through(wf, ef, y, cache, duf);
      MatD dxd, dud;
      analytic_gradients(Chain<double>(to_double(uf), v, s.block), to_double(xf),
                         MatD(to_double(wf).transpose() * to_double(ef)), dxd, dud);
      const double err = rel_err(duf, dud);
      CHECK(err <= kRelTol);
      worst = std::max(worst, err);
    }
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=float  wrt=U via backward_through max_rel_err="
                              << hra_test::sci(worst) << " (vs double analytic, tol "
                              << hra_test::sci(kRelTol) << ")");
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: backward_through names wrong shapes", "[chain][errors]", float,
                   double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    const Chain<T> chain(random_as<T>(8, 4, 1), v);
    const Mat<T> x = random_as<T>(8, 3, 2);
    const Mat<T> w = random_as<T>(5, 8, 3), e = random_as<T>(5, 3, 4);
    Mat<T> y, du;
    typename Chain<T>::ForwardCache cache;
    chain.forward(x, y, cache);
    expect_error<std::invalid_argument>(
        [&] { chain.backward_through(Mat<T>(w.leftCols(7)), e, y, cache, du); },
        {"backward_through", "5x7", "d=8"});
    expect_error<std::invalid_argument>(
        [&] { chain.backward_through(w, Mat<T>(e.topRows(4)), y, cache, du); },
        {"backward_through", "4x3", "5x3"});
    Mat<T> y_short = y.leftCols(2);
    expect_error<std::invalid_argument>(
        [&] { chain.backward_through(w, Mat<T>(e.leftCols(2)), y_short, cache, du); }, {"r x n"});
    Mat<T> y_bad = y.topRows(7);
    expect_error<std::invalid_argument>([&] { chain.backward_through(w, e, y_bad, cache, du); },
                                        {"backward_through", "7x3"});
    CHECK_NOTHROW(chain.backward_through(w, e, y, cache, du));
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: dL/du_i is orthogonal to u_i", "[chain][gradient]", float,
                   double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    double worst = 0;
    for (const Shape& s : kShapes) {
      INFO(describe(v, s));
      // Columns of very different lengths: only their directions matter.
      Mat<T> u = random_as<T>(s.d, s.r, seed_of(s, 41));
      for (Index j = 0; j < s.r; ++j) u.col(j) *= static_cast<T>(std::pow(3.0, double(j % 5) - 2));
      const Mat<T> x = random_as<T>(s.d, s.n, seed_of(s, 42));
      const Mat<T> g = random_as<T>(s.d, s.n, seed_of(s, 43));
      const Chain<T> chain(u, v, s.block);
      Mat<T> dx, du;
      analytic_gradients(chain, x, g, dx, du);
      if (du_vanishes(v, s)) continue;  // dU = 0 up to rounding, checked above
      for (Index j = 0; j < s.r; ++j) {
        const Eigen::VectorXd uj = u.col(j).template cast<double>();
        const double dot = std::abs(uj.dot(du.col(j).template cast<double>()));
        const double rel = dot / (uj.norm() * std::max(to_double(du).norm(), 1e-300));
        worst = std::max(worst, rel);
        CHECK(rel <= 16 * eps<T>() * std::sqrt(static_cast<double>(s.d)));
      }
      // The loss does not change when a column is rescaled by c: same dX, and dU_i scales by 1/c.
      Mat<T> u2 = u;
      u2.col(0) *= T(4);
      Mat<T> dx2, du2;
      analytic_gradients(Chain<T>(u2, v, s.block), x, g, dx2, du2);
      CHECK(rel_err(dx2, dx) <= tol<T>(s.d, s.r));
      CHECK(rel_err(Mat<T>(du2.col(0) * T(4)), Mat<T>(du.col(0))) <= 8 * tol<T>(s.d, s.r));
    }
    WARN("GRADCHECK variant=" << hra::to_string(v)
                              << " scalar=" << (eps<T>() < 1e-10 ? "double" : "float")
                              << " max |u_i.dU_i|/(|u_i||dU|) = " << hra_test::sci(worst));
  }
}

// --- Errors ------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("ReflectorChain: shape mismatches name both sizes", "[chain][errors]", float,
                   double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    const Chain<T> chain(random_as<T>(8, 4, 1), v);
    const Mat<T> x = random_as<T>(8, 3, 2), x7 = random_as<T>(7, 3, 3);
    Mat<T> y, dx, du;
    typename Chain<T>::ForwardCache cache;
    chain.forward(x, y, cache);

    expect_error<std::invalid_argument>([&] { chain.apply(x7, y); }, {"apply", "8x3", "7x3"});
    expect_error<std::invalid_argument>([&] { chain.apply_transpose(x7, y); },
                                        {"apply_transpose", "8x3", "7x3"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> m = x7;
          chain.apply_in_place(m);
        },
        {"7 rows", "d=8"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> m = x7;
          chain.apply_transpose_in_place(m);
        },
        {"7 rows", "d=8"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> w(5, 7);
          w.setOnes();
          chain.apply_right(w);
        },
        {"7 columns", "d=8"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> w(5, 9);
          w.setOnes();
          chain.apply_transpose_right(w);
        },
        {"9 columns", "d=8"});
    expect_error<std::invalid_argument>(
        [&] {
          typename Chain<T>::ForwardCache c;
          chain.forward(x7, y, c);
        },
        {"forward", "8x3", "7x3"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> m = x7;
          typename Chain<T>::ForwardCache c;
          chain.forward_in_place(m, c);
        },
        {"7 rows", "d=8"});
    // backward: X of the wrong height, G of the wrong height or width.
    expect_error<std::invalid_argument>([&] { chain.backward(x7, x, cache, dx, du); },
                                        {"backward", "8x3", "7x3"});
    expect_error<std::invalid_argument>([&] { chain.backward(x, x7, cache, dx, du); },
                                        {"gradient G", "8x3", "7x3"});
    expect_error<std::invalid_argument>(
        [&] { chain.backward(x, Mat<T>(x.leftCols(2)), cache, dx, du); },
        {"gradient G", "8x3", "8x2"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> yy = y;
          Mat<T> gg = x.leftCols(2);
          chain.backward_in_place(yy, gg, cache, du);
        },
        {"gradient G", "8x3", "8x2"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> yy = x7;
          Mat<T> gg = x7;
          chain.backward_in_place(yy, gg, cache, du);
        },
        {"output Y", "8x3", "7x3"});
    // The valid calls still work after all those failures.
    CHECK_NOTHROW(chain.backward(x, x, cache, dx, du));
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: backward refuses a cache from another forward",
                   "[chain][errors]", float, double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    const Chain<T> chain(random_as<T>(8, 4, 1), v, 3);
    const Mat<T> x = random_as<T>(8, 3, 2), x2 = random_as<T>(8, 2, 3);
    Mat<T> y, dx, du;
    typename Chain<T>::ForwardCache cache, empty;
    chain.forward(x, y, cache);
    // A cache of another batch size: r x n is 4x2 but it holds 4x3 coefficients.
    expect_error<std::invalid_argument>([&] { chain.backward(x2, x2, cache, dx, du); },
                                        {"cache", "4x3", "4x2"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> yy = x2;
          Mat<T> gg = x2;
          chain.backward_in_place(yy, gg, cache, du);
        },
        {"cache", "4x3", "4x2"});
    // No forward at all.
    expect_error<std::invalid_argument>([&] { chain.backward(x, x, empty, dx, du); },
                                        {"cache", "0x0", "4x3"});
    // A cache made by a chain of another rank.
    const Chain<T> rank3(random_as<T>(8, 3, 4), v, 3);
    typename Chain<T>::ForwardCache cache3;
    rank3.forward(x, y, cache3);
    expect_error<std::invalid_argument>([&] { chain.backward(x, x, cache3, dx, du); },
                                        {"cache", "3x3", "4x3"});
  }
  const Mat<T> u = random_as<T>(8, 4, 5), x = random_as<T>(8, 3, 6);
  Mat<T> y, dx, du;
  // A cache made by the other variant (same U, same n).
  {
    const Chain<T> chain(u, Variant::chain), gs(u, Variant::gram_schmidt);
    typename Chain<T>::ForwardCache from_chain, from_gs;
    chain.forward(x, y, from_chain);
    gs.forward(x, y, from_gs);
    expect_error<std::invalid_argument>([&] { gs.backward(x, x, from_chain, dx, du); },
                                        {"cache", "variant"});
    expect_error<std::invalid_argument>([&] { chain.backward(x, x, from_gs, dx, du); },
                                        {"cache", "variant"});
  }
  // A cache made with another block size: 2 blocks of 3 + 1 columns vs 2 blocks of 2 + 2.
  {
    const Chain<T> b3(u, Variant::chain, 3), b2(u, Variant::chain, 2), b1(u, Variant::chain, 1);
    typename Chain<T>::ForwardCache cache;
    b3.forward(x, y, cache);
    expect_error<std::invalid_argument>([&] { b2.backward(x, x, cache, dx, du); },
                                        {"cache", "block"});
    expect_error<std::invalid_argument>([&] { b1.backward(x, x, cache, dx, du); },
                                        {"cache", "block"});
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: rank and block size are validated", "[chain][errors]", float,
                   double) {
  using T = TestType;
  expect_error<std::invalid_argument>([&] { Chain<T> c(Mat<T>(8, 0)); }, {"r=0"});
  expect_error<std::invalid_argument>([&] { Chain<T> c(random_as<T>(8, 9, 1)); }, {"r=9", "d=8"});
  expect_error<std::invalid_argument>([&] { Chain<T> c(Mat<T>(0, 0)); }, {"d=0"});
  expect_error<std::invalid_argument>([&] { Chain<T>::initialized(8, 0, Init::random, 1); },
                                      {"r=0"});
  expect_error<std::invalid_argument>([&] { Chain<T>::initialized(8, 9, Init::random, 1); },
                                      {"r=9", "d=8"});
  expect_error<std::invalid_argument>([&] { Chain<T>::initialized(8, 10, Init::symmetric, 1); },
                                      {"r=10", "d=8"});
  expect_error<std::invalid_argument>([&] { Chain<T> c(random_as<T>(8, 3, 1), Variant::chain, 0); },
                                      {"block_size", "got 0"});
  expect_error<std::invalid_argument>(
      [&] { Chain<T>::initialized(8, 2, Init::random, 1, Variant::chain, 0); },
      {"block_size", "got 0"});
  Chain<T> chain(random_as<T>(8, 3, 1), Variant::chain, 2);
  expect_error<std::invalid_argument>([&] { chain.set_block_size(0); }, {"block_size", "got 0"});
  expect_error<std::invalid_argument>([&] { chain.set_block_size(-3); }, {"block_size", "got -3"});
  CHECK(chain.block_size() == 2);  // unchanged by the failed calls
  // The edges that are allowed: r = d, r = 1, d = 1.
  CHECK_NOTHROW(Chain<T>(random_as<T>(8, 8, 2)));
  CHECK_NOTHROW(Chain<T>(random_as<T>(8, 1, 2)));
  CHECK_NOTHROW(Chain<T>(random_as<T>(1, 1, 2)));
}

TEMPLATE_TEST_CASE("ReflectorChain: symmetric initialisation needs even r and the chain variant",
                   "[chain][errors][init]", float, double) {
  using T = TestType;
  expect_error<std::invalid_argument>([&] { Chain<T>::initialized(8, 3, Init::symmetric, 1); },
                                      {"even", "r=3"});
  expect_error<std::invalid_argument>([&] { Chain<T>::initialized(8, 1, Init::symmetric, 1); },
                                      {"even", "r=1"});
  expect_error<std::invalid_argument>(
      [&] { Chain<T>::initialized(8, 4, Init::symmetric, 1, Variant::gram_schmidt); },
      {"symmetric", "Gram-Schmidt"});
  CHECK_NOTHROW(Chain<T>::initialized(8, 3, Init::random, 1));
  CHECK_NOTHROW(Chain<T>::initialized(8, 4, Init::random, 1, Variant::gram_schmidt));
}

TEMPLATE_TEST_CASE("ReflectorChain: zero columns are an error, not a NaN", "[chain][errors]", float,
                   double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    Mat<T> u = random_as<T>(8, 4, 1);
    u.col(2).setZero();
    expect_error<std::invalid_argument>([&] { Chain<T> c(u, v); }, {"column 2", "zero"});

    Chain<T> chain(random_as<T>(8, 4, 2), v);
    const Mat<T> before = chain.reflectors();
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(u); }, {"column 2", "zero"});
    CHECK((chain.reflectors().array() == before.array()).all());

    // Zeroed through the mutable view: every use of the chain reports it.
    chain.reflector_values().col(1).setZero();
    const Mat<T> x = random_as<T>(8, 3, 3);
    Mat<T> y;
    typename Chain<T>::ForwardCache cache;
    expect_error<std::invalid_argument>([&] { chain.apply(x, y); }, {"column 1", "zero"});
    expect_error<std::invalid_argument>([&] { chain.apply_transpose(x, y); }, {"column 1", "zero"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> w = x.transpose();
          chain.apply_right(w);
        },
        {"column 1", "zero"});
    expect_error<std::invalid_argument>(
        [&] {
          Mat<T> w = x.transpose();
          chain.apply_transpose_right(w);
        },
        {"column 1", "zero"});
    expect_error<std::invalid_argument>([&] { chain.dense(); }, {"column 1", "zero"});
    expect_error<std::invalid_argument>([&] { chain.forward(x, y, cache); }, {"column 1", "zero"});
    expect_error<std::invalid_argument>([&] { chain.factorize(); }, {"column 1", "zero"});
    // Restoring the column makes it usable again.
    chain.reflector_values() = before;
    CHECK_NOTHROW(chain.apply(x, y));
    CHECK(y.allFinite());
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: a column whose squared norm underflows is named as such",
                   "[chain][errors]", float, double) {
  using T = TestType;
  // sqrt of the smallest positive subnormal: its square underflows to exactly 0.
  const T tiny = std::sqrt(std::numeric_limits<T>::denorm_min()) / T(4);
  REQUIRE(tiny > T(0));
  REQUIRE(tiny * tiny == T(0));
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    Mat<T> u = random_as<T>(6, 3, 4);
    u.col(1).setConstant(tiny);
    expect_error<std::invalid_argument>([&] { Chain<T> c(u, v); },
                                        {"column 1", "underflows", "rescale"});
    Chain<T> chain(random_as<T>(6, 3, 5), v);
    chain.reflector_values().col(2).setConstant(tiny);
    expect_error<std::invalid_argument>([&] { chain.factorize(); }, {"column 2", "underflows"});
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: non-finite reflectors are refused with their position",
                   "[chain][errors]", float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    const std::pair<T, const char*> bad_values[] = {{nan, "nan"}, {inf, "inf"}, {-inf, "-inf"}};
    for (const auto& [bad, text] : bad_values) {
      INFO(text);
      Mat<T> u = random_as<T>(8, 4, 1);
      u(3, 1) = bad;
      expect_error<std::invalid_argument>([&] { Chain<T> c(u, v); }, {text, "(3, 1)", "8x4"});

      Chain<T> chain(random_as<T>(8, 4, 2), v);
      const Mat<T> before = chain.reflectors();
      expect_error<std::invalid_argument>([&] { chain.set_reflectors(u); },
                                          {text, "(3, 1)", "8x4"});
      CHECK((chain.reflectors().array() == before.array()).all());

      chain.reflector_values()(3, 1) = bad;
      const Mat<T> x = random_as<T>(8, 3, 3);
      Mat<T> y;
      typename Chain<T>::ForwardCache cache;
      expect_error<std::invalid_argument>([&] { chain.apply(x, y); }, {text, "(3, 1)", "8x4"});
      expect_error<std::invalid_argument>([&] { chain.forward(x, y, cache); },
                                          {text, "(3, 1)", "8x4"});
      expect_error<std::invalid_argument>(
          [&] {
            Mat<T> w = x.transpose();
            chain.apply_right(w);
          },
          {text, "(3, 1)", "8x4"});
    }
    // Finite entries whose squares overflow.
    Chain<T> chain(random_as<T>(8, 4, 2), v);
    chain.reflector_values().col(2).setConstant(std::numeric_limits<T>::max() / 2);
    Mat<T> y;
    expect_error<std::invalid_argument>([&] { chain.apply(random_as<T>(8, 3, 3), y); },
                                        {"column 2", "overflow"});
  }
}

TEMPLATE_TEST_CASE("ReflectorChain: Gram-Schmidt refuses linearly dependent columns",
                   "[chain][errors][gram_schmidt]", float, double) {
  using T = TestType;
  Mat<T> u = random_as<T>(8, 4, 1);
  u.col(2) = u.col(0) - T(2) * u.col(1);  // dependent on the previous columns
  const Mat<T> x = random_as<T>(8, 3, 2);
  Mat<T> y;
  typename Chain<T>::ForwardCache cache;
  const Chain<T> gs(u, Variant::gram_schmidt);
  expect_error<std::invalid_argument>([&] { gs.apply(x, y); }, {"column 2", "linearly dependent"});
  expect_error<std::invalid_argument>([&] { gs.dense(); }, {"column 2", "linearly dependent"});
  expect_error<std::invalid_argument>([&] { gs.forward(x, y, cache); },
                                      {"column 2", "linearly dependent"});
  Mat<T> repeated = random_as<T>(8, 3, 3);
  repeated.col(1) = T(-3) * repeated.col(0);
  expect_error<std::invalid_argument>([&] { Chain<T>(repeated, Variant::gram_schmidt).dense(); },
                                      {"column 1", "linearly dependent"});
  // The chain variant has no such restriction: the same U is a valid chain.
  Mat<T> h;
  CHECK_NOTHROW(h = Chain<T>(u, Variant::chain).dense());
  CHECK(rel_err(h, explicit_chain(to_double(u))) <= tol<T>(8, 4));
}

TEMPLATE_TEST_CASE("ReflectorChain: a failed set_reflectors leaves the chain unchanged",
                   "[chain][errors]", float, double) {
  using T = TestType;
  for (const Variant v : kVariants) {
    INFO(hra::to_string(v));
    Chain<T> chain(random_as<T>(8, 4, 1), v, 3);
    const Mat<T> before = chain.reflectors();
    const Mat<T> dense_before = chain.dense();
    Mat<T> zero_col = random_as<T>(8, 4, 2), with_nan = zero_col, with_inf = zero_col;
    zero_col.col(3).setZero();
    with_nan(0, 0) = std::numeric_limits<T>::quiet_NaN();
    with_inf(7, 3) = std::numeric_limits<T>::infinity();
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(random_as<T>(8, 3, 3)); },
                                        {"set_reflectors", "8x4", "8x3"});
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(random_as<T>(9, 4, 3)); },
                                        {"set_reflectors", "8x4", "9x4"});
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(zero_col); }, {"column 3"});
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(with_nan); }, {"(0, 0)"});
    expect_error<std::invalid_argument>([&] { chain.set_reflectors(with_inf); }, {"(7, 3)"});
    CHECK((chain.reflectors().array() == before.array()).all());
    CHECK(chain.dim() == 8);
    CHECK(chain.rank() == 4);
    CHECK(chain.block_size() == 3);
    CHECK(chain.variant() == v);
    CHECK((chain.dense().array() == dense_before.array()).all());
    // A valid replacement does take effect.
    const Mat<T> next = random_as<T>(8, 4, 4);
    chain.set_reflectors(next);
    CHECK((chain.reflectors().array() == next.array()).all());
    CHECK(rel_err(chain.dense(), explicit_h(to_double(next), v)) <= tol<T>(8, 4));
  }
}
