// Data-parallel training over MPI: every rank holds the same layers, computes the gradients of
// its own shard of the batch, and the ranks average those gradients before the optimiser step.
// Needs <mpi.h> (the hra::mpi CMake target); nothing else in hra does. What users include: it
// brings the errors (mpi/error.hpp), the communicator (mpi/communicator.hpp) and the agreement
// protocol's records and messages (mpi/agreement.hpp).
#pragma once

#include <mpi.h>

#include <Eigen/Core>
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../hash.hpp"
#include "../layer.hpp"
#include "agreement.hpp"
#include "communicator.hpp"
#include "error.hpp"

namespace hra {
namespace mpi {

/// Options of DataParallel; every rank must pass the same (the constructor checks).
struct DataParallelOptions {
  int root = 0;                  ///< the rank whose parameter values every rank starts from
  std::int64_t check_every = 0;  ///< > 0: average_gradients() runs check_consistency() first
                                 ///< on every k-th call after the first (calls k+1, 2k+1, ...)
};

/// \brief Data-parallel training over MPI for any set of layers (or parameter views).
///
/// Every rank builds the same layers in the same order and trains on its own shard of each
/// batch; after backward() it calls average_gradients(), then steps its optimiser. Because every
/// rank then applies the same update to the same values, the parameters stay identical (bit for
/// bit) on every rank, and the training equals one process on the whole batch up to rounding.
///
///   hra::mpi::DataParallelf dp({&layer1, &layer2});  // checks the lists agree; rank 0's values
///   for (...) {                                      // x: this rank's columns of the batch
///     forward / loss / backward on x;
///     dp.average_gradients();                        // one MPI_Allreduce of every gradient
///     adam.step(...);                                // the same step on every rank
///   }
///   dp.check_consistency();                          // optional: parameters still identical?
///
/// - Start (constructor): one MPI_Allgather of a compact signature of every rank's parameter
///   list (scalar type, count, a hash of names and shapes) and options; if any rank differs,
///   every rank throws the same mismatch_error naming the first differing rank and what differs
///   (instead of entering collectives the others skip). Then rank `root`'s values are broadcast.
/// - average_gradients(): packs every gradient into one buffer, reduces it with a single
///   in-place MPI_Allreduce (MPI_SUM), and writes back g <- sum_p w_p g_p / sum_p w_p; w_p = 1 for
///   the plain mean (the default), or each rank's local sample count (see its overload).
/// - Errors every rank must agree on are decided from reduced or gathered data, so that all
///   ranks throw together and none is left waiting in a collective: a changed parameter list,
///   a bad weight, a non-finite gradient, diverged parameters. A failed MPI call throws
///   hra::mpi::error naming the call. The communicator is a duplicate (MPI_Comm_dup) of the
///   one given, with MPI_ERRORS_RETURN, so hra's messages never collide with the caller's.
///
/// Frozen weights are not parameters: they are neither broadcast nor checked, so every rank must
/// load the same ones. Destroy the object before MPI_Finalize (or it cannot free its
/// communicator). Not copyable; a moved-from object may only be destroyed or assigned.
template <typename Scalar_>
class DataParallel {
  static_assert(std::is_same<Scalar_, float>::value || std::is_same<Scalar_, double>::value,
                "hra::mpi::DataParallel supports float and double (MPI_FLOAT, MPI_DOUBLE)");

 public:
  using Scalar = Scalar_;
  using Index = Eigen::Index;
  using View = ParameterView<Scalar>;
  using Options = DataParallelOptions;

  /// Slots after the gradients in the reduced buffer (weight, flags; see average_gradients()).
  static constexpr Index kSlots = 8;

  /// Over the parameters() of `layers` (re-fetched at every call, named "layers[i].<name>").
  /// Collective over `comm`: every rank must call it. Throws mismatch_error (on every rank) if
  /// the ranks' lists or options differ or a rank's arguments are invalid (a null layer, a
  /// gradient shaped unlike its value, check_every < 0), std::logic_error if MPI is not
  /// initialised, hra::mpi::error if an MPI call fails.
  explicit DataParallel(std::vector<Layer<Scalar>*> layers, MPI_Comm comm = MPI_COMM_WORLD,
                        const Options& options = Options())
      : layers_(std::move(layers)), from_layers_(true), options_(options) {
    start(comm);
  }

