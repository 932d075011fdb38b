// Reading and writing safetensors files: named tensors to and from Eigen matrices.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../detail/checks.hpp"
#include "detail/atomic_file.hpp"
#include "detail/dtype.hpp"
#include "detail/json.hpp"
#include "detail/little_endian.hpp"
#include "detail/read_file.hpp"

/// \brief The safetensors format (https://github.com/huggingface/safetensors), tensor level.
///
/// A file is
///   - 8 bytes: N, the header length, an unsigned 64-bit little-endian integer;
///   - N bytes: a UTF-8 JSON object `{"name": {"dtype": "F32", "shape": [rows, cols],
///     "data_offsets": [begin, end]}, ..., "__metadata__": {"key": "value", ...}}`, possibly
///     padded with trailing spaces (`__metadata__` is optional and maps strings to strings);
///   - the data buffer; `[begin, end)` are byte offsets into it, relative to its start.
///
/// Tensors are stored little-endian in C (row-major) order, as PyTorch keeps them. Layout
/// convention of this header: a PyTorch tensor of shape (rows, cols) is the Eigen rows x cols
/// matrix with the same (i, j) entries, so `W[i][j]` in PyTorch is `W(i, j)` here (the bytes are
/// transposed in memory, which the getters and setters take care of); a 1-D tensor of shape (n,)
/// is an Eigen vector of size n. A PEFT `nn.Linear` weight (out_features, in_features) is thus
/// the d_out x d_in matrix W of SPEC.md, and `hra_u` (in_features, r) is U (d_in x r).
///
/// Element types: F32, F64, F16 (IEEE binary16) and BF16 (bfloat16) are read and written; any
/// of them converts to a float or double Eigen matrix on reading, and values are rounded to
/// nearest, ties to even, on writing.
///
/// Errors: a malformed file throws format_error, a well-formed file that lacks what the caller
/// asked for (a name, a shape, finite values) throws tensor_error, an operating-system failure
/// throws io_error; all derive from hra::safetensors::error (a std::runtime_error), and every
/// message starts with "safetensors: <file>: " (the path, or "<memory>" for a parsed buffer)
/// and names the tensor involved. Nothing is read from the data buffer until the whole header
/// has been validated.
namespace hra {
namespace safetensors {

/// Base of every error thrown while reading or writing safetensors data.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The bytes are not a valid safetensors file (header length, JSON, dtype, shape, offsets).
class format_error : public error {
 public:
  using error::error;
};

/// A valid file does not hold what was asked for: a missing tensor, a tensor of another rank or
/// shape than expected, or non-finite values where finite ones were required.
class tensor_error : public error {
 public:
  using error::error;
};

/// The operating system refused: a file that cannot be opened, read, created, written or renamed.
class io_error : public error {
 public:
  using error::error;
};

/// What the getters do with NaN and infinities in the data.
enum class NonFinite {
  reject,  ///< throw tensor_error naming the tensor and the first offending element (default)
  allow    ///< return them as they are
};

/// Limits applied while parsing.
struct ReadOptions {
  /// Longest header accepted, in bytes (the reference implementation's limit is 100 MB).
  std::uint64_t max_header_bytes = 100'000'000;
  /// The format requires every byte of the data buffer to belong to exactly one tensor (no
  /// holes, no trailing bytes). Set to true to accept files that leave bytes unused.
  bool allow_unindexed_bytes = false;
  /// Largest file load() accepts, in bytes (16 GiB), checked before anything is read. Raise it
  /// for larger adapters; memory used is about the size of the tensors the header declares.
  std::uint64_t max_file_bytes = std::uint64_t{16} << 30;
};

/// \brief One tensor: element type, shape and raw bytes.
///
/// `data` holds product(shape) elements of `dtype`, little-endian, in C (row-major) order, so
/// `data.size() == numel() * size_of(dtype)`. A rank-0 tensor (shape []) holds one element.
struct Tensor {
  Dtype dtype = Dtype::F32;         ///< element type
  std::vector<std::int64_t> shape;  ///< PyTorch order: (rows, cols) for a matrix
  std::vector<unsigned char> data;  ///< numel() * size_of(dtype) bytes, little-endian, row-major

