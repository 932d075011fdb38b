// safetensors reading and writing: conversions, round trips, the byte layout, every rejection
// of a malformed file (by its message) and the atomic replacement of files.
#include <hra/detail/random.hpp>
#include <hra/io/detail/half.hpp>
#include <hra/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/matrices.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
namespace st = hra::safetensors;
using hra::detail::bfloat16_to_float;
using hra::detail::double_to_bfloat16;
using hra::detail::double_to_half;
using hra::detail::half_to_float;
using hra_test::expect_error;
using hra_test::read_all;
using hra_test::write_all;

namespace {

const std::vector<st::Dtype> all_dtypes = {st::Dtype::F16, st::Dtype::BF16, st::Dtype::F32,
                                           st::Dtype::F64};

/// A file from a header text and a data buffer, with the length prefix written by hand.
std::string craft(const std::string& header, const std::string& buffer = "") {
  std::string out(8, '\0');
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + buffer;
}

std::string f32_bytes(const std::vector<float>& values) {
  std::string out;
  for (float v : values) {
    std::uint32_t b;
    std::memcpy(&b, &v, 4);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((b >> (8 * i)) & 0xFF));
  }
  return out;
}

std::string u16_bytes(const std::vector<std::uint16_t>& values) {
  std::string out;
  for (std::uint16_t v : values) {
    out.push_back(static_cast<char>(v & 0xFF));
    out.push_back(static_cast<char>(v >> 8));
  }
  return out;
}

std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

/// The value a dtype stores for x (what a getter must return after a put).
double stored_value(double x, st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::F16:
      return half_to_float(double_to_half(x));
    case st::Dtype::BF16:
      return bfloat16_to_float(double_to_bfloat16(x));
    case st::Dtype::F32:
      return static_cast<float>(x);
    case st::Dtype::F64:
      return x;
  }
  return 0;
}

/// Relative spacing of a dtype near 1 (half a unit in the last place bounds the rounding error).
double unit_roundoff(st::Dtype dtype) {
  switch (dtype) {
    case st::Dtype::F16:
      return std::ldexp(1.0, -11);
    case st::Dtype::BF16:
      return std::ldexp(1.0, -8);
    case st::Dtype::F32:
      return std::ldexp(1.0, -24);
    case st::Dtype::F64:
      return 0;
  }
  return 0;
}

const std::string w23 = R"("w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
const std::string data23 = f32_bytes({1, 2, 3, 4, 5, 6});

/// parse() of `bytes` must throw format_error mentioning the source, `tensor` (if not empty)
/// and `what`.
void expect_rejected(const std::string& bytes, const std::string& tensor, const std::string& what,
                     const st::ReadOptions& options = {}) {
  CAPTURE(what);
  std::vector<std::string> parts{"safetensors: crafted.safetensors: ", what};
  if (!tensor.empty()) parts.push_back("tensor '" + tensor + "'");
  expect_error<st::format_error>([&] { (void)st::parse(bytes, "crafted.safetensors", options); },
                                 parts);
}

}  // namespace

TEST_CASE("binary16 conversion: exact values, rounding ties, subnormals, overflow, specials") {
  const double sub = std::ldexp(1.0, -24);  // smallest subnormal half
  CHECK(double_to_half(1.0) == 0x3C00);
  CHECK(double_to_half(-2.0) == 0xC000);
  CHECK(double_to_half(0.5) == 0x3800);
  CHECK(double_to_half(65504.0) == 0x7BFF);  // largest finite
  CHECK(double_to_half(0.0) == 0x0000);
  CHECK(double_to_half(-0.0) == 0x8000);
  // Ties go to the even neighbour, in the normal range ...
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11)) == 0x3C00);
  CHECK(double_to_half(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3C02);
  CHECK(double_to_half(2049.0) == 0x6800);  // spacing 2 at 2048: tie between 2048 and 2050
  CHECK(double_to_half(2051.0) == 0x6802);
  CHECK(double_to_half(2047.5) == 0x6800);  // tie that carries into the next exponent
  // ... just above a tie rounds up, and a double is rounded once (float first would tie to 1.0)
  CHECK(double_to_half(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)) == 0x3C01);
  // ... and among subnormals.
  CHECK(double_to_half(sub) == 0x0001);
  CHECK(double_to_half(0.5 * sub) == 0x0000);  // tie with zero: even
  CHECK(double_to_half(0.5 * sub * (1 + 1e-12)) == 0x0001);
  CHECK(double_to_half(1.5 * sub) == 0x0002);
  CHECK(double_to_half(2.5 * sub) == 0x0002);
  CHECK(double_to_half(1023 * sub) == 0x03FF);    // largest subnormal
  CHECK(double_to_half(1023.5 * sub) == 0x0400);  // rounds up to the smallest normal 2^-14
  CHECK(double_to_half(std::ldexp(1.0, -14)) == 0x0400);
  CHECK(double_to_half(-3 * sub) == 0x8003);
  CHECK(double_to_half(1e-30) == 0x0000);
  CHECK(double_to_half(-1e-30) == 0x8000);
  CHECK(double_to_half(std::numeric_limits<double>::denorm_min()) == 0x0000);
  // Overflow: 65520 is the tie between 65504 (odd) and 65536 (not finite), so it overflows.
  CHECK(double_to_half(65519.99) == 0x7BFF);
  CHECK(double_to_half(65520.0) == 0x7C00);
  CHECK(double_to_half(-1e10) == 0xFC00);
  CHECK(double_to_half(std::numeric_limits<double>::max()) == 0x7C00);
  CHECK(double_to_half(std::numeric_limits<double>::infinity()) == 0x7C00);
  CHECK(double_to_half(-std::numeric_limits<double>::infinity()) == 0xFC00);
  const std::uint16_t nan = double_to_half(std::numeric_limits<double>::quiet_NaN());
  CHECK((nan & 0x7C00) == 0x7C00);
  CHECK((nan & 0x03FF) != 0);

  CHECK(half_to_float(0x0001) == static_cast<float>(sub));
  CHECK(half_to_float(0x03FF) == static_cast<float>(1023 * sub));
  CHECK(half_to_float(0x7BFF) == 65504.0f);
  CHECK(half_to_float(0x3555) == static_cast<float>(0x555 * std::ldexp(1.0, -12)));
  CHECK(half_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0xFC01)));
  CHECK(std::signbit(half_to_float(0x8000)));
}

