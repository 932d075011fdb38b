// hra::Sgd, hra::Adam (and AdamW) and hra::CosineSchedule against the textbook updates, written
// out here element by element from PyTorch's documented algorithms
// (https://pytorch.org/docs/stable/generated/torch.optim.SGD.html, .../torch.optim.Adam.html,
// .../torch.optim.AdamW.html), and convergence to closed-form optima on convex problems.
#include <catch2/catch.hpp>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/QR>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include "hra/linear.hpp"
#include "hra/optim.hpp"
#include "hra/weight_matrix.hpp"
#include "support/errors.hpp"
#include "support/figures.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra_test::bitwise_equal;
using hra_test::expect_error;
using hra_test::Mat;
using hra_test::MatD;
using hra_test::max_abs;
using hra_test::random_matrix;
using hra_test::rel_err;
using hra_test::VecD;

// A parameter owned by the test, exposed to the optimiser as a ParameterView.
template <typename T>
struct Param {
  std::string name;
  Mat<T> value, grad;
  hra::ParameterView<T> view() {
    return {
        name, {value.data(), value.rows(), value.cols()}, {grad.data(), grad.rows(), grad.cols()}};
  }
};

template <typename T>
Param<T> make_param(const std::string& name, Index rows, Index cols, std::uint64_t seed) {
  return {name, random_matrix(rows, cols, seed).cast<T>(), Mat<T>::Zero(rows, cols)};
}

// Gradient of step t (t = 1, 2, ...) for a parameter: fixed random data, scaled so entries differ
// in magnitude (Adam's per-entry normalisation then matters).
MatD gradient_at(Index rows, Index cols, int t, std::uint64_t salt) {
  MatD g = random_matrix(rows, cols, 1000 * salt + static_cast<std::uint64_t>(t));
  for (Index i = 0; i < g.size(); ++i) g(i) *= 1.0 + static_cast<double>(i % 5);
  return g;
}

// PyTorch's SGD, one scalar at a time (dampening 0):
//   g <- g + wd p;  b <- g (t = 1) or mu b + g;  g <- nesterov ? g + mu b : b  (if mu != 0);
//   p <- p - lr g.
struct SgdReference {
  double lr, mu, wd;
  bool nesterov;
  double p, b = 0;
  int t = 0;
  void step(double g) {
    ++t;
    if (wd != 0) g = g + wd * p;
    if (mu != 0) {
      b = t == 1 ? g : mu * b + g;
      g = nesterov ? g + mu * b : b;
    }
    p = p - lr * g;
  }
};

// PyTorch's Adam / AdamW, one scalar at a time:
//   AdamW: p <- p - lr wd p;   Adam: g <- g + wd p;
//   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  mh = m / (1 - b1^t);  vh = v / (1 - b2^t);
//   p <- p - lr mh / (sqrt(vh) + eps).
struct AdamReference {
  double lr, b1, b2, eps, wd;
  bool decoupled;
  double p, m = 0, v = 0;
  int t = 0;
  void step(double g) {
    ++t;
    if (decoupled)
      p = p - lr * wd * p;
    else
      g = g + wd * p;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const double mh = m / (1 - std::pow(b1, t));
    const double vh = v / (1 - std::pow(b2, t));
    p = p - lr * mh / (std::sqrt(vh) + eps);
  }
};

template <typename T>
double tolerance() {
  return sizeof(T) == 4 ? 2e-6 : 1e-14;
}

}  // namespace

// --- SGD ---------------------------------------------------------------------------------------

TEST_CASE("Sgd: a hand-computed scalar example", "[optim][sgd]") {
  // p = 1, g = 0.5, lr = 0.1: p <- 1 - 0.05 = 0.95. With momentum 0.9 and then g = 0.25:
  // b = 0.9 * 0.5 + 0.25 = 0.7, p <- 0.95 - 0.07 = 0.88.
  Param<double> p{"p", MatD::Constant(1, 1, 1.0), MatD::Constant(1, 1, 0.5)};
  hra::Sgd<double> sgd({0.1, 0.9, 0.0, false});
  sgd.step({p.view()});
  CHECK(p.value(0) == Approx(0.95).epsilon(1e-15));
  p.grad(0) = 0.25;
  sgd.step({p.view()});
  CHECK(p.value(0) == Approx(0.88).epsilon(1e-15));
}

