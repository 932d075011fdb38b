// Optimisers that walk any layer's ParameterViews, and a learning-rate schedule.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "detail/checks.hpp"
#include "layer.hpp"

namespace hra {

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
  void clear() { entries_.clear(); }
  std::size_t size() const { return entries_.size(); }

 private:
  std::unordered_map<const Scalar*, Entry> entries_;
};

template <typename Scalar>
void check_gradient(const ParameterView<Scalar>& p, const char* who) {
  if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
    throw_invalid(who, ": parameter '", p.name, "' has a ", shape(p.value.rows(), p.value.cols()),
                  " value but a ", shape(p.grad.rows(), p.grad.cols()), " gradient");
  if (!p.grad.allFinite())
    throw_invalid(who, ": parameter '", p.name,
                  "' has a non-finite gradient (nothing was updated)");
}

}  // namespace detail

/// \brief Stochastic gradient descent with momentum and L2 weight decay, as PyTorch's SGD:
///   g <- grad + weight_decay p;  v <- momentum v + g (v <- g on a parameter's first step);
///   p <- p - lr (nesterov ? g + momentum v : v).
template <typename Scalar>
class Sgd {
 public:
  struct Options {
    double lr = 1e-2;
    double momentum = 0.0;
    double weight_decay = 0.0;
    bool nesterov = false;
  };
  explicit Sgd(const Options& o) : o_(o) {
    if (!(o.lr >= 0) || !(o.momentum >= 0) || !(o.weight_decay >= 0))
      detail::throw_invalid("Sgd: lr, momentum and weight_decay must be >= 0, got lr=", o.lr,
                            " momentum=", o.momentum, " weight_decay=", o.weight_decay);
  }

  /// One update of every parameter. All gradients (and momentum shapes) are checked before
  /// anything changes.
  void step(std::vector<ParameterView<Scalar>> params) {
    const Scalar lr = static_cast<Scalar>(o_.lr), mu = static_cast<Scalar>(o_.momentum),
                 wd = static_cast<Scalar>(o_.weight_decay);
    for (const auto& p : params) {
      detail::check_gradient(p, "Sgd::step");
      if (mu != Scalar(0)) state_.check(p);
    }
    Matrix g;
    for (auto& p : params) {
      g = p.grad;
      if (wd != Scalar(0)) g += wd * p.value;
      if (mu != Scalar(0)) {
        auto& e = state_.get(p);
        Matrix& v = e.slot[0];
        if (e.steps++ == 0)
          v = g;
        else
          v = mu * v + g;
        if (o_.nesterov)
          g += mu * v;
        else
          g = v;
      }
      p.value -= lr * g;
    }
  }
  void set_lr(double lr) { o_.lr = lr; }
  double lr() const { return o_.lr; }
  /// Forgets the momentum buffers.
  void reset() { state_.clear(); }

 private:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  Options o_;
  detail::SlotState<Scalar, 1> state_;
};

/// \brief Adam (Kingma & Ba) and AdamW (Loshchilov & Hutter), as PyTorch computes them:
///   g <- grad (+ weight_decay p for Adam);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
///   p <- p - lr weight_decay p (AdamW only);  p <- p - lr m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps).
/// t counts the updates of each parameter separately.
template <typename Scalar>
class Adam {
 public:
  struct Options {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;
    bool decoupled_weight_decay = false;  ///< true: AdamW
  };
  explicit Adam(const Options& o) : o_(o) {
    if (!(o.lr >= 0) || !(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1) ||
        !(o.eps > 0) || !(o.weight_decay >= 0))
      detail::throw_invalid(
          "Adam: need lr >= 0, 0 <= beta1, beta2 < 1, eps > 0, weight_decay >= 0; got lr=", o.lr,
          " beta1=", o.beta1, " beta2=", o.beta2, " eps=", o.eps, " weight_decay=", o.weight_decay);
  }
  /// AdamW with PyTorch's default weight decay 0.01 unless given.
  static Adam adamw(double lr, double weight_decay = 1e-2) {
    Options o;
    o.lr = lr;
    o.weight_decay = weight_decay;
    o.decoupled_weight_decay = true;
    return Adam(o);
  }

  /// One update of every parameter. All gradients (and moment shapes) are checked before
  /// anything changes.
  void step(std::vector<ParameterView<Scalar>> params) {
    for (const auto& p : params) {
      detail::check_gradient(p, "Adam::step");
      state_.check(p);
    }
    const double b1 = o_.beta1, b2 = o_.beta2;
    Matrix g;
    for (auto& p : params) {
      auto& e = state_.get(p);
      const auto t = static_cast<double>(++e.steps);
      g = p.grad;
      if (o_.weight_decay != 0.0) {
        if (o_.decoupled_weight_decay)
          p.value *= static_cast<Scalar>(1.0 - o_.lr * o_.weight_decay);
        else
          g += static_cast<Scalar>(o_.weight_decay) * p.value;
      }
      Matrix& m = e.slot[0];
      Matrix& v = e.slot[1];
      m = static_cast<Scalar>(b1) * m + static_cast<Scalar>(1 - b1) * g;
      v = static_cast<Scalar>(b2) * v + static_cast<Scalar>(1 - b2) * g.cwiseAbs2();
      const Scalar step = static_cast<Scalar>(o_.lr / (1.0 - std::pow(b1, t)));
      const Scalar bc2 = static_cast<Scalar>(std::sqrt(1.0 - std::pow(b2, t)));
      p.value.array() -= step * m.array() / (v.array().sqrt() / bc2 + static_cast<Scalar>(o_.eps));
    }
  }
  void set_lr(double lr) { o_.lr = lr; }
  double lr() const { return o_.lr; }
  const Options& options() const { return o_; }
  /// Forgets the moment estimates and step counts.
  void reset() { state_.clear(); }

 private:
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  Options o_;
  detail::SlotState<Scalar, 2> state_;
};

/// \brief Cosine learning-rate schedule with linear warm-up, as fine-tuning recipes use:
///   step < warmup: lr = base (step + 1) / warmup;
///   then lr = min + (base - min) (1 + cos(pi (step - warmup) / (total - warmup))) / 2,
///   and min after `total` steps.
class CosineSchedule {
 public:
  CosineSchedule(double base_lr, std::int64_t warmup_steps, std::int64_t total_steps,
                 double min_lr = 0.0)
      : base_(base_lr), min_(min_lr), warmup_(warmup_steps), total_(total_steps) {
    if (warmup_steps < 0 || total_steps < 1 || warmup_steps > total_steps)
      detail::throw_invalid(
          "CosineSchedule: need 0 <= warmup_steps <= total_steps and total >= 1, got warmup=",
          warmup_steps, " total=", total_steps);
    if (!(base_lr >= 0) || !(min_lr >= 0) || min_lr > base_lr)
      detail::throw_invalid("CosineSchedule: need 0 <= min_lr <= base_lr, got base=", base_lr,
                            " min=", min_lr);
  }
  double operator()(std::int64_t step) const {
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