TEST_CASE("binary16 conversion: every bit pattern round-trips and rounding is to the nearest") {
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float v = half_to_float(bits);
    if (std::isnan(v)) {
      const std::uint16_t back = double_to_half(v);
      REQUIRE((back & 0x7C00) == 0x7C00);
      REQUIRE((back & 0x03FF) != 0);
      REQUIRE((back & 0x8000) == (bits & 0x8000));
    } else {
      REQUIRE(double_to_half(v) == bits);
    }
  }
  // Random doubles across the whole range: the result is never farther than a neighbour.
  hra::detail::Random rng(7);
  for (int k = 0; k < 200000; ++k) {
    const double x = rng.uniform(1.0) * std::ldexp(1.0, static_cast<int>(rng.below(44)) - 28);
    const std::uint16_t h = double_to_half(x);
    const double v = half_to_float(h);
    if (std::isinf(v)) {
      REQUIRE(std::abs(x) >= 65520.0);
      continue;
    }
    const std::uint16_t mag = h & 0x7FFF;
    const double up = mag < 0x7BFF ? half_to_float(static_cast<std::uint16_t>(h + 1)) : v;
    const double down = mag > 0 ? half_to_float(static_cast<std::uint16_t>(h - 1)) : v;
    REQUIRE(std::abs(x - v) <= std::abs(x - up));
    REQUIRE(std::abs(x - v) <= std::abs(x - down));
  }
#if defined(__FLT16_MAX__) && !defined(__clang__)
  // An independent reference where the compiler has one (GCC's _Float16 on x86-64).
  for (int k = 0; k < 200000; ++k) {
    const double x = rng.normal() * std::ldexp(1.0, static_cast<int>(rng.below(50)) - 30);
    const _Float16 ref = static_cast<_Float16>(x);
    std::uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    REQUIRE(double_to_half(x) == ref_bits);
  }
#endif
}

