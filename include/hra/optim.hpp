// Optimisers that walk any layer's ParameterViews, and a learning-rate schedule.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "detail/checks.hpp"
#include "layer.hpp"

namespace hra {

/// One parameter's optimiser state, as checkpoints save it: the state tensors (Sgd: the
/// momentum buffer; Adam: the first and second moments, each the parameter's shape) and the
/// number of updates applied to it. No slots and steps 0: the parameter has no state yet.
template <typename Scalar>
struct ParameterState {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  std::vector<Matrix> slots;
  std::int64_t steps = 0;
};

namespace detail {

/// Per-parameter optimiser state created on first use, keyed by the parameter's storage.
/// A parameter whose size changed under the same storage is an error, not a silent reset.
template <typename Scalar, int Slots>
class SlotState {
 public:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  struct Entry {
    Matrix slot[Slots];
    std::int64_t steps = 0;  ///< updates applied so far (0 right after creation)
  };

  /// Throws std::invalid_argument if `p` already has state of another shape; changes nothing.
  /// Optimisers call it for every parameter before updating any, so a refused step is a no-op.
  void check(const ParameterView<Scalar>& p) const {
    const auto it = entries_.find(p.value.data());
    if (it != entries_.end() && (it->second.slot[0].rows() != p.value.rows() ||
                                 it->second.slot[0].cols() != p.value.cols()))
      throw_invalid("optimiser: parameter '", p.name, "' changed shape from ",
                    shape(it->second.slot[0].rows(), it->second.slot[0].cols()), " to ",
                    shape(p.value.rows(), p.value.cols()), "; call reset()");
  }

  Entry& get(const ParameterView<Scalar>& p) {
    check(p);
    auto it = entries_.find(p.value.data());
    if (it == entries_.end()) {
      Entry e;
      for (auto& s : e.slot) s.setZero(p.value.rows(), p.value.cols());
      it = entries_.emplace(p.value.data(), std::move(e)).first;
    }
    return it->second;
  }

  /// The state of each of `params`, in their order.
  std::vector<ParameterState<Scalar>> export_state(
      const std::vector<ParameterView<Scalar>>& params) const {
    std::vector<ParameterState<Scalar>> out;
    for (const auto& p : params) {
      check(p);
      ParameterState<Scalar> s;
      const auto it = entries_.find(p.value.data());
      if (it != entries_.end()) {
        for (const auto& m : it->second.slot) s.slots.push_back(m);
        s.steps = it->second.steps;
      }
      out.push_back(std::move(s));
    }
    return out;
  }

  /// Replaces the state of each of `params` by `state` (same order). Everything is checked
  /// before anything changes: std::invalid_argument naming the parameter otherwise.
  void import_state(const std::vector<ParameterView<Scalar>>& params,
                    const std::vector<ParameterState<Scalar>>& state, const char* who) {
    check_import(params, state, who);
    for (std::size_t k = 0; k < params.size(); ++k) {
      const auto& s = state[k];
      entries_.erase(params[k].value.data());
      if (s.slots.empty() && s.steps == 0) continue;
      Entry e;
      for (int i = 0; i < Slots; ++i) e.slot[i] = s.slots[static_cast<std::size_t>(i)];
      e.steps = s.steps;
      entries_.emplace(params[k].value.data(), std::move(e));
    }
  }