  /// product(shape); 1 for shape []. Assumes a validated shape (see detail::tensor_fault()).
  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (std::int64_t e : shape) n *= static_cast<std::uint64_t>(e);
    return n;
  }

  /// Same dtype, shape and bytes (so NaNs with equal bits compare equal).
  friend bool operator==(const Tensor& a, const Tensor& b) {
    return a.dtype == b.dtype && a.shape == b.shape && a.data == b.data;
  }
  friend bool operator!=(const Tensor& a, const Tensor& b) { return !(a == b); }
};

/// "[2, 3]": a shape as printed in error messages.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace safetensors

namespace detail {

/// \brief Why `t`'s bytes do not match its shape and dtype, as an error message's tail
/// ("negative dimension in shape [2, -1]", "shape [..] of F32 is too large (its byte count
/// overflows 64 bits)", "shape [3] of F32 needs 12 bytes, data has 8"), or "" when they match
/// (data.size() == byte_count(shape, size_of(dtype))): the one check of a Tensor built by hand.
inline std::string tensor_fault(const safetensors::Tensor& t) {
  using safetensors::shape_string;
  const ByteCount count = byte_count(t.shape, safetensors::size_of(t.dtype));
  switch (count.fault) {
    case ShapeFault::negative:
      return concat("negative dimension in shape ", shape_string(t.shape));
    case ShapeFault::overflow:
      return concat("shape ", shape_string(t.shape), " of ", safetensors::to_string(t.dtype),
                    " is too large (its byte count overflows 64 bits)");
    case ShapeFault::none:
      break;
  }
  if (count.bytes == t.data.size()) return std::string();
  return concat("shape ", shape_string(t.shape), " of ", safetensors::to_string(t.dtype), " needs ",
                count.bytes, " bytes, data has ", t.data.size());
}

/// "[1, 2]": the multi-index of row-major flat position `flat` in `shape`.
inline std::string unravel(std::uint64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> index(shape.size(), 0);
  for (std::size_t k = shape.size(); k-- > 0;) {
    const auto extent = static_cast<std::uint64_t>(shape[k]);
    if (extent == 0) break;
    index[k] = static_cast<std::int64_t>(flat % extent);
    flat /= extent;
  }
  return safetensors::shape_string(index);
}

}  // namespace detail

namespace safetensors {

/// \brief The tensors and `__metadata__` of one safetensors file, held in memory.
///
/// Tensors are kept by name (sorted). `source()` is the path the file was read from (or
/// "<memory>"); every error message starts with it. Setters encode Eigen data into a dtype
/// (see the namespace comment for the layout convention), getters decode any dtype to float or
/// double and check rank, shape and finiteness. Every supported dtype is a floating-point type,
/// so any tensor converts to either scalar; there is no dtype-class mismatch to report.
class TensorFile {
 public:
  using Index = Eigen::Index;
  template <typename Scalar>
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  template <typename Scalar>
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// An empty file; `source` names it in error messages.
  explicit TensorFile(std::string source = "<memory>") : source_(std::move(source)) {}

  /// The path this file was read from, or "<memory>".
  const std::string& source() const { return source_; }
  /// Renames the file in error messages (e.g. before save() to its final path).
  void set_source(std::string source) { source_ = std::move(source); }

  /// The `__metadata__` string map (written only when not empty).
  std::map<std::string, std::string>& metadata() { return metadata_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// All tensors by name.
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }
  /// Number of tensors (metadata not counted).
  std::size_t size() const { return tensors_.size(); }
  /// True when there is no tensor.
  bool empty() const { return tensors_.empty(); }
  /// True when a tensor is called `name`.
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  /// The tensor called `name`; tensor_error naming the file and the tensor when there is none.
  const Tensor& at(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail<tensor_error>(name, "no such tensor");
    return it->second;
  }

  /// Removes `name`; returns whether it was there.
  bool erase(const std::string& name) { return tensors_.erase(name) != 0; }