TEST_CASE("bfloat16 conversion: exact values, ties, subnormals, overflow, specials") {
  CHECK(double_to_bfloat16(1.0) == 0x3F80);
  CHECK(double_to_bfloat16(-2.0) == 0xC000);
  CHECK(double_to_bfloat16(1.0 + std::ldexp(1.0, -8)) == 0x3F80);  // tie to even
  CHECK(double_to_bfloat16(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3F82);
  CHECK(double_to_bfloat16(std::ldexp(1.0, -133)) == 0x0001);  // smallest subnormal
  CHECK(double_to_bfloat16(std::ldexp(1.0, -134)) == 0x0000);  // tie with zero
  CHECK(double_to_bfloat16(std::ldexp(3.0, -135)) == 0x0001);
  CHECK(double_to_bfloat16(std::ldexp(1.0, -126)) == 0x0080);              // smallest normal
  CHECK(double_to_bfloat16(std::numeric_limits<float>::max()) == 0x7F80);  // rounds up, overflows
  CHECK(bfloat16_to_float(0x7F7F) == std::ldexp(255.0f, 120));             // largest finite
  CHECK(double_to_bfloat16(std::ldexp(255.0, 120)) == 0x7F7F);
  CHECK(double_to_bfloat16(-std::numeric_limits<double>::infinity()) == 0xFF80);
  CHECK(double_to_bfloat16(1e300) == 0x7F80);
  CHECK(double_to_bfloat16(-0.0) == 0x8000);
  CHECK(std::isnan(bfloat16_to_float(double_to_bfloat16(std::nan("")))));
  CHECK(bfloat16_to_float(0x0001) == std::ldexp(1.0f, -133));

  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float v = bfloat16_to_float(bits);
    // bfloat16 is the top half of a float.
    if (!std::isnan(v)) {
      REQUIRE(float_bits(v) == (h << 16));
      REQUIRE(double_to_bfloat16(v) == bits);
    }
  }
  // Against the classic float-bits formula (round half to even on the low 16 bits).
  hra::detail::Random rng(11);
  for (int k = 0; k < 200000; ++k) {
    const auto f =
        static_cast<float>(rng.normal() * std::ldexp(1.0, static_cast<int>(rng.below(280)) - 150));
    const std::uint32_t b = float_bits(f);
    const auto ref = static_cast<std::uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    REQUIRE(double_to_bfloat16(f) == ref);
  }
}

TEMPLATE_TEST_CASE("matrices and vectors round-trip through a file in every dtype", "", float,
                   double) {
  using Scalar = TestType;
  using Matrix = hra_test::Mat<Scalar>;
  using Vector = hra_test::Vec<Scalar>;
  const hra_test::TempDir dir("hra_test_safetensors");
  // Not square: a transposition would show.
  const Matrix m = hra_test::random_as<Scalar>(5, 3, 1) * Scalar(3);
  const Vector v = hra_test::random_vec<Scalar>(7, 2) * Scalar(100);
  // Values every dtype holds exactly must come back exactly.
  Matrix exact(2, 4);
  exact << 0.5, -3.25, 1024, 0, std::ldexp(Scalar(1), -14), -Scalar(1.5), 7, 65504;

  for (st::Dtype dtype : all_dtypes) {
    CAPTURE(st::to_string(dtype));
    st::TensorFile out;
    out.put_matrix("m", m, dtype);
    out.put_vector("v", v, dtype);
    out.put_matrix("exact", exact, dtype);
    out.put_vector("row", m.row(1), dtype);  // a 1 x n expression is a vector too
    const fs::path path = dir.path / (std::string(st::to_string(dtype)) + ".safetensors");
    st::save(path, out);
    const st::TensorFile in = st::load(path);
    CHECK(in.source() == path.string());
    CHECK(in.names() == std::vector<std::string>{"exact", "m", "row", "v"});
    CHECK(in.at("m").dtype == dtype);
    CHECK(in.at("m").shape == std::vector<std::int64_t>{5, 3});
    CHECK(in.at("v").shape == std::vector<std::int64_t>{7});

    const Matrix m2 = in.get_matrix<Scalar>("m", 5, 3);
    const Vector v2 = in.get_vector<Scalar>("v", 7);
    for (Eigen::Index j = 0; j < m.cols(); ++j)
      for (Eigen::Index i = 0; i < m.rows(); ++i) {
        const double x = static_cast<double>(m(i, j));
        REQUIRE(static_cast<double>(m2(i, j)) == static_cast<Scalar>(stored_value(x, dtype)));
        // Relative rounding error, plus half the smallest half subnormal for tiny values.
        REQUIRE(std::abs(static_cast<double>(m2(i, j)) - x) <=
                unit_roundoff(dtype) * std::abs(x) + std::ldexp(1.0, -25));
      }
    for (Eigen::Index i = 0; i < v.size(); ++i) {
      const double x = static_cast<double>(v(i));
      REQUIRE(static_cast<double>(v2(i)) == static_cast<Scalar>(stored_value(x, dtype)));
    }
    if (dtype != st::Dtype::BF16) {
      CHECK(in.get_matrix<Scalar>("exact") == exact);
    } else {  // 65504 needs 11 significant bits; everything else in `exact` is in every dtype
      CHECK(in.get_matrix<Scalar>("exact")(1, 3) == 65536);
      CHECK(in.get_matrix<Scalar>("exact").leftCols(3) == exact.leftCols(3));
    }
    CHECK(in.get_vector<Scalar>("row", 3) == in.get_matrix<Scalar>("m").row(1).transpose());
    // The other scalar type reads the same numbers.
    CHECK(in.get_matrix<double>("m").template cast<Scalar>() == m2);
  }
}