  /// The checks of import_state() alone (nothing changes).
  static void check_import(const std::vector<ParameterView<Scalar>>& params,
                           const std::vector<ParameterState<Scalar>>& state, const char* who) {
    if (params.size() != state.size())
      throw_invalid(who, "::set_state: ", state.size(), " states for ", params.size(),
                    " parameters");
    for (std::size_t k = 0; k < params.size(); ++k) {
      const auto& p = params[k];
      const auto& s = state[k];
      if (s.steps < 0)
        throw_invalid(who, "::set_state: parameter '", p.name, "' has a negative step count ",
                      s.steps);
      if (s.slots.empty() && s.steps == 0) continue;
      if (s.slots.size() != static_cast<std::size_t>(Slots))
        throw_invalid(who, "::set_state: parameter '", p.name, "' has ", s.slots.size(),
                      " state tensors, expected ", Slots);
      for (const auto& m : s.slots) {
        if (m.rows() != p.value.rows() || m.cols() != p.value.cols())
          throw_invalid(who, "::set_state: parameter '", p.name, "' is ",
                        shape(p.value.rows(), p.value.cols()), " but its state is ",
                        shape(m.rows(), m.cols()));
        check_finite(m, (std::string(who) + "::set_state: state of '" + p.name + "'").c_str());
      }
    }
  }

  void clear() { entries_.clear(); }
  std::size_t size() const { return entries_.size(); }

 private:
  std::unordered_map<const Scalar*, Entry> entries_;
};

/// Checks every gradient of a step before any update: the shapes agree, the values are finite,
/// and no parameter's memory is passed twice (it would be updated twice).
template <typename Scalar>
void check_step(const std::vector<ParameterView<Scalar>>& params, const char* who) {
  std::unordered_set<const Scalar*> seen;
  for (const auto& p : params) {
    if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
      throw_invalid(who, ": parameter '", p.name, "' has a ", shape(p.value.rows(), p.value.cols()),
                    " value but a ", shape(p.grad.rows(), p.grad.cols()), " gradient");
    if (!detail::all_finite(p.grad))
      throw_invalid(who, ": parameter '", p.name,
                    "' has a non-finite gradient (nothing was updated)");
    if (p.value.size() > 0 && !seen.insert(p.value.data()).second)
      throw_invalid(who, ": parameter '", p.name,
                    "' is passed twice (its memory appears more than once; nothing was updated)");
  }
}

/// Whether a hyperparameter such as lr or weight_decay is usable: finite and >= 0.
inline bool finite_nonnegative(double value) {
  return std::isfinite(value) && value >= 0;
}

/// std::invalid_argument "<who...>: <name> must be finite and >= 0, got <value>" unless
/// finite_nonnegative(value); `who` is concatenated only when it throws.
template <typename... Who>
void check_hyper(double value, const char* name, const Who&... who) {
  if (!finite_nonnegative(value))
    throw_invalid(who..., ": ", name, " must be finite and >= 0, got ", value);
}

/// \brief What Sgd and Adam share (internal): the options, the learning rate, and the
/// per-parameter slots with their export for checkpoints.
template <typename Scalar, typename Options_, int Slots>
class SlotOptimizer {
 public:
  using Options = Options_;

  /// Sets the learning rate (finite and >= 0, else std::invalid_argument and unchanged).
  void set_lr(double lr) {
    check_hyper(lr, "lr", Options::optimizer, "::set_lr");
    o_.lr = lr;
  }
  double lr() const { return o_.lr; }
  const Options& options() const { return o_; }
  /// Forgets the slots (momentum or moments) and the update counts.
  void reset() { state_.clear(); }

  /// The slots and update count of each of `params` (for checkpoints).
  std::vector<ParameterState<Scalar>> state(
      const std::vector<ParameterView<Scalar>>& params) const {
    return state_.export_state(params);
  }
  /// Restores what state() returned for the same parameters (validated first, all or nothing).
  void set_state(const std::vector<ParameterView<Scalar>>& params,
                 const std::vector<ParameterState<Scalar>>& state) {
    state_.import_state(params, state, Options::optimizer);
  }
  /// The checks of set_state() alone: std::invalid_argument as set_state() would throw it,
  /// nothing changes (checkpoint::Reader checks everything before it restores anything).
  void check_state(const std::vector<ParameterView<Scalar>>& params,
                   const std::vector<ParameterState<Scalar>>& state) const {
    SlotState<Scalar, Slots>::check_import(params, state, Options::optimizer);
  }