  /// The same for a braced list, dp({&layer1, &layer2}) (which would otherwise be ambiguous).
  DataParallel(std::initializer_list<Layer<Scalar>*> layers, MPI_Comm comm = MPI_COMM_WORLD,
               const Options& options = Options())
      : DataParallel(std::vector<Layer<Scalar>*>(layers), comm, options) {}

  /// Over fixed views (e.g. a layer's parameters() or memory of your own), used as given: they
  /// must stay valid, and keep their storage, for the object's lifetime.
  explicit DataParallel(std::vector<View> parameters, MPI_Comm comm = MPI_COMM_WORLD,
                        const Options& options = Options())
      : views_(std::move(parameters)), from_layers_(false), options_(options) {
    start(comm);
  }

  /// \brief g <- (1/P) sum_p g_p on every rank: the plain mean over the P ranks.
  ///
  /// Equals the gradient of the mean loss over all samples when every rank's loss is the mean
  /// over the same number of samples. Throws on every rank (having set every gradient to NaN,
  /// so that an optimiser step that ignores the exception refuses too): std::invalid_argument
  /// if a rank's gradient or the reduced one is not finite (the optimisers' own reaction),
  /// std::logic_error if a rank's parameter list changed since construction or the ranks mix
  /// the two overloads in one step, divergence_error from the periodic check (check_every).
  void average_gradients() { reduce(1.0, false); }

  /// \brief g <- sum_p w_p g_p / sum_p w_p, w_p = `local_weight` of rank p.
  ///
  /// With w_p the number of samples rank p's loss is the mean over, this is the gradient of
  /// the mean loss over all sum_p w_p samples, also when the shards differ in size (a last,
  /// short batch). A rank with w_p = 0 contributes nothing (its gradients are not read). Every
  /// rank must use this overload in the same step. Throws as average_gradients(), and
  /// std::invalid_argument on every rank if a weight is negative or not finite or all are 0.
  void average_gradients(double local_weight) { reduce(local_weight, true); }

  /// \brief Throws divergence_error on every rank unless every rank's parameters are bitwise
  /// equal to rank 0's.
  ///
  /// One MPI_Allgather of a 64-bit hash and the sum of each tensor's values (16 bytes per tensor
  /// and rank); the message names the first differing rank and tensor and both sums. Costs one
  /// pass over the parameters. std::logic_error if a rank's parameter list changed.
  void check_consistency() {
    const char* who = "hra::mpi::DataParallel::check_consistency";
    std::string problem;
    const std::vector<View> views = current(problem);
    const std::size_t n = layout_.size() + 1;
    std::vector<detail::Checksum> mine(n, detail::Checksum{0, 0.0});
    if (problem.empty()) {
      for (std::size_t i = 0; i < layout_.size(); ++i) {
        const auto& v = views[i].value;
        mine[i + 1].hash =
            detail::values_digest(v.data(), static_cast<std::size_t>(v.size()) * sizeof(Scalar),
                                  detail::mix64(static_cast<std::uint64_t>(i)));
        mine[i + 1].sum = v.template cast<double>().sum();
      }
    } else {
      mine[0].hash = 1;
    }
    std::vector<detail::Checksum> all(n * static_cast<std::size_t>(size_));
    check(MPI_Allgather(mine.data(), static_cast<int>(n * sizeof(detail::Checksum)), MPI_BYTE,
                        all.data(), static_cast<int>(n * sizeof(detail::Checksum)), MPI_BYTE,
                        comm_.get()),
          "MPI_Allgather", who);
    std::vector<int> changed, differ;
    std::size_t first_tensor = 0;
    for (int p = 0; p < size_; ++p) {
      const detail::Checksum* rec = &all[static_cast<std::size_t>(p) * n];
      if (rec[0].hash != 0) {
        changed.push_back(p);
        continue;
      }
      for (std::size_t i = 1; i < n; ++i)
        if (rec[i].hash != all[i].hash) {
          if (differ.empty()) first_tensor = i;
          differ.push_back(p);
          break;
        }
    }
    if (!changed.empty()) throw_changed(who, changed, problem);
    if (differ.empty()) return;
    const int k = differ.front();
    const detail::Checksum& theirs = all[static_cast<std::size_t>(k) * n + first_tensor];
    const detail::Checksum& root = all[first_tensor];
    const auto& e = layout_[first_tensor - 1];
    std::ostringstream os;
    os << std::setprecision(17) << who
       << ": the parameters diverged across ranks: " << differ.size() << " of " << size_
       << " ranks differ from rank 0 (" << (differ.size() > 1 ? "ranks " : "rank ")
       << detail::list_ranks(differ) << "); the first, rank " << k << ", differs in '" << e.name
       << "' (" << hra::detail::shape(e.rows, e.cols) << "): checksum " << std::hex << theirs.hash
       << " vs " << root.hash << std::dec << ", sum of values " << theirs.sum << " vs " << root.sum
       << " (every rank must apply the same optimiser steps to the averaged gradients)";
    throw divergence_error(os.str());
  }