TEST_CASE("layout: PyTorch (rows, cols) row-major bytes are the Eigen rows x cols matrix") {
  // Bytes as PyTorch writes torch.tensor([[1, 2, 3], [4, 5, 6]]).
  const std::string bytes = craft("{" + w23 + "}", data23);
  const st::TensorFile f = st::parse(bytes);
  const Eigen::MatrixXd w = f.get_matrix<double>("w", 2, 3);
  Eigen::MatrixXd expected(2, 3);
  expected << 1, 2, 3, 4, 5, 6;
  CHECK(w == expected);
  CHECK(f.get_array<float>("w") == std::vector<float>{1, 2, 3, 4, 5, 6});

  // And put_matrix writes the same bytes back (entry (i, j) at i * cols + j).
  st::TensorFile g;
  g.put_matrix("w", expected.cast<float>().eval());
  const auto& data = g.at("w").data;
  CHECK(std::string(data.begin(), data.end()) == data23);
  // Half bytes decode the same way.
  const std::string half = craft(R"({"h":{"dtype":"F16","shape":[1,3],"data_offsets":[0,6]}})",
                                 u16_bytes({0x3C00, 0xC000, 0x0001}));
  const Eigen::MatrixXf h = st::parse(half).get_matrix<float>("h");
  CHECK(h(0, 0) == 1.0f);
  CHECK(h(0, 1) == -2.0f);
  CHECK(h(0, 2) == std::ldexp(1.0f, -24));
  const std::string bf = craft(R"({"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})",
                               u16_bytes({0x3F80, 0xC0A0}));
  CHECK(st::parse(bf).get_vector<double>("b") == Eigen::Vector2d(1.0, -5.0));
}

TEST_CASE("serialized bytes: sorted keys, space padding, 8-byte aligned data, no gaps") {
  st::TensorFile f;
  f.put_vector("z_half", Eigen::VectorXf::Ones(3), st::Dtype::F16);   // 6 bytes
  f.put_vector("a_f32", Eigen::VectorXf::Ones(1));                    // 4 bytes
  f.put_matrix("m_f64", Eigen::MatrixXd::Ones(1, 2));                 // 16 bytes
  f.put_vector("b_bf16", Eigen::VectorXd::Ones(1), st::Dtype::BF16);  // 2 bytes
  f.metadata()["format"] = "pt";
  const std::string bytes = st::serialize(f);
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
  CHECK((8 + n) % 8 == 0);
  const std::string header = bytes.substr(8, n);
  const std::size_t json_end = header.find_last_not_of(' ') + 1;  // the rest is padding
  CHECK(header[json_end - 1] == '}');
  CHECK(header.substr(0, 40) == R"({"__metadata__":{"format":"pt"},"a_f32":)");
  const auto j = nlohmann::json::parse(header);
  // Largest elements first so each tensor starts at a multiple of its element size.
  CHECK(j["m_f64"]["data_offsets"] == nlohmann::json::array({0, 16}));
  CHECK(j["a_f32"]["data_offsets"] == nlohmann::json::array({16, 20}));
  CHECK(j["b_bf16"]["data_offsets"] == nlohmann::json::array({20, 22}));
  CHECK(j["z_half"]["data_offsets"] == nlohmann::json::array({22, 28}));
  CHECK(j["m_f64"]["shape"] == nlohmann::json::array({1, 2}));
  CHECK(bytes.size() == 8 + n + 28);
  CHECK(header.substr(0, json_end) == j.dump());  // nlohmann's dump is sorted: so was the header
  const st::TensorFile back = st::parse(bytes);
  for (const auto& name : f.names()) CHECK(back.at(name) == f.at(name));
}

TEST_CASE("metadata, empty files, rank-0 and empty tensors round-trip") {
  const hra_test::TempDir dir("hra_test_safetensors");
  st::TensorFile f;
  f.metadata()["format"] = "pt";
  f.metadata()["note"] = "unicode: \xc3\xa9\xe2\x82\xac, quotes \" and \\ and\nnewline";
  f.put_array<double>("scalar", {}, {2.5});
  f.put_matrix("empty", Eigen::MatrixXf(0, 3));
  f.put_array<float>("cube", {2, 1, 2}, {1, 2, 3, 4}, st::Dtype::BF16);
  st::save(dir.path / "a.safetensors", f);
  const st::TensorFile g = st::load(dir.path / "a.safetensors");
  CHECK(g.metadata() == f.metadata());
  CHECK(g.get_array<double>("scalar") == std::vector<double>{2.5});
  CHECK(g.at("scalar").shape.empty());
  CHECK(g.get_matrix<float>("empty", 0, 3).size() == 0);
  CHECK(g.get_array<double>("cube") == std::vector<double>{1, 2, 3, 4});
  CHECK(g.at("cube").shape == std::vector<std::int64_t>{2, 1, 2});

  const st::TensorFile nothing = st::parse(st::serialize(st::TensorFile()));
  CHECK(nothing.empty());
  CHECK(nothing.metadata().empty());
  CHECK(st::serialize(st::TensorFile()).size() == 16);  // length + "{}" padded to 8

  // Unknown keys in a tensor entry are ignored, as the reference reader does.
  const st::TensorFile extra = st::parse(
      craft(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":[1]}})", data23));
  CHECK(extra.get_matrix<float>("w").sum() == 21.0f);

  st::TensorFile h = g;
  CHECK(h.erase("cube"));
  CHECK_FALSE(h.erase("cube"));
  CHECK_FALSE(h.contains("cube"));
  CHECK(h.size() == 2);
}