  /// \brief Adds or replaces the tensor `name`. Throws std::invalid_argument naming the tensor
  /// when the name is "__metadata__", a dimension is negative, product(shape) * size_of(dtype)
  /// overflows, or `data.size()` is not that many bytes.
  void put(const std::string& name, Tensor tensor) {
    if (name == "__metadata__")
      detail::throw_invalid(where(name), "the name __metadata__ is reserved for metadata");
    const std::string fault = detail::tensor_fault(tensor);
    if (!fault.empty()) detail::throw_invalid(where(name), fault);
    tensors_[name] = std::move(tensor);
  }

  /// \brief Stores `values` (product(shape) numbers in row-major order) as tensor `name` of
  /// the given shape and dtype. std::invalid_argument if the count does not match the shape.
  template <typename Scalar>
  void put_array(const std::string& name, std::vector<std::int64_t> shape,
                 const std::vector<Scalar>& values, Dtype dtype = natural_dtype<Scalar>()) {
    const detail::ByteCount n = detail::byte_count(shape, 1);  // elements
    if (!n) detail::throw_invalid(where(name), "invalid shape ", shape_string(shape));
    if (n.bytes != values.size())
      detail::throw_invalid(where(name), "shape ", shape_string(shape), " needs ", n.bytes,
                            " values, got ", values.size());
    put_contiguous(name, std::move(shape), values.data(), dtype);
  }

  /// \brief Stores the rows x cols matrix `m` as the 2-D tensor `name` of shape (rows, cols),
  /// entry (i, j) at row-major position i * cols + j, converted to `dtype`.
  template <typename Derived>
  void put_matrix(const std::string& name, const Eigen::MatrixBase<Derived>& m,
                  Dtype dtype = natural_dtype<typename Derived::Scalar>()) {
    using Scalar = typename Derived::Scalar;
    const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major = m;
    put_contiguous(name, {row_major.rows(), row_major.cols()}, row_major.data(), dtype);
  }

  /// \brief Stores the vector `v` (n x 1 or 1 x n) as the 1-D tensor `name` of shape (n,).
  /// std::invalid_argument naming the tensor if `v` is not a vector.
  template <typename Derived>
  void put_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v,
                  Dtype dtype = natural_dtype<typename Derived::Scalar>()) {
    using Scalar = typename Derived::Scalar;
    if (v.rows() != 1 && v.cols() != 1)
      detail::throw_invalid(where(name), "expected a vector, got a ",
                            detail::shape(v.rows(), v.cols()), " matrix");
    const Vector<Scalar> plain = v.reshaped();
    put_contiguous(name, {plain.size()}, plain.data(), dtype);
  }

  /// \brief All elements of tensor `name`, any rank, in row-major order, converted to Scalar.
  /// tensor_error if there is no such tensor, or (with NonFinite::reject) if a value is NaN or
  /// infinite after conversion (e.g. an F64 value beyond float's range read as float).
  template <typename Scalar>
  std::vector<Scalar> get_array(const std::string& name,
                                NonFinite non_finite = NonFinite::reject) const {
    const Tensor& t = checked(name);
    std::vector<Scalar> out(static_cast<std::size_t>(t.numel()));
    decode_checked(name, t, out.data(), non_finite);
    return out;
  }