  /// Copies rank `root`'s parameter values to every rank (one MPI_Bcast; the constructor does
  /// this with DataParallelOptions::root). An invalid root is MPI's error: hra::mpi::error
  /// naming MPI_Bcast. std::logic_error on every rank if a rank's parameter list changed.
  void broadcast_parameters(int root = 0) {
    const char* who = "hra::mpi::DataParallel::broadcast_parameters";
    std::string problem;
    std::vector<View> views = current(problem);
    int changed[2] = {problem.empty() ? 0 : 1, problem.empty() ? INT_MAX : rank_};
    check(MPI_Allreduce(MPI_IN_PLACE, &changed[0], 1, MPI_INT, MPI_SUM, comm_.get()),
          "MPI_Allreduce", who);
    check(MPI_Allreduce(MPI_IN_PLACE, &changed[1], 1, MPI_INT, MPI_MIN, comm_.get()),
          "MPI_Allreduce", who);
    if (changed[0] > 0) throw_changed(who, std::vector<int>{changed[1]}, problem, changed[0]);
    bcast_values(views, root, who);
  }

  /// Rank of this process in communicator(), and the number of ranks P.
  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The duplicated communicator (MPI_ERRORS_RETURN: check your calls with hra::mpi::check).
  MPI_Comm communicator() const { return comm_.get(); }
  /// Number of parameter scalars, and the bytes one average_gradients() reduces (with the
  /// kSlots scalars of weight and flags).
  Index num_values() const { return values_; }
  std::size_t bytes_per_step() const {
    return static_cast<std::size_t>(values_ + kSlots) * sizeof(Scalar);
  }
  /// Successful average_gradients() calls so far.
  std::int64_t steps() const { return steps_; }
  /// sum_p w_p of the last successful average_gradients() (P for the plain mean).
  double total_weight() const { return total_weight_; }
  /// The parameter names in the reduced order ("layers[i].<name>" when built from layers).
  std::vector<std::string> parameter_names() const {
    std::vector<std::string> out;
    for (const auto& e : layout_) out.push_back(e.name);
    return out;
  }

 private:
  struct Entry {
    std::string name;
    Index rows, cols, offset;
  };

  // Slot indices after the gradients in buffer_ (all reduced with MPI_SUM).
  enum Slot : Index {
    kWeight = 0,     // w_p
    kWeighted,       // 1 if the weighted overload was called
    kChanged,        // 1 if the parameter list changed on this rank
    kChangedRank,    // rank if it did (the sum names the rank when one did)
    kBadWeight,      // 1 if w_p is negative or not finite
    kBadWeightRank,  //
    kNonFinite,      // 1 if this rank's gradient is not finite
    kNonFiniteRank   //
  };

  // The current views; when built from layers, re-fetched and compared with the layout. On a
  // difference, `problem` says what changed (and the returned views must not be used).
  std::vector<View> current(std::string& problem) {
    if (!from_layers_) return views_;
    std::vector<View> out;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      if (layers_[l] == nullptr) {
        problem = detail::concat("layers[", l, "] is a null pointer");
        return out;
      }
      for (auto& v : layers_[l]->parameters()) {
        v.name = detail::concat("layers[", l, "].", v.name);
        out.push_back(std::move(v));
      }
    }
    if (layout_.empty() && !started_) return out;  // the constructor records this layout
    if (out.size() != layout_.size()) {
      problem = detail::concat("there are ", out.size(), " parameter tensors, there were ",
                               layout_.size(), " at construction");
      return out;
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto& e = layout_[i];
      const auto& v = out[i];
      if (v.name != e.name || v.value.rows() != e.rows || v.value.cols() != e.cols ||
          v.grad.rows() != e.rows || v.grad.cols() != e.cols) {
        problem = detail::concat(
            "tensor ", i, " is '", v.name, "' ", hra::detail::shape(v.value.rows(), v.value.cols()),
            ", it was '", e.name, "' ", hra::detail::shape(e.rows, e.cols), " at construction");
        return out;
      }
    }
    return out;
  }