TEMPLATE_TEST_CASE("Sgd: steps match PyTorch's algorithm (plain, momentum, decay, nesterov)",
                   "[optim][sgd]", float, double) {
  using T = TestType;
  struct Config {
    const char* name;
    double lr, mu, wd;
    bool nesterov;
  };
  const Config configs[] = {
      {"plain", 0.1, 0.0, 0.0, false},        {"momentum", 0.05, 0.9, 0.0, false},
      {"weight_decay", 0.1, 0.0, 0.3, false}, {"momentum+decay", 0.05, 0.8, 0.2, false},
      {"nesterov", 0.05, 0.9, 0.0, true},     {"nesterov+decay", 0.02, 0.7, 0.1, true}};
  for (const Config& c : configs) {
    INFO(c.name);
    auto a = make_param<T>("a", 3, 2, 1), b = make_param<T>("b", 4, 1, 2);
    std::vector<SgdReference> ra, rb;
    for (Index i = 0; i < a.value.size(); ++i)
      ra.push_back({c.lr, c.mu, c.wd, c.nesterov, static_cast<double>(a.value(i))});
    for (Index i = 0; i < b.value.size(); ++i)
      rb.push_back({c.lr, c.mu, c.wd, c.nesterov, static_cast<double>(b.value(i))});
    hra::Sgd<T> sgd({c.lr, c.mu, c.wd, c.nesterov});
    for (int t = 1; t <= 3; ++t) {
      a.grad = gradient_at(3, 2, t, 1).cast<T>();
      b.grad = gradient_at(4, 1, t, 2).cast<T>();
      sgd.step({a.view(), b.view()});
      MatD wa(3, 2), wb(4, 1);
      for (Index i = 0; i < a.value.size(); ++i) {
        ra[static_cast<std::size_t>(i)].step(static_cast<double>(a.grad(i)));
        wa(i) = ra[static_cast<std::size_t>(i)].p;
      }
      for (Index i = 0; i < b.value.size(); ++i) {
        rb[static_cast<std::size_t>(i)].step(static_cast<double>(b.grad(i)));
        wb(i) = rb[static_cast<std::size_t>(i)].p;
      }
      INFO("step " << t);
      CHECK(rel_err(a.value.template cast<double>(), wa) <= tolerance<T>());
      CHECK(rel_err(b.value.template cast<double>(), wb) <= tolerance<T>());
    }
  }
}

TEST_CASE("Sgd: momentum state is created per parameter on its first step", "[optim][sgd]") {
  // "b" joins at the second step: its first update must use b = g (no history), while "a"
  // continues with its momentum.
  auto a = make_param<double>("a", 2, 2, 3), b = make_param<double>("b", 2, 2, 4);
  std::vector<SgdReference> ra, rb;
  for (Index i = 0; i < 4; ++i) {
    ra.push_back({0.1, 0.9, 0.0, false, a.value(i)});
    rb.push_back({0.1, 0.9, 0.0, false, b.value(i)});
  }
  hra::Sgd<double> sgd({0.1, 0.9, 0.0, false});
  a.grad = gradient_at(2, 2, 1, 3);
  sgd.step({a.view()});
  for (Index i = 0; i < 4; ++i) ra[static_cast<std::size_t>(i)].step(a.grad(i));
  a.grad = gradient_at(2, 2, 2, 3);
  b.grad = gradient_at(2, 2, 1, 4);
  sgd.step({a.view(), b.view()});
  for (Index i = 0; i < 4; ++i) {
    ra[static_cast<std::size_t>(i)].step(a.grad(i));
    rb[static_cast<std::size_t>(i)].step(b.grad(i));
    CHECK(a.value(i) == Approx(ra[static_cast<std::size_t>(i)].p).epsilon(1e-14));
    CHECK(b.value(i) == Approx(rb[static_cast<std::size_t>(i)].p).epsilon(1e-14));
  }
  // reset() forgets the momentum: the next step is a first step again (b = g).
  sgd.reset();
  const MatD before = a.value;
  a.grad = gradient_at(2, 2, 3, 3);
  sgd.step({a.view()});
  CHECK(rel_err(a.value, before - 0.1 * a.grad) <= 1e-15);
}

// --- Adam / AdamW ------------------------------------------------------------------------------