TEST_CASE("rejected: file too short and header length out of range") {
  expect_rejected("", "", "file is 0 bytes, too short");
  expect_rejected(std::string(7, '\0'), "", "file is 7 bytes, too short");
  // Header length 100 with 10 header bytes present.
  std::string b = craft("{}        ");
  b[0] = 100;
  expect_rejected(b, "", "header length 100 runs past the end of the file");
  b = craft("{}");
  b[7] = static_cast<char>(0x80);  // 2^63
  expect_rejected(b, "", "header length 9223372036854775810 exceeds the limit");
  st::ReadOptions small;
  small.max_header_bytes = 4;
  expect_rejected(craft("{}      "), "", "exceeds the limit of 4 bytes", small);
  // In-memory buffers are named "<memory>".
  expect_error<st::format_error>([&] { st::parse(std::string("abc")); },
                                 {"safetensors: <memory>: file is 3 bytes"});
}

TEST_CASE("rejected: header that is not a JSON object") {
  expect_rejected(craft("{\"w\":"), "", "header is not valid JSON");
  expect_rejected(craft("{} trailing"), "", "header is not valid JSON");
  expect_rejected(craft(""), "", "header is not valid JSON");
  expect_rejected(craft("{\"w\":1,}"), "", "header is not valid JSON");
  expect_rejected(craft("{\"\xff\":1}"), "", "header is not valid JSON");  // not UTF-8
  expect_rejected(craft("[1,2]"), "", "header is JSON array, not an object");
  expect_rejected(craft("42"), "", "header is JSON number, not an object");
  expect_rejected(craft(std::string(100, '[') + std::string(100, ']')), "", "nests deeper than");
  expect_rejected(craft("{\"w\":" + std::string(20, '[') + std::string(20, ']') + "}"), "",
                  "nests deeper than");
}

TEST_CASE("rejected: duplicate names and keys (nlohmann would keep the last silently)") {
  expect_rejected(craft("{" + w23 + "," + w23 + "}", data23), "w",
                  "name appears more than once in the header");
  expect_rejected(
      craft(R"({"w":{"dtype":"F32","dtype":"F16","shape":[2,3],"data_offsets":[0,24]}})", data23),
      "w", "key 'dtype' appears more than once");
  expect_rejected(craft(R"({"__metadata__":{"a":"1","a":"2"},)" + w23 + "}", data23), "",
                  "__metadata__: key 'a' appears more than once");
  expect_rejected(craft(R"({"__metadata__":{},"__metadata__":{},)" + w23 + "}", data23), "",
                  "__metadata__: name appears more than once");
}

TEST_CASE("rejected: missing or ill-typed dtype, shape and data_offsets") {
  const auto one = [](const std::string& entry) { return craft("{\"w\":" + entry + "}", data23); };
  expect_rejected(one("[1]"), "w", "entry is array, not an object");
  expect_rejected(one(R"({"shape":[2,3],"data_offsets":[0,24]})"), "w", "missing \"dtype\"");
  expect_rejected(one(R"({"dtype":7,"shape":[2,3],"data_offsets":[0,24]})"), "w",
                  "\"dtype\" is number, not a string");
  expect_rejected(one(R"({"dtype":"I32","shape":[2,3],"data_offsets":[0,24]})"), "w",
                  "unsupported dtype 'I32'");
  expect_rejected(one(R"({"dtype":"f32","shape":[2,3],"data_offsets":[0,24]})"), "w",
                  "unsupported dtype 'f32'");
  expect_rejected(one(R"({"dtype":"F32","data_offsets":[0,24]})"), "w", "missing \"shape\"");
  expect_rejected(one(R"({"dtype":"F32","shape":"2x3","data_offsets":[0,24]})"), "w",
                  "\"shape\" is string, not an array");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,-3],"data_offsets":[0,24]})"), "w",
                  "\"shape\" entry -3 is a negative integer");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3.0],"data_offsets":[0,24]})"), "w",
                  "is a non-integer number");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,null],"data_offsets":[0,24]})"), "w",
                  "\"shape\" entry null is null");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3]})"), "w", "missing \"data_offsets\"");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0]})"), "w",
                  "not an array [begin, end]");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":{"a":0}})"), "w",
                  "not an array [begin, end]");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":["0","24"]})"), "w",
                  "are not non-negative integers");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[-8,24]})"), "w",
                  "are not non-negative integers");
  expect_rejected(craft(R"({"__metadata__":[1],)" + w23 + "}", data23), "",
                  "__metadata__ is array, not an object of strings");
  expect_rejected(craft(R"({"__metadata__":{"epochs":3},)" + w23 + "}", data23), "",
                  "__metadata__ entry 'epochs' is number, not a string");
}

