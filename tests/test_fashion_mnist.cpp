// The Fashion-MNIST reader used by the experiments: IDX parsing and its rejections on crafted
// buffers, a gzip round trip through a temporary directory, the missing-data message, and the
// real Debian files when they are installed.
#include <catch2/catch.hpp>

#include <zlib.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include "../experiments/common/fashion_mnist.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using hra::experiments::idx_images_magic;
using hra::experiments::idx_labels_magic;
using hra::experiments::IdxArray;
using hra::experiments::parse_idx;
using hra::experiments::Split;

namespace {

using Bytes = std::vector<std::uint8_t>;

void put_be32(Bytes& out, std::uint32_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}

/// An IDX buffer with the given magic and dimensions whose values are `value(k)` for k in file
/// order, with `extra` bytes appended or `-extra` bytes cut off the end.
template <typename F>
Bytes idx_buffer(std::uint32_t magic, const std::vector<std::uint32_t>& dims, F value,
                 long extra = 0) {
  Bytes out;
  put_be32(out, magic);
  std::size_t count = 1;
  for (auto d : dims) {
    put_be32(out, d);
    count *= d;
  }
  for (std::size_t k = 0; k < count; ++k) out.push_back(static_cast<std::uint8_t>(value(k)));
  if (extra > 0) out.insert(out.end(), static_cast<std::size_t>(extra), 0x5a);
  if (extra < 0) out.resize(out.size() - static_cast<std::size_t>(-extra));
  return out;
}

Bytes images_buffer(std::uint32_t n, std::uint32_t rows, std::uint32_t cols, long extra = 0) {
  return idx_buffer(
      idx_images_magic, {n, rows, cols}, [](std::size_t k) { return (k * 37 + 11) % 256; }, extra);
}

Bytes labels_buffer(std::uint32_t n, long extra = 0) {
  return idx_buffer(
      idx_labels_magic, {n}, [](std::size_t k) { return k % 10; }, extra);
}

/// The message of the std::runtime_error that parse_idx throws on `bytes`.
std::string rejection(const Bytes& bytes, std::uint32_t magic) {
  try {
    parse_idx(bytes, magic, "crafted.idx");
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  FAIL("parse_idx accepted a bad buffer");
  return {};
}

using hra_test::TempDir;

void write_gzip(const fs::path& path, const Bytes& bytes) {
  gzFile f = gzopen(path.string().c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
          static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

}  // namespace

TEST_CASE("parse_idx reads dimensions and values of well-formed arrays", "[fashion_mnist]") {
  const Bytes images = images_buffer(2, 3, 4);
  const IdxArray a = parse_idx(images, idx_images_magic, "images.idx");
  CHECK(a.magic == idx_images_magic);
  CHECK(a.dims == std::vector<std::size_t>{2, 3, 4});
  REQUIRE(a.values.size() == 24);
  for (std::size_t k = 0; k < 24; ++k) CHECK(a.values[k] == (k * 37 + 11) % 256);

  // Dimensions are big-endian: 0x00000102 = 258 labels.
  const IdxArray l = parse_idx(labels_buffer(258), idx_labels_magic, "labels.idx");
  CHECK(l.dims == std::vector<std::size_t>{258});
  CHECK(l.values[257] == 257 % 10);
}

TEST_CASE("parse_idx rejects malformed IDX buffers with a message naming file and fault",
          "[fashion_mnist]") {
  SECTION("shorter than the magic number") {
    const std::string m = rejection(Bytes{0, 0, 8}, idx_images_magic);
    CHECK_THAT(m,
               Contains("crafted.idx") && Contains("truncated IDX header") && Contains("3 bytes"));
  }
  SECTION("labels where images are expected") {
    const std::string m = rejection(labels_buffer(5), idx_images_magic);
    CHECK_THAT(m, Contains("crafted.idx") && Contains("bad magic number 0x00000801") &&
                      Contains("expected 0x00000803"));
  }
  SECTION("little-endian magic number") {
    Bytes b = images_buffer(1, 2, 2);
    std::swap(b[0], b[3]);
    std::swap(b[1], b[2]);
    CHECK_THAT(rejection(b, idx_images_magic), Contains("bad magic number 0x03080000"));
  }
  SECTION("non-byte element type (0x0D = float)") {
    Bytes b = images_buffer(1, 2, 2);
    b[2] = 0x0d;
    CHECK_THAT(rejection(b, idx_images_magic), Contains("bad magic number 0x00000d03"));
  }
  SECTION("header cut inside the dimensions") {
    Bytes b = images_buffer(1, 2, 2);
    b.resize(10);
    CHECK_THAT(rejection(b, idx_images_magic),
               Contains("truncated IDX header: 10 bytes, 3 dimensions need 16"));
  }
  SECTION("zero dimension") {
    CHECK_THAT(rejection(images_buffer(3, 0, 28), idx_images_magic),
               Contains("dimension 1 is zero"));
    CHECK_THAT(rejection(labels_buffer(0), idx_labels_magic), Contains("dimension 0 is zero"));
  }
  SECTION("truncated data") {
    CHECK_THAT(rejection(images_buffer(2, 3, 4, -1), idx_images_magic),
               Contains("crafted.idx") && Contains("truncated data") && Contains("2 x 3 x 4") &&
                   Contains("23 bytes present"));
    CHECK_THAT(rejection(labels_buffer(7, -7), idx_labels_magic), Contains("truncated data"));
  }
  SECTION("dimensions whose product overflows read as truncation") {
    Bytes b;
    put_be32(b, idx_images_magic);
    for (int i = 0; i < 3; ++i) put_be32(b, 0xffffffffu);
    b.insert(b.end(), 100, 0);
    CHECK_THAT(rejection(b, idx_images_magic),
               Contains("truncated data") && Contains("100 bytes present"));
  }
  SECTION("trailing garbage") {
    CHECK_THAT(rejection(images_buffer(2, 3, 4, 5), idx_images_magic),
               Contains("crafted.idx") && Contains("trailing garbage: 5 bytes"));
    CHECK_THAT(rejection(labels_buffer(4, 1), idx_labels_magic),
               Contains("trailing garbage: 1 bytes"));
  }
}

TEST_CASE("dataset_from_idx lays one scaled image per column", "[fashion_mnist]") {
  const IdxArray images = parse_idx(images_buffer(3, 2, 5), idx_images_magic, "i");
  const IdxArray labels = parse_idx(labels_buffer(3), idx_labels_magic, "l");
  const auto ds = hra::experiments::dataset_from_idx<double>(images, labels, "i", "l");
  CHECK(ds.rows == 2);
  CHECK(ds.cols == 5);
  REQUIRE(ds.images.rows() == 10);
  REQUIRE(ds.size() == 3);
  CHECK(ds.labels == std::vector<int>{0, 1, 2});
  for (Eigen::Index k = 0; k < 3; ++k) {
    for (Eigen::Index i = 0; i < 2; ++i) {
      for (Eigen::Index j = 0; j < 5; ++j) {
        const auto file_index = static_cast<std::size_t>(k * 10 + i * 5 + j);
        CHECK(ds.images(i * 5 + j, k) == Approx(((file_index * 37 + 11) % 256) / 255.0));
      }
    }
  }
}

TEST_CASE("dataset_from_idx rejects mismatched counts and labels outside 0..9", "[fashion_mnist]") {
  const IdxArray images = parse_idx(images_buffer(4, 2, 2), idx_images_magic, "img");
  SECTION("more images than labels") {
    const IdxArray labels = parse_idx(labels_buffer(3), idx_labels_magic, "lab");
    CHECK_THROWS_WITH(hra::experiments::dataset_from_idx(images, labels, "img.gz", "lab.gz"),
                      Contains("img.gz holds 4 images but lab.gz holds 3 labels"));
  }
  SECTION("a label of 10") {
    const Bytes b =
        idx_buffer(idx_labels_magic, {4}, [](std::size_t k) { return k == 2 ? 10 : 1; });
    const IdxArray labels = parse_idx(b, idx_labels_magic, "lab");
    CHECK_THROWS_WITH(hra::experiments::dataset_from_idx(images, labels, "img.gz", "lab.gz"),
                      Contains("lab.gz: label 10 at index 2 is outside 0..9"));
  }
  SECTION("arrays swapped") {
    const IdxArray labels = parse_idx(labels_buffer(4), idx_labels_magic, "lab");
    CHECK_THROWS_WITH(hra::experiments::dataset_from_idx(labels, images, "lab.gz", "img.gz"),
                      Contains("lab.gz: not an n x rows x cols"));
  }
}

TEST_CASE("parse_split accepts train and test only", "[fashion_mnist]") {
  CHECK(hra::experiments::parse_split("train") == Split::train);
  CHECK(hra::experiments::parse_split("test") == Split::test);
  CHECK_THROWS_AS(hra::experiments::parse_split("validation"), std::invalid_argument);
  CHECK_THROWS_WITH(hra::experiments::parse_split("Train"), Contains("'Train'"));
}

TEST_CASE("load_fashion_mnist round-trips gzip'd IDX files written with zlib", "[fashion_mnist]") {
  TempDir dir;
  const std::uint32_t n = 5;
  write_gzip(dir.path / "t10k-images-idx3-ubyte.gz", images_buffer(n, 28, 28));
  write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", labels_buffer(n));

  const auto ds = hra::experiments::load_fashion_mnist(dir.path.string(), Split::test);
  static_assert(std::is_same<decltype(ds.images)::Scalar, float>::value, "float by default");
  CHECK(ds.rows == 28);
  CHECK(ds.cols == 28);
  REQUIRE(ds.images.rows() == 784);
  REQUIRE(ds.size() == n);
  CHECK(ds.labels == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(ds.images(0, 0) == Approx(11 / 255.0f));
  CHECK(ds.images(783, 4) == Approx(((4 * 784 + 783) * 37 + 11) % 256 / 255.0f));
  CHECK(ds.images.minCoeff() >= 0.0f);
  CHECK(ds.images.maxCoeff() <= 1.0f);

  const auto dd = hra::experiments::load_fashion_mnist<double>(dir.path.string(), Split::test);
  CHECK(dd.images(783, 4) == ((4 * 784 + 783) * 37 + 11) % 256 / 255.0);
  CHECK((dd.images.cast<float>() - ds.images).cwiseAbs().maxCoeff() <= 1e-7f);

  SECTION("the train split is looked up under its own names") {
    CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(dir.path.string(), Split::train),
                      Contains("train-images-idx3-ubyte.gz does not exist"));
  }
  SECTION("uncompressed files are read when the .gz is absent") {
    write_gzip(dir.path / "train-images-idx3-ubyte.gz", images_buffer(2, 28, 28));
    const Bytes raw = labels_buffer(2);
    std::ofstream(dir.path / "train-labels-idx1-ubyte", std::ios::binary)
        .write(reinterpret_cast<const char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    const auto tr = hra::experiments::load_fashion_mnist(dir.path.string(), Split::train);
    CHECK(tr.labels == std::vector<int>{0, 1});
  }
  SECTION("a truncated gzip stream is reported with its path") {
    const fs::path p = dir.path / "t10k-images-idx3-ubyte.gz";
    fs::resize_file(p, fs::file_size(p) / 2);
    CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(dir.path.string(), Split::test),
                      Contains(p.string()) && Contains("corrupt or truncated gzip data"));
  }
  SECTION("images that are not 28 x 28 are rejected") {
    write_gzip(dir.path / "t10k-images-idx3-ubyte.gz", images_buffer(n, 28, 27));
    CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(dir.path.string(), Split::test),
                      Contains("t10k-images-idx3-ubyte.gz: images are 28 x 27"));
  }
  SECTION("IDX faults inside the gzip name the file") {
    write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", labels_buffer(n, 3));
    CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(dir.path.string(), Split::test),
                      Contains("t10k-labels-idx1-ubyte.gz: trailing garbage: 3 bytes"));
  }
  SECTION("count mismatch between the two files") {
    write_gzip(dir.path / "t10k-labels-idx1-ubyte.gz", labels_buffer(n + 1));
    CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(dir.path.string(), Split::test),
                      Contains("holds 5 images but") && Contains("holds 6 labels"));
  }
}

