// The data-size sweep of the Fashion-MNIST fine-tuning example (issue #16).
//
// For every target training-set size and every method ("arm"): the learning rate is chosen on a
// validation split held out of the target training images (a small grid around the method's
// default, one seed per grid point), then the method is trained with several seeds at that rate.
// Every run takes the same number of optimiser steps whatever the size (Adam, cosine schedule
// with linear warm-up, full batches drawn from one shuffle of the training set per pass), and
// after the adapters are merged into the weights it is measured on the whole target test set and
// on the whole source test set (what the network keeps of the task it was pretrained on).
//
// Generic over the network: Net needs forward(x) -> logits, backward(dlogits, false),
// add_regularizer(), predict(x, logits) const, merge(), unmerge(), size() and module_at(k) (an
// hra::Layer), as hra::Sequential has; the program supplies a builder per arm and seed.
#pragma once

#include <hra/hra.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlp.hpp"

namespace hra::experiments::sweep {

using Index = Eigen::Index;

/// One method as the sweep runs it.
struct Arm {
  std::string name;    ///< id in the CSVs, e.g. "lora" or "hra@12"
  std::string label;   ///< as in the tables, e.g. "LoRA r=8"
  std::string budget;  ///< "reference", "equal rank" or "equal parameters"
  Index rank = 0;      ///< adapter rank (0: none)
  bool trains = true;  ///< false for "no adaptation": measured once, never trained
  double default_lr = 0;
  double head_lr = 0;  ///< 0: the classifier head uses the arm's (tuned) rate
};

/// What the sweep does; every field is set by the example from its flags.
struct Settings {
  std::vector<Index> sizes;  ///< target training images per size, ascending
  std::int64_t steps = 0;    ///< optimiser steps of every run
  Index batch = 128;
  double warmup = 0.05;     ///< fraction of the steps spent warming up
  Index validation = 0;     ///< the pool's last images, held out for choosing the learning rate
  int grid_points = 3;      ///< learning rates per arm and size: half-decades around the default
  int edge_extensions = 1;  ///< extra half-decades tried beyond a best rate at the grid's edge
  int seeds = 3;
  std::uint64_t first_seed = 0;
  std::string out_dir;
};

/// \brief The images the sweep reads (one per column, labels alongside); not owned.
///
/// Size N trains on the pool's first N images. The last `Settings::validation` images of the
/// pool are the validation split: choosing the rate for size N trains on the first
/// min(N, pool - validation) images (the final runs' set whenever N leaves the split out).
template <typename Scalar>
struct DataView {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Matrix& pool_images;
  const std::vector<int>& pool_labels;
  const Matrix& target_test_images;
  const std::vector<int>& target_test_labels;
  const Matrix& source_test_images;
  const std::vector<int>& source_test_labels;
};

/// \brief The rate `offset` half-decades from `centre` on the ladder ... 0.01, 0.03, 0.1, 0.3 ...
///
/// The centre is first snapped to the nearest ladder value (3 stands for 10^0.5).
inline double ladder_rate(double centre, int offset) {
  const int p = static_cast<int>(std::lround(2.0 * std::log10(centre))) + offset;
  const int decade = p >= 0 ? p / 2 : -((-p + 1) / 2);  // floor(p / 2)
  return std::pow(10.0, decade) * (p - 2 * decade == 0 ? 1.0 : 3.0);
}

/// \brief The HRA rank whose trainable parameters come closest to LoRA's at `lora_rank`.
///
/// `layers` holds (d_in, d_out) of each adapted layer: LoRA trains r (d_in + d_out) per layer,
/// HRA r d_in (SPEC 1). Ties go to the smaller rank.
inline Index matching_hra_rank(const std::vector<std::pair<Index, Index>>& layers,
                               Index lora_rank) {
  Index lora = 0, hra_per_rank = 0, max_rank = std::numeric_limits<Index>::max();
  for (const auto& [d_in, d_out] : layers) {
    lora += lora_rank * (d_in + d_out);
    hra_per_rank += d_in;
    max_rank = std::min(max_rank, d_in);
  }
  if (hra_per_rank == 0) throw std::invalid_argument("matching_hra_rank: no adapted layers");
  Index best = 1;
  for (Index r = 1; r <= max_rank; ++r)
    if (std::abs(r * hra_per_rank - lora) < std::abs(best * hra_per_rank - lora)) best = r;
  return best;
}

/// Mean, sample standard deviation, minimum and maximum.
struct Stats {
  double mean = std::nan(""), sd = std::nan(""), min = std::nan(""), max = std::nan("");
  int n = 0;
};

inline Stats stats_of(const std::vector<double>& v) {
  Stats s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / s.n;
  s.min = *std::min_element(v.begin(), v.end());
  s.max = *std::max_element(v.begin(), v.end());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.sd = s.n > 1 ? std::sqrt(ss / (s.n - 1)) : 0.0;
  return s;
}

/// One training run (or, for an arm that does not train, one measurement).
struct Run {
  Index size = 0;       ///< the sweep's size this run belongs to
  std::size_t arm = 0;  ///< index into the arms
  std::string role;     ///< "tune" (choosing the rate) or "final"
  std::uint64_t seed = 0;
  double lr = 0, head_lr = 0;
  Index train_images = 0;
  std::int64_t steps = 0;            ///< steps taken (fewer when the loss stopped being finite)
  double val_acc = std::nan("");     ///< measured on tuning runs
  double target_acc = std::nan("");  ///< merged network, target test set
  double source_acc = std::nan("");  ///< merged network, source test set
  /// The same with the pretrained classifier head put back: what the adapted body keeps of
  /// the source task's features (every method retrains the head for the target).
  double source_acc_pretrained_head = std::nan("");
  double final_loss = std::nan("");  ///< mean training loss over the last 10% of the steps
  bool diverged = false;
  bool merge_ok = true;
  double merge_max_diff = 0;  ///< max |logits merged - unmerged| on the target test set
  double seconds = 0;         ///< training, wall clock
  std::string error;          ///< a run that threw: its message
};

/// One arm at one size, over its final runs.
struct Row {
  Index size = 0;
  std::size_t arm = 0;
  Index params = 0;                    ///< trainable parameters, classifier head included
  Index head_params = 0;               ///< of those, the classifier head's
  std::vector<double> grid, grid_val;  ///< rates tried and their validation accuracy
  double lr = 0;
  bool at_edge = false;  ///< the chosen rate is the grid's smallest or largest
  Index tune_images = 0;
  Stats target, source, source_pretrained_head;
  double seconds = 0;  ///< mean training time of a final run
  bool merge_ok = true;
};

namespace detail {

template <class Net, class Matrix>
Matrix predict_columns(const Net& net, const Matrix& images, Index begin, Index count) {
  constexpr Index chunk = 2500;
  Matrix logits, part;
  for (Index j = 0; j < count; j += chunk) {
    const Index n = std::min(chunk, count - j);
    net.predict(images.middleCols(begin + j, n), part);
    if (logits.size() == 0) logits.resize(part.rows(), count);
    logits.middleCols(j, n) = part;
  }
  return logits;
}

template <class Matrix>
double accuracy_of(const Matrix& logits, const std::vector<int>& labels, Index begin) {
  const std::vector<int> part(labels.begin() + begin, labels.begin() + begin + logits.cols());
  return hra::experiments::accuracy<typename Matrix::Scalar>(logits, part);
}

struct TrainOutcome {
  std::int64_t steps = 0;
  double final_loss = std::nan("");
  bool diverged = false;
  double seconds = 0;
};

// Adam and a cosine schedule over exactly s.steps steps of min(batch, n) images each, from a
// stream of shuffles of the first n images (pass k shuffled by seed and k, as the main job does).
// The head and the body have their own optimisers (their rates may differ), one schedule shape.
template <class Net, class Matrix>
TrainOutcome train_steps(Net& net, const Matrix& images, const std::vector<int>& labels, Index n,
                         double lr, double head_lr, const Settings& s, std::uint64_t seed) {
  using Scalar = typename Matrix::Scalar;
  const std::int64_t total = s.steps;
  const auto warmup =
      std::min<std::int64_t>(total, static_cast<std::int64_t>(std::ceil(s.warmup * total)));
  hra::CosineSchedule schedule(lr, warmup, total), head_schedule(head_lr, warmup, total);
  hra::Adam<Scalar> adam({lr}), head_adam({head_lr});
  const std::size_t head = net.size() - 1;
  const Index bn = std::min(s.batch, n);
  const std::int64_t tail = std::max<std::int64_t>(1, total / 10);

  std::vector<Index> order(static_cast<std::size_t>(n));
  std::size_t next = order.size();
  std::uint64_t pass = 0;
  Matrix x(images.rows(), bn), grad;
  std::vector<int> y(static_cast<std::size_t>(bn));
  TrainOutcome out;
  double tail_sum = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::int64_t step = 0; step < total; ++step) {
    for (Index j = 0; j < bn; ++j) {
      if (next == order.size()) {
        std::iota(order.begin(), order.end(), Index{0});
        std::mt19937_64 rng(seed * 1000003u + ++pass);
        for (std::size_t k = order.size(); k > 1; --k)
          std::swap(order[k - 1], order[static_cast<std::size_t>(rng() % k)]);
        next = 0;
      }
      const Index src = order[next++];
      x.col(j) = images.col(src);
      y[static_cast<std::size_t>(j)] = labels[static_cast<std::size_t>(src)];
    }
    const Matrix& logits = net.forward(x);
    double loss = hra::experiments::softmax_cross_entropy<Scalar>(logits, y, &grad);
    net.backward(grad, /*compute_input_gradient=*/false);
    loss += net.add_regularizer();
    if (!std::isfinite(loss)) {
      out.diverged = true;
      break;
    }
    std::vector<hra::ParameterView<Scalar>> body;
    for (std::size_t k = 0; k < head; ++k)
      for (auto& p : net.module_at(k).parameters()) body.push_back(p);
    adam.set_lr(schedule(step));
    adam.step(body);
    head_adam.set_lr(head_schedule(step));
    head_adam.step(net.module_at(head).parameters());
    if (step >= total - tail) tail_sum += loss;
    out.steps = step + 1;
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!out.diverged) out.final_loss = tail_sum / static_cast<double>(tail);
  return out;
}

inline std::string percent(double fraction) {
  if (!std::isfinite(fraction)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", 100 * fraction);
  return buf;
}

inline std::string mean_sd(const Stats& s) {
  if (s.n == 0 || !std::isfinite(s.mean)) return "-";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.2f ± %.2f", 100 * s.mean, 100 * s.sd);
  return buf;
}

inline std::string rate(double lr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", lr);
  return buf;
}

inline std::string with_thousands(Index v) {
  std::string digits = std::to_string(v), out;
  for (std::size_t k = 0; k < digits.size(); ++k) {
    if (k > 0 && (digits.size() - k) % 3 == 0) out += ',';
    out += digits[k];
  }
  return out;
}

inline std::ofstream open_for_writing(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  return out;
}

}  // namespace detail

/// \brief Trains and measures one run; a run that throws is recorded with its message.
///
/// The network is merged before it is measured (so the accuracies are those of the plain
/// network a user would ship); the merged logits must match the unmerged ones on the target
/// test set (merge_ok), and the validation accuracy of a tuning run is that of the same network.
template <class Net>
using Builder = std::function<Net(std::size_t arm, std::uint64_t seed)>;
/// Puts the pretrained classifier head back into a (merged) network.
template <class Net>
using HeadRestorer = std::function<void(Net&)>;

template <class Net, typename Scalar>
Run run_one(const Builder<Net>& build, const HeadRestorer<Net>& restore_head,
            const std::vector<Arm>& arms, std::size_t arm, Index size, const std::string& role,
            double lr, Index train_images, bool measure_validation, bool measure_test,
            std::uint64_t seed, const DataView<Scalar>& d, const Settings& s) {
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Arm& a = arms[arm];
  Run r;
  r.size = size;
  r.arm = arm;
  r.role = role;
  r.seed = seed;
  r.lr = a.trains ? lr : 0.0;
  r.head_lr = a.trains ? (a.head_lr > 0 ? a.head_lr : lr) : 0.0;
  r.train_images = a.trains ? train_images : 0;
  try {
    Net net = build(arm, seed);
    if (a.trains) {
      const auto t = detail::train_steps(net, d.pool_images, d.pool_labels, train_images, r.lr,
                                         r.head_lr, s, seed);
      r.steps = t.steps;
      r.final_loss = t.final_loss;
      r.diverged = t.diverged;
      r.seconds = t.seconds;
    }
    const Index pool = d.pool_images.cols();
    if (measure_validation)
      r.val_acc = detail::accuracy_of(
          detail::predict_columns(net, d.pool_images, pool - s.validation, s.validation),
          d.pool_labels, pool - s.validation);
    if (measure_test) {
      const Index n_test = d.target_test_images.cols();
      const Matrix unmerged = detail::predict_columns(net, d.target_test_images, 0, n_test);
      if (!r.diverged) net.merge();
      const Matrix merged = detail::predict_columns(net, d.target_test_images, 0, n_test);
      r.target_acc = detail::accuracy_of(merged, d.target_test_labels, 0);
      r.source_acc = detail::accuracy_of(
          detail::predict_columns(net, d.source_test_images, 0, d.source_test_images.cols()),
          d.source_test_labels, 0);
      if (restore_head) {
        restore_head(net);
        r.source_acc_pretrained_head = detail::accuracy_of(
            detail::predict_columns(net, d.source_test_images, 0, d.source_test_images.cols()),
            d.source_test_labels, 0);
      }
      if (!r.diverged) {
        r.merge_max_diff = static_cast<double>((merged - unmerged).cwiseAbs().maxCoeff());
        const double tol =
            1e-3 * std::max(1.0, static_cast<double>(unmerged.cwiseAbs().maxCoeff()));
        // As the comparison's check: only near-ties may flip (hra::experiments::same_predictions).
        r.merge_ok =
            r.merge_max_diff < tol && same_predictions(unmerged, merged, 2 * r.merge_max_diff);
      }
    }
  } catch (const std::exception& e) {
    r.error = e.what();
    r.diverged = true;
  }
  std::printf(
      "  [%6ld %-22s %-5s seed %llu lr %-6s] val %6s  target %6s  source %6s (old head %6s)  "
      "%5.1f s%s%s\n",
      static_cast<long>(size), a.label.c_str(), role.c_str(), static_cast<unsigned long long>(seed),
      a.trains ? detail::rate(r.lr).c_str() : "-", detail::percent(r.val_acc).c_str(),
      detail::percent(r.target_acc).c_str(), detail::percent(r.source_acc).c_str(),
      detail::percent(r.source_acc_pretrained_head).c_str(), r.seconds,
      r.diverged ? "  DIVERGED" : "", r.error.empty() ? "" : ("  error: " + r.error).c_str());
  std::fflush(stdout);
  return r;
}

/// Everything the sweep measured.
struct Outcome {
  std::vector<Run> runs;
  std::vector<Row> rows;  ///< size-major, arms in their order
  double seconds = 0;     ///< wall clock of the whole sweep
};

/// \brief Runs the sweep (see the top of this file) and returns every run and every row.
///
/// `build(arm, seed)` returns a fresh network set up for arms[arm] on copies of the pretrained
/// weights, its adapters initialised from `seed`; `restore_head(net)`, when given, writes the
/// pretrained classifier head into a network (for Run::source_acc_pretrained_head).
template <class Net, typename Scalar>
Outcome run(const std::vector<Arm>& arms, const Builder<Net>& build,
            const HeadRestorer<Net>& restore_head, const DataView<Scalar>& d, const Settings& s) {
  const Index pool = d.pool_images.cols();
  if (s.sizes.empty()) throw std::invalid_argument("sweep: no sizes");
  if (s.validation < 1 || s.validation >= pool)
    throw std::invalid_argument("sweep: the validation split (" + std::to_string(s.validation) +
                                " images) must leave training images in the pool of " +
                                std::to_string(pool));
  for (Index n : s.sizes)
    if (n < 1 || n > pool)
      throw std::invalid_argument("sweep: size " + std::to_string(n) + " is outside 1.." +
                                  std::to_string(pool) + " (the target training images available)");
  if (s.steps < 1) throw std::invalid_argument("sweep: need at least one step per run");
  if (s.grid_points < 1) throw std::invalid_argument("sweep: need at least one learning rate");

  const auto start = std::chrono::steady_clock::now();
  Outcome out;
  std::vector<Run> frozen(arms.size());  // arms that do not train: measured once
  std::vector<bool> frozen_done(arms.size(), false);
  for (Index size : s.sizes) {
    const Index tune_images = std::min(size, pool - s.validation);
    const bool tune_is_final = tune_images == size;
    std::printf("\nTarget training images: %ld (rates chosen on %ld of them, validation %ld)\n",
                static_cast<long>(size), static_cast<long>(tune_images),
                static_cast<long>(s.validation));
    for (std::size_t arm = 0; arm < arms.size(); ++arm) {
      const Arm& a = arms[arm];
      Row row;
      row.size = size;
      row.arm = arm;
      row.tune_images = tune_images;
      {
        Net probe = build(arm, s.first_seed);
        row.params = probe.num_trainable_parameters();
        row.head_params = probe.module_at(probe.size() - 1).num_trainable_parameters();
      }
      std::vector<Run> finals;
      if (!a.trains) {
        if (!frozen_done[arm]) {
          frozen[arm] = run_one<Net, Scalar>(build, restore_head, arms, arm, size, "final", 0, 0,
                                             false, true, s.first_seed, d, s);
          frozen_done[arm] = true;
          out.runs.push_back(frozen[arm]);
        }
        finals.push_back(frozen[arm]);
      } else {
        // Choose the rate: one run per grid point, seed first_seed, best validation accuracy
        // (the smaller rate on a tie). A best rate at the grid's edge extends the grid by a
        // half-decade beyond it, up to Settings::edge_extensions times.
        std::vector<std::pair<int, Run>> tried;  // (half-decades from the default, run), sorted
        auto try_rate = [&](int offset) {
          Run r = run_one<Net, Scalar>(build, restore_head, arms, arm, size, "tune",
                                       ladder_rate(a.default_lr, offset), tune_images, true,
                                       tune_is_final, s.first_seed, d, s);
          const auto at = std::find_if(tried.begin(), tried.end(),
                                       [&](const auto& t) { return t.first > offset; });
          tried.insert(at, {offset, std::move(r)});
        };
        auto best_index = [&] {
          std::size_t best = 0;
          auto score = [](const Run& r) { return std::isfinite(r.val_acc) ? r.val_acc : -1.0; };
          for (std::size_t k = 1; k < tried.size(); ++k)
            if (score(tried[k].second) > score(tried[best].second)) best = k;
          return best;
        };
        const int lo = -(s.grid_points - 1) / 2;
        for (int k = 0; k < s.grid_points; ++k) try_rate(lo + k);
        for (int extended = 0; extended < s.edge_extensions && tried.size() > 1; ++extended) {
          const std::size_t best = best_index();
          if (best == 0)
            try_rate(tried.front().first - 1);
          else if (best + 1 == tried.size())
            try_rate(tried.back().first + 1);
          else
            break;
        }
        const std::size_t best = best_index();
        std::vector<Run> tuning;
        for (auto& t : tried) {
          row.grid.push_back(t.second.lr);
          row.grid_val.push_back(t.second.val_acc);
          tuning.push_back(t.second);
        }
        row.lr = tuning[best].lr;
        row.at_edge = tuning.size() > 1 && (best == 0 || best + 1 == tuning.size());
        out.runs.insert(out.runs.end(), tuning.begin(), tuning.end());
        // The tuning run of the chosen rate is the first seed's final run when it trained on
        // the same images; the other seeds follow.
        if (tune_is_final) finals.push_back(tuning[best]);
        for (int k = tune_is_final ? 1 : 0; k < s.seeds; ++k) {
          finals.push_back(run_one<Net, Scalar>(
              build, restore_head, arms, arm, size, "final", row.lr, size, false, true,
              s.first_seed + static_cast<std::uint64_t>(k), d, s));
          out.runs.push_back(finals.back());
        }
      }
      std::vector<double> target, source, source_head;
      for (const auto& r : finals) {
        target.push_back(r.target_acc);
        source.push_back(r.source_acc);
        if (std::isfinite(r.source_acc_pretrained_head))
          source_head.push_back(r.source_acc_pretrained_head);
        row.seconds += r.seconds / static_cast<double>(finals.size());
        row.merge_ok = row.merge_ok && r.merge_ok && r.error.empty();
      }
      row.target = stats_of(target);
      row.source = stats_of(source);
      row.source_pretrained_head = stats_of(source_head);
      out.rows.push_back(row);
      std::printf("  => %s at %ld images: target %s %%, source %s %% (lr %s%s)\n", a.label.c_str(),
                  static_cast<long>(size), detail::mean_sd(row.target).c_str(),
                  detail::mean_sd(row.source).c_str(),
                  a.trains ? detail::rate(row.lr).c_str() : "-",
                  row.at_edge ? ", at the grid's edge" : "");
      std::fflush(stdout);
    }
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

/// Every run, one row each (tuning runs too; a tuning run whose images were the final set also
/// counts as the first seed's final run in sweep_summary.csv).
inline void write_runs_csv(const std::string& path, const Outcome& o,
                           const std::vector<Arm>& arms) {
  std::ofstream out = detail::open_for_writing(path);
  out << "size,method,label,budget,rank,role,seed,lr,head_lr,train_images,steps,val_acc,"
         "target_acc,source_acc,source_acc_pretrained_head,final_train_loss,diverged,merge_ok,"
         "merge_max_abs_diff,"
         "train_seconds,error\n";
  for (const auto& r : o.runs) {
    const Arm& a = arms[r.arm];
    out << r.size << ',' << a.name << ",\"" << a.label << "\"," << a.budget << ',' << a.rank << ','
        << r.role << ',' << r.seed << ',' << r.lr << ',' << r.head_lr << ',' << r.train_images
        << ',' << r.steps << ',' << r.val_acc << ',' << r.target_acc << ',' << r.source_acc << ','
        << r.source_acc_pretrained_head << ',' << r.final_loss << ',' << (r.diverged ? "yes" : "no")
        << ',' << (r.merge_ok ? "yes" : "no") << ',' << r.merge_max_diff << ',' << r.seconds
        << ",\"" << r.error << "\"\n";
  }
}

/// One row per arm and size: the final runs' mean and spread, the grid and the chosen rate.
inline void write_summary_csv(const std::string& path, const Outcome& o,
                              const std::vector<Arm>& arms, const Settings& s) {
  std::ofstream out = detail::open_for_writing(path);
  out << "size,method,label,budget,rank,trainable_params,adapter_params,steps,batch,runs,"
         "target_acc_mean,target_acc_std,target_acc_min,target_acc_max,source_acc_mean,"
         "source_acc_std,source_acc_min,source_acc_max,source_acc_pretrained_head_mean,"
         "source_acc_pretrained_head_std,lr,lr_at_grid_edge,lr_grid,val_acc_grid,"
         "tune_images,validation_images,train_seconds_mean,merge_ok\n";
  for (const auto& r : o.rows) {
    const Arm& a = arms[r.arm];
    std::string grid, val;
    for (std::size_t k = 0; k < r.grid.size(); ++k) {
      grid += (k ? ";" : "") + detail::rate(r.grid[k]);
      val += (k ? ";" : "") + detail::rate(r.grid_val[k]);
    }
    out << r.size << ',' << a.name << ",\"" << a.label << "\"," << a.budget << ',' << a.rank << ','
        << r.params << ',' << r.params - r.head_params << ',' << (a.trains ? s.steps : 0) << ','
        << s.batch << ',' << r.target.n << ',' << r.target.mean << ',' << r.target.sd << ','
        << r.target.min << ',' << r.target.max << ',' << r.source.mean << ',' << r.source.sd << ','
        << r.source.min << ',' << r.source.max << ',' << r.source_pretrained_head.mean << ','
        << r.source_pretrained_head.sd << ',' << (a.trains ? r.lr : 0) << ','
        << (r.at_edge ? "yes" : "no") << ',' << grid << ',' << val << ',' << r.tune_images << ','
        << s.validation << ',' << r.seconds << ',' << (r.merge_ok ? "yes" : "no") << '\n';
  }
}

/// \brief The tables in Markdown: target accuracy, source accuracy kept and the chosen rates,
/// one row per arm and one column per size (mean ± sample sd over the seeds, in %).
inline std::string markdown_tables(const Outcome& o, const std::vector<Arm>& arms,
                                   const Settings& s) {
  std::ostringstream md;
  auto header = [&](const std::string& first, bool params) {
    md << "| " << first << (params ? " | trainable (adapter) params" : "");
    for (Index n : s.sizes) md << " | " << detail::with_thousands(n);
    md << " |\n|---" << (params ? "|---:" : "");
    for (std::size_t k = 0; k < s.sizes.size(); ++k) md << "|---:";
    md << "|\n";
  };
  auto find = [&](std::size_t arm, Index size) -> const Row* {
    for (const auto& r : o.rows)
      if (r.arm == arm && r.size == size) return &r;
    return nullptr;
  };
  auto table = [&](const std::string& title, bool params, auto cell) {
    md << "\n" << title << "\n\n";
    header("method", params);
    for (std::size_t arm = 0; arm < arms.size(); ++arm) {
      const Row* first = find(arm, s.sizes.front());
      if (!first) continue;
      md << "| " << arms[arm].label;
      if (arms[arm].budget == "equal parameters") md << " (= params)";
      if (params)
        md << " | " << detail::with_thousands(first->params) << " ("
           << detail::with_thousands(first->params - first->head_params) << ")";
      for (Index n : s.sizes) {
        const Row* r = find(arm, n);
        md << " | " << (r ? cell(*r) : std::string("-"));
      }
      md << " |\n";
    }
  };
  table("Target test accuracy (%, rot90 test set, mean ± sd over the seeds):", true,
        [](const Row& r) { return detail::mean_sd(r.target); });
  table("Source test accuracy kept after adaptation and merge (%, unshifted test set):", false,
        [](const Row& r) { return detail::mean_sd(r.source); });
  table(
      "Source test accuracy of the adapted body with the pretrained head put back (%, after "
      "merge):",
      false, [](const Row& r) { return detail::mean_sd(r.source_pretrained_head); });
  table("Learning rate chosen on the validation split (* = at the grid's edge):", false,
        [&](const Row& r) {
          if (!arms[r.arm].trains) return std::string("-");
          return detail::rate(r.lr) + (r.at_edge ? "*" : "");
        });
  return md.str();
}

}  // namespace hra::experiments::sweep