  [[noreturn]] void throw_changed(const char* who, const std::vector<int>& ranks,
                                  const std::string& problem, int count = -1) const {
    const int n = count >= 0 ? count : static_cast<int>(ranks.size());
    std::string msg = detail::concat(who, ": the parameter list changed since construction on ", n,
                                     " of ", size_, " ranks (first: rank ", ranks.front(), ")");
    if (!problem.empty()) msg += detail::concat("; on this rank (", rank_, "): ", problem);
    throw std::logic_error(msg);
  }

  void start(MPI_Comm comm) {
    const char* who = "hra::mpi::DataParallel";
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      throw std::logic_error(
          "hra::mpi::DataParallel: MPI is not initialised (call MPI_Init before and destroy the "
          "object before MPI_Finalize)");
    comm_ = detail::Communicator(comm, who);
    check(MPI_Comm_rank(comm_.get(), &rank_), "MPI_Comm_rank", who);
    check(MPI_Comm_size(comm_.get(), &size_), "MPI_Comm_size", who);

    // This rank's layout and its text form (exchanged only when the ranks disagree).
    std::string problem;
    std::vector<View> views = current(problem);
    if (problem.empty() && options_.check_every < 0)
      problem = detail::concat("check_every must be >= 0, got ", options_.check_every);
    std::ostringstream descriptor;
    Index offset = 0;
    if (problem.empty())
      for (const auto& v : views) {
        if (v.grad.rows() != v.value.rows() || v.grad.cols() != v.value.cols()) {
          problem = detail::concat(
              "parameter '", v.name, "' has a ", hra::detail::shape(v.value.rows(), v.value.cols()),
              " value but a ", hra::detail::shape(v.grad.rows(), v.grad.cols()), " gradient");
          break;
        }
        layout_.push_back({v.name, v.value.rows(), v.value.cols(), offset});
        offset += v.value.size();
        descriptor << "'" << v.name << "' " << hra::detail::shape(v.value.rows(), v.value.cols())
                   << '\0';
      }
    started_ = true;
    const std::string text = problem.empty() ? descriptor.str() : problem;
    detail::Signature mine{sizeof(Scalar),
                           problem.empty() ? layout_.size() : 0,
                           problem.empty() ? static_cast<std::uint64_t>(offset) : 0,
                           hra::fnv1a64(text),
                           static_cast<std::uint64_t>(static_cast<std::int64_t>(options_.root)),
                           static_cast<std::uint64_t>(options_.check_every),
                           problem.empty() ? 0u : 1u};
    std::vector<detail::Signature> all(static_cast<std::size_t>(size_));
    const int bytes = static_cast<int>(sizeof mine);
    check(MPI_Allgather(&mine, bytes, MPI_BYTE, all.data(), bytes, MPI_BYTE, comm_.get()),
          "MPI_Allgather", who);
    std::vector<int> differ;
    for (int p = 0; p < size_; ++p)
      if (all[static_cast<std::size_t>(p)] != all[0] ||
          all[static_cast<std::size_t>(p)].local_problem)
        differ.push_back(p);
    if (!differ.empty()) throw_mismatch(all, differ, text);

    values_ = offset;
    buffer_.assign(static_cast<std::size_t>(values_ + kSlots), Scalar(0));
    bcast_values(views, options_.root, who);
  }

