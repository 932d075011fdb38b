// Agreement with PEFT's HRA (huggingface/peft, src/peft/tuners/hra/layer.py), evaluated by
// PyTorch in float64 and stored in tests/fixtures/peft_*.txt by scripts/make_peft_fixtures.py.
#include <catch2/catch.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "hra/reflector_chain.hpp"
#include "support/errors.hpp"
#include "support/fixtures.hpp"

namespace {

using Eigen::MatrixXd;
using hra_test::expect_error;

// Every case the script writes; a missing file fails the test that loads it.
const std::vector<std::string>& case_names() {
  static const std::vector<std::string> names = {"chain_din5_dout7_r1_n1",
                                                 "chain_din8_dout6_r2_n3",
                                                 "chain_din7_dout9_r3_n1",
                                                 "chain_din10_dout4_r4_n3",
                                                 "chain_din6_dout8_r6_n3",
                                                 "chain_din12_dout5_r12_n1",
                                                 "chain_symmetric_din8_dout5_r4_n3",
                                                 "gs_din5_dout7_r1_n3",
                                                 "gs_din8_dout6_r2_n1",
                                                 "gs_din9_dout11_r3_n3",
                                                 "gs_din12_dout7_r4_n1",
                                                 "gs_din6_dout5_r6_n3"};
  return names;
}

std::string fixture_path(const std::string& name) {
  return std::string(HRA_TEST_FIXTURES) + "/peft_" + name + ".txt";
}

// One PEFT case in Eigen's layout: activations transposed to d x n (one sample per column).
struct PeftCase {
  std::string name;
  hra::Variant variant;
  Eigen::Index d_in, d_out, r, n;
  MatrixXd hra_u;        // d_in x r
  MatrixXd weight;       // d_out x d_in
  Eigen::VectorXd bias;  // d_out
  MatrixXd x;            // d_in x n
  MatrixXd grad_output;  // d_out x n  (G = dL/dy)
  MatrixXd delta;        // d_in x d_in, get_delta_weight()
  MatrixXd delta_reverse;
  MatrixXd output;  // d_out x n
  MatrixXd grad_u;  // d_in x r
  MatrixXd grad_x;  // d_in x n
};

PeftCase load_case(const std::string& name) {
  const hra_test::Fixture f = hra_test::load_fixture(fixture_path(name));
  PeftCase c;
  c.name = f.field("case");
  REQUIRE(c.name == name);
  const long gs = f.integer("apply_GS");
  REQUIRE((gs == 0 || gs == 1));
  c.variant = gs ? hra::Variant::gram_schmidt : hra::Variant::chain;
  c.d_in = f.integer("d_in");
  c.d_out = f.integer("d_out");
  c.r = f.integer("r");
  c.n = f.integer("n");
  c.hra_u = f.matrix("hra_u", c.d_in, c.r);
  c.weight = f.matrix("weight", c.d_out, c.d_in);
  c.bias = f.matrix("bias", 1, c.d_out).transpose();
  c.x = f.matrix("x", c.n, c.d_in).transpose();
  c.grad_output = f.matrix("grad_output", c.n, c.d_out).transpose();
  c.delta = f.matrix("delta_weight", c.d_in, c.d_in);
  c.delta_reverse = f.matrix("delta_weight_reverse", c.d_in, c.d_in);
  c.output = f.matrix("output", c.n, c.d_out).transpose();
  c.grad_u = f.matrix("grad_hra_u", c.d_in, c.r);
  c.grad_x = f.matrix("grad_x", c.n, c.d_in).transpose();
  return c;
}

// max|a - b| / max(max|b|, 1): the fixtures' entries are O(1), and PEFT's gradient for the
// Gram-Schmidt case r = d_in is zero up to rounding, where a pure relative error is meaningless.
double scaled_err(const MatrixXd& a, const MatrixXd& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff() / std::max(b.cwiseAbs().maxCoeff(), 1.0);
}

constexpr double kTol = 1e-12;

// Largest error per variant over all cases, printed as greppable "PEFTCHECK ..." lines.
struct MaxErr {
  double chain = 0, gram_schmidt = 0;
  void add(hra::Variant v, double e) {
    double& m = v == hra::Variant::chain ? chain : gram_schmidt;
    m = std::max(m, e);
  }
  void report(const char* what) const {
    std::printf("PEFTCHECK variant=chain        %-36s max_err=%.3e (tolerance %.0e)\n", what, chain,
                kTol);
    std::printf("PEFTCHECK variant=gram_schmidt %-36s max_err=%.3e (tolerance %.0e)\n", what,
                gram_schmidt, kTol);
  }
};

}  // namespace

TEST_CASE("PEFT fixtures: a missing or malformed file fails loudly", "[peft][fixtures]") {
  const std::string missing = std::string(HRA_TEST_FIXTURES) + "/peft_no_such_case.txt";
  expect_error<std::runtime_error>([&] { hra_test::load_fixture(missing); },
                                   {"cannot open fixture file", missing});
  // The first case is complete; asking it for a matrix of the wrong shape is an error too.
  const hra_test::Fixture f = hra_test::load_fixture(fixture_path(case_names().front()));
  expect_error<std::runtime_error>([&] { f.matrix("hra_u", 4, 1); }, {"hra_u", "5x1"});
  expect_error<std::runtime_error>([&] { f.matrix("no_such_matrix", 1, 1); }, {"no_such_matrix"});
}