TEST_CASE("rejected: overflowing shapes and inconsistent data_offsets") {
  const auto one = [](const std::string& entry, const std::string& data = data23) {
    return craft("{\"w\":" + entry + "}", data);
  };
  expect_rejected(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,24]})"),
                  "w", "overflows 64-bit byte counts");
  expect_rejected(one(R"({"dtype":"F64","shape":[18446744073709551615],"data_offsets":[0,24]})"),
                  "w", "overflows 64-bit byte counts");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[24,0]})"), "w",
                  "begin after they end");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,28]})"), "w",
                  "run past the end of the data buffer (24 bytes)");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,18446744073709551615]})"),
                  "w", "run past the end of the data buffer");
  expect_rejected(one(R"({"dtype":"F32","shape":[2,2],"data_offsets":[0,24]})"), "w",
                  "span 24 bytes, but shape [2, 2] of F32 needs 16");
  expect_rejected(one(R"({"dtype":"F16","shape":[2,3],"data_offsets":[0,24]})"), "w",
                  "of F16 needs 12");
  // A zero dimension makes an empty tensor, which must span no bytes.
  expect_rejected(one(R"({"dtype":"F32","shape":[0,3],"data_offsets":[0,24]})"), "w", "needs 0");
}

TEST_CASE("rejected: overlapping tensors, holes and trailing bytes") {
  const std::string a = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string b_overlap = R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]})";
  expect_rejected(craft("{" + a + "," + b_overlap + "}", f32_bytes({1, 2, 3})), "b",
                  "bytes [4, 12) overlap tensor 'a' at [0, 8)");
  const std::string b_same = R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  expect_rejected(craft("{" + a + "," + b_same + "}", f32_bytes({1, 2})), "b",
                  "overlap tensor 'a'");
  // Aliasing inside another tensor.
  const std::string c_inside = R"("c":{"dtype":"F16","shape":[1],"data_offsets":[2,4]})";
  expect_rejected(craft("{" + a + "," + c_inside + "}", f32_bytes({1, 2})), "c", "overlap tensor");

  const std::string b_gap = R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]})";
  const std::string holed = craft("{" + a + "," + b_gap + "}", f32_bytes({1, 2, 0, 4}));
  expect_rejected(holed, "b", "bytes [8, 12) of the data buffer belong to no tensor");
  const std::string trailing = craft("{" + a + "}", f32_bytes({1, 2, 3}));
  expect_rejected(trailing, "", "bytes [8, 12) at the end of the data buffer belong to no tensor");
  st::ReadOptions lax;
  lax.allow_unindexed_bytes = true;
  CHECK(st::parse(holed, "<memory>", lax).get_vector<float>("b")(0) == 4.0f);
  CHECK(st::parse(trailing, "<memory>", lax).get_vector<float>("a", 2) == Eigen::Vector2f(1, 2));
  // Empty tensors own no bytes, so they may sit anywhere in the buffer.
  const std::string e = R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]})";
  CHECK(st::parse(craft("{" + a + "," + e + "}", f32_bytes({1, 2}))).size() == 2);
}

TEST_CASE("rejected files name their path, unreadable paths are io_error") {
  const hra_test::TempDir dir("hra_test_safetensors");
  const fs::path bad = dir.path / "bad.safetensors";
  write_all(bad, craft(R"({"w":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}})", "x"));
  expect_error<st::format_error>(
      [&] { st::load(bad); }, {"safetensors: " + bad.string() + ": tensor 'w': unsupported dtype"});
  write_all(bad, "short");
  expect_error<st::format_error>([&] { st::load(bad); }, {bad.string() + ": file is 5 bytes"});
  expect_error<st::io_error>([&] { st::load(dir.path / "missing.safetensors"); },
                             {"missing.safetensors: cannot open: no such file"});
  expect_error<st::io_error>([&] { st::load(dir.path); }, {"not a regular file"});
}