  // Every rank builds the same message from the gathered signatures and from the descriptors
  // of rank 0 and of the first differing rank k (two broadcasts every rank takes part in).
  [[noreturn]] void throw_mismatch(const std::vector<detail::Signature>& all,
                                   const std::vector<int>& differ, const std::string& text) {
    const char* who = "hra::mpi::DataParallel";
    const int k = differ.front();
    const std::string text0 = bcast_string(text, 0, who);
    const std::string textk = k == 0 ? text0 : bcast_string(text, k, who);
    const detail::Signature& s0 = all[0];
    const detail::Signature& sk = all[static_cast<std::size_t>(k)];
    std::ostringstream os;
    os << who << ": the ranks hold different parameter lists or options (";
    std::vector<int> others;
    for (int p : differ)
      if (p != 0) others.push_back(p);
    if (s0.local_problem) os << "rank 0 has invalid arguments";
    if (s0.local_problem && !others.empty()) os << "; ";
    if (!others.empty())
      os << others.size() << " of " << size_
         << " ranks differ from rank 0: " << detail::list_ranks(others);
    os << "); ";
    if (sk.local_problem) {
      os << "rank " << k << ": " << textk;
    } else if (sk.scalar_bytes != s0.scalar_bytes) {
      os << "rank " << k << " holds " << detail::scalar_name(sk.scalar_bytes)
         << " parameters, rank 0 " << detail::scalar_name(s0.scalar_bytes);
    } else if (sk.root != s0.root || sk.check_every != s0.check_every) {
      os << "rank " << k << " has options root=" << static_cast<std::int64_t>(sk.root)
         << " check_every=" << sk.check_every
         << ", rank 0 root=" << static_cast<std::int64_t>(s0.root)
         << " check_every=" << s0.check_every;
    } else {
      os << detail::describe_layout_difference(detail::split_descriptor(text0),
                                               detail::split_descriptor(textk), k);
    }
    os << ". Every rank must build the same layers, in the same order, with the same options";
    throw mismatch_error(os.str());
  }

  std::string bcast_string(const std::string& text, int root, const char* who) {
    std::uint64_t length = text.size();
    check(MPI_Bcast(&length, 1, MPI_UINT64_T, root, comm_.get()), "MPI_Bcast", who);
    std::string out = rank_ == root ? text : std::string(static_cast<std::size_t>(length), '\0');
    detail::for_chunks(out.size(), [&](std::size_t off, int count) {
      check(MPI_Bcast(&out[off], count, MPI_CHAR, root, comm_.get()), "MPI_Bcast", who);
    });
    return out;
  }

  void bcast_values(std::vector<View>& views, int root, const char* who) {
    Scalar* buf = buffer_.data();
    if (rank_ == root)
      for (std::size_t i = 0; i < views.size(); ++i) matrix(buf, layout_[i]) = views[i].value;
    const std::size_t n = static_cast<std::size_t>(values_);
    if (n == 0) {  // still a collective call, so that an invalid root fails on every rank
      check(MPI_Bcast(buf, 0, detail::MpiScalar<Scalar>::type(), root, comm_.get()), "MPI_Bcast",
            who);
      return;
    }
    detail::for_chunks(n, [&](std::size_t off, int count) {
      check(MPI_Bcast(buf + off, count, detail::MpiScalar<Scalar>::type(), root, comm_.get()),
            "MPI_Bcast", who);
    });
    if (rank_ != root)
      for (std::size_t i = 0; i < views.size(); ++i) views[i].value = matrix(buf, layout_[i]);
  }

  static Eigen::Map<typename View::Matrix> matrix(Scalar* buf, const Entry& e) {
    return {buf + e.offset, e.rows, e.cols};
  }