 protected:
  /// Checks `o` (Options::validate(), std::invalid_argument).
  explicit SlotOptimizer(const Options& o) : o_(o) { o_.validate(); }

  Options o_;
  SlotState<Scalar, Slots> state_;
};

}  // namespace detail

/// \brief Stochastic gradient descent with momentum and L2 weight decay, as PyTorch's SGD:
///   g <- grad + weight_decay p;  v <- momentum v + g (v <- g on a parameter's first step);
///   p <- p - lr (nesterov ? g + momentum v : v).
/// Hyperparameters are finite and >= 0 (std::invalid_argument otherwise).
struct SgdOptions {
  static constexpr const char* optimizer = "Sgd";  ///< how messages name the optimiser

  /// std::invalid_argument naming the values unless every hyperparameter is finite and >= 0.
  void validate() const {
    using detail::finite_nonnegative;
    if (!finite_nonnegative(lr) || !finite_nonnegative(momentum) ||
        !finite_nonnegative(weight_decay))
      detail::throw_invalid("Sgd: lr, momentum and weight_decay must be finite and >= 0, got lr=",
                            lr, " momentum=", momentum, " weight_decay=", weight_decay);
  }

  double lr = 1e-2;
  double momentum = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

template <typename Scalar>
class Sgd : public detail::SlotOptimizer<Scalar, SgdOptions, 1> {
  using Base = detail::SlotOptimizer<Scalar, SgdOptions, 1>;

 public:
  /// std::invalid_argument for bad hyperparameters (SgdOptions::validate()).
  explicit Sgd(const SgdOptions& o) : Base(o) {}

  /// One update of every parameter. All gradients (and momentum shapes) are checked before
  /// anything changes.
  void step(std::vector<ParameterView<Scalar>> params) {
    const Scalar lr = static_cast<Scalar>(this->o_.lr), mu = static_cast<Scalar>(this->o_.momentum),
                 wd = static_cast<Scalar>(this->o_.weight_decay);
    detail::check_step(params, "Sgd::step");
    if (mu != Scalar(0))
      for (const auto& p : params) this->state_.check(p);
    Matrix g;
    for (auto& p : params) {
      g = p.grad;
      if (wd != Scalar(0)) g += wd * p.value;
      if (mu != Scalar(0)) {
        auto& e = this->state_.get(p);
        Matrix& v = e.slot[0];
        if (e.steps++ == 0)
          v = g;
        else
          v = mu * v + g;
        if (this->o_.nesterov)
          g += mu * v;
        else
          g = v;
      }
      p.value -= lr * g;
    }
  }

 private:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
};

/// \brief Adam (Kingma & Ba) and AdamW (Loshchilov & Hutter), as PyTorch computes them:
///   g <- grad (+ weight_decay p for Adam);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
///   p <- p - lr weight_decay p (AdamW only);  p <- p - lr m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps).
/// t counts the updates of each parameter separately. Hyperparameters are validated
/// (std::invalid_argument): lr and weight_decay finite and >= 0, 0 <= beta1, beta2 < 1, eps
/// finite and > 0.
struct AdamOptions {
  static constexpr const char* optimizer = "Adam";  ///< how messages name the optimiser

  /// std::invalid_argument naming the values unless they are in the ranges above.
  void validate() const {
    using detail::finite_nonnegative;
    if (!finite_nonnegative(lr) || !(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1) ||
        !(finite_nonnegative(eps) && eps > 0) || !finite_nonnegative(weight_decay))
      detail::throw_invalid(
          "Adam: need finite lr >= 0, 0 <= beta1, beta2 < 1, finite eps > 0 and "
          "finite weight_decay >= 0; got lr=",
          lr, " beta1=", beta1, " beta2=", beta2, " eps=", eps, " weight_decay=", weight_decay);
  }

  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  ///< true: AdamW
};

template <typename Scalar>
class Adam : public detail::SlotOptimizer<Scalar, AdamOptions, 2> {
  using Base = detail::SlotOptimizer<Scalar, AdamOptions, 2>;