  /// \brief The 2-D tensor `name` of shape (rows, cols) as an Eigen rows x cols matrix.
  /// tensor_error naming the file, the tensor and its shape if it is not 2-D; see get_array().
  template <typename Scalar>
  Matrix<Scalar> get_matrix(const std::string& name,
                            NonFinite non_finite = NonFinite::reject) const {
    const Tensor& t = at_rank(name, 2, "a matrix");
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row_major(
        static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1]));
    decode_checked(name, t, row_major.data(), non_finite);
    return row_major;
  }

  /// \brief As get_matrix(name), and tensor_error naming the expected and actual shapes unless
  /// the tensor has shape (rows, cols).
  template <typename Scalar>
  Matrix<Scalar> get_matrix(const std::string& name, Index rows, Index cols,
                            NonFinite non_finite = NonFinite::reject) const {
    expect_shape(name, {rows, cols});
    return get_matrix<Scalar>(name, non_finite);
  }

  /// \brief The 1-D tensor `name` of shape (n,) as an Eigen vector of size n. tensor_error
  /// naming the file, the tensor and its shape if it is not 1-D; see get_array().
  template <typename Scalar>
  Vector<Scalar> get_vector(const std::string& name,
                            NonFinite non_finite = NonFinite::reject) const {
    const Tensor& t = at_rank(name, 1, "a vector");
    Vector<Scalar> v(static_cast<Index>(t.shape[0]));
    decode_checked(name, t, v.data(), non_finite);
    return v;
  }

  /// \brief As get_vector(name), and tensor_error naming the expected and actual shapes unless
  /// the tensor has shape (size,).
  template <typename Scalar>
  Vector<Scalar> get_vector(const std::string& name, Index size,
                            NonFinite non_finite = NonFinite::reject) const {
    expect_shape(name, {size});
    return get_vector<Scalar>(name, non_finite);
  }

  /// tensor_error naming the file, the tensor, `expected` and the actual shape unless they agree.
  void expect_shape(const std::string& name, const std::vector<std::int64_t>& expected) const {
    const Tensor& t = at(name);
    if (t.shape != expected)
      fail<tensor_error>(name, "expected shape ", shape_string(expected), ", got ",
                         shape_string(t.shape));
  }

 private:
  std::string where(const std::string& name) const {
    return detail::concat("safetensors: ", source_, ": tensor '", name, "': ");
  }

  template <typename Error, typename... Parts>
  [[noreturn]] void fail(const std::string& name, const Parts&... parts) const {
    throw Error(where(name) + detail::concat(parts...));
  }

  /// The tensor `name`, whose bytes must match its shape and dtype (a Tensor built by hand may
  /// not, and is never read past its bytes): tensor_error naming the fault otherwise.
  const Tensor& checked(const std::string& name) const {
    const Tensor& t = at(name);
    const std::string fault = detail::tensor_fault(t);
    if (!fault.empty()) fail<tensor_error>(name, fault);
    return t;
  }

  /// The tensor `name`, which must have `rank` dimensions: tensor_error naming `what` otherwise.
  const Tensor& at_rank(const std::string& name, std::size_t rank, const char* what) const {
    const Tensor& t = checked(name);
    if (t.shape.size() != rank)
      fail<tensor_error>(name, "expected a ", rank, "-D tensor (", what, "), got shape ",
                         shape_string(t.shape));
    return t;
  }

  template <typename Scalar>
  void put_contiguous(const std::string& name, std::vector<std::int64_t> shape,
                      const Scalar* values, Dtype dtype) {
    (void)sizeof(detail::ScalarCheck<Scalar>);  // float, double or long double
    Tensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    const std::size_t n = static_cast<std::size_t>(t.numel());
    t.data.resize(n * size_of(dtype));
    detail::encode(values, n, dtype, t.data.data());
    put(name, std::move(t));
  }

  template <typename Scalar>
  void decode_checked(const std::string& name, const Tensor& t, Scalar* out,
                      NonFinite non_finite) const {
    (void)sizeof(detail::ScalarCheck<Scalar>);
    const std::size_t n = static_cast<std::size_t>(t.numel());  // t is checked()
    detail::decode(t.dtype, t.data.data(), n, out);
    if (non_finite == NonFinite::allow) return;
    for (std::size_t i = 0; i < n; ++i) {
      if (std::isfinite(out[i])) continue;
      const double stored = detail::decode_one(t.dtype, t.data.data() + i * size_of(t.dtype));
      fail<tensor_error>(name, "non-finite value ", stored, " (", to_string(t.dtype),
                         std::isfinite(stored) ? ", out of range of the requested type" : "",
                         ") at index ", detail::unravel(i, t.shape), " of shape ",
                         shape_string(t.shape));
    }
  }

  std::string source_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, Tensor> tensors_;
};

}  // namespace safetensors