TEST_CASE("Adam: a hand-computed scalar example", "[optim][adam]") {
  // First step: m = 0.1 g, v = 0.001 g^2, so mh = g and vh = g^2 and the update is
  // lr g / (|g| + eps): p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.900000002 (to 1e-9).
  Param<double> p{"p", MatD::Constant(1, 1, 1.0), MatD::Constant(1, 1, 0.5)};
  hra::Adam<double> adam({0.1, 0.9, 0.999, 1e-8, 0.0, false});
  adam.step({p.view()});
  CHECK(p.value(0) == Approx(0.900000002).epsilon(1e-12));
  // Second step with g = -0.5: m = 0.9*0.05 - 0.05 = -0.005, mh = -0.005/0.19;
  // v = 0.999*0.00025 + 0.00025 = 0.00049975, vh = 0.00049975/0.001999 = 0.25 (exactly:
  // 0.25 (1 + 0.999) / (1 - 0.999^2) = 0.25); p = 0.900000002 + 0.1 * (0.005/0.19) / 0.5.
  p.grad(0) = -0.5;
  adam.step({p.view()});
  CHECK(p.value(0) == Approx(0.900000002 + 0.1 * (0.005 / 0.19) / (0.5 + 1e-8)).epsilon(1e-12));
}

TEMPLATE_TEST_CASE("Adam / AdamW: three steps match PyTorch's algorithm", "[optim][adam]", float,
                   double) {
  using T = TestType;
  struct Config {
    const char* name;
    hra::Adam<double>::Options o;
  };
  const Config configs[] = {
      {"adam", {1e-2, 0.9, 0.999, 1e-8, 0.0, false}},
      {"adam_l2_decay", {1e-2, 0.9, 0.999, 1e-8, 0.1, false}},
      {"adamw", {1e-2, 0.9, 0.999, 1e-8, 0.1, true}},
      {"adamw_other_betas", {3e-2, 0.8, 0.99, 1e-6, 0.05, true}},
      {"adam_large_eps", {1e-2, 0.5, 0.9, 0.5, 0.0, false}},
  };
  for (const Config& c : configs) {
    INFO(c.name);
    const auto& o = c.o;
    typename hra::Adam<T>::Options ot;
    ot.lr = o.lr;
    ot.beta1 = o.beta1;
    ot.beta2 = o.beta2;
    ot.eps = o.eps;
    ot.weight_decay = o.weight_decay;
    ot.decoupled_weight_decay = o.decoupled_weight_decay;
    hra::Adam<T> adam(ot);
    auto a = make_param<T>("a", 3, 4, 5), b = make_param<T>("b", 1, 5, 6);
    std::vector<AdamReference> ra, rb;
    for (Index i = 0; i < a.value.size(); ++i)
      ra.push_back({o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.decoupled_weight_decay,
                    static_cast<double>(a.value(i))});
    for (Index i = 0; i < b.value.size(); ++i)
      rb.push_back({o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.decoupled_weight_decay,
                    static_cast<double>(b.value(i))});
    for (int t = 1; t <= 3; ++t) {
      a.grad = gradient_at(3, 4, t, 5).cast<T>();
      b.grad = gradient_at(1, 5, t, 6).cast<T>();
      adam.step({a.view(), b.view()});
      MatD wa(3, 4), wb(1, 5);
      for (Index i = 0; i < a.value.size(); ++i) {
        ra[static_cast<std::size_t>(i)].step(static_cast<double>(a.grad(i)));
        wa(i) = ra[static_cast<std::size_t>(i)].p;
      }
      for (Index i = 0; i < b.value.size(); ++i) {
        rb[static_cast<std::size_t>(i)].step(static_cast<double>(b.grad(i)));
        wb(i) = rb[static_cast<std::size_t>(i)].p;
      }
      INFO("step " << t);
      CHECK(rel_err(a.value.template cast<double>(), wa) <= tolerance<T>());
      CHECK(rel_err(b.value.template cast<double>(), wb) <= tolerance<T>());
    }
  }
}

TEST_CASE("Adam: adamw() is decoupled decay with PyTorch's default 0.01", "[optim][adam]") {
  auto adamw = hra::Adam<double>::adamw(1e-3);
  CHECK(adamw.options().decoupled_weight_decay);
  CHECK(adamw.options().weight_decay == 0.01);
  CHECK(adamw.options().beta1 == 0.9);
  CHECK(adamw.options().beta2 == 0.999);
  CHECK(adamw.options().eps == 1e-8);
  auto p = make_param<double>("p", 2, 3, 7);
  p.grad = gradient_at(2, 3, 1, 7);
  std::vector<AdamReference> r;
  for (Index i = 0; i < 6; ++i) r.push_back({1e-3, 0.9, 0.999, 1e-8, 0.01, true, p.value(i)});
  adamw.step({p.view()});
  for (Index i = 0; i < 6; ++i) {
    r[static_cast<std::size_t>(i)].step(p.grad(i));
    CHECK(p.value(i) == Approx(r[static_cast<std::size_t>(i)].p).epsilon(1e-14));
  }
}