TEST_CASE("PEFT fixtures: dense H equals get_delta_weight, both orders", "[peft][dense]") {
  MaxErr err_forward, err_reverse, err_reverse_apply;
  for (const auto& name : case_names()) {
    INFO("case " << name);
    const PeftCase c = load_case(name);
    const hra::ReflectorChaind chain(c.hra_u, c.variant);
    const MatrixXd h = chain.dense();
    const double e1 = scaled_err(h, c.delta);
    // PEFT's unmerge uses get_delta_weight(reverse=True): that must be H^T = H^{-1}.
    const double e2 = scaled_err(MatrixXd(h.transpose()), c.delta_reverse);
    MatrixXd ht;
    chain.apply_transpose(MatrixXd::Identity(c.d_in, c.d_in), ht);
    const double e3 = scaled_err(ht, c.delta_reverse);
    CHECK(e1 <= kTol);
    CHECK(e2 <= kTol);
    CHECK(e3 <= kTol);
    err_forward.add(c.variant, e1);
    err_reverse.add(c.variant, e2);
    err_reverse_apply.add(c.variant, e3);
  }
  err_forward.report("dense() vs delta_weight");
  err_reverse.report("dense()^T vs delta_weight(reverse)");
  err_reverse_apply.report("apply_transpose(I) vs (reverse)");
}

TEST_CASE("PEFT fixtures: layer output and merged weight", "[peft][forward]") {
  MaxErr err_output, err_merged, err_unmerged;
  for (const auto& name : case_names()) {
    INFO("case " << name);
    const PeftCase c = load_case(name);
    const hra::ReflectorChaind chain(c.hra_u, c.variant);
    // y = W (H x) + b, H applied to the batch without forming it.
    MatrixXd hx;
    chain.apply(c.x, hx);
    const MatrixXd y = (c.weight * hx).colwise() + c.bias;
    const double e1 = scaled_err(y, c.output);
    // PEFT's merge: W <- W @ delta_weight; our apply_right must give the same W H.
    MatrixXd merged = c.weight;
    chain.apply_right(merged);
    const double e2 = scaled_err(merged, MatrixXd(c.weight * c.delta));
    // PEFT's unmerge multiplies by the reverse product; ours must restore W.
    MatrixXd unmerged = merged;
    chain.apply_transpose_right(unmerged);
    const double e3 = scaled_err(unmerged, MatrixXd(merged * c.delta_reverse));
    CHECK(e1 <= kTol);
    CHECK(e2 <= kTol);
    CHECK(e3 <= kTol);
    CHECK(scaled_err(unmerged, c.weight) <= kTol);
    err_output.add(c.variant, e1);
    err_merged.add(c.variant, e2);
    err_unmerged.add(c.variant, e3);
  }
  err_output.report("layer output W H x + b");
  err_merged.report("apply_right(W) vs W @ delta");
  err_unmerged.report("unmerge vs W H @ delta(reverse)");
}

TEST_CASE("PEFT fixtures: gradients equal PyTorch autograd", "[peft][backward]") {
  MaxErr err_u, err_x, err_u_in_place;
  for (const auto& name : case_names()) {
    INFO("case " << name);
    const PeftCase c = load_case(name);
    const hra::ReflectorChaind chain(c.hra_u, c.variant);
    MatrixXd hx, dx, du;
    hra::ReflectorChaind::ForwardCache cache;
    chain.forward(c.x, hx, cache);
    // Through the frozen layer y = W (H x) + b: dL/d(Hx) = W^T G; then dX = H^T W^T G.
    const MatrixXd g = c.weight.transpose() * c.grad_output;
    chain.backward(c.x, g, cache, dx, du);
    const double e1 = scaled_err(du, c.grad_u);
    const double e2 = scaled_err(dx, c.grad_x);
    // The layers' path: backward from the output, in place.
    MatrixXd y = hx, g_in_place = g, du_in_place;
    chain.backward_in_place(y, g_in_place, cache, du_in_place);
    const double e3 = std::max(scaled_err(du_in_place, c.grad_u), scaled_err(g_in_place, c.grad_x));
    CHECK(scaled_err(y, c.x) <= kTol);  // the input, rebuilt from the output
    CHECK(e1 <= kTol);
    CHECK(e2 <= kTol);
    CHECK(e3 <= kTol);
    err_u.add(c.variant, e1);
    err_x.add(c.variant, e2);
    err_u_in_place.add(c.variant, e3);
  }
  err_u.report("dL/dU vs autograd hra_u.grad");
  err_x.report("dL/dX vs autograd x.grad");
  err_u_in_place.report("backward_in_place dU, dX vs autograd");
}