namespace detail {

/// Header JSON nested deeper than this is rejected before it is built (a valid header needs 3:
/// the root object, a tensor object, its shape array).
constexpr int max_header_nesting = 16;

/// Parses the header text, rejecting duplicate keys at any level (nlohmann keeps the last one
/// silently) and absurd nesting, with format_error messages that start with `where` and name
/// the tensor (or __metadata__) the duplicate sits in.
inline nlohmann::json parse_header(std::string_view text, const std::string& where) {
  const auto duplicate = [](const std::vector<std::string>& path, const std::string& key) {
    // path[1] is the top-level entry (tensor or __metadata__) the duplicate sits in.
    const std::string& entry = path.size() == 1 ? key : path[1];
    const std::string what =
        entry == "__metadata__" ? std::string("__metadata__") : "tensor '" + entry + "'";
    if (path.size() == 1) return what + ": name appears more than once in the header";
    return concat(what, ": key '", key, "' appears more than once");
  };
  return parse_strict_json<nlohmann::json, safetensors::format_error>(
      text, where,
      {max_header_nesting, "header JSON nests deeper than", "header is not valid JSON"}, duplicate);
}

/// A JSON number that is a non-negative integer, or nothing.
inline std::optional<std::uint64_t> as_count(const nlohmann::json& j) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer() && j.get<std::int64_t>() >= 0)
    return static_cast<std::uint64_t>(j.get<std::int64_t>());
  return std::nullopt;
}

inline const char* json_kind(const nlohmann::json& j) {
  if (j.is_number_integer() && !j.is_number_unsigned() && j.get<std::int64_t>() < 0)
    return "a negative integer";
  if (j.is_number_float()) return "a non-integer number";
  return j.type_name();
}

}  // namespace detail