TEST_CASE("Adam: state and step count are per parameter, created on first use", "[optim][adam]") {
  // "b" joins at step 3: its bias correction must use t = 1 while "a" is at t = 3.
  auto a = make_param<double>("a", 2, 3, 8), b = make_param<double>("b", 3, 1, 9);
  std::vector<AdamReference> ra, rb;
  for (Index i = 0; i < a.value.size(); ++i)
    ra.push_back({1e-2, 0.9, 0.999, 1e-8, 0.0, false, a.value(i)});
  for (Index i = 0; i < b.value.size(); ++i)
    rb.push_back({1e-2, 0.9, 0.999, 1e-8, 0.0, false, b.value(i)});
  hra::Adam<double> adam({1e-2, 0.9, 0.999, 1e-8, 0.0, false});
  for (int t = 1; t <= 4; ++t) {
    a.grad = gradient_at(2, 3, t, 8);
    b.grad = gradient_at(3, 1, t, 9);
    if (t < 3) {
      adam.step({a.view()});
    } else {
      adam.step({b.view(), a.view()});  // order in the list does not matter
      for (Index i = 0; i < b.value.size(); ++i) rb[static_cast<std::size_t>(i)].step(b.grad(i));
    }
    for (Index i = 0; i < a.value.size(); ++i) ra[static_cast<std::size_t>(i)].step(a.grad(i));
  }
  for (Index i = 0; i < a.value.size(); ++i)
    CHECK(a.value(i) == Approx(ra[static_cast<std::size_t>(i)].p).epsilon(1e-14));
  for (Index i = 0; i < b.value.size(); ++i)
    CHECK(b.value(i) == Approx(rb[static_cast<std::size_t>(i)].p).epsilon(1e-14));

  // reset(): the next step is a first step again (update lr g / (|g| + eps) per entry).
  adam.reset();
  const MatD before = a.value;
  a.grad = gradient_at(2, 3, 5, 8);
  adam.step({a.view()});
  const MatD want = before.array() - 1e-2 * a.grad.array() / (a.grad.array().abs() + 1e-8);
  CHECK(rel_err(a.value, want) <= 1e-14);
}

// --- Bad input ---------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("Optimisers: a non-finite gradient throws and changes nothing",
                   "[optim][errors]", float, double) {
  using T = TestType;
  for (const T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
    auto run = [&](auto& opt, const char* who) {
      INFO(who);
      // Two identical sets of parameters: one sees a failed step in the middle, one does not.
      auto a = make_param<T>("a", 2, 3, 10), b = make_param<T>("b", 3, 2, 11);
      auto a2 = a, b2 = b;
      auto opt2 = opt;
      a.grad = gradient_at(2, 3, 1, 10).cast<T>();
      b.grad = gradient_at(3, 2, 1, 11).cast<T>();
      a2.grad = a.grad;
      b2.grad = b.grad;
      opt.step({a.view(), b.view()});
      opt2.step({a2.view(), b2.view()});

      const Mat<T> va = a.value, vb = b.value;
      a.grad = gradient_at(2, 3, 2, 10).cast<T>();
      b.grad = gradient_at(3, 2, 2, 11).cast<T>();
      b.grad(2, 1) = bad;  // the second parameter is bad: the first must not move either
      expect_error<std::invalid_argument>(
          [&] {
            opt.step({a.view(), b.view()});
          },
          {who, "'b'", "non-finite gradient"});
      CHECK(bitwise_equal(a.value, va));
      CHECK(bitwise_equal(b.value, vb));

      // The failed call left no trace in the state (moments, step counts).
      for (int t = 3; t <= 4; ++t) {
        a.grad = a2.grad = gradient_at(2, 3, t, 10).cast<T>();
        b.grad = b2.grad = gradient_at(3, 2, t, 11).cast<T>();
        opt.step({a.view(), b.view()});
        opt2.step({a2.view(), b2.view()});
      }
      CHECK(bitwise_equal(a.value, a2.value));
      CHECK(bitwise_equal(b.value, b2.value));
    };
    hra::Sgd<T> sgd({0.1, 0.9, 0.01, true});
    run(sgd, "Sgd::step");
    hra::Adam<T> adam({1e-2, 0.9, 0.999, 1e-8, 0.01, true});
    run(adam, "Adam::step");
  }
}