TEST_CASE("getters reject missing tensors, wrong ranks and wrong shapes, naming both shapes") {
  st::TensorFile f("model.safetensors");
  f.put_matrix("w", Eigen::MatrixXf::Ones(2, 3));
  f.put_vector("b", Eigen::VectorXd::Ones(4));
  f.put_array<float>("t", {2, 2, 2}, std::vector<float>(8, 1.0f));
  expect_error<st::tensor_error>([&] { f.get_matrix<float>("nope"); },
                                 {"safetensors: model.safetensors: tensor 'nope': no such tensor"});
  expect_error<st::tensor_error>([&] { f.at("nope"); }, {"no such tensor"});
  expect_error<st::tensor_error>(
      [&] { f.get_matrix<float>("w", 3, 2); },
      {"model.safetensors: tensor 'w': expected shape [3, 2], got [2, 3]"});
  expect_error<st::tensor_error>([&] { f.get_matrix<double>("b"); },
                                 {"tensor 'b': expected a 2-D tensor (a matrix), got shape [4]"});
  expect_error<st::tensor_error>(
      [&] { f.get_matrix<double>("t"); },
      {"tensor 't': expected a 2-D tensor (a matrix), got shape [2, 2, 2]"});
  expect_error<st::tensor_error>(
      [&] { f.get_vector<float>("w"); },
      {"tensor 'w': expected a 1-D tensor (a vector), got shape [2, 3]"});
  expect_error<st::tensor_error>([&] { f.get_vector<float>("b", 5); },
                                 {"tensor 'b': expected shape [5], got [4]"});
  expect_error<st::tensor_error>([&] { f.get_matrix<float>("b", 4, 1); },
                                 {"expected shape [4, 1], got [4]"});
  CHECK_NOTHROW(f.expect_shape("t", {2, 2, 2}));
  // A Tensor put by hand is checked against its bytes.
  st::Tensor broken;
  broken.shape = {3};
  broken.data.resize(8);
  expect_error<std::invalid_argument>([&] { f.put("x", broken); },
                                      {"tensor 'x': shape [3] of F32 needs 12 bytes, data has 8"});
  broken.shape = {-1};
  expect_error<std::invalid_argument>([&] { f.put("x", broken); },
                                      {"tensor 'x': negative dimension"});
  broken.shape = {std::int64_t{1} << 32, std::int64_t{1} << 30};  // 2^62 elements, 2^64 bytes
  expect_error<std::invalid_argument>(
      [&] { f.put("x", broken); },
      {"tensor 'x': shape [4294967296, 1073741824] of F32 is too large"});
  expect_error<std::invalid_argument>([&] { f.put("__metadata__", st::Tensor{}); }, {"reserved"});
  expect_error<std::invalid_argument>([&] { f.put_vector("y", Eigen::MatrixXf::Ones(2, 2)); },
                                      {"tensor 'y': expected a vector, got a 2x2 matrix"});
  expect_error<std::invalid_argument>(
      [&] {
        f.put_array<float>("z", {2, 2}, {1, 2, 3});
      },
      {"tensor 'z': shape [2, 2] needs 4 values, got 3"});
}

TEST_CASE("byte_count: product(shape) x element size, negative and overflowing shapes refused") {
  using hra::detail::byte_count;
  using hra::detail::ShapeFault;
  const auto bytes = [](const std::vector<std::int64_t>& shape, std::uint64_t size) {
    const hra::detail::ByteCount c = byte_count(shape, size);
    REQUIRE(c);
    return c.bytes;
  };
  CHECK(bytes({}, 4) == 4);  // shape [] holds one element
  CHECK(bytes({2, 3}, 4) == 24);
  CHECK(bytes({2, 3}, 1) == 6);  // an element count
  CHECK(bytes({0, std::int64_t{1} << 62}, 8) == 0);
  CHECK(bytes({std::int64_t{1} << 60}, 8) == std::uint64_t{1} << 63);  // the largest that fits
  CHECK(byte_count({std::int64_t{1} << 61}, 8).fault == ShapeFault::overflow);  // 2^64
  CHECK(byte_count({2, -1}, 4).fault == ShapeFault::negative);
  CHECK(byte_count({std::int64_t{1} << 62}, 4).fault == ShapeFault::overflow);
  CHECK(byte_count({std::int64_t{1} << 32, std::int64_t{1} << 32}, 1).fault ==
        ShapeFault::overflow);
  // The first fault in the order of the dimensions.
  CHECK(byte_count({std::int64_t{1} << 62, 8, -1}, 1).fault == ShapeFault::overflow);
  CHECK(byte_count({-1, std::int64_t{1} << 62, 8}, 1).fault == ShapeFault::negative);
  CHECK_FALSE(byte_count({-1}, 4));
}