namespace detail {

/// One tensor of a validated header: where its bytes are in the data buffer.
struct HeaderEntry {
  std::string name;
  safetensors::Dtype dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin, end;  ///< byte range in the data buffer
};

/// A validated header: the metadata and the tensors, by name.
struct ParsedHeader {
  std::map<std::string, std::string> metadata;
  std::vector<HeaderEntry> entries;
};

/// The header length N from the first 8 bytes of a file of `size` bytes, checked against the
/// limit and the size (format_error starting with `where`).
inline std::uint64_t checked_header_length(const unsigned char* first8, std::uint64_t size,
                                           const std::string& where,
                                           const safetensors::ReadOptions& options) {
  const auto header_len = load_le<std::uint64_t>(first8);
  if (header_len > options.max_header_bytes)
    throw safetensors::format_error(concat(where, "header length ", header_len,
                                           " exceeds the limit of ", options.max_header_bytes,
                                           " bytes"));
  if (header_len > size - 8)
    throw safetensors::format_error(concat(where, "header length ", header_len,
                                           " runs past the end of the file (", size,
                                           " bytes, so at most ", size - 8, " are available)"));
  return header_len;
}

/// \brief Validates the header text of a file whose data buffer has `buffer_size` bytes, as
/// described at safetensors::parse(), without looking at the buffer: what lets load() refuse
/// a file by its header before reading (or allocating) its data.
inline ParsedHeader validate_header(std::string_view text, std::uint64_t buffer_size,
                                    const std::string& where,
                                    const safetensors::ReadOptions& options) {
  using namespace safetensors;
  const auto bad = [&](const auto&... parts) { return format_error(concat(where, parts...)); };
  const auto bad_tensor = [&](const std::string& name, const auto&... parts) {
    return format_error(concat(where, "tensor '", name, "': ", parts...));
  };
  const nlohmann::json header = parse_header(text, where);
  if (!header.is_object()) throw bad("header is JSON ", header.type_name(), ", not an object");

  ParsedHeader parsed;
  std::vector<HeaderEntry>& entries = parsed.entries;
  entries.reserve(header.size());

  for (const auto& kv : header.items()) {
    const std::string& name = kv.key();
    const nlohmann::json& value = kv.value();
    if (name == "__metadata__") {
      if (!value.is_object())
        throw bad("__metadata__ is ", value.type_name(), ", not an object of strings");
      for (const auto& m : value.items()) {
        if (!m.value().is_string())
          throw bad("__metadata__ entry '", m.key(), "' is ", m.value().type_name(),
                    ", not a string");
        parsed.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!value.is_object())
      throw bad_tensor(name, "entry is ", value.type_name(), ", not an object");

    const auto dtype_it = value.find("dtype");
    if (dtype_it == value.end()) throw bad_tensor(name, "missing \"dtype\"");
    if (!dtype_it->is_string())
      throw bad_tensor(name, "\"dtype\" is ", dtype_it->type_name(), ", not a string");
    const auto& dtype_name = dtype_it->get_ref<const std::string&>();
    const std::optional<Dtype> dtype = parse_dtype(dtype_name);
    if (!dtype)
      throw bad_tensor(name, "unsupported dtype '", dtype_name,
                       "' (hra reads F16, BF16, F32, F64)");

    const auto shape_it = value.find("shape");
    if (shape_it == value.end()) throw bad_tensor(name, "missing \"shape\"");
    if (!shape_it->is_array())
      throw bad_tensor(name, "\"shape\" is ", shape_it->type_name(), ", not an array");
    HeaderEntry e{name, *dtype, {}, 0, 0};
    const auto overflows = [&] {
      return bad_tensor(name, "\"shape\" ", shape_it->dump(), " of ", dtype_name,
                        " overflows 64-bit byte counts");
    };
    for (const auto& dim : *shape_it) {
      const std::optional<std::uint64_t> extent = detail::as_count(dim);
      if (!extent)
        throw bad_tensor(name, "\"shape\" entry ", dim.dump(), " is ", detail::json_kind(dim),
                         ", not a non-negative integer");
      if (*extent > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        throw overflows();
      e.shape.push_back(static_cast<std::int64_t>(*extent));
    }
    const detail::ByteCount count = detail::byte_count(e.shape, size_of(*dtype));
    if (!count) throw overflows();
    const std::uint64_t bytes_needed = count.bytes;

    const auto offsets_it = value.find("data_offsets");
    if (offsets_it == value.end()) throw bad_tensor(name, "missing \"data_offsets\"");
    if (!offsets_it->is_array() || offsets_it->size() != 2)
      throw bad_tensor(name, "\"data_offsets\" is ", offsets_it->dump(),
                       ", not an array [begin, end]");
    const std::optional<std::uint64_t> begin = detail::as_count((*offsets_it)[0]);
    const std::optional<std::uint64_t> end = detail::as_count((*offsets_it)[1]);
    if (!begin || !end)
      throw bad_tensor(name, "\"data_offsets\" ", offsets_it->dump(),
                       " are not non-negative integers");
    if (*begin > *end)
      throw bad_tensor(name, "\"data_offsets\" ", offsets_it->dump(), " begin after they end");
    if (*end > buffer_size)
      throw bad_tensor(name, "\"data_offsets\" ", offsets_it->dump(),
                       " run past the end of the data buffer (", buffer_size, " bytes)");
    if (*end - *begin != bytes_needed)
      throw bad_tensor(name, "\"data_offsets\" ", offsets_it->dump(), " span ", *end - *begin,
                       " bytes, but shape ", shape_string(e.shape), " of ", dtype_name, " needs ",
                       bytes_needed);
    e.begin = *begin;
    e.end = *end;
    entries.push_back(std::move(e));
  }

  // Byte ranges must be disjoint and, unless allowed otherwise, cover the buffer exactly.
  std::vector<const HeaderEntry*> by_offset;
  for (const HeaderEntry& e : entries)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const HeaderEntry* a, const HeaderEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
  });
  std::uint64_t covered = 0;  // end of the bytes claimed so far
  const HeaderEntry* last = nullptr;
  for (const HeaderEntry* e : by_offset) {
    if (last && e->begin < covered)
      throw bad_tensor(e->name, "bytes [", e->begin, ", ", e->end, ") overlap tensor '", last->name,
                       "' at [", last->begin, ", ", last->end, ")");
    if (!options.allow_unindexed_bytes && e->begin > covered)
      throw bad("bytes [", covered, ", ", e->begin,
                ") of the data buffer belong to no tensor (the format allows no holes); next is "
                "tensor '",
                e->name, "'");
    covered = e->end;
    last = e;
  }
  if (!options.allow_unindexed_bytes && covered != buffer_size)
    throw bad("bytes [", covered, ", ", buffer_size,
              ") at the end of the data buffer belong to no tensor (the format allows no "
              "trailing bytes)");

  return parsed;
}

/// The tensors of `header`, their bytes taken by `read(begin, end, out)`, into a TensorFile.
template <typename Read>
safetensors::TensorFile tensors_of(ParsedHeader header, std::string source, Read read) {
  safetensors::TensorFile file(std::move(source));
  file.metadata() = std::move(header.metadata);
  for (HeaderEntry& e : header.entries) {
    safetensors::Tensor t;
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    t.data.resize(static_cast<std::size_t>(e.end - e.begin));
    read(e.begin, t.data.data(), t.data.size());
    file.put(e.name, std::move(t));
  }
  return file;
}

}  // namespace detail