TEMPLATE_TEST_CASE("Optimisers: a parameter whose shape changed under the same storage throws",
                   "[optim][errors]", float, double) {
  using T = TestType;
  auto run = [&](auto& opt) {
    auto q = make_param<T>("q", 2, 2, 12), p = make_param<T>("p", 2, 3, 13);
    q.grad.setOnes();
    p.grad.setOnes();
    opt.step({q.view(), p.view()});
    // The same 6 numbers seen as 3 x 2.
    hra::ParameterView<T> reshaped{"p", {p.value.data(), 3, 2}, {p.grad.data(), 3, 2}};
    const Mat<T> vq = q.value, vp = p.value;
    expect_error<std::invalid_argument>(
        [&] {
          opt.step({q.view(), reshaped});
        },
        {"'p'", "changed shape from 2x3 to 3x2", "reset()"});
    CHECK(bitwise_equal(p.value, vp));
    CHECK(bitwise_equal(q.value, vq));  // nothing moved, not even the parameter listed first
    // After reset() the new shape is accepted.
    opt.reset();
    opt.step({q.view(), reshaped});
    CHECK_FALSE(bitwise_equal(p.value, vp));
  };
  hra::Adam<T> adam({1e-2, 0.9, 0.999, 1e-8, 0.0, false});
  run(adam);
  hra::Sgd<T> sgd({0.1, 0.9, 0.0, false});
  run(sgd);
}

TEST_CASE("Optimisers: value and gradient of different shapes, bad options", "[optim][errors]") {
  MatD v = MatD::Ones(2, 3), g = MatD::Ones(3, 3);
  hra::ParameterView<double> p{"w", {v.data(), 2, 3}, {g.data(), 3, 3}};
  hra::Sgd<double> sgd({0.1, 0.0, 0.0, false});
  expect_error<std::invalid_argument>([&] { sgd.step({p}); },
                                      {"Sgd::step", "'w'", "2x3 value", "3x3 gradient"});
  hra::Adam<double> adam({});
  expect_error<std::invalid_argument>([&] { adam.step({p}); },
                                      {"Adam::step", "'w'", "2x3 value", "3x3 gradient"});
  CHECK(bitwise_equal(v, MatD::Ones(2, 3)));

  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Sgd<double>({-0.1, 0.0, 0.0, false});
      },
      {"Sgd", "lr=-0.1"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Sgd<double>({0.1, -0.5, 0.0, false});
      },
      {"Sgd", "momentum=-0.5"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Sgd<double>({0.1, 0.0, -1.0, false});
      },
      {"Sgd", "weight_decay=-1"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Adam<double>({1e-3, 1.0, 0.999, 1e-8, 0.0, false});
      },
      {"Adam", "beta1=1"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Adam<double>({1e-3, 0.9, -0.1, 1e-8, 0.0, false});
      },
      {"Adam", "beta2=-0.1"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Adam<double>({1e-3, 0.9, 0.999, 0.0, 0.0, false});
      },
      {"Adam", "eps=0"});
  expect_error<std::invalid_argument>(
      [] {
        (void)hra::Adam<double>(
            {std::numeric_limits<double>::quiet_NaN(), 0.9, 0.999, 1e-8, 0.0, false});
      },
      {"Adam", "lr=nan"});
  expect_error<std::invalid_argument>([] { hra::Adam<double>::adamw(1e-3, -0.01); },
                                      {"Adam", "weight_decay=-0.01"});
}

// --- Convergence on convex problems ------------------------------------------------------------

namespace {

// Least squares with a trainable Linear layer: L = (1/n) |W X + b 1^T - T|_F^2 (+ decay).
struct LeastSquares {
  static constexpr Index d_in = 5, d_out = 3, n = 40;
  MatD x = random_matrix(d_in, n, 201);
  MatD t;
  LeastSquares() {
    const MatD w_true = random_matrix(d_out, d_in, 202);
    const VecD b_true = random_matrix(d_out, 1, 203);
    t = w_true * x;
    t.colwise() += b_true;
    t += 0.1 * random_matrix(d_out, n, 204);  // noise: the optimum does not fit exactly
  }
  // The inputs with a row of ones, so that [W b] is one d_out x (d_in + 1) matrix.
  MatD augmented() const {
    MatD xa(d_in + 1, n);
    xa.topRows(d_in) = x;
    xa.row(d_in).setOnes();
    return xa;
  }
  // argmin (1/n)|Θ Xa - T|^2 + (ridge/2)|Θ|^2: Θ ((2/n) Xa Xa^T + ridge I) = (2/n) T Xa^T.
  // ridge = 0 is solved by Householder QR of Xa^T (ordinary least squares).
  MatD optimum(double ridge) const {
    const MatD xa = augmented();
    if (ridge == 0) return xa.transpose().householderQr().solve(t.transpose()).transpose();
    const double s = 2.0 / static_cast<double>(n);
    MatD a = s * xa * xa.transpose();
    a.diagonal().array() += ridge;
    const MatD rhs = s * xa * t.transpose();
    return a.ldlt().solve(rhs).transpose();
  }
  // Trains [W b] from zero with `opt` for `steps` steps of the cosine schedule; returns [W b].
  template <typename Opt>
  MatD train(Opt& opt, double lr, int steps) const {
    MatD w0 = MatD::Zero(d_out, d_in);
    hra::Lineard layer(hra::WeightMatrix<double>::owned(w0), VecD(VecD::Zero(d_out)),
                       hra::LinearOptions{true}, hra::BiasMode::all);
    const hra::CosineSchedule schedule(lr, 0, steps, 0.0);
    for (int s = 0; s < steps; ++s) {
      const MatD& y = layer.forward(x);
      layer.backward((2.0 / static_cast<double>(n)) * (y - t), false);
      opt.set_lr(schedule(s));
      opt.step(layer.parameters());
    }
    MatD theta(d_out, d_in + 1);
    theta.leftCols(d_in) = layer.weight();
    theta.col(d_in) = *layer.bias();
    return theta;
  }
};

}  // namespace

