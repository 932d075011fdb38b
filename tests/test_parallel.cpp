// hra's thread pool and its split products: every task runs exactly once, nested runs are
// serial, and a seeded computation gives the same bits whatever the thread count (issue #11).
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <Eigen/QR>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "hra/hra_linear.hpp"
#include "hra/linear.hpp"
#include "hra/lora_linear.hpp"
#include "hra/parallel.hpp"
#include "support/matrices.hpp"

namespace {

using Eigen::Index;
using hra_test::bitwise_equal;
using hra_test::Mat;

// Restores the pool's thread count when a test ends, even on failure.
struct ThreadCount {
  int saved = hra::num_threads();
  ~ThreadCount() { hra::set_num_threads(saved); }
};

}  // namespace

TEST_CASE("Threads: a run calls every task exactly once, nested runs serially", "[parallel]") {
  ThreadCount restore;
  for (int threads : {1, 2, 3, 5}) {
    hra::set_num_threads(threads);
    CHECK(hra::num_threads() == threads);
    std::vector<std::atomic<int>> calls(37);
    std::atomic<int> nested{0};
    hra::detail::ThreadPool::instance().run(37, [&](std::int64_t i) {
      calls[static_cast<std::size_t>(i)].fetch_add(1);
      hra::detail::ThreadPool::instance().run(3, [&](std::int64_t) { nested.fetch_add(1); });
    });
    for (const auto& c : calls) CHECK(c.load() == 1);
    CHECK(nested.load() == 37 * 3);
  }
  hra::set_num_threads(0);
  CHECK(hra::num_threads() == 1);
}