namespace safetensors {

/// \brief Parses a safetensors file held in memory (`size` bytes at `data`); `source` names it
/// in error messages. Validates everything before copying any tensor data:
///   - at least 8 bytes; header length N <= options.max_header_bytes and 8 + N <= size;
///   - the header is valid UTF-8 JSON without NUL bytes, an object, without duplicate keys at
///     any level;
///   - `__metadata__`, if present, maps strings to strings;
///   - every other entry is an object with "dtype" (F16, BF16, F32 or F64), "shape" (an array
///     of non-negative integers whose product times the element size fits in 64 bits) and
///     "data_offsets" ([begin, end], integers, begin <= end <= buffer size,
///     end - begin == product(shape) * element size); other keys are ignored;
///   - no two tensors share a byte; unless options.allow_unindexed_bytes, every byte of the
///     buffer belongs to a tensor.
/// Throws format_error naming `source` and the offending tensor.
inline TensorFile parse(const void* data, std::size_t size, std::string source = "<memory>",
                        const ReadOptions& options = {}) {
  using detail::concat;
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::string where = concat("safetensors: ", source, ": ");
  if (size < 8)
    throw format_error(
        concat(where, "file is ", size, " bytes, too short for the 8-byte header length"));
  const std::uint64_t header_len = detail::checked_header_length(bytes, size, where, options);
  const unsigned char* buffer = bytes + 8 + header_len;
  detail::ParsedHeader header =
      detail::validate_header(std::string_view(reinterpret_cast<const char*>(bytes + 8),
                                               static_cast<std::size_t>(header_len)),
                              size - 8 - header_len, where, options);
  return detail::tensors_of(std::move(header), std::move(source),
                            [&](std::uint64_t begin, unsigned char* out, std::size_t n) {
                              std::copy(buffer + begin, buffer + begin + n, out);
                            });
}

/// Parses a safetensors file held in `bytes`; see parse(const void*, std::size_t, ...).
inline TensorFile parse(std::string_view bytes, std::string source = "<memory>",
                        const ReadOptions& options = {}) {
  return parse(bytes.data(), bytes.size(), std::move(source), options);
}

}  // namespace safetensors