TEST_CASE("Optimisers: AdamW reaches the least-squares optimum, Adam with L2 decay the ridge one",
          "[optim][convergence]") {
  const LeastSquares problem;
  const MatD ols = problem.optimum(0.0);
  const double ridge = 0.1;
  const MatD ridge_opt = problem.optimum(ridge);
  // The two optima differ clearly, so each test below tells the two decays apart.
  REQUIRE(max_abs(ols - ridge_opt) > 1e-2);
  // Both are stationary points of their objectives (checks the closed forms themselves).
  const MatD xa = problem.augmented();
  const double s = 2.0 / static_cast<double>(LeastSquares::n);
  CHECK(max_abs(s * (ols * xa - problem.t) * xa.transpose()) <= 1e-12);
  CHECK(max_abs(s * (ridge_opt * xa - problem.t) * xa.transpose() + ridge * ridge_opt) <= 1e-12);

  // AdamW (decoupled decay 0.01): at a fixed point with steady gradients m -> g, v -> g^2, so
  // wd p = -g/(|g| + eps), i.e. |g| = eps wd |p| / (1 - wd |p|) ~ 1e-10: the fixed point is the
  // least-squares optimum up to ~1e-10. On the way there wd p is balanced by g / sqrt(v), and v
  // remembers old, larger gradients for ~1/(1 - beta2) steps; beta2 = 0.99 (instead of 0.999)
  // lets that memory fade within the 3000 steps (with 0.999 the gap is still 2e-4 at 3000).
  hra::Adam<double> adamw({0.05, 0.9, 0.99, 1e-8, 0.01, true});
  const MatD got_w = problem.train(adamw, 0.05, 3000);
  const double err_w = max_abs(got_w - ols);
  WARN("CONVERGENCE adamw max|theta - theta_ols| = "
       << hra_test::sci(err_w) << " (|theta_ols|max = " << max_abs(ols) << ")");
  CHECK(err_w <= 1e-5);

  // Adam with L2 (coupled) decay: the stationary point satisfies grad + wd p = 0, the ridge
  // solution with ridge = wd.
  hra::Adam<double> adam({0.05, 0.9, 0.999, 1e-8, ridge, false});
  const MatD got_l2 = problem.train(adam, 0.05, 3000);
  const double err_l2 = max_abs(got_l2 - ridge_opt);
  WARN("CONVERGENCE adam_l2 max|theta - theta_ridge| = " << hra_test::sci(err_l2));
  CHECK(err_l2 <= 1e-4);

  // SGD with momentum (and L2 decay) reaches the ridge optimum too.
  hra::Sgd<double> sgd({0.1, 0.9, ridge, false});
  const MatD got_sgd = problem.train(sgd, 0.1, 3000);
  const double err_sgd = max_abs(got_sgd - ridge_opt);
  WARN("CONVERGENCE sgd_momentum_l2 max|theta - theta_ridge| = " << hra_test::sci(err_sgd));
  CHECK(err_sgd <= 1e-6);
}

// --- Learning-rate schedule --------------------------------------------------------------------