TEST_CASE("a missing data directory explains how to install or redirect", "[fashion_mnist]") {
  TempDir dir;
  const std::string missing = (dir.path / "no-such-dir").string();
  CHECK_THROWS_WITH(hra::experiments::load_fashion_mnist(missing, Split::train),
                    Contains(missing + "/train-images-idx3-ubyte.gz does not exist") &&
                        Contains("apt-get install dataset-fashion-mnist") &&
                        Contains("HRA_FASHION_MNIST_DIR"));
}

TEST_CASE("the installed Debian Fashion-MNIST loads completely", "[fashion_mnist][data]") {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz")) {
    WARN("skipped: " << dir << " is absent (apt-get install dataset-fashion-mnist)");
    return;
  }
  struct Expect {
    Split split;
    Eigen::Index n;
  };
  for (const Expect e : {Expect{Split::train, 60000}, Expect{Split::test, 10000}}) {
    INFO("split " << hra::experiments::to_string(e.split));
    const auto ds = hra::experiments::load_fashion_mnist(dir, e.split);
    CHECK(ds.rows == 28);
    CHECK(ds.cols == 28);
    CHECK(ds.images.rows() == 784);
    REQUIRE(ds.size() == e.n);
    REQUIRE(ds.labels.size() == static_cast<std::size_t>(e.n));
    // Fashion-MNIST is balanced: every class has a tenth of the samples.
    std::array<Eigen::Index, 10> per_class{};
    for (int label : ds.labels) {
      REQUIRE(label >= 0);
      REQUIRE(label <= 9);
      ++per_class[static_cast<std::size_t>(label)];
    }
    for (Eigen::Index c : per_class) CHECK(c == e.n / 10);
    CHECK(ds.images.minCoeff() == 0.0f);
    CHECK(ds.images.maxCoeff() == 1.0f);
    const float mean = ds.images.mean();
    CHECK(mean > 0.2f);  // about 0.286 for both splits
    CHECK(mean < 0.4f);
  }
}
