// Fashion-MNIST for the experiments: a reader for the gzip'd IDX files that Debian's
// dataset-fashion-mnist package installs under /usr/share/datasets/fashion-mnist.
//
// Needs zlib (link ZLIB::ZLIB). Header-only, like the library it serves.
#pragma once

#include <zlib.h>

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace hra::experiments {

/// Which half of Fashion-MNIST: 60000 training or 10000 test images.
enum class Split { train, test };

/// "train" or "test" (as written on a command line) to a Split; throws std::invalid_argument.
inline Split parse_split(const std::string& text) {
  if (text == "train") return Split::train;
  if (text == "test") return Split::test;
  throw std::invalid_argument("unknown Fashion-MNIST split '" + text +
                              "': expected 'train' or 'test'");
}

inline const char* to_string(Split split) {
  return split == Split::train ? "train" : "test";
}

/// \brief Labelled images, one per column.
///
/// images is (rows*cols) x n with pixel (i, j) of sample k at images(i*cols + j, k) (the file's
/// row-major order), scaled from 0..255 to [0, 1]; labels[k] in 0..9 is the class of column k.
template <typename Scalar_>
struct BasicDataset {
  static_assert(std::is_floating_point<Scalar_>::value,
                "BasicDataset<Scalar>: Scalar must be float, double or long double");
  using Scalar = Scalar_;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

  Matrix images;
  std::vector<int> labels;
  int rows = 0;
  int cols = 0;

  Eigen::Index size() const { return images.cols(); }
};

using Dataset = BasicDataset<float>;

/// One array of an IDX file: the magic number, the dimensions, and the values in file order.
/// Only the unsigned-byte type (type code 0x08) is supported, which is all MNIST-style data uses.
struct IdxArray {
  std::uint32_t magic = 0;
  std::vector<std::size_t> dims;
  std::vector<std::uint8_t> values;
};

/// IDX magic numbers (big-endian on disk): 0x0000 0x08 (unsigned byte) then the dimension count.
inline constexpr std::uint32_t idx_images_magic = 0x00000803;
inline constexpr std::uint32_t idx_labels_magic = 0x00000801;

/// Fashion-MNIST's class names, indexed by label.
inline constexpr const char* fashion_mnist_classes[10] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

namespace detail {

inline std::string hex32(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", static_cast<unsigned>(v));
  return buf;
}

inline std::uint32_t read_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

inline bool file_exists(const std::string& path) {
  return std::ifstream(path).good();
}

}  // namespace detail

/// \brief Parses an IDX array held in memory (already decompressed).
///
/// `name` is the file the bytes came from; every error message starts with it. Throws
/// std::runtime_error if the buffer is shorter than its header, the magic number is not
/// `expected_magic`, a dimension is zero, the values are fewer than the product of the
/// dimensions (truncated) or more (trailing garbage).
inline IdxArray parse_idx(const std::uint8_t* bytes, std::size_t size, std::uint32_t expected_magic,
                          const std::string& name) {
  auto fail = [&name](const std::string& what) { throw std::runtime_error(name + ": " + what); };
  if (size < 4) {
    fail("truncated IDX header: " + std::to_string(size) + " bytes, the magic number needs 4");
  }
  IdxArray out;
  out.magic = detail::read_be32(bytes);
  if (out.magic != expected_magic) {
    fail("bad magic number " + detail::hex32(out.magic) + ", expected " +
         detail::hex32(expected_magic) + " (unsigned-byte IDX with " +
         std::to_string(expected_magic & 0xffu) + " dimension(s))");
  }
  const std::size_t ndims = out.magic & 0xffu;
  const std::size_t header = 4 + 4 * ndims;
  if (size < header) {
    fail("truncated IDX header: " + std::to_string(size) + " bytes, " + std::to_string(ndims) +
         " dimensions need " + std::to_string(header));
  }
  // The product is compared against the bytes present step by step, so a huge dimension in a
  // corrupt header reads as truncation instead of overflowing.
  const std::size_t available = size - header;
  std::size_t count = 1;
  bool too_many = false;
  for (std::size_t i = 0; i < ndims; ++i) {
    const std::uint32_t d = detail::read_be32(bytes + 4 + 4 * i);
    if (d == 0) fail("dimension " + std::to_string(i) + " is zero");
    out.dims.push_back(d);
    if (!too_many && count > available / d) too_many = true;
    if (!too_many) count *= d;
  }
  std::string shape;
  for (std::size_t i = 0; i < ndims; ++i) shape += (i ? " x " : "") + std::to_string(out.dims[i]);
  if (too_many || available < count) {
    fail("truncated data: dimensions " + shape + " need more than the " +
         std::to_string(available) + " bytes present");
  }
  if (available > count) {
    fail("trailing garbage: " + std::to_string(available - count) +
         " bytes after the data of dimensions " + shape);
  }
  out.values.assign(bytes + header, bytes + size);
  return out;
}

inline IdxArray parse_idx(const std::vector<std::uint8_t>& bytes, std::uint32_t expected_magic,
                          const std::string& name) {
  return parse_idx(bytes.data(), bytes.size(), expected_magic, name);
}

/// Reads a whole gzip file (or an uncompressed one: zlib passes those through) into memory.
/// Throws std::runtime_error naming the file if it cannot be opened or is corrupt/truncated.
inline std::vector<std::uint8_t> read_gzip_file(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) throw std::runtime_error(path + ": cannot open");
  gzbuffer(file, 1u << 18);
  std::vector<std::uint8_t> out;
  constexpr unsigned chunk = 1u << 20;
  for (;;) {
    const std::size_t old = out.size();
    out.resize(old + chunk);
    const int got = gzread(file, out.data() + old, chunk);
    if (got < 0) {  // reported below from gzerror
      out.resize(old);
      break;
    }
    out.resize(old + static_cast<std::size_t>(got));
    if (got == 0) break;
  }
  int code = Z_OK;
  const char* message = gzerror(file, &code);
  const std::string what = message != nullptr ? message : "";
  gzclose(file);
  if (code != Z_OK && code != Z_STREAM_END) {
    throw std::runtime_error(path + ": corrupt or truncated gzip data (" + what + ")");
  }
  return out;
}