TEST_CASE("CosineSchedule: warm-up, midpoint and end against the closed formula",
          "[optim][schedule]") {
  const double base = 1e-3, lo = 1e-5;
  const hra::CosineSchedule s(base, 10, 110, lo);
  const double pi = 3.14159265358979323846;
  // Linear warm-up: base (step + 1) / warmup.
  CHECK(s(0) == Approx(base * 0.1).epsilon(1e-15));
  CHECK(s(4) == Approx(base * 0.5).epsilon(1e-15));
  CHECK(s(9) == Approx(base).epsilon(1e-15));
  // Cosine from base (step = warmup) through the midpoint (base + min) / 2 to min.
  CHECK(s(10) == Approx(base).epsilon(1e-15));
  CHECK(s(60) == Approx((base + lo) / 2).epsilon(1e-15));
  CHECK(s(35) == Approx(lo + (base - lo) * (1 + std::cos(pi * 25.0 / 100.0)) / 2).epsilon(1e-15));
  CHECK(s(85) == Approx(lo + (base - lo) * (1 + std::cos(pi * 75.0 / 100.0)) / 2).epsilon(1e-15));
  CHECK(s(109) == Approx(lo + (base - lo) * (1 + std::cos(pi * 99.0 / 100.0)) / 2).epsilon(1e-15));
  CHECK(s(110) == lo);
  CHECK(s(1000) == lo);
  // Monotone after the warm-up.
  for (std::int64_t k = 10; k < 110; ++k) CHECK(s(k + 1) <= s(k));

  // No warm-up: starts at base; min defaults to 0.
  const hra::CosineSchedule plain(0.5, 0, 4);
  CHECK(plain(0) == 0.5);
  CHECK(plain(2) == Approx(0.25).epsilon(1e-15));
  CHECK(plain(1) == Approx(0.5 * (1 + std::cos(pi / 4)) / 2).epsilon(1e-15));
  CHECK(plain(4) == 0.0);
  // Warm-up over the whole run: ramps to base, then min.
  const hra::CosineSchedule ramp(2.0, 4, 4, 0.5);
  CHECK(ramp(0) == Approx(0.5).epsilon(1e-15));
  CHECK(ramp(3) == Approx(2.0).epsilon(1e-15));
  CHECK(ramp(4) == 0.5);
}

TEST_CASE("CosineSchedule: bad arguments are clear errors", "[optim][schedule][errors]") {
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(1e-3, -1, 10); },
                                      {"warmup=-1", "total=10"});
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(1e-3, 0, 0); }, {"total=0"});
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(1e-3, 11, 10); },
                                      {"warmup=11", "total=10"});
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(-1e-3, 0, 10); },
                                      {"base=-0.001"});
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(1e-3, 0, 10, 1e-2); },
                                      {"base=0.001", "min=0.01"});
  expect_error<std::invalid_argument>([] { (void)hra::CosineSchedule(1e-3, 0, 10, -1.0); },
                                      {"min=-1"});
  expect_error<std::invalid_argument>(
      [] { (void)hra::CosineSchedule(std::numeric_limits<double>::quiet_NaN(), 0, 10); },
      {"base=nan"});
}

TEST_CASE("CosineSchedule: a negative step and infinite rates are refused",
          "[optim][schedule][errors]") {
  const hra::CosineSchedule s(0.1, 2, 10);
  expect_error<std::invalid_argument>([&] { (void)s(-1); }, {"step", ">= 0", "-1"});
  expect_error<std::invalid_argument>(
      [] { (void)hra::CosineSchedule(std::numeric_limits<double>::infinity(), 0, 10); },
      {"base=inf"});
}

TEMPLATE_TEST_CASE("Optimisers: non-finite hyperparameters are refused, also by set_lr",
                   "[optim][errors]", float, double) {
  using T = TestType;
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Sgd<T>({inf, 0.0, 0.0, false});
      },
      {"Sgd", "lr", "finite", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Sgd<T>({0.1, inf, 0.0, false});
      },
      {"Sgd", "momentum", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Sgd<T>({0.1, 0.0, inf, false});
      },
      {"Sgd", "weight_decay", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Sgd<T>({0.1, nan, 0.0, false});
      },
      {"Sgd", "momentum=nan"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Adam<T>({inf, 0.9, 0.999, 1e-8, 0.0, false});
      },
      {"Adam", "lr", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Adam<T>({1e-3, 0.9, 0.999, inf, 0.0, false});
      },
      {"Adam", "eps", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Adam<T>({1e-3, 0.9, 0.999, 1e-8, inf, false});
      },
      {"Adam", "weight_decay", "inf"});
  expect_error<std::invalid_argument>(
      [&] {
        (void)hra::Adam<T>({1e-3, nan, 0.999, 1e-8, 0.0, false});
      },
      {"Adam", "beta1=nan"});
  hra::Sgd<T> sgd({0.1});
  hra::Adam<T> adam({1e-3});
  for (const double bad : {-1.0, inf, nan}) {
    INFO("lr " << bad);
    expect_error<std::invalid_argument>([&] { sgd.set_lr(bad); }, {"Sgd::set_lr", "lr"});
    expect_error<std::invalid_argument>([&] { adam.set_lr(bad); }, {"Adam::set_lr", "lr"});
  }
  CHECK(sgd.lr() == 0.1);
  CHECK(adam.lr() == 1e-3);
}

