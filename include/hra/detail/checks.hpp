// Internal helpers for argument checking and error messages.
#pragma once

#include <Eigen/Core>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

/// Hot-path internal invariants (not user errors). Define HRA_ASSERT before including
/// any hra header to route them elsewhere (e.g. to an exception in a debugging build).
#ifndef HRA_ASSERT
#define HRA_ASSERT(cond) assert(cond)
#endif

/// Re-exports the type names of a layer's (dependent) base class, which C++ does not make
/// visible in a class template by itself; the same device as Eigen's
/// EIGEN_DENSE_PUBLIC_INTERFACE. Use inside the class, under `public:`.
#define HRA_LAYER_TYPES(Base)    \
  using typename Base::ConstRef; \
  using typename Base::Index;    \
  using typename Base::Matrix;   \
  using typename Base::Scalar;   \
  using typename Base::Vector

namespace hra {
namespace detail {

/// names[e] for the enumerator e of an enum numbered 0, 1, ... in the order of `names` (the
/// to_string() of hra's enums); "?" for a value outside it.
template <typename Enum, std::size_t N>
const char* enum_name(Enum e, const char* const (&names)[N]) {
  const auto i = static_cast<std::size_t>(e);
  return i < N ? names[i] : "?";
}

template <typename Scalar>
struct ScalarCheck {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value ||
                    std::is_same<Scalar, long double>::value,
                "hra supports the real floating-point scalars float, double and long double");
};

/// The type names of hra's public classes over one scalar (Layer, ReflectorChain), checked.
template <typename Scalar_>
struct ScalarTypes : ScalarCheck<Scalar_> {
  using Scalar = Scalar_;
  using Index = Eigen::Index;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using ConstRef = Eigen::Ref<const Matrix>;
};

/// Builds a message from any streamable pieces: concat("rank ", r, " > dim ", d).
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <typename... Parts>
[[noreturn]] void throw_invalid(const Parts&... parts) {
  throw std::invalid_argument(concat(parts...));
}

inline std::string shape(Eigen::Index rows, Eigen::Index cols) {
  return concat(rows, "x", cols);
}

/// Throws std::invalid_argument naming `what` and both shapes unless m is rows x cols.
template <typename Derived>
void check_shape(const Eigen::MatrixBase<Derived>& m, Eigen::Index rows, Eigen::Index cols,
                 const char* what) {
  if (m.rows() != rows || m.cols() != cols)
    throw_invalid(what, ": expected a ", shape(rows, cols), " matrix, got ",
                  shape(m.rows(), m.cols()));
}

/// Whether every entry of m is finite, in one vectorised pass: x * 0 is 0 for every finite x and
/// NaN for an infinity or a NaN, and a NaN survives the sum. Eigen 3.4's allFinite() reduces a
/// comparison with all(), which it does not vectorise: 6.2 us against 1.2 us for a 256 x 64
/// float batch, checked twice per layer and step. (Like allFinite(), it assumes IEEE arithmetic:
/// not -ffast-math.)
template <typename Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return std::isfinite((m.derived().array() * Scalar(0)).sum());
}

/// Throws std::invalid_argument naming `what` and the first offending entry unless all finite.
template <typename Derived>
void check_finite(const Eigen::MatrixBase<Derived>& m, const char* what) {
  // One vectorised pass; only locate the culprit on failure.
  if (all_finite(m)) return;
  for (Eigen::Index j = 0; j < m.cols(); ++j)
    for (Eigen::Index i = 0; i < m.rows(); ++i)
      if (!std::isfinite(m(i, j)))
        throw_invalid(what, ": non-finite value ", m(i, j), " at (", i, ", ", j, ") of a ",
                      shape(m.rows(), m.cols()), " matrix");
}

/// Whether the memory spans of two matrices (blocks, maps, refs) overlap: a layer that writes
/// into one of its buffers while reading an argument that lives in it must copy the argument
/// first.
template <typename A, typename B>
bool overlaps(const Eigen::DenseBase<A>& a, const Eigen::DenseBase<B>& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto* a0 = reinterpret_cast<const char*>(a.derived().data());
  const auto* b0 = reinterpret_cast<const char*>(b.derived().data());
  const auto span = [](const auto& m) {
    return static_cast<std::size_t>((m.outerSize() - 1) * m.outerStride() + m.innerSize()) *
           sizeof(typename std::decay_t<decltype(m)>::Scalar);
  };
  return a0 < b0 + span(b.derived()) && b0 < a0 + span(a.derived());
}

}  // namespace detail
}  // namespace hra