/// \brief Builds a dataset from parsed image (n x rows x cols) and label (n) arrays.
///
/// Checks that the counts agree and every label is in 0..9; the names are used in the messages.
template <typename Scalar = float>
BasicDataset<Scalar> dataset_from_idx(const IdxArray& images, const IdxArray& labels,
                                      const std::string& images_name,
                                      const std::string& labels_name) {
  if (images.magic != idx_images_magic || images.dims.size() != 3) {
    throw std::runtime_error(images_name + ": not an n x rows x cols unsigned-byte image array");
  }
  if (labels.magic != idx_labels_magic || labels.dims.size() != 1) {
    throw std::runtime_error(labels_name + ": not a length-n unsigned-byte label array");
  }
  const std::size_t n = images.dims[0];
  if (labels.dims[0] != n) {
    throw std::runtime_error(images_name + " holds " + std::to_string(n) + " images but " +
                             labels_name + " holds " + std::to_string(labels.dims[0]) + " labels");
  }
  constexpr std::size_t int_max = static_cast<std::size_t>(std::numeric_limits<int>::max());
  if (images.dims[1] > int_max || images.dims[2] > int_max || n > int_max) {
    throw std::runtime_error(images_name + ": dimensions too large");
  }

  BasicDataset<Scalar> out;
  out.rows = static_cast<int>(images.dims[1]);
  out.cols = static_cast<int>(images.dims[2]);
  out.labels.resize(n);
  for (std::size_t k = 0; k < n; ++k) {
    const int label = labels.values[k];
    if (label > 9) {
      throw std::runtime_error(labels_name + ": label " + std::to_string(label) + " at index " +
                               std::to_string(k) + " is outside 0..9");
    }
    out.labels[k] = label;
  }
  const Eigen::Index pixels = Eigen::Index{out.rows} * out.cols;
  using Bytes = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic>;
  const Eigen::Map<const Bytes> raw(images.values.data(), pixels, static_cast<Eigen::Index>(n));
  out.images = raw.template cast<Scalar>() / Scalar(255);
  return out;
}

/// Where load_fashion_mnist() looks by default: $HRA_FASHION_MNIST_DIR if set, else the
/// directory Debian's dataset-fashion-mnist package installs to.
inline std::string default_fashion_mnist_dir() {
  const char* env = std::getenv("HRA_FASHION_MNIST_DIR");
  if (env != nullptr && *env != '\0') return env;
  return "/usr/share/datasets/fashion-mnist";
}

/// \brief Loads one split of Fashion-MNIST from `dir`.
///
/// Reads `<prefix>-images-idx3-ubyte.gz` and `<prefix>-labels-idx1-ubyte.gz` (prefix "train" or
/// "t10k"; the uncompressed name is tried when the .gz is absent), checks both IDX files, that
/// the images are 28 x 28, that the counts match and every label is in 0..9. Returns 784 x n
/// images in [0, 1]. Throws std::runtime_error naming the file and the fault; if a file is
/// missing the message says how to install the data set and how to point elsewhere.
template <typename Scalar = float>
BasicDataset<Scalar> load_fashion_mnist(const std::string& dir, Split split) {
  const std::string prefix = split == Split::train ? "train" : "t10k";
  auto locate = [&](const std::string& stem) {
    const std::string base = dir + "/" + stem;
    if (detail::file_exists(base + ".gz")) return base + ".gz";
    if (detail::file_exists(base)) return base;
    throw std::runtime_error(
        "Fashion-MNIST " + std::string(to_string(split)) + " split not found: " + base +
        ".gz does not exist. Install the data set with `apt-get install dataset-fashion-mnist` "
        "(it goes to /usr/share/datasets/fashion-mnist), or point to another directory holding "
        "the IDX files (the dir argument, or the HRA_FASHION_MNIST_DIR environment variable).");
  };
  const std::string images_path = locate(prefix + "-images-idx3-ubyte");
  const std::string labels_path = locate(prefix + "-labels-idx1-ubyte");

  const IdxArray images = parse_idx(read_gzip_file(images_path), idx_images_magic, images_path);
  if (images.dims[1] != 28 || images.dims[2] != 28) {
    throw std::runtime_error(images_path + ": images are " + std::to_string(images.dims[1]) +
                             " x " + std::to_string(images.dims[2]) +
                             ", Fashion-MNIST's are 28 x 28");
  }
  const IdxArray labels = parse_idx(read_gzip_file(labels_path), idx_labels_magic, labels_path);
  return dataset_from_idx<Scalar>(images, labels, images_path, labels_path);
}

/// load_fashion_mnist(default_fashion_mnist_dir(), split).
template <typename Scalar = float>
BasicDataset<Scalar> load_fashion_mnist(Split split) {
  return load_fashion_mnist<Scalar>(default_fashion_mnist_dir(), split);
}

}  // namespace hra::experiments