TEMPLATE_TEST_CASE("Optimisers: the same parameter passed twice is refused before any update",
                   "[optim][errors]", float, double) {
  using T = TestType;
  auto a = make_param<T>("a", 3, 2, 1);
  auto b = make_param<T>("b", 2, 2, 2);
  a.grad.setOnes();
  b.grad.setOnes();
  const Mat<T> a0 = a.value, b0 = b.value;
  hra::Sgd<T> sgd({0.1, 0.9, 0.0, false});
  hra::Adam<T> adam({1e-3});
  expect_error<std::invalid_argument>(
      [&] {
        sgd.step({a.view(), b.view(), a.view()});
      },
      {"Sgd::step", "'a'", "passed twice", "nothing was updated"});
  expect_error<std::invalid_argument>(
      [&] {
        adam.step({b.view(), b.view()});
      },
      {"Adam::step", "'b'", "passed twice"});
  CHECK(bitwise_equal(a.value, a0));
  CHECK(bitwise_equal(b.value, b0));
}

TEMPLATE_TEST_CASE("Optimisers: state() and set_state() resume a run bit for bit", "[optim][state]",
                   float, double) {
  using T = TestType;
  // Three steps, save, three more, against six uninterrupted steps.
  auto run = [](auto make_opt, bool interrupt) {
    auto a = make_param<T>("a", 3, 2, 1);
    auto b = make_param<T>("b", 4, 1, 2);
    auto opt = make_opt();
    for (int t = 1; t <= 6; ++t) {
      if (interrupt && t == 4) {
        const auto saved = opt.state({a.view(), b.view()});
        auto fresh = make_opt();
        fresh.set_state({a.view(), b.view()}, saved);
        opt = fresh;
      }
      a.grad = gradient_at(3, 2, t, 1).cast<T>();
      // "b" only joins at step 2: its state has its own count.
      b.grad = gradient_at(4, 1, t, 2).cast<T>();
      if (t == 1)
        opt.step({a.view()});
      else
        opt.step({a.view(), b.view()});
    }
    return std::make_pair(Mat<T>(a.value), Mat<T>(b.value));
  };
  auto sgd = [] { return hra::Sgd<T>({0.05, 0.9, 0.01, true}); };
  auto adam = [] { return hra::Adam<T>::adamw(1e-2); };
  CHECK(run(sgd, true) == run(sgd, false));
  CHECK(run(adam, true) == run(adam, false));

  // What state() reports, and what set_state() refuses (nothing changes on error).
  auto a = make_param<T>("a", 3, 2, 1);
  a.grad.setOnes();
  hra::Adam<T> opt({1e-3});
  opt.step({a.view()});
  opt.step({a.view()});
  const auto s = opt.state({a.view()});
  REQUIRE(s.size() == 1);
  CHECK(s[0].steps == 2);
  REQUIRE(s[0].slots.size() == 2);
  CHECK(s[0].slots[0].rows() == 3);
  auto b = make_param<T>("b", 2, 2, 2);
  CHECK(opt.state({b.view()})[0].steps == 0);  // no state yet
  CHECK(opt.state({b.view()})[0].slots.empty());
  auto wrong = s;
  wrong[0].slots[1].resize(2, 2);
  expect_error<std::invalid_argument>([&] { opt.set_state({a.view()}, wrong); },
                                      {"Adam::set_state", "'a'", "3x2", "2x2"});
  expect_error<std::invalid_argument>(
      [&] {
        opt.set_state({a.view(), b.view()}, s);
      },
      {"1 states for 2 parameters"});
  wrong = s;
  wrong[0].steps = -1;
  expect_error<std::invalid_argument>([&] { opt.set_state({a.view()}, wrong); },
                                      {"negative step count"});
  wrong = s;
  wrong[0].slots.pop_back();
  expect_error<std::invalid_argument>([&] { opt.set_state({a.view()}, wrong); },
                                      {"1 state tensors, expected 2"});
  CHECK(opt.state({a.view()})[0].steps == 2);
}