TEMPLATE_TEST_CASE("Threads: a split product gives the same bits on 1, 2 and 4 threads",
                   "[parallel]", float, double) {
  using T = TestType;
  using hra::detail::Op;
  ThreadCount restore;
  // Both above the split threshold: 512^3 (8 column slices) and the example's first layer on
  // 2000 images (256 x 784 times 784 x 2000, 16 slices), where Eigen's blocking of one unsplit
  // product can depend on the column count, so slices computed on one thread as one product
  // would differ in the last bits from the same slices run on several. Every pair of transpose
  // flags: a transposed operand is sliced along its other dimension.
  for (const auto& shape : {std::array<Index, 3>{512, 512, 512}, {256, 784, 2000}}) {
    for (const Op op_a : {Op::n, Op::t}) {
      for (const Op op_b : {Op::n, Op::t}) {
        const Index m = shape[0], k = shape[1], n = shape[2];
        INFO("product " << m << "x" << k << " times " << k << "x" << n << ", A"
                        << (op_a == Op::t ? "^T" : "") << " B" << (op_b == Op::t ? "^T" : ""));
        REQUIRE(double(m) * double(k) * double(n) >= hra::detail::parallel_product_min_madds);
        const Mat<T> a = op_a == Op::n ? hra_test::random_as<T>(m, k, 1)
                                       : hra_test::random_as<T>(k, m, 1),
                     b = op_b == Op::n ? hra_test::random_as<T>(k, n, 2)
                                       : hra_test::random_as<T>(n, k, 2);
        const Mat<T> acc0 = hra_test::random_as<T>(m, n, 3);
        const Mat<T> ea = op_a == Op::n ? a : Mat<T>(a.transpose()),
                     eb = op_b == Op::n ? b : Mat<T>(b.transpose());
        const auto run = [&](int threads) {
          hra::set_num_threads(threads);
          std::array<Mat<T>, 2> r;
          hra::detail::product(r[0], a, op_a, b, op_b);
          r[1] = acc0;
          hra::detail::product(r[1], a, op_a, b, op_b, T(0.5), /*accumulate=*/true);
          return r;
        };
        const std::array<Mat<T>, 2> one = run(1);
        // The values are the product's (to rounding), whatever the split.
        const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
        CHECK(hra_test::rel_err(one[0], (ea * eb).eval()) < tol);
        CHECK(hra_test::rel_err(one[1], (acc0 + T(0.5) * ea * eb).eval()) < tol);
        for (int threads : {2, 4}) {
          const std::array<Mat<T>, 2> r = run(threads);
          CHECK(bitwise_equal(r[0], one[0]));
          CHECK(bitwise_equal(r[1], one[1]));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("Threads: layers give the same bits on 1, 2 and 3 threads", "[parallel]", float,
                   double) {
  using T = TestType;
  ThreadCount restore;
  // Large enough that forward and backward split their products (1024 x 1024 x 256 each).
  const Index d = 1024, n = 256;
  const Mat<T> w = hra_test::random_as<T>(d, d, 4), x = hra_test::random_as<T>(d, n, 5),
               dy = hra_test::random_as<T>(d, n, 6);
  struct Result {
    Mat<T> hra_y, hra_dx, hra_du, lora_y, lora_dx, lin_y, lin_dx;
  };
  const auto run = [&](int threads) {
    hra::set_num_threads(threads);
    Result r;
    hra::HraOptions ho;
    ho.rank = 8;
    ho.init = hra::Init::random;
    hra::HraLinear<T> h(w, ho);
    r.hra_y = h.forward(x);
    r.hra_dx = h.backward(dy);
    r.hra_du = h.adapter().gradient();
    hra::LoraOptions lo;
    lo.rank = 8;
    hra::LoraLinear<T> l(w, lo);
    r.lora_y = l.forward(x);
    r.lora_dx = l.backward(dy);
    hra::Linear<T> lin(hra::WeightMatrix<T>::owned(w), std::nullopt);
    r.lin_y = lin.forward(x);
    r.lin_dx = lin.backward(dy);
    return r;
  };
  const Result one = run(1);
  for (int threads : {2, 3}) {
    const Result r = run(threads);
    CHECK(bitwise_equal(r.hra_y, one.hra_y));
    CHECK(bitwise_equal(r.hra_dx, one.hra_dx));
    CHECK(bitwise_equal(r.hra_du, one.hra_du));
    CHECK(bitwise_equal(r.lora_y, one.lora_y));
    CHECK(bitwise_equal(r.lora_dx, one.lora_dx));
    CHECK(bitwise_equal(r.lin_y, one.lin_y));
    CHECK(bitwise_equal(r.lin_dx, one.lin_dx));
  }
}

TEMPLATE_TEST_CASE("Threads: the adapters' thin products give the same bits on 1, 2 and 3 threads",
                   "[parallel]", float, double) {
  using T = TestType;
  ThreadCount restore;
  // d_in r n = 4096 x 8 x 512 = 16 Mi multiply-adds: the chain form's U^T X, U K, G K^T and
  // Y Z^T and the low-rank form's V^T X, X Z^T and W^T (dY K^T) are split
  // (detail::thin_product), by columns for the r x n projections and by rows for the tall
  // results; W V (256 x 4096 x 8 = 8 Mi) too. A narrow W keeps the frozen products small.
  const Index d_in = 4096, d_out = 256, n = 512, r = 8;
  REQUIRE(double(d_in) * double(r) * double(n) >= hra::detail::parallel_thin_min_madds);
  REQUIRE(double(d_out) * double(d_in) * double(r) >= hra::detail::parallel_thin_min_madds);
  const Mat<T> w = hra_test::random_as<T>(d_out, d_in, 7), x = hra_test::random_as<T>(d_in, n, 8),
               dy = hra_test::random_as<T>(d_out, n, 9);
  for (const hra::HraForm form : {hra::HraForm::chain, hra::HraForm::low_rank})
    for (const hra::Variant variant : {hra::Variant::chain, hra::Variant::gram_schmidt}) {
      INFO("form " << hra::to_string(form) << ", variant "
                   << (variant == hra::Variant::chain ? "chain" : "gram_schmidt"));
      const auto run = [&](int threads) {
        hra::set_num_threads(threads);
        hra::HraOptions ho;
        ho.rank = r;
        ho.variant = variant;
        ho.init = hra::Init::random;
        ho.block_size = 4;  // two blocks, so the chain's loop over blocks is split too
        hra::HraLinear<T> h(w, ho);
        h.set_form(form);
        std::array<Mat<T>, 3> out;
        out[0] = h.forward(x);
        REQUIRE(h.last_form() == form);
        out[1] = h.backward(dy);
        out[2] = h.adapter().gradient();
        return out;
      };
      const std::array<Mat<T>, 3> one = run(1);
      for (int threads : {2, 3}) {
        const std::array<Mat<T>, 3> got = run(threads);
        CHECK(bitwise_equal(got[0], one[0]));
        CHECK(bitwise_equal(got[1], one[1]));
        CHECK(bitwise_equal(got[2], one[2]));
      }
    }
}

// merge / unmerge (ReflectorChain::apply_right, detail::RightUpdate) split W's rows over the
// pool once W V has 64 Mi multiply-adds: the same bits on 1, 2 and 3 threads, equal to W H
// computed as a plain product, also on a block of a larger matrix (outer stride != rows) whose
// row count is not a multiple of the kernel's row chunk.
TEMPLATE_TEST_CASE("Threads: merge gives the same bits on 1, 2 and 3 threads", "[parallel]", float,
                   double) {
  using T = TestType;
  ThreadCount restore;
  const Index rows = 2051, d = 2048;  // 2 rows d r = 67.2M multiply-adds at r = 8
  const Mat<T> big = hra_test::random_as<T>(rows + 5, d + 1, 7);
  for (const hra::Variant v : {hra::Variant::chain, hra::Variant::gram_schmidt}) {
    for (const Index r : {Index(8), Index(13)}) {
      INFO(hra::to_string(v) << " r=" << r);
      const hra::ReflectorChain<T> chain(hra_test::random_as<T>(d, r, 8 + r), v, 8);
      const auto f = chain.factorize();
      const auto run = [&](int threads, hra::Apply op) {
        hra::set_num_threads(threads);
        Mat<T> w = big;
        chain.apply_right(f, w.block(2, 0, rows, d), op);
        return w;
      };
      const Mat<T> one = run(1, hra::Apply::h), back = run(1, hra::Apply::transpose);
      for (int threads : {2, 3}) {
        CHECK(bitwise_equal(run(threads, hra::Apply::h), one));
        CHECK(bitwise_equal(run(threads, hra::Apply::transpose), back));
      }
      // Against W H in double, one reflection at a time (chain: W H_1 ... H_r) or with Q from
      // Eigen's Householder QR (Gram-Schmidt: W - 2 W Q Q^T); untouched rows and column included.
      const Eigen::MatrixXd u = chain.reflectors().template cast<double>();
      Eigen::MatrixXd expected = big.template cast<double>();
      auto wb = expected.block(2, 0, rows, d);
      if (v == hra::Variant::chain) {
        for (Index i = 0; i < r; ++i)
          wb -= (2.0 / u.col(i).squaredNorm()) * (wb * u.col(i)) * u.col(i).transpose();
      } else {
        const Eigen::MatrixXd q = Eigen::HouseholderQR<Eigen::MatrixXd>(u).householderQ() *
                                  Eigen::MatrixXd::Identity(d, r);
        wb -= 2.0 * (wb * q) * q.transpose();
      }
      const double scale = expected.cwiseAbs().maxCoeff();
      const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-13;
      CHECK((one.template cast<double>() - expected).cwiseAbs().maxCoeff() <= tol * scale);
      CHECK(bitwise_equal(Mat<T>(one.topRows(2)), Mat<T>(big.topRows(2))));
      CHECK(bitwise_equal(Mat<T>(one.col(d)), Mat<T>(big.col(d))));
    }
  }
}