TEST_CASE("non-finite values are rejected by default and allowed on request") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::string bytes = craft("{" + w23 + "}", f32_bytes({1, 2, 3, 4, nan, 6}));
  const st::TensorFile f = st::parse(bytes, "adapter.safetensors");
  expect_error<st::tensor_error>([&] { f.get_matrix<float>("w"); },
                                 {"adapter.safetensors: tensor 'w': non-finite value nan (F32) at "
                                  "index [1, 1] of shape [2, 3]"});
  expect_error<st::tensor_error>([&] { f.get_array<double>("w"); },
                                 {"tensor 'w': non-finite value nan (F32)"});
  const Eigen::MatrixXf w = f.get_matrix<float>("w", st::NonFinite::allow);
  CHECK(std::isnan(w(1, 1)));
  CHECK(w(1, 2) == 6.0f);

  const std::string h = craft(R"({"h":{"dtype":"F16","shape":[3],"data_offsets":[0,6]}})",
                              u16_bytes({0x3C00, 0x3C00, 0xFC00}));
  expect_error<st::tensor_error>([&] { st::parse(h).get_vector<double>("h", 3); },
                                 {"tensor 'h': non-finite value -inf (F16) at index [2]"});
  // Finite as stored, infinite once narrowed to float.
  st::TensorFile big;
  big.put_vector("d", Eigen::Vector2d(1.0, 1e300));
  CHECK(big.get_vector<double>("d")(1) == 1e300);
  expect_error<st::tensor_error>(
      [&] { big.get_vector<float>("d"); },
      {"non-finite value 1e+300 (F64, out of range of the requested type) at index [1]"});
  // Writing keeps non-finite values (the caller decides what is acceptable).
  st::TensorFile nf;
  nf.put_vector("v", Eigen::Vector2f(inf, -inf), st::Dtype::BF16);
  const auto back = st::parse(st::serialize(nf)).get_vector<float>("v", st::NonFinite::allow);
  CHECK(back(0) == inf);
  CHECK(back(1) == -inf);
}

TEST_CASE("save replaces a file atomically and leaves no temporary files") {
  const hra_test::TempDir dir("hra_test_safetensors");
  const fs::path target = dir.path / "adapter.safetensors";
  st::TensorFile first;
  first.put_matrix("w", Eigen::MatrixXf::Constant(2, 2, 1.0f));
  st::save(target, first);
  const std::string first_bytes = read_all(target);
  CHECK(first_bytes == st::serialize(first));

  st::TensorFile second;
  second.put_matrix("w", Eigen::MatrixXf::Constant(3, 3, 2.0f));
  st::save(target, second);  // overwrite
  CHECK(st::load(target).get_matrix<float>("w", 3, 3).sum() == 18.0f);
  CHECK(dir.entries() == std::vector<std::string>{"adapter.safetensors"});
  // The file gets ordinary permissions (umask applied), not a temporary file's 0600.
  const mode_t mask = ::umask(022);
  ::umask(mask);
  struct stat info {};
  REQUIRE(::stat(target.c_str(), &info) == 0);
  CHECK((info.st_mode & 0777) == (0666 & ~mask));

  SECTION("a directory that does not exist") {
    const fs::path nowhere = dir.path / "no" / "such" / "dir" / "a.safetensors";
    expect_error<st::io_error>(
        [&] { st::save(nowhere, first); },
        {"safetensors: " + nowhere.string() + ": cannot create a temporary file in"});
    CHECK_FALSE(fs::exists(dir.path / "no"));
  }
  SECTION("a conversion failure before any byte is written") {
    st::save(target, first);
    st::TensorFile invalid;
    invalid.put_vector("bad\xff name", Eigen::VectorXf::Ones(2));  // not UTF-8: JSON refuses it
    expect_error<std::invalid_argument>([&] { st::save(target, invalid); }, {"not valid UTF-8"});
    CHECK(read_all(target) == first_bytes);
    CHECK(dir.entries() == std::vector<std::string>{"adapter.safetensors"});
  }
  SECTION("a write that fails half way (file size limit) keeps the old file") {
    st::save(target, first);
    st::TensorFile large;
    large.put_matrix("w", Eigen::MatrixXf::Ones(512, 512));  // 1 MiB
    expect_error<st::io_error>(
        [&] {
          const hra_test::FileSizeLimit limit(64 * 1024);
          st::save(target, large);
        },
        {target.string() + ": write failed"});
    CHECK(read_all(target) == first_bytes);
    CHECK(dir.entries() == std::vector<std::string>{"adapter.safetensors"});
  }
  SECTION("a rename that fails (the target is a non-empty directory)") {
    const fs::path blocked = dir.path / "blocked.safetensors";
    fs::create_directories(blocked / "inside");
    expect_error<st::io_error>([&] { st::save(blocked, first); },
                               {blocked.string() + ": rename over the target failed"});
    CHECK(fs::is_directory(blocked / "inside"));
    CHECK(dir.entries() == std::vector<std::string>{"adapter.safetensors", "blocked.safetensors"});
  }
}