  void reduce(double weight, bool weighted) {
    const char* who = "hra::mpi::DataParallel::average_gradients";
    if (options_.check_every > 0 && steps_ > 0 && steps_ % options_.check_every == 0) {
      try {
        check_consistency();
      } catch (...) {
        std::string ignored;
        std::vector<View> views = current(ignored);
        poison(views);
        throw;
      }
    }
    std::string problem;
    std::vector<View> views = current(problem);
    const bool layout_ok = problem.empty();
    const Scalar w = static_cast<Scalar>(weight);
    const bool weight_ok = std::isfinite(w) && w >= Scalar(0);
    if (layout_ok && !weight_ok)
      problem = detail::concat("the local weight must be finite and >= 0 (as ",
                               detail::MpiScalar<Scalar>::name, "), got ", weight);
    Scalar* buf = buffer_.data();
    Eigen::Map<Eigen::Matrix<Scalar, Eigen::Dynamic, 1>> grads(buf, values_);
    bool local_nonfinite = false;
    if (layout_ok && weight_ok && w > Scalar(0)) {
      for (std::size_t i = 0; i < views.size(); ++i) {
        if (w == Scalar(1))
          matrix(buf, layout_[i]) = views[i].grad;
        else
          matrix(buf, layout_[i]) = w * views[i].grad;
      }
      local_nonfinite = !grads.allFinite();
    } else {
      grads.setZero();  // no contribution (w = 0: the gradients may be stale or unset)
    }
    const Scalar r = static_cast<Scalar>(rank_);
    Scalar* slot = buf + values_;
    slot[kWeight] = layout_ok && weight_ok ? w : Scalar(0);
    slot[kWeighted] = weighted ? Scalar(1) : Scalar(0);
    slot[kChanged] = layout_ok ? Scalar(0) : Scalar(1);
    slot[kChangedRank] = layout_ok ? Scalar(0) : r;
    slot[kBadWeight] = layout_ok && !weight_ok ? Scalar(1) : Scalar(0);
    slot[kBadWeightRank] = layout_ok && !weight_ok ? r : Scalar(0);
    slot[kNonFinite] = local_nonfinite ? Scalar(1) : Scalar(0);
    slot[kNonFiniteRank] = local_nonfinite ? r : Scalar(0);

    detail::for_chunks(buffer_.size(), [&](std::size_t off, int count) {
      check(MPI_Allreduce(MPI_IN_PLACE, buf + off, count, detail::MpiScalar<Scalar>::type(),
                          MPI_SUM, comm_.get()),
            "MPI_Allreduce", who);
    });

    // From here on every rank decides from the same reduced numbers.
    auto count = [&](Slot s) { return static_cast<long long>(slot[s]); };
    auto which = [&](Slot flag, Slot rank) {
      return count(flag) == 1 ? detail::concat(" (rank ", count(rank), ")") : std::string();
    };
    if (count(kChanged) > 0) {
      poison(views);
      std::string msg =
          detail::concat(who, ": the parameter list changed since construction on ",
                         count(kChanged), " of ", size_, " ranks", which(kChanged, kChangedRank));
      if (!layout_ok) msg += detail::concat("; on this rank (", rank_, "): ", problem);
      throw std::logic_error(msg);
    }
    if (count(kWeighted) != 0 && count(kWeighted) != size_) {
      poison(views);
      throw std::logic_error(detail::concat(
          who, ": ", count(kWeighted), " of ", size_,
          " ranks called average_gradients(weight) and the others average_gradients(); every "
          "rank must call the same overload in a step"));
    }
    if (count(kBadWeight) > 0) {
      poison(views);
      std::string msg = detail::concat(who, ": invalid weight on ", count(kBadWeight), " of ",
                                       size_, " ranks", which(kBadWeight, kBadWeightRank));
      if (!weight_ok) msg += detail::concat("; on this rank (", rank_, "): ", problem);
      throw std::invalid_argument(msg);
    }
    const Scalar total = slot[kWeight];
    if (!(total > Scalar(0))) {
      poison(views);
      throw std::invalid_argument(detail::concat(who, ": the weights sum to ",
                                                 static_cast<double>(total), " over the ", size_,
                                                 " ranks; at least one rank needs samples"));
    }
    if (count(kNonFinite) > 0 || !grads.allFinite()) {
      poison(views);
      throw std::invalid_argument(
          count(kNonFinite) > 0
              ? detail::concat(who, ": non-finite gradient on ", count(kNonFinite), " of ", size_,
                               " ranks", which(kNonFinite, kNonFiniteRank),
                               "; every gradient is set to NaN, so no optimiser steps")
              : detail::concat(who,
                               ": the summed gradient overflowed to a non-finite value; "
                               "every gradient is set to NaN, so no optimiser steps"));
    }
    const Scalar scale = Scalar(1) / total;
    for (std::size_t i = 0; i < views.size(); ++i) views[i].grad = scale * matrix(buf, layout_[i]);
    total_weight_ = static_cast<double>(total);
    ++steps_;
  }

  // After a failed step: no gradient may be used, by a caller that ignores the exception either.
  static void poison(std::vector<View>& views) {
    for (auto& v : views) v.grad.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  }

  std::vector<Layer<Scalar>*> layers_;
  std::vector<View> views_;
  bool from_layers_;
  bool started_ = false;
  Options options_;
  detail::Communicator comm_;
  int rank_ = 0, size_ = 1;
  std::vector<Entry> layout_;
  Index values_ = 0;
  std::vector<Scalar> buffer_;
  std::int64_t steps_ = 0;
  double total_weight_ = 0.0;
};

using DataParallelf = DataParallel<float>;
using DataParalleld = DataParallel<double>;

}  // namespace mpi
}  // namespace hra