 public:
  /// std::invalid_argument for bad hyperparameters (AdamOptions::validate()).
  explicit Adam(const AdamOptions& o) : Base(o) {}
  /// AdamW with PyTorch's default weight decay 0.01 unless given.
  static Adam adamw(double lr, double weight_decay = 1e-2) {
    AdamOptions o;
    o.lr = lr;
    o.weight_decay = weight_decay;
    o.decoupled_weight_decay = true;
    return Adam(o);
  }

  /// One update of every parameter. All gradients (and moment shapes) are checked before
  /// anything changes.
  void step(std::vector<ParameterView<Scalar>> params) {
    detail::check_step(params, "Adam::step");
    for (const auto& p : params) this->state_.check(p);
    const double b1 = this->o_.beta1, b2 = this->o_.beta2;
    Matrix g;
    for (auto& p : params) {
      auto& e = this->state_.get(p);
      const auto t = static_cast<double>(++e.steps);
      g = p.grad;
      if (this->o_.weight_decay != 0.0) {
        if (this->o_.decoupled_weight_decay)
          p.value *= static_cast<Scalar>(1.0 - this->o_.lr * this->o_.weight_decay);
        else
          g += static_cast<Scalar>(this->o_.weight_decay) * p.value;
      }
      Matrix& m = e.slot[0];
      Matrix& v = e.slot[1];
      m = static_cast<Scalar>(b1) * m + static_cast<Scalar>(1 - b1) * g;
      v = static_cast<Scalar>(b2) * v + static_cast<Scalar>(1 - b2) * g.cwiseAbs2();
      const Scalar step = static_cast<Scalar>(this->o_.lr / (1.0 - std::pow(b1, t)));
      const Scalar bc2 = static_cast<Scalar>(std::sqrt(1.0 - std::pow(b2, t)));
      p.value.array() -=
          step * m.array() / (v.array().sqrt() / bc2 + static_cast<Scalar>(this->o_.eps));
    }
  }

 private:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
};

/// \brief Cosine learning-rate schedule with linear warm-up, as fine-tuning recipes use:
///   step < warmup: lr = base (step + 1) / warmup;
///   then lr = min + (base - min) (1 + cos(pi (step - warmup) / (total - warmup))) / 2,
///   and min after `total` steps. The schedule is a function of the step, so a resumed run
///   only needs its step count. Rates are finite, 0 <= min_lr <= base_lr; steps >= 0.
class CosineSchedule {
 public:
  CosineSchedule(double base_lr, std::int64_t warmup_steps, std::int64_t total_steps,
                 double min_lr = 0.0)
      : base_(base_lr), min_(min_lr), warmup_(warmup_steps), total_(total_steps) {
    if (warmup_steps < 0 || total_steps < 1 || warmup_steps > total_steps)
      detail::throw_invalid(
          "CosineSchedule: need 0 <= warmup_steps <= total_steps and total >= 1, got warmup=",
          warmup_steps, " total=", total_steps);
    if (!(base_lr >= 0) || !(min_lr >= 0) || min_lr > base_lr || !std::isfinite(base_lr))
      detail::throw_invalid("CosineSchedule: need finite 0 <= min_lr <= base_lr, got base=",
                            base_lr, " min=", min_lr);
  }
  /// The rate at `step` (>= 0; std::invalid_argument for a negative step).
  double operator()(std::int64_t step) const {
    if (step < 0) detail::throw_invalid("CosineSchedule: step must be >= 0, got ", step);
    if (step < warmup_) return base_ * static_cast<double>(step + 1) / static_cast<double>(warmup_);
    if (step >= total_ || total_ == warmup_) return min_;
    const double progress =
        static_cast<double>(step - warmup_) / static_cast<double>(total_ - warmup_);
    return min_ + (base_ - min_) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }

 private:
  double base_, min_;
  std::int64_t warmup_, total_;
};

}  // namespace hra