namespace detail {

/// \brief load() of an opened file; error messages name `source`. Reads the 8-byte header
/// length, then the header, validates both against the file's size, and only then reads each
/// tensor's bytes into that tensor: memory is the header plus the tensors the header validly
/// declares, and a file refused by its size or header is not read further.
inline safetensors::TensorFile load_opened(InputFile<safetensors::io_error>& in, std::string source,
                                           const safetensors::ReadOptions& options) {
  using namespace safetensors;
  const std::string where = concat("safetensors: ", source, ": ");
  const std::uint64_t size = in.size();
  if (size > options.max_file_bytes)
    throw io_error(concat(where, "is ", size, " bytes, more than the ", options.max_file_bytes,
                          " accepted (ReadOptions::max_file_bytes)"));
  if (size < 8)
    throw format_error(
        concat(where, "file is ", size, " bytes, too short for the 8-byte header length"));
  unsigned char first8[8];
  in.read_at(0, first8, 8);
  const std::uint64_t header_len = checked_header_length(first8, size, where, options);
  std::string text(static_cast<std::size_t>(header_len), '\0');
  in.read_at(8, text.data(), text.size());
  ParsedHeader header = validate_header(text, size - 8 - header_len, where, options);
  text = std::string();
  return tensors_of(std::move(header), std::move(source),
                    [&](std::uint64_t begin, unsigned char* out, std::size_t n) {
                      in.read_at(8 + header_len + begin, out, n);
                    });
}

}  // namespace detail

namespace safetensors {

/// \brief Reads the file at `path` and parses it; error messages name the path. Bounded: the
/// size is checked against options.max_file_bytes before anything is read, then the header
/// length and the header against the size, and the tensors' bytes are read last, each into its
/// tensor (never the whole file into one buffer). io_error if it is missing, not a regular
/// file, larger than the limit, or cannot be read; format_error as for parse().
inline TensorFile load(const std::filesystem::path& path, const ReadOptions& options = {}) {
  detail::InputFile<io_error> in(path, "safetensors: ");
  return detail::load_opened(in, path.string(), options);
}

/// \brief The bytes of a safetensors file holding `file`'s tensors and metadata.
///
/// Header keys are sorted (nlohmann's object order), `__metadata__` is written only when not
/// empty, and the header is padded with spaces so that the data buffer starts at a multiple of
/// 8 bytes. Tensors are laid out by decreasing element size, then by name, with no gaps, so each
/// starts at a multiple of its element size. std::invalid_argument naming the tensor if a
/// Tensor is inconsistent or a name or metadata string is not valid UTF-8.
inline std::string serialize(const TensorFile& file) {
  using json = nlohmann::json;
  std::vector<std::pair<const std::string*, const Tensor*>> order;
  for (const auto& kv : file.tensors()) {
    const Tensor& t = kv.second;
    const std::string fault = detail::tensor_fault(t);
    if (!fault.empty())
      detail::throw_invalid("safetensors: ", file.source(), ": tensor '", kv.first, "': ", fault);
    order.emplace_back(&kv.first, &t);
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return size_of(a.second->dtype) > size_of(b.second->dtype);
  });

  json header = json::object();
  std::uint64_t offset = 0;
  for (const auto& [name, t] : order) {
    const std::uint64_t end = offset + t->data.size();
    header[*name] = {
        {"dtype", to_string(t->dtype)}, {"shape", t->shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!file.metadata().empty()) header["__metadata__"] = file.metadata();

  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {
    detail::throw_invalid("safetensors: ", file.source(),
                          ": a tensor name or metadata string is not valid UTF-8: ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  std::string out(8 + text.size() + offset, '\0');
  detail::store_le(static_cast<std::uint64_t>(text.size()),
                   reinterpret_cast<unsigned char*>(out.data()));
  std::copy(text.begin(), text.end(), out.begin() + 8);
  auto pos = out.begin() + 8 + static_cast<std::ptrdiff_t>(text.size());
  for (const auto& entry : order) {
    const Tensor& t = *entry.second;
    pos = std::copy(t.data.begin(), t.data.end(), pos);
  }
  return out;
}

/// \brief Writes `file` to `path` atomically: serialize() first (so conversion errors touch no
/// file), then a temporary file in the same directory, fsync, and a rename over `path`. On any
/// failure the temporary file is removed, an existing file at `path` is left as it was, and
/// io_error names the path and the OS error.
inline void save(const std::filesystem::path& path, const TensorFile& file) {
  detail::replace_file_atomically<io_error>(path, serialize(file), "safetensors: ");
}

}  // namespace safetensors
}  // namespace hra
