// Fine-tuning a pretrained MLP and a small CNN on a shifted Fashion-MNIST task: no adaptation,
// head only, full fine-tuning, LoRA and HRA (several variants), on the same data with the same
// budget.
//
//   finetune_fashion_mnist [--epochs N] [--rank R] [--lambda L] [--seed S] [--out DIR] ...
//   (--help lists every flag)
//
// 1. Pretrain a 784-256-256-10 MLP on the source task (the first half of the Fashion-MNIST
//    training images, as they are) and save it to DIR/pretrained_mlp.safetensors; a later run
//    with the same settings loads it instead.
// 2. The target task is the same ten classes on the other half of the training images, shifted
//    (by default rotated by 90 degrees), tested on the shifted test set.
// 3. Every method starts from the pretrained weights and trains with Adam, a cosine schedule
//    with linear warm-up, the same epochs, batches and batch order; the classifier head is
//    trained by every method except "none" (as PEFT's modules_to_save does), the two hidden
//    layers are frozen (head), trained (full) or adapted (LoRA, HRA). Each method runs with
//    several seeds (adapter initialisation and batch order).
// 4. For each: target test accuracy (mean and spread over the seeds), trainable parameters,
//    training time, and whether the merged model (adapters folded into W) reproduces the
//    unmerged predictions.
// 5. Then the same for a CNN (--arch; conv 1->8 3x3 stride 2, conv 8->16 3x3 stride 2, linear
//    784->10, saved as DIR/pretrained_cnn.safetensors) with methods none, head, full, LoRA,
//    HRA and HRA-GS, every convolution and the hidden linear maps adapted alike; it has its
//    own (fewer) epochs, --cnn-epochs and --cnn-pretrain-epochs, to fit the time budget.
// Writes DIR/finetune_summary.csv (one row per method), DIR/finetune_results.csv (one per run)
// and DIR/finetune_curves.csv (loss and accuracy during training), DIR/finetune_cnn_*.csv the
// same for the CNN; scripts/plot_finetune.py DIR draws DIR/finetune_accuracy_vs_params.png
// from them.
#include <hra/hra.hpp>
#include <hra/io/safetensors.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <hra/io/checkpoint.hpp>
#include "common/architecture.hpp"
#include "common/distributed.hpp"
#include "common/fashion_mnist.hpp"
#include "common/mlp.hpp"
#include "common/shifts.hpp"
#include "common/sweep.hpp"

namespace {

using Scalar = float;
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
using Index = Eigen::Index;
using Clock = std::chrono::steady_clock;
using Net = hra::Sequential<Scalar>;
using Weights = hra::experiments::MlpWeights<Scalar>;

// ---------------------------------------------------------------------------------------------
// Settings

struct Config {
  std::string data_dir = hra::experiments::default_fashion_mnist_dir();
  std::string out_dir = "results";
  std::string shift = "rot90";
  std::vector<std::string> methods;  // empty: all
  int epochs = 8;
  int pretrain_epochs = 10;
  Index batch = 128;
  Index hidden = 256;
  Index rank = 8;
  Index small_rank = 2;
  double lambda = 1e-2;
  std::uint64_t seed = 0;
  int seeds = 3;                     // fine-tuning runs per method, with seeds seed, seed + 1, ...
  Index train_limit = 0;             // caps the source and the target training sets (0: no cap)
  Index target_train = 0;            // target training images (0: the whole target half)
  Index validation = 0;              // held out of the target half and used instead of the test set
  double warmup = 0.05;              // fraction of the steps spent warming up
  std::map<std::string, double> lr;  // per-method overrides
  double head_lr = 0;                // 0: each method's own learning rate
  // --sweep (examples/common/sweep.hpp): sizes, a fixed step budget, rates chosen per size.
  bool sweep = false;
  std::vector<Index> sweep_sizes = {300, 1000, 3000, 10000, 30000};
  std::int64_t sweep_steps = 400;
  Index sweep_validation = 5000;
  int sweep_grid = 3;
  int sweep_extend = 1;
  // Architectures, run one after the other; `arch` is the one a per-architecture copy runs
  // (run() overrides epochs, pretrain_epochs and methods in the CNN's copy).
  std::vector<std::string> archs = {"mlp", "cnn"};
  std::string arch = "mlp";
  Index cnn_channels1 = 8, cnn_channels2 = 16;
  int cnn_epochs = 3;
  int cnn_pretrain_epochs = 3;
  bool methods_given = false;         // --methods was given (else each architecture's default list)
  std::string checkpoint_dir;         // --checkpoint: empty for none
  std::int64_t checkpoint_every = 0;  // steps between checkpoints (0: after each epoch)
  bool resume = false;
  std::int64_t stop_after_steps = 0;  // (testing) save a checkpoint and exit after N steps
  std::int64_t kill_after_saves = 0;  // (testing) SIGKILL itself right after its Nth save
  bool mpi = false;                   // shard every batch over the MPI ranks
};

const char* const all_methods[] = {"none", "head",    "full",   "lora",
                                   "hra",  "hra-reg", "hra-gs", "hra-small"};
// The CNN's default comparison (issue 13): the regulariser and the small rank are MLP studies.
const char* const cnn_methods[] = {"none", "head", "full", "lora", "hra", "hra-gs"};

void print_usage(std::FILE* to) {
  const Config d;
  std::fprintf(
      to,
      "usage: finetune_fashion_mnist [flags]\n"
      "  --data DIR           Fashion-MNIST IDX files (default %s)\n"
      "  --out DIR            results folder (default %s)\n"
      "  --epochs N           fine-tuning epochs per method (default %d)\n"
      "  --pretrain-epochs N  epochs on the source task (default %d)\n"
      "  --rank R             LoRA / HRA rank (default %ld)\n"
      "  --small-rank R       rank of the smaller HRA run 'hra-small' (default %ld)\n"
      "  --lambda L           orthogonality regulariser of 'hra-reg' (default %g)\n"
      "  --seed S             first seed (default %llu); the pretrained network uses S\n"
      "  --seeds N            fine-tuning runs per method, seeds S..S+N-1 (default %d): adapter\n"
      "                       initialisation and batch order change, the data do not\n"
      "  --methods LIST       comma-separated subset of: none,head,full,lora,hra,hra-reg,\n"
      "                       hra-gs,hra-small (default: all)\n"
      "  --lr METHOD=LR,...   override a method's learning rate (e.g. --lr hra=0.02)\n"
      "  --head-lr LR         learning rate of the classifier head for every method\n"
      "                       (default: the method's own)\n"
      "  --shift NAME         target shift: %s (default %s)\n"
      "  --batch N            batch size (default %ld)\n"
      "  --hidden N           hidden units per layer (default %ld)\n"
      "  --train-limit N      use at most N source and N target training images (quick runs)\n"
      "  --target-train N     use N target training images (default: all 30000)\n"
      "  --validation N       hold N target training images out and report accuracy on them\n"
      "                       instead of the test set (for tuning learning rates)\n"
      "  --sweep              instead of one comparison, the data-size sweep: every method at\n"
      "                       each target training size for the same number of steps, its\n"
      "                       learning rate chosen per size on a validation split (--lr moves\n"
      "                       the grid's centre), target and source test accuracy after merge;\n"
      "                       writes DIR/sweep_*.csv and DIR/sweep_tables.md\n"
      "  --sweep-sizes LIST   target training images per size (default 300,1000,3000,10000,\n"
      "                       30000)\n"
      "  --sweep-steps N      optimiser steps of every run (default %lld: at batch 128, 170\n"
      "                       epochs of 300 images, 17 of 3000, 1.7 of 30000)\n"
      "  --sweep-validation N the last N target training images choose the rates (default %ld)\n"
      "  --sweep-grid N       learning rates tried per method and size, half-decades around\n"
      "                       the method's default (default %d)\n"
      "  --sweep-extend N     when the best rate is at the grid's edge, try up to N more\n"
      "                       half-decades beyond it (default %d)\n"
      "  --arch LIST          networks to compare, one after the other: mlp (784-H-H-10), cnn\n"
      "                       (conv 1->C1 3x3/2, conv C1->C2 3x3/2, linear C2*49->10)\n"
      "                       (default mlp,cnn)\n"
      "  --cnn-epochs N       fine-tuning epochs of the CNN (default %d; --epochs is the MLP's)\n"
      "  --cnn-pretrain-epochs N  the CNN's epochs on the source task (default %d)\n"
      "  --cnn-channels C1,C2 the CNN's channels (default %ld,%ld); its methods default to\n"
      "                       none,head,full,lora,hra,hra-gs (--methods applies to both)\n"
      "  --checkpoint DIR     save the whole training state into DIR (replaced atomically)\n"
      "                       after every epoch and every finished run\n"
      "  --checkpoint-every K save it every K optimiser steps instead of every epoch\n"
      "  --resume             continue from the checkpoint in DIR (a fresh start if there is\n"
      "                       none); the results equal an uninterrupted run's bit for bit\n"
      "%s"
      "  --help               this text\n",
      d.data_dir.c_str(), d.out_dir.c_str(), d.epochs, d.pretrain_epochs, static_cast<long>(d.rank),
      static_cast<long>(d.small_rank), d.lambda, static_cast<unsigned long long>(d.seed), d.seeds,
      hra::experiments::shift_help(), d.shift.c_str(), static_cast<long>(d.batch),
      static_cast<long>(d.hidden), static_cast<long long>(d.sweep_steps),
      static_cast<long>(d.sweep_validation), d.sweep_grid, d.sweep_extend, d.cnn_epochs,
      d.cnn_pretrain_epochs, static_cast<long>(d.cnn_channels1), static_cast<long>(d.cnn_channels2),
      hra::experiments::built_with_mpi()
          ? "  --mpi                under mpirun: every rank trains on a slice of each batch, the\n"
            "                       gradients are averaged (hra::mpi); rank 0 prints and writes\n"
          : "");
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

long parse_int(const std::string& flag, const std::string& text, long min) {
  std::size_t used = 0;
  long v = 0;
  try {
    v = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || v < min)
    throw std::invalid_argument(flag + ": expected an integer >= " + std::to_string(min) +
                                ", got '" + text + "'");
  return v;
}

double parse_double(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || !std::isfinite(v) || v < 0)
    throw std::invalid_argument(flag + ": expected a number >= 0, got '" + text + "'");
  return v;
}

// Returns nothing when --help was given.
std::optional<Config> parse_args(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return std::nullopt;
    if (flag == "--sweep") {
      c.sweep = true;
      continue;
    }
    if (flag == "--resume") {
      c.resume = true;
      continue;
    }
    if (flag == "--mpi") {
      if (!hra::experiments::built_with_mpi())
        throw std::invalid_argument(
            "--mpi: this program was built without MPI (use finetune_fashion_mnist_mpi)");
      c.mpi = true;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + ": missing value (see --help)");
    const std::string v = argv[++i];
    if (flag == "--data") {
      c.data_dir = v;
    } else if (flag == "--out") {
      c.out_dir = v;
    } else if (flag == "--epochs") {
      c.epochs = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--pretrain-epochs") {
      c.pretrain_epochs = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--rank") {
      c.rank = parse_int(flag, v, 1);
    } else if (flag == "--small-rank") {
      c.small_rank = parse_int(flag, v, 1);
    } else if (flag == "--lambda") {
      c.lambda = parse_double(flag, v);
    } else if (flag == "--seed") {
      c.seed = static_cast<std::uint64_t>(parse_int(flag, v, 0));
    } else if (flag == "--seeds") {
      c.seeds = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--methods") {
      c.methods = split_list(v);
      c.methods_given = true;
      for (const auto& m : c.methods)
        if (std::find(std::begin(all_methods), std::end(all_methods), m) == std::end(all_methods))
          throw std::invalid_argument("--methods: unknown method '" + m + "' (see --help)");
    } else if (flag == "--lr") {
      for (const auto& item : split_list(v)) {
        const auto eq = item.find('=');
        if (eq == std::string::npos)
          throw std::invalid_argument("--lr: expected METHOD=LR, got '" + item + "'");
        const std::string method = item.substr(0, eq);
        if (std::find(std::begin(all_methods), std::end(all_methods), method) ==
            std::end(all_methods))
          throw std::invalid_argument("--lr: unknown method '" + method + "' (see --help)");
        c.lr[method] = parse_double(flag, item.substr(eq + 1));
      }
    } else if (flag == "--head-lr") {
      c.head_lr = parse_double(flag, v);
    } else if (flag == "--shift") {
      hra::experiments::shift_source_pixels(v);  // validates the name
      c.shift = v;
    } else if (flag == "--batch") {
      c.batch = parse_int(flag, v, 1);
    } else if (flag == "--hidden") {
      c.hidden = parse_int(flag, v, 2);
    } else if (flag == "--train-limit") {
      c.train_limit = parse_int(flag, v, 0);
    } else if (flag == "--target-train") {
      c.target_train = parse_int(flag, v, 0);
    } else if (flag == "--validation") {
      c.validation = parse_int(flag, v, 0);
    } else if (flag == "--sweep-sizes") {
      c.sweep_sizes.clear();
      for (const auto& item : split_list(v)) c.sweep_sizes.push_back(parse_int(flag, item, 1));
      std::sort(c.sweep_sizes.begin(), c.sweep_sizes.end());
      c.sweep_sizes.erase(std::unique(c.sweep_sizes.begin(), c.sweep_sizes.end()),
                          c.sweep_sizes.end());
      if (c.sweep_sizes.empty()) throw std::invalid_argument("--sweep-sizes: no sizes");
    } else if (flag == "--sweep-steps") {
      c.sweep_steps = parse_int(flag, v, 1);
    } else if (flag == "--sweep-validation") {
      c.sweep_validation = parse_int(flag, v, 1);
    } else if (flag == "--sweep-grid") {
      c.sweep_grid = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--sweep-extend") {
      c.sweep_extend = static_cast<int>(parse_int(flag, v, 0));
    } else if (flag == "--arch") {
      c.archs = split_list(v);
      for (const auto& a : c.archs)
        if (a != "mlp" && a != "cnn")
          throw std::invalid_argument("--arch: unknown architecture '" + a + "' (mlp or cnn)");
      if (c.archs.empty()) throw std::invalid_argument("--arch: expected mlp, cnn or mlp,cnn");
    } else if (flag == "--cnn-epochs") {
      c.cnn_epochs = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--cnn-pretrain-epochs") {
      c.cnn_pretrain_epochs = static_cast<int>(parse_int(flag, v, 1));
    } else if (flag == "--checkpoint") {
      c.checkpoint_dir = v;
    } else if (flag == "--checkpoint-every") {
      c.checkpoint_every = parse_int(flag, v, 0);
    } else if (flag == "--stop-after-steps") {  // for the resume test; not in --help
      c.stop_after_steps = parse_int(flag, v, 1);
    } else if (flag == "--kill-after-save") {  // for the resume test; not in --help
      c.kill_after_saves = parse_int(flag, v, 1);
    } else if (flag == "--cnn-channels") {
      const auto items = split_list(v);
      if (items.size() != 2)
        throw std::invalid_argument("--cnn-channels: expected C1,C2, got '" + v + "'");
      c.cnn_channels1 = parse_int(flag, items[0], 1);
      c.cnn_channels2 = parse_int(flag, items[1], 1);
    } else {
      throw std::invalid_argument("unknown flag '" + flag + "' (see --help)");
    }
  }
  if (c.methods.empty()) c.methods.assign(std::begin(all_methods), std::end(all_methods));
  if (c.sweep && (c.target_train > 0 || c.validation > 0))
    throw std::invalid_argument(
        "--target-train and --validation are for the single comparison; --sweep takes "
        "--sweep-sizes and --sweep-validation");
  if (c.checkpoint_dir.empty() &&
      (c.resume || c.stop_after_steps > 0 || c.checkpoint_every > 0 || c.kill_after_saves > 0))
    throw std::invalid_argument(
        "--resume, --checkpoint-every, --stop-after-steps and --kill-after-save need "
        "--checkpoint DIR");
  if (c.sweep && (c.mpi || !c.checkpoint_dir.empty()))
    throw std::invalid_argument(
        "--sweep runs in one process without checkpoints (no --mpi, "
        "--checkpoint)");
  if (c.mpi && !c.checkpoint_dir.empty())
    throw std::invalid_argument("--checkpoint is not supported together with --mpi");
  return c;
}

// ---------------------------------------------------------------------------------------------
// Data

struct Data {
  Matrix images;  // 784 x n
  std::vector<int> labels;
  std::string name;  // for messages
  Index size() const { return images.cols(); }
};

Data slice(const hra::experiments::Dataset& d, Index begin, Index count) {
  Data out;
  out.images = d.images.middleCols(begin, count);
  out.labels.assign(d.labels.begin() + begin, d.labels.begin() + begin + count);
  return out;
}

struct Tasks {
  Data source_train, source_test, target_train, target_eval;
  std::string eval_name;  // "test" or "validation"
};

// Source: the first half of the training images as they are. Target: the second half, shifted;
// evaluated on the shifted test set (or on held-out target training images with --validation).
Tasks make_tasks(const Config& c) {
  const auto train =
      hra::experiments::load_fashion_mnist<Scalar>(c.data_dir, hra::experiments::Split::train);
  const auto test =
      hra::experiments::load_fashion_mnist<Scalar>(c.data_dir, hra::experiments::Split::test);
  const Index half = train.size() / 2;
  Index n_source = half, n_target = train.size() - half;
  if (c.train_limit > 0) n_source = std::min(n_source, c.train_limit);
  if (c.validation >= n_target)
    throw std::invalid_argument("--validation " + std::to_string(c.validation) +
                                " leaves no target training images");
  Index n_target_train = n_target - c.validation;
  if (c.target_train > 0) n_target_train = std::min(n_target_train, c.target_train);
  if (c.train_limit > 0) n_target_train = std::min(n_target_train, c.train_limit);

  Tasks t;
  t.source_train = slice(train, 0, n_source);
  t.source_test = slice(test, 0, test.size());
  t.target_train = slice(train, half, n_target_train);
  t.target_train.images = hra::experiments::apply_shift(t.target_train.images, c.shift);
  if (c.validation > 0) {
    t.target_eval = slice(train, train.size() - c.validation, c.validation);
    t.eval_name = "validation";
  } else {
    t.target_eval = slice(test, 0, test.size());
    t.eval_name = "test";
  }
  t.target_eval.images = hra::experiments::apply_shift(t.target_eval.images, c.shift);
  t.source_test.name = "source test";
  t.target_eval.name = "target " + t.eval_name;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Methods

enum class Kind { none, head, full, lora, hra };

struct Method {
  std::string name;   // as on the command line
  std::string label;  // as in the table
  Kind kind = Kind::none;
  Index rank = 0;
  double lambda = 0;
  hra::Variant variant = hra::Variant::chain;
  double lr = 0;       // hidden layers (adapters or weights)
  double head_lr = 0;  // classifier head
};

// Learning rates picked per method on a validation split (5000 held-out target training
// images, the defaults otherwise) from a grid of half-decades 1e-3 ... 1; the best values
// are listed here and the sweep in examples/README_SECTION.md. --lr overrides them.
double default_lr(const std::string& name) {
  if (name == "head") return 3e-1;
  if (name == "full") return 1e-2;
  if (name == "lora") return 1e-2;
  if (name == "hra-small") return 3e-1;
  return 1e-1;  // hra, hra-reg, hra-gs
}

Method make_method(const std::string& name, const Config& c) {
  char lambda[32];
  std::snprintf(lambda, sizeof lambda, "%g", c.lambda);
  const std::string r = "r=" + std::to_string(c.rank);
  Method m;
  m.name = name;
  m.kind = Kind::hra;
  m.rank = c.rank;
  if (name == "none") {
    m = {name, "no adaptation", Kind::none};
  } else if (name == "head") {
    m = {name, "head only", Kind::head};
  } else if (name == "full") {
    m = {name, "full fine-tuning", Kind::full};
  } else if (name == "lora") {
    m.label = "LoRA " + r;
    m.kind = Kind::lora;
  } else if (name == "hra") {
    m.label = "HRA " + r + " lambda=0";
  } else if (name == "hra-reg") {
    m.label = "HRA " + r + " lambda=" + lambda;
    m.lambda = c.lambda;
  } else if (name == "hra-gs") {
    m.label = "HRA-GS " + r;
    m.variant = hra::Variant::gram_schmidt;
  } else if (name == "hra-small") {
    m.label = "HRA r=" + std::to_string(c.small_rank) + " lambda=0";
    m.rank = c.small_rank;
  } else {
    throw std::invalid_argument("unknown method '" + name + "'");
  }
  if (m.kind != Kind::none) m.lr = default_lr(name);
  const auto it = c.lr.find(name);
  if (it != c.lr.end()) m.lr = it->second;
  m.head_lr = c.head_lr > 0 ? c.head_lr : m.lr;
  if (m.kind == Kind::head) m.lr = m.head_lr;
  return m;
}

// The layers of the architecture c.arch.
std::vector<hra::experiments::LayerSpec> network_layers(const Config& c) {
  if (c.arch == "cnn") return hra::experiments::cnn_layers(c.cnn_channels1, c.cnn_channels2, 10);
  return hra::experiments::mlp_layers({28 * 28, c.hidden, c.hidden, 10});
}

// The adapter rank of method `m` on `layer`: m.rank, capped where the layer is too small (HRA:
// r <= D, the fan-in; LoRA: r <= min(d_out, d_in)), as for the CNN's first convolution (D = 9).
Index layer_rank(const hra::experiments::LayerSpec& layer, const Method& m) {
  Index cap = layer.weight_cols();
  if (m.kind == Kind::lora) cap = std::min(cap, layer.weight_rows());
  return std::min(m.rank, cap);
}

// A network over copies of the pretrained weights, set up for `m`: the head (the last layer) is
// a trainable Linear for every method but "none"; the others are frozen, trained, or adapted
// (linear and convolutional layers alike).
Net build_network(const Weights& w, const std::vector<hra::experiments::LayerSpec>& specs,
                  const Method& m, std::uint64_t seed) {
  std::vector<std::unique_ptr<hra::Layer<Scalar>>> layers;
  const std::size_t last = w.weights.size() - 1;
  for (std::size_t k = 0; k <= last; ++k) {
    auto weight = hra::WeightMatrix<Scalar>::owned(w.weights[k]);
    std::optional<Vector> bias = w.biases[k];
    const bool head = k == last;
    const std::optional<hra::Conv2dGeometry>& conv = specs[k].conv;
    const Index rank = layer_rank(specs[k], m);
    if (m.kind == Kind::none || (m.kind == Kind::head && !head)) {
      if (conv)
        layers.push_back(std::make_unique<hra::Conv2d<Scalar>>(*conv, std::move(weight), bias,
                                                               hra::Conv2dOptions{false}));
      else
        layers.push_back(std::make_unique<hra::Linear<Scalar>>(std::move(weight), bias,
                                                               hra::LinearOptions{false}));
    } else if (m.kind == Kind::full || head) {
      if (conv)
        layers.push_back(std::make_unique<hra::Conv2d<Scalar>>(
            *conv, std::move(weight), bias, hra::Conv2dOptions{true}, hra::BiasMode::all));
      else
        layers.push_back(std::make_unique<hra::Linear<Scalar>>(
            std::move(weight), bias, hra::LinearOptions{true}, hra::BiasMode::all));
    } else if (m.kind == Kind::lora) {
      hra::LoraOptions o;
      o.rank = rank;
      o.alpha = static_cast<double>(rank);  // scaling alpha / r = 1
      o.seed = seed * 1000 + k;
      if (conv)
        layers.push_back(
            std::make_unique<hra::LoraConv2d<Scalar>>(*conv, std::move(weight), bias, o));
      else
        layers.push_back(std::make_unique<hra::LoraLinear<Scalar>>(std::move(weight), bias, o));
    } else {
      hra::HraOptions o;
      o.rank = rank;
      o.variant = m.variant;
      // Symmetric init (H = I at the start) needs an even rank and is degenerate for
      // Gram-Schmidt; those start from a random H, as PEFT does.
      o.init = m.variant == hra::Variant::chain && rank % 2 == 0 ? hra::Init::symmetric
                                                                 : hra::Init::random;
      o.lambda = m.lambda;
      o.seed = seed * 1000 + k;
      if (conv)
        layers.push_back(
            std::make_unique<hra::HraConv2d<Scalar>>(*conv, std::move(weight), bias, o));
      else
        layers.push_back(std::make_unique<hra::HraLinear<Scalar>>(std::move(weight), bias, o));
    }
  }
  // Modules "layers.<k>" (put_weights()' names), a ReLU after every one but the head.
  Net net;
  for (std::size_t k = 0; k <= last; ++k)
    net.add("layers." + std::to_string(k), std::move(layers[k]),
            k < last ? hra::Activation::relu : hra::Activation::identity);
  return net;
}

// ---------------------------------------------------------------------------------------------
// Training and evaluation

Matrix predict_all(const Net& net, const Matrix& images) {
  constexpr Index chunk = 2500;
  Matrix logits(0, 0), part;
  for (Index j = 0; j < images.cols(); j += chunk) {
    const Index n = std::min(chunk, images.cols() - j);
    net.predict(images.middleCols(j, n), part);
    if (logits.size() == 0) logits.resize(part.rows(), images.cols());
    logits.middleCols(j, n) = part;
  }
  return logits;
}

double evaluate(const Net& net, const Data& d) {
  return hra::experiments::accuracy<Scalar>(predict_all(net, d.images), d.labels);
}

// finetune_curves.csv: written as it goes (flushed per row) and kept in memory, so that a
// checkpoint can carry the rows written so far. An empty path writes no file (MPI ranks other
// than 0).
class CurveWriter {
 public:
  static constexpr const char* header = "method,seed,epoch,step,train_loss,eval_acc,elapsed_s\n";
  // `text`: rows written before (a resumed run), header included; empty: a new file.
  explicit CurveWriter(const std::string& path, std::string text = header)
      : path_(path), text_(std::move(text)) {
    rewrite();
  }
  void row(const std::string& method, std::uint64_t seed, int epoch, std::int64_t step, double loss,
           double acc, double seconds) {
    // An empty field is "not measured at this step" (no loss before training; accuracy only
    // at the end of an epoch).
    std::ostringstream line;
    line << method << ',' << seed << ',' << epoch << ',' << step << ',';
    if (std::isfinite(loss)) line << loss;
    line << ',';
    if (std::isfinite(acc)) line << acc;
    line << ',' << seconds << '\n';
    text_ += line.str();
    if (out_.is_open()) {
      out_ << line.str();
      out_.flush();
    }
  }
  const std::string& text() const { return text_; }

  // Removes the rows of `method` and writes the file again.
  void remove_rows(const std::string& method) {
    std::string kept;
    for (std::size_t at = 0; at < text_.size();) {
      const std::size_t end = std::min(text_.find('\n', at), text_.size() - 1) + 1;
      if (at == 0 || text_.compare(at, method.size() + 1, method + ",") != 0)
        kept.append(text_, at, end - at);
      at = end;
    }
    if (kept.size() == text_.size()) return;
    text_ = std::move(kept);
    rewrite();
  }

 private:
  void rewrite() {
    if (path_.empty()) return;
    out_.close();
    out_.open(path_, std::ios::trunc);
    if (!out_) throw std::runtime_error(path_ + ": cannot open for writing");
    out_ << text_;
    out_.flush();
  }

  std::string path_;
  std::string text_;
  std::ofstream out_;
};

struct TrainStats {
  double seconds = 0;      // wall clock, training only (evaluation excluded)
  double cpu_seconds = 0;  // processor time of all threads over the same spans
  double final_loss = 0;
  double allreduce_seconds = 0;  // of `seconds`, in the gradient allreduce (MPI only)
  std::int64_t steps = 0;
  Index samples = 0;  // training images processed (every rank's, once)
};

// ---------------------------------------------------------------------------------------------
// Checkpoints (--checkpoint DIR, --resume)

// Where a training run stands: with the network's parameters and both optimisers' states, all
// train() needs to continue exactly where it was. The batch order is a function of the seed and
// the epoch (see train()), so it is derived again, not stored.
struct Progress {
  int epoch = 1;          // the epoch in progress
  Index next_batch = 0;   // position, in this epoch's order, of the next batch's first sample
  std::int64_t step = 0;  // optimiser steps so far: the schedule's position
  double loss_sum = 0, window_sum = 0;
  Index window_count = 0;
  double seconds = 0, cpu_seconds = 0;  // training time so far (not part of the results)
};

// Thrown when --stop-after-steps is reached (after the checkpoint is saved).
class Stopped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int stopped_exit_code = 75;  // EX_TEMPFAIL: "try again", i.e. resume

// Everything that changes the results, for the check that a checkpoint belongs to this run.
std::string settings_signature(const Config& c) {
  std::ostringstream s;
  s << std::setprecision(17) << "shift=" << c.shift << ";epochs=" << c.epochs
    << ";pretrain_epochs=" << c.pretrain_epochs << ";batch=" << c.batch << ";hidden=" << c.hidden
    << ";rank=" << c.rank << ";small_rank=" << c.small_rank << ";lambda=" << c.lambda
    << ";seed=" << c.seed << ";seeds=" << c.seeds << ";train_limit=" << c.train_limit
    << ";target_train=" << c.target_train << ";validation=" << c.validation
    << ";warmup=" << c.warmup << ";head_lr=" << c.head_lr << ";cnn=" << c.cnn_channels1 << ","
    << c.cnn_channels2 << "," << c.cnn_epochs << "," << c.cnn_pretrain_epochs << ";archs=";
  for (const auto& a : c.archs) s << a << ",";
  s << ";methods=" << (c.methods_given ? "" : "default:");
  for (const auto& m : c.methods) s << m << ",";
  s << ";lr=";
  for (const auto& kv : c.lr) s << kv.first << "=" << kv.second << ",";
  return s.str();
}

// The checkpoint of a whole comparison: the finished runs' results and curves, and the state of
// the training in progress (pretraining or a method's run), saved every --checkpoint-every steps
// (0: after each epoch) and after each finished run.
class Checkpointer {
 public:
  using json = nlohmann::json;

  explicit Checkpointer(const Config& c)
      : dir_(c.checkpoint_dir),
        every_(c.checkpoint_every),
        stop_after_(c.stop_after_steps),
        kill_after_(c.kill_after_saves),
        settings_(settings_signature(c)) {
    state_ = {{"format", "hra-finetune-checkpoint"},
              {"version", 1},
              {"settings", settings_},
              {"archs", json::object()},
              {"training", nullptr}};
    if (dir_.empty() || !c.resume) return;
    reader_ = hra::checkpoint::Reader<Scalar>::load(dir_);
    if (!reader_) {
      std::printf("--resume: no checkpoint in %s yet; starting from the beginning\n", dir_.c_str());
      return;
    }
    const json& st = reader_->metadata();
    if (!st.is_object() || st.value("format", "") != "hra-finetune-checkpoint" ||
        st.value("version", 0) != 1 || !st.contains("settings") || !st["settings"].is_string())
      throw std::runtime_error("--resume: " + dir_ + " holds no checkpoint of this program");
    if (st.at("settings").get<std::string>() != settings_)
      throw std::invalid_argument(
          "--resume: the checkpoint in " + dir_ + " was made with other settings:\n  checkpoint: " +
          st.at("settings").get<std::string>() + "\n  this run:   " + settings_);
    state_ = st;
    std::size_t finished = 0;
    for (const auto& arch : state_["archs"])
      finished += arch.value("results", json::array()).size();
    std::printf("Resuming from %s: %zu finished run(s)", dir_.c_str(), finished);
    if (!state_["training"].is_null())
      std::printf(", %s at step %lld", state_["training"]["key"].get<std::string>().c_str(),
                  static_cast<long long>(state_["training"]["step"].get<std::int64_t>()));
    std::printf("\n");
  }

  bool enabled() const { return !dir_.empty(); }

  // Whether the checkpoint holds the training `key` (arch/method/seed) in progress.
  bool in_progress(const std::string& key) const {
    const json& t = state_["training"];
    return !t.is_null() && t.at("key").get<std::string>() == key;
  }

  // Called after every file this run saves (checkpoints, the pretrained network): with
  // --kill-after-save N the process kills itself with SIGKILL right after its Nth save, as a crash
  // would, to test that every save leaves a state the run resumes from exactly.
  void saved(const std::string& what) {
    if (kill_after_ <= 0 || ++saves_ < kill_after_) return;
    std::printf("--kill-after-save: SIGKILL after save %lld (%s)\n", static_cast<long long>(saves_),
                what.c_str());
    std::fflush(stdout);
    std::raise(SIGKILL);
  }

  // The curves written so far for `arch` (the header only when there are none).
  std::string curves(const std::string& arch) const {
    const auto it = state_["archs"].find(arch);
    if (it == state_["archs"].end() || !it->contains("curves")) return CurveWriter::header;
    return (*it)["curves"].get<std::string>();
  }
  // While attached, saves take `arch`'s curves from `w`.
  void attach(const std::string& arch, const CurveWriter* w) { writers_[arch] = w; }
  void detach(const std::string& arch) {
    if (writers_.count(arch)) state_["archs"][arch]["curves"] = writers_[arch]->text();
    writers_.erase(arch);
  }

  // The result of a run the checkpoint has finished, if any.
  std::optional<json> finished(const std::string& arch, const std::string& method,
                               std::uint64_t seed) const {
    const auto it = state_["archs"].find(arch);
    if (it == state_["archs"].end() || !it->contains("results")) return std::nullopt;
    for (const auto& r : (*it)["results"])
      if (r.at("method").get<std::string>() == method && r.at("seed").get<std::uint64_t>() == seed)
        return r;
    return std::nullopt;
  }
  // A run finished: its result joins the checkpoint, which no longer has training in progress.
  void finish(const std::string& arch, json result) {
    if (!enabled()) return;
    state_["archs"][arch]["results"].push_back(std::move(result));
    state_["training"] = nullptr;
    pending_ = hra::checkpoint::Writer<Scalar>();
    save();
  }

  // Restores the training `key` (arch/method/seed) into net, the optimisers and `p` when the
  // checkpoint holds it; false otherwise (a fresh start).
  bool restore(const std::string& key, Net& net, hra::Adam<Scalar>& body_adam,
               const std::vector<hra::ParameterView<Scalar>>& body, hra::Adam<Scalar>& head_adam,
               const std::vector<hra::ParameterView<Scalar>>& head, Progress& p) {
    if (!in_progress(key) || !reader_) return false;
    const json& t = state_["training"];
    // Everything is read and checked (hra::checkpoint stages the tensors) before anything changes.
    Progress read;
    try {
      read.epoch = t.at("epoch").get<int>();
      read.next_batch = t.at("next_batch").get<Index>();
      read.step = t.at("step").get<std::int64_t>();
      read.loss_sum = t.at("loss_sum").get<double>();
      read.window_sum = t.at("window_sum").get<double>();
      read.window_count = t.at("window_count").get<Index>();
      read.seconds = t.at("seconds").get<double>();
      read.cpu_seconds = t.at("cpu_seconds").get<double>();
    } catch (const json::exception& e) {
      throw hra::checkpoint::error("checkpoint: " + dir_ + ": the training progress of " + key +
                                   " is malformed: " + e.what());
    }
    if (read.epoch < 1 || read.next_batch < 0 || read.step < 0 || read.window_count < 0)
      throw hra::checkpoint::error("checkpoint: " + dir_ + ": the training progress of " + key +
                                   " has a negative position");
    reader_->parameters("net", net.parameters());
    reader_->optimizer("adam_body", body_adam, body);
    reader_->optimizer("adam_head", head_adam, head);
    reader_->apply();
    p = read;
    std::printf("  [%s] resumed at epoch %d, step %lld\n", key.c_str(), p.epoch,
                static_cast<long long>(p.step));
    return true;
  }

  // When train() calls after_step().
  enum class Point {
    step,          // after an optimiser step
    end_of_epoch,  // after an epoch's evaluation, with `p` already at the next epoch
    end,           // after the last epoch (restoring it restores the trained network)
  };

  // Saves when due (at Point::end always), and stops the program when --stop-after-steps is
  // reached.
  void after_step(const std::string& key, Net& net, const hra::Adam<Scalar>& body_adam,
                  const std::vector<hra::ParameterView<Scalar>>& body,
                  const hra::Adam<Scalar>& head_adam,
                  const std::vector<hra::ParameterView<Scalar>>& head, const Progress& p,
                  Point at) {
    if (!enabled()) return;
    if (at == Point::step) ++steps_here_;
    const bool stop = at == Point::step && stop_after_ > 0 && steps_here_ >= stop_after_;
    const bool due = at == Point::end || (every_ > 0 ? at == Point::step && p.step % every_ == 0
                                                     : at == Point::end_of_epoch);
    if (!stop && !due) return;
    hra::checkpoint::Writer<Scalar> tensors;
    json t = {{"key", key},
              {"epoch", p.epoch},
              {"next_batch", p.next_batch},
              {"step", p.step},
              {"loss_sum", p.loss_sum},
              {"window_sum", p.window_sum},
              {"window_count", p.window_count},
              {"seconds", p.seconds},
              {"cpu_seconds", p.cpu_seconds}};
    tensors.parameters("net", net.parameters());
    tensors.optimizer("adam_body", body_adam, body);
    tensors.optimizer("adam_head", head_adam, head);
    state_["training"] = std::move(t);
    pending_ = std::move(tensors);
    save();
    if (stop)
      throw Stopped("stopped after " + std::to_string(steps_here_) +
                    " training steps (--stop-after-steps); the checkpoint in " + dir_ +
                    " continues with --resume");
  }

 private:
  void save() {
    for (const auto& kv : writers_) state_["archs"][kv.first]["curves"] = kv.second->text();
    pending_.metadata() = state_;
    pending_.save(dir_);
    const json& t = state_["training"];
    saved("checkpoint, " + (t.is_null() ? std::string("no training in progress")
                                        : t.at("key").get<std::string>() + " at step " +
                                              std::to_string(t.at("step").get<std::int64_t>())));
  }

  std::string dir_;
  std::int64_t every_ = 0, stop_after_ = 0, steps_here_ = 0, kill_after_ = 0, saves_ = 0;
  std::string settings_;
  json state_;
  // The training in progress as hra::checkpoint writes it (empty between runs), and what
  // --resume read.
  hra::checkpoint::Writer<Scalar> pending_;
  std::optional<hra::checkpoint::Reader<Scalar>> reader_;
  std::map<std::string, const CurveWriter*> writers_;
};

// What a run needs besides its settings: the ranks (MPI), the checkpoint.
struct Runtime {
  hra::experiments::Ranks ranks;
  Checkpointer* checkpoint = nullptr;
};

// Adam with a cosine schedule and linear warm-up over epochs x ceil(n / batch) steps. The batch
// order depends only on the seed and the epoch, so every method sees the same batches (and a
// resumed run derives it again). With several ranks each trains on its slice of every batch and
// the gradients are averaged (GradientAverager), so all ranks take the same steps.
// save_at_end: a checkpoint is saved after the last epoch too (the pretraining's: see
// pretrained_network()). A run resumed from it only restores the network (final_loss is 0).
TrainStats train(Net& net, const std::string& name, std::uint64_t seed, double lr, double head_lr,
                 int epochs, const Data& train, const Data& eval, const Config& c,
                 CurveWriter& curves, Runtime& rt, bool save_at_end = false) {
  const Index n = train.size();
  const Index steps_per_epoch = (n + c.batch - 1) / c.batch;
  const std::int64_t total = static_cast<std::int64_t>(steps_per_epoch) * epochs;
  const auto warmup =
      std::min<std::int64_t>(total, static_cast<std::int64_t>(std::ceil(c.warmup * total)));
  // The head and the hidden layers may have their own learning rates: two optimisers, one
  // schedule shape.
  hra::CosineSchedule schedule(lr, warmup, total), head_schedule(head_lr, warmup, total);
  hra::Adam<Scalar> adam({lr}), head_adam({head_lr});
  const std::size_t head = net.size() - 1;
  std::vector<hra::Layer<Scalar>*> layers;
  for (std::size_t k = 0; k < net.size(); ++k) layers.push_back(&net.module_at(k));
  hra::experiments::GradientAverager<Scalar> averager(rt.ranks, layers);
  const auto body_params = [&] {
    std::vector<hra::ParameterView<Scalar>> body;
    for (std::size_t k = 0; k < head; ++k)
      for (auto& p : net.module_at(k).parameters()) body.push_back(p);
    return body;
  };
  const std::string key = c.arch + "/" + name + "/" + std::to_string(seed);

  const std::int64_t log_every = std::max<std::int64_t>(1, steps_per_epoch / 4);
  TrainStats stats;
  Progress p;
  using Point = Checkpointer::Point;
  const auto checkpoint = [&](Point at) {
    if (rt.checkpoint)
      rt.checkpoint->after_step(key, net, adam, body_params(), head_adam,
                                net.module_at(head).parameters(), p, at);
  };
  if (!rt.checkpoint || !rt.checkpoint->restore(key, net, adam, body_params(), head_adam,
                                                net.module_at(head).parameters(), p)) {
    const double acc0 = evaluate(net, eval);
    curves.row(name, seed, 0, 0, std::nan(""), acc0, 0.0);
  }
  stats.seconds = p.seconds;
  stats.cpu_seconds = p.cpu_seconds;
  const bool restored_at_end = p.epoch > epochs;

  std::vector<Index> order(static_cast<std::size_t>(n));
  Matrix x(train.images.rows(), c.batch), grad;
  std::vector<int> labels;
  for (; p.epoch <= epochs; ++p.epoch) {
    const int epoch = p.epoch;
    std::iota(order.begin(), order.end(), Index{0});
    std::mt19937_64 rng(seed * 1000003u + static_cast<std::uint64_t>(epoch));
    for (std::size_t k = order.size(); k > 1; --k)
      std::swap(order[k - 1], order[static_cast<std::size_t>(rng() % k)]);

    const auto start = Clock::now();
    const std::clock_t cpu_start = std::clock();
    const auto elapsed = [&] {
      return stats.seconds + std::chrono::duration<double>(Clock::now() - start).count();
    };
    for (Index b0 = p.next_batch; b0 < n; b0 += c.batch) {
      const Index bn = std::min(c.batch, n - b0);
      // This rank's slice of the batch (all of it on one process).
      const auto [first, local] = rt.ranks.shard(bn);
      double loss = 0;
      if (local > 0) {
        x.resize(train.images.rows(), local);
        labels.resize(static_cast<std::size_t>(local));
        for (Index j = 0; j < local; ++j) {
          const Index src = order[static_cast<std::size_t>(b0 + first + j)];
          x.col(j) = train.images.col(src);
          labels[static_cast<std::size_t>(j)] = train.labels[static_cast<std::size_t>(src)];
        }
        const Matrix& logits = net.forward(x);
        loss = hra::experiments::softmax_cross_entropy<Scalar>(logits, labels, &grad);
        net.backward(grad, /*compute_input_gradient=*/false);
      } else {
        for (auto* l : layers) l->zero_gradients();
      }
      averager.average(static_cast<double>(local));
      const double penalty = net.add_regularizer();
      adam.set_lr(schedule(p.step));
      adam.step(body_params());
      head_adam.set_lr(head_schedule(p.step));
      head_adam.step(net.module_at(head).parameters());
      // This rank's share of the batch's summed loss; the ranks' shares are added when logged.
      const double batch_loss =
          loss * static_cast<double>(local) + penalty * static_cast<double>(bn) / rt.ranks.size();
      p.loss_sum += batch_loss;
      p.window_sum += batch_loss;
      p.window_count += bn;
      ++p.step;
      p.next_batch = b0 + bn;
      // The training loss four times per epoch (the end of the epoch is logged below).
      if (p.step % log_every == 0 && b0 + bn < n) {
        curves.row(name, seed, epoch, p.step,
                   rt.ranks.sum(p.window_sum) / static_cast<double>(p.window_count), std::nan(""),
                   elapsed());
        p.window_sum = 0;
        p.window_count = 0;
      }
      p.seconds = elapsed();
      p.cpu_seconds =
          stats.cpu_seconds + static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
      checkpoint(Point::step);
    }
    stats.seconds += std::chrono::duration<double>(Clock::now() - start).count();
    stats.cpu_seconds += static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
    stats.final_loss = rt.ranks.sum(p.loss_sum) / static_cast<double>(n);
    const double acc = evaluate(net, eval);
    curves.row(name, seed, epoch, p.step,
               rt.ranks.sum(p.window_sum) / static_cast<double>(p.window_count), acc,
               stats.seconds);
    std::printf("  [%s seed %llu] epoch %2d/%d  loss %.4f  %s acc %6.2f%%  %5.1f s\n", name.c_str(),
                static_cast<unsigned long long>(seed), epoch, epochs, stats.final_loss,
                eval.name.c_str(), 100 * acc, stats.seconds);
    std::fflush(stdout);
    // The next epoch starts afresh.
    p.next_batch = 0;
    p.loss_sum = p.window_sum = 0;
    p.window_count = 0;
    p.seconds = stats.seconds;
    p.cpu_seconds = stats.cpu_seconds;
    if (p.epoch < epochs) {
      ++p.epoch;
      checkpoint(Point::end_of_epoch);
      --p.epoch;
    }
  }
  if (save_at_end && !restored_at_end) checkpoint(Point::end);
  stats.allreduce_seconds = averager.seconds();
  stats.steps = p.step;
  stats.samples = n * epochs;
  return stats;
}

// ---------------------------------------------------------------------------------------------
// The pretrained network on disk

std::string pretrain_signature(const Config& c, const Tasks& t) {
  std::ostringstream s;
  if (c.arch == "mlp")
    s << "mlp 784-" << c.hidden << "-" << c.hidden << "-10";
  else
    s << c.arch << " " << hra::experiments::describe(network_layers(c));
  s << "; source=fashion-mnist train[0:" << t.source_train.size()
    << "] unshifted; epochs=" << c.pretrain_epochs << "; batch=" << c.batch
    << "; adam lr=1e-3 cosine; seed=" << c.seed;
  return s.str();
}

// The safetensors layout is PyTorch's: "layers.<k>.weight" ((out_features, in_features), or
// (C_out, C_in, kh, kw) for a convolution) and "layers.<k>.bias" (see architecture.hpp).
void save_pretrained(const std::string& path, const Weights& w, const std::string& signature,
                     const std::vector<hra::experiments::LayerSpec>& layers) {
  hra::safetensors::TensorFile file(path);
  file.metadata()["signature"] = signature;
  hra::experiments::put_weights(file, layers, w);
  hra::safetensors::save(path, file);
}

// The weights saved at `path` if they were made with the same settings; nothing otherwise.
std::optional<Weights> load_pretrained(const std::string& path, const std::string& signature,
                                       const std::vector<hra::experiments::LayerSpec>& layers) {
  if (!std::filesystem::exists(path)) return std::nullopt;
  try {
    const auto file = hra::safetensors::load(path);
    const auto it = file.metadata().find("signature");
    if (it == file.metadata().end() || it->second != signature) {
      std::printf("%s was made with other settings; pretraining again\n", path.c_str());
      return std::nullopt;
    }
    return hra::experiments::get_weights<Scalar>(file, layers);
  } catch (const hra::safetensors::error& e) {
    std::printf("cannot reuse %s (%s); pretraining again\n", path.c_str(), e.what());
    return std::nullopt;
  }
}

Weights pretrained_network(const Config& c, const Tasks& t, CurveWriter& curves, Runtime& rt) {
  const auto layers = network_layers(c);
  const std::string path = c.out_dir + "/pretrained_" + c.arch + ".safetensors";
  const std::string signature = pretrain_signature(c, t);
  // A checkpoint taken during the pretraining continues it, even when the file exists. The last
  // such checkpoint is saved after the last epoch, before the file: a run killed after it, before
  // or after the file was written, restores the trained network from it (with every curves row)
  // and writes the file if it is not there yet.
  const bool resuming =
      rt.checkpoint && rt.checkpoint->in_progress(c.arch + "/pretrain/" + std::to_string(c.seed));
  auto loaded = resuming ? std::nullopt : load_pretrained(path, signature, layers);
  // With MPI every rank must take the same branch (pretraining is collective).
  if (rt.ranks.all(loaded.has_value())) {
    std::printf("Loaded the pretrained network from %s\n", path.c_str());
    return *loaded;
  }
  // A fresh start writes the pretraining's rows anew (a resumed one continues its own): the
  // checkpoint's curves may hold them when the file was removed after the pretraining.
  if (!resuming) curves.remove_rows("pretrain");
  std::printf(
      "Pretraining %s on the source task (%ld images, %d epochs)\n",
      c.arch == "mlp"
          ? ("784-" + std::to_string(c.hidden) + "-" + std::to_string(c.hidden) + "-10").c_str()
          : hra::experiments::describe(layers).c_str(),
      static_cast<long>(t.source_train.size()), c.pretrain_epochs);
  Weights w = hra::experiments::initialized_weights<Scalar>(layers, c.seed + 7);
  Method full{"pretrain", "pretrain", Kind::full};
  Net net = build_network(w, layers, full, c.seed);
  const TrainStats s = train(net, "pretrain", c.seed, 1e-3, 1e-3, c.pretrain_epochs, t.source_train,
                             t.source_test, c, curves, rt, /*save_at_end=*/true);
  for (std::size_t k = 0; k < w.weights.size(); ++k) {
    auto& layer = dynamic_cast<hra::AffineLayer<Scalar>&>(net.module_at(k));
    w.weights[k] = layer.weight();
    w.biases[k] = *layer.bias();
  }
  const auto same_as = [&](const std::optional<Weights>& other) {
    if (!other) return false;
    for (std::size_t k = 0; k < w.weights.size(); ++k)
      if (other->weights[k] != w.weights[k] || other->biases[k] != w.biases[k]) return false;
    return true;
  };
  if (rt.ranks.root() && !(resuming && same_as(load_pretrained(path, signature, layers)))) {
    save_pretrained(path, w, signature, layers);
    if (rt.checkpoint) rt.checkpoint->saved("pretrained file " + path);
  }
  std::printf("Pretrained in %.1f s (%.1f s cpu); saved to %s\n", s.seconds, s.cpu_seconds,
              path.c_str());
  return w;
}

// ---------------------------------------------------------------------------------------------
// One method, start to end

struct Result {
  Method method;
  std::uint64_t seed = 0;
  Index params = 0;
  double accuracy = 0;
  double seconds = 0;
  double cpu_seconds = 0;
  bool has_adapter = false;
  double merged_accuracy = 0;
  double merge_max_diff = 0;    // max |logits merged - logits unmerged| on the eval set
  double unmerge_max_diff = 0;  // the same after unmerge(): the round trip
  bool merge_ok = true;
  std::uint64_t logits_hash = 0;  // FNV-1a of the final eval logits' bytes (bit-for-bit checks)
  double allreduce_seconds = 0;   // of `seconds`, in the gradient allreduce (MPI)
  Index samples = 0;              // training images processed
};

// A finished run in a checkpoint. Doubles round-trip exactly through nlohmann::json.
nlohmann::json to_json(const Result& r) {
  return {{"method", r.method.name},
          {"seed", r.seed},
          {"params", r.params},
          {"accuracy", r.accuracy},
          {"seconds", r.seconds},
          {"cpu_seconds", r.cpu_seconds},
          {"has_adapter", r.has_adapter},
          {"merged_accuracy", r.merged_accuracy},
          {"merge_max_diff", r.merge_max_diff},
          {"unmerge_max_diff", r.unmerge_max_diff},
          {"merge_ok", r.merge_ok},
          {"logits_hash", r.logits_hash},
          {"allreduce_seconds", r.allreduce_seconds},
          {"samples", r.samples}};
}

Result result_from_json(const nlohmann::json& j, const Method& m) {
  Result r;
  r.method = m;
  r.seed = j.at("seed").get<std::uint64_t>();
  r.params = j.at("params").get<Index>();
  r.accuracy = j.at("accuracy").get<double>();
  r.seconds = j.at("seconds").get<double>();
  r.cpu_seconds = j.at("cpu_seconds").get<double>();
  r.has_adapter = j.at("has_adapter").get<bool>();
  r.merged_accuracy = j.at("merged_accuracy").get<double>();
  r.merge_max_diff = j.at("merge_max_diff").get<double>();
  r.unmerge_max_diff = j.at("unmerge_max_diff").get<double>();
  r.merge_ok = j.at("merge_ok").get<bool>();
  r.logits_hash = j.at("logits_hash").get<std::uint64_t>();
  r.allreduce_seconds = j.at("allreduce_seconds").get<double>();
  r.samples = j.at("samples").get<Index>();
  return r;
}

Result run_method(const Method& m, std::uint64_t seed, const Weights& pretrained, const Tasks& t,
                  const Config& c, CurveWriter& curves, Runtime& rt) {
  if (rt.checkpoint)
    if (const auto done = rt.checkpoint->finished(c.arch, m.name, seed)) {
      Result r = result_from_json(*done, m);
      std::printf("  => seed %llu: %s acc %.2f%% (finished before; from the checkpoint)\n",
                  static_cast<unsigned long long>(seed), t.target_eval.name.c_str(),
                  100 * r.accuracy);
      return r;
    }
  Net net = build_network(pretrained, network_layers(c), m, seed);
  Result r;
  r.method = m;
  r.seed = seed;
  r.params = net.num_trainable_parameters();
  r.has_adapter = m.kind == Kind::lora || m.kind == Kind::hra;
  if (m.kind != Kind::none) {
    const TrainStats s = train(net, m.name, seed, m.lr, m.head_lr, c.epochs, t.target_train,
                               t.target_eval, c, curves, rt);
    r.seconds = s.seconds;
    r.cpu_seconds = s.cpu_seconds;
    r.allreduce_seconds = s.allreduce_seconds;
    r.samples = s.samples;
  } else {
    curves.row(m.name, seed, 0, 0, std::nan(""), evaluate(net, t.target_eval), 0.0);
  }
  const Matrix logits = predict_all(net, t.target_eval.images);
  r.accuracy = hra::experiments::accuracy<Scalar>(logits, t.target_eval.labels);
  r.logits_hash = hra::experiments::bytes_hash(logits);
  r.merged_accuracy = r.accuracy;
  if (r.has_adapter) {
    // Fold every adapter into its W, evaluate the plain network, then take the adapters out.
    net.merge();
    const Matrix merged = predict_all(net, t.target_eval.images);
    net.unmerge();
    const Matrix again = predict_all(net, t.target_eval.images);
    r.merged_accuracy = hra::experiments::accuracy<Scalar>(merged, t.target_eval.labels);
    r.merge_max_diff = (merged - logits).cwiseAbs().maxCoeff();
    r.unmerge_max_diff = (again - logits).cwiseAbs().maxCoeff();
    const double tol = 1e-3 * std::max(1.0, static_cast<double>(logits.cwiseAbs().maxCoeff()));
    // Rounding of the merged weight may flip a prediction whose top two logits are within twice
    // the largest logit change; any other difference is a failed merge.
    r.merge_ok = r.merge_max_diff < tol && r.unmerge_max_diff < tol &&
                 hra::experiments::same_predictions<Scalar>(logits, merged, 2 * r.merge_max_diff) &&
                 hra::experiments::same_predictions<Scalar>(logits, again, 2 * r.unmerge_max_diff);
  }
  std::printf("  => seed %llu: %s acc %.2f%%", static_cast<unsigned long long>(seed),
              t.target_eval.name.c_str(), 100 * r.accuracy);
  if (r.has_adapter)
    std::printf("; merged %.2f%% (max |logit change| %.1e, after unmerge %.1e)",
                100 * r.merged_accuracy, r.merge_max_diff, r.unmerge_max_diff);
  std::printf("; logits %016llx\n", static_cast<unsigned long long>(r.logits_hash));
  if (rt.checkpoint) rt.checkpoint->finish(c.arch, to_json(r));
  return r;
}

/// The runs of one method over every seed.
struct Summary {
  Method method;
  Index params = 0;
  int runs = 0;
  double mean = 0, stddev = 0, min = 1, max = 0;  // accuracy
  double seconds = 0, cpu_seconds = 0;            // mean per run
  bool has_adapter = false, merge_ok = true;
  double merge_max_diff = 0;  // worst over the runs
};

Summary summarize(const std::vector<Result>& runs) {
  Summary s;
  s.method = runs.front().method;
  s.params = runs.front().params;
  s.has_adapter = runs.front().has_adapter;
  s.runs = static_cast<int>(runs.size());
  for (const auto& r : runs) {
    s.mean += r.accuracy / s.runs;
    s.min = std::min(s.min, r.accuracy);
    s.max = std::max(s.max, r.accuracy);
    s.seconds += r.seconds / s.runs;
    s.cpu_seconds += r.cpu_seconds / s.runs;
    s.merge_ok = s.merge_ok && r.merge_ok;
    s.merge_max_diff = std::max(s.merge_max_diff, r.merge_max_diff);
  }
  double ss = 0;
  for (const auto& r : runs) ss += (r.accuracy - s.mean) * (r.accuracy - s.mean);
  s.stddev = s.runs > 1 ? std::sqrt(ss / (s.runs - 1)) : 0.0;  // sample standard deviation
  return s;
}

std::ofstream open_csv(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  return out;
}

std::string hash_text(std::uint64_t h) {
  char text[24];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(h));
  return text;
}

// One row per run.
void write_results(const std::string& path, const std::vector<Result>& results, const Config& c,
                   const std::string& eval_name) {
  std::ofstream out = open_csv(path);
  out << "method,label,seed,rank,lambda,lr,head_lr,epochs,trainable_params,eval_set,eval_acc,"
         "merged_acc,"
         "merge_max_abs_diff,unmerge_max_abs_diff,merge_ok,logits_fnv1a,train_seconds,"
         "train_cpu_seconds,allreduce_seconds\n";
  for (const auto& r : results) {
    out << r.method.name << ",\"" << r.method.label << "\"," << r.seed << ',' << r.method.rank
        << ',' << r.method.lambda << ',' << r.method.lr << ',' << r.method.head_lr << ','
        << (r.method.kind == Kind::none ? 0 : c.epochs) << ',' << r.params << ',' << eval_name
        << ',' << r.accuracy << ',' << r.merged_accuracy << ',' << r.merge_max_diff << ','
        << r.unmerge_max_diff << ',' << (r.has_adapter ? (r.merge_ok ? "yes" : "no") : "n/a") << ','
        << hash_text(r.logits_hash) << ',' << r.seconds << ',' << r.cpu_seconds << ','
        << r.allreduce_seconds << '\n';
  }
}

// One row per method, over its seeds.
void write_summary(const std::string& path, const std::vector<Summary>& summaries, const Config& c,
                   const std::string& eval_name, Index full_params) {
  std::ofstream out = open_csv(path);
  out << "method,label,rank,lambda,lr,head_lr,epochs,runs,trainable_params,params_fraction_of_full,"
         "eval_set,acc_mean,acc_std,acc_min,acc_max,merge_ok,merge_max_abs_diff,train_seconds,"
         "train_cpu_seconds\n";
  for (const auto& s : summaries) {
    out << s.method.name << ",\"" << s.method.label << "\"," << s.method.rank << ','
        << s.method.lambda << ',' << s.method.lr << ',' << s.method.head_lr << ','
        << (s.method.kind == Kind::none ? 0 : c.epochs) << ',' << s.runs << ',' << s.params << ','
        << static_cast<double>(s.params) / static_cast<double>(full_params) << ',' << eval_name
        << ',' << s.mean << ',' << s.stddev << ',' << s.min << ',' << s.max << ','
        << (s.has_adapter ? (s.merge_ok ? "yes" : "no") : "n/a") << ',' << s.merge_max_diff << ','
        << s.seconds << ',' << s.cpu_seconds << '\n';
  }
}

void print_table(const std::vector<Summary>& summaries, Index full_params, const Tasks& t,
                 const Config& c) {
  std::printf(
      "\nResults (%s): %s accuracy, mean +- standard deviation over %d seed(s); %d epochs;\n"
      "trainable parameters include the classifier head; wall s / cpu s: training time per run\n"
      "(cpu s counts every thread)\n",
      c.arch == "mlp" ? "MLP" : "CNN", t.target_eval.name.c_str(), c.seeds, c.epochs);
  std::printf("| %-24s | %10s | %7s | %15s | %17s | %7s | %7s |\n", "method", "trainable", "% full",
              "accuracy", "merged = unmerged", "wall s", "cpu s");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(26, '-').c_str(),
              std::string(12, '-').c_str(), std::string(9, '-').c_str(),
              std::string(17, '-').c_str(), std::string(19, '-').c_str(),
              std::string(9, '-').c_str(), std::string(9, '-').c_str());
  for (const auto& s : summaries) {
    char acc[64], merge[64];
    std::snprintf(acc, sizeof acc, "%.2f +- %.2f %%", 100 * s.mean, 100 * s.stddev);
    if (s.has_adapter)
      std::snprintf(merge, sizeof merge, "%s (%.0e)", s.merge_ok ? "yes" : "NO", s.merge_max_diff);
    else
      std::snprintf(merge, sizeof merge, "n/a");
    std::printf("| %-24s | %10ld | %6.2f%% | %15s | %17s | %7.1f | %7.1f |\n",
                s.method.label.c_str(), static_cast<long>(s.params),
                100.0 * static_cast<double>(s.params) / static_cast<double>(full_params), acc,
                merge, s.seconds, s.cpu_seconds);
  }
  std::printf(
      "(merged = unmerged: the merged network gives the same accuracy and its logits\n"
      "differ by at most the number in brackets; n/a: no adapter to merge)\n");
}

// The settings of one architecture's comparison: the CNN has its own epochs and default methods.
Config arch_config(const Config& c, const std::string& arch) {
  Config a = c;
  a.arch = arch;
  if (arch == "cnn") {
    a.epochs = c.cnn_epochs;
    a.pretrain_epochs = c.cnn_pretrain_epochs;
    if (!c.methods_given) a.methods.assign(std::begin(cnn_methods), std::end(cnn_methods));
  }
  return a;
}

// The results files of c.arch: finetune_*.csv for the MLP (as before the CNN existed),
// finetune_cnn_*.csv for the CNN.
std::string results_prefix(const Config& c) {
  return c.out_dir + (c.arch == "mlp" ? "/finetune_" : "/finetune_" + c.arch + "_");
}

// One architecture: pretrain (or load), every method over every seed, the table and the CSVs.
// Returns 3 if a merged model does not reproduce its unmerged predictions, else 0.
int run_arch(const Config& c, const Tasks& t, Runtime& rt) {
  const auto layers = network_layers(c);
  std::printf("\n=== %s: %s; %d fine-tuning epochs, %d pretraining epochs ===\n",
              c.arch == "mlp" ? "MLP" : "CNN", hra::experiments::describe(layers).c_str(), c.epochs,
              c.pretrain_epochs);
  const std::string prefix = results_prefix(c);
  CurveWriter curves(rt.ranks.root() ? prefix + "curves.csv" : "",
                     rt.checkpoint ? rt.checkpoint->curves(c.arch) : CurveWriter::header);
  if (rt.checkpoint) rt.checkpoint->attach(c.arch, &curves);
  const Weights pretrained = pretrained_network(c, t, curves, rt);
  {
    Net net = build_network(pretrained, layers, make_method("none", c), c.seed);
    std::printf("Pretrained network: source test acc %.2f%%, %s acc %.2f%%\n",
                100 * evaluate(net, t.source_test), t.target_eval.name.c_str(),
                100 * evaluate(net, t.target_eval));
  }

  Index full_params = 0;
  for (std::size_t k = 0; k < pretrained.weights.size(); ++k)
    full_params += pretrained.weights[k].size() + pretrained.biases[k].size();

  std::vector<Result> results;
  std::vector<Summary> summaries;
  for (const auto& name : c.methods) {
    const Method m = make_method(name, c);
    std::printf("\n%s", m.label.c_str());
    if (m.kind != Kind::none) std::printf(" (lr %g, head lr %g)", m.lr, m.head_lr);
    std::printf("\n");
    if (m.kind == Kind::lora || m.kind == Kind::hra)
      for (std::size_t k = 0; k + 1 < layers.size(); ++k)
        if (layer_rank(layers[k], m) < m.rank)
          std::printf("  note: rank %ld on layer %zu (%s), whose %s is only %ld\n",
                      static_cast<long>(layer_rank(layers[k], m)), k, layers[k].describe().c_str(),
                      m.kind == Kind::lora ? "min(d_out, fan-in)" : "fan-in",
                      static_cast<long>(layer_rank(layers[k], m)));
    std::vector<Result> runs;
    const int seeds = m.kind == Kind::none ? 1 : c.seeds;  // nothing random to vary
    for (int k = 0; k < seeds; ++k)
      runs.push_back(
          run_method(m, c.seed + static_cast<std::uint64_t>(k), pretrained, t, c, curves, rt));
    results.insert(results.end(), runs.begin(), runs.end());
    summaries.push_back(summarize(runs));
  }

  if (rt.checkpoint) rt.checkpoint->detach(c.arch);
  print_table(summaries, full_params, t, c);
  double seconds = 0, allreduce = 0, samples = 0;
  for (const auto& r : results) {
    seconds += r.seconds;
    allreduce += r.allreduce_seconds;
    samples += static_cast<double>(r.samples);
  }
  if (seconds > 0) {
    std::printf(
        "Fine-tuning throughput: %.0f training images/s (%.0f images in %.1f s, %d "
        "process(es) x %d thread(s))",
        samples / seconds, samples, seconds, rt.ranks.size(), hra::num_threads());
    if (rt.ranks.distributed())
      std::printf("; gradient allreduce %.1f s = %.1f%% of the training time", allreduce,
                  100 * allreduce / seconds);
    std::printf("\n");
  }
  if (rt.ranks.root()) {
    write_results(prefix + "results.csv", results, c, t.eval_name);
    write_summary(prefix + "summary.csv", summaries, c, t.eval_name, full_params);
    std::printf("\nWrote %ssummary.csv, %sresults.csv (every run) and %scurves.csv\n",
                prefix.c_str(), prefix.c_str(), prefix.c_str());
  }
  for (const auto& s : summaries)
    if (!s.merge_ok) {
      std::fprintf(stderr,
                   "error: %s %s: a merged model does not reproduce its unmerged predictions\n",
                   c.arch.c_str(), s.method.label.c_str());
      return 3;
    }
  return 0;
}

// The data-size sweep (--sweep, issue #16): the methods of --methods at --rank ("equal rank"),
// plus HRA and HRA-GS at the rank whose trainable parameters come closest to LoRA's at --rank
// ("equal parameters"); examples/common/sweep.hpp does the rest.
int run_sweep(const Config& given, const hra::experiments::Ranks& ranks) {
  namespace sw = hra::experiments::sweep;
  const Config c = arch_config(given, "mlp");  // the sweep adapts the MLP
  const auto start = Clock::now();
  std::filesystem::create_directories(c.out_dir);
  std::printf("threads: Eigen %d, hra %d; shift: %s; data: %s\n", Eigen::nbThreads(),
              hra::num_threads(), c.shift.c_str(), c.data_dir.c_str());
  const Tasks t = make_tasks(c);  // the whole target half, the test sets
  CurveWriter curves(c.out_dir + "/sweep_pretrain_curves.csv");
  Runtime rt{ranks, nullptr};
  const Weights pretrained = pretrained_network(c, t, curves, rt);

  std::vector<std::pair<Index, Index>> adapted;  // (d_in, d_out) of the hidden layers
  for (std::size_t k = 0; k + 1 < pretrained.weights.size(); ++k)
    adapted.emplace_back(pretrained.weights[k].cols(), pretrained.weights[k].rows());
  const Index equal_rank = sw::matching_hra_rank(adapted, c.rank);

  std::vector<Method> methods;
  std::vector<sw::Arm> arms;
  auto add = [&](const Method& m, const std::string& name, const std::string& budget) {
    methods.push_back(m);
    arms.push_back({name, m.label, budget, m.kind == Kind::lora || m.kind == Kind::hra ? m.rank : 0,
                    m.kind != Kind::none, m.lr, c.head_lr});
  };
  for (const auto& name : c.methods) {
    const Method m = make_method(name, c);
    add(m, name,
        m.kind == Kind::none || m.kind == Kind::head || m.kind == Kind::full
            ? "reference"
            : (m.rank == c.rank ? "equal rank" : "other rank"));
  }
  const bool has_lora = std::find(c.methods.begin(), c.methods.end(), "lora") != c.methods.end();
  if (has_lora && equal_rank != c.rank)
    for (const char* name : {"hra", "hra-gs"})
      if (std::find(c.methods.begin(), c.methods.end(), name) != c.methods.end()) {
        Config at = c;
        at.rank = equal_rank;
        add(make_method(name, at), std::string(name) + "@" + std::to_string(equal_rank),
            "equal parameters");
      }

  sw::Settings s;
  s.sizes = c.sweep_sizes;
  s.steps = c.sweep_steps;
  s.batch = c.batch;
  s.warmup = c.warmup;
  s.validation = c.sweep_validation;
  s.grid_points = c.sweep_grid;
  s.edge_extensions = c.sweep_extend;
  s.seeds = c.seeds;
  s.first_seed = c.seed;
  s.out_dir = c.out_dir;
  std::printf("Sweep: target sizes");
  for (Index n : s.sizes) std::printf(" %ld", static_cast<long>(n));
  std::printf(
      "; %lld steps of %ld images per run; %d learning rate(s) per method and size chosen on\n"
      "the last %ld of the %ld target training images; %d seed(s); HRA at r=%ld matches the\n"
      "parameters of LoRA at r=%ld\n",
      static_cast<long long>(s.steps), static_cast<long>(s.batch), s.grid_points,
      static_cast<long>(s.validation), static_cast<long>(t.target_train.size()), s.seeds,
      static_cast<long>(equal_rank), static_cast<long>(c.rank));

  const sw::Builder<Net> build = [&](std::size_t arm, std::uint64_t seed) {
    return build_network(pretrained, network_layers(c), methods[arm], seed);
  };
  // The pretrained head is the last layer's "weight" and "bias" (trainable in every method
  // but "none", which keeps it anyway).
  const sw::HeadRestorer<Net> restore_head = [&](Net& net) {
    for (auto& p : net.module_at(net.size() - 1).parameters()) {
      if (p.name == "weight") p.value = pretrained.weights.back();
      if (p.name == "bias") p.value = pretrained.biases.back();
    }
  };
  const sw::DataView<Scalar> data{t.target_train.images, t.target_train.labels,
                                  t.target_eval.images,  t.target_eval.labels,
                                  t.source_test.images,  t.source_test.labels};
  const sw::Outcome o = sw::run<Net, Scalar>(arms, build, restore_head, data, s);

  std::ostringstream md;
  md << "Fashion-MNIST data-size sweep: pretrained on the unshifted first half of the training "
        "images, adapted to the "
     << c.shift << " second half. Every run: " << s.steps << " Adam steps of " << s.batch
     << " images (cosine schedule, " << c.warmup * 100
     << "% warm-up), whatever the training-set size; the learning rate of each method and size "
        "is the best of "
     << s.grid_points << " half-decades around its default (" << s.edge_extensions
     << " more beyond a best rate at the grid's edge) on the last " << s.validation
     << " target training images (one seed); then " << s.seeds
     << " seed(s) at that rate. Accuracies after merging the adapters, on the whole target and "
        "source test sets ("
     << t.target_eval.size() << " images each). Sweep time " << static_cast<long>(o.seconds)
     << " s.\n";
  md << sw::markdown_tables(o, arms, s);
  const std::string tables = md.str();
  std::printf("\n%s", tables.c_str());
  {
    std::ofstream out(c.out_dir + "/sweep_tables.md");
    if (!out) throw std::runtime_error(c.out_dir + "/sweep_tables.md: cannot open for writing");
    out << tables;
  }
  sw::write_runs_csv(c.out_dir + "/sweep_runs.csv", o, arms);
  sw::write_summary_csv(c.out_dir + "/sweep_summary.csv", o, arms, s);
  std::printf(
      "\nWrote %s/sweep_summary.csv, sweep_runs.csv (every run, tuning included) and\n"
      "sweep_tables.md; charts: python3 scripts/plot_sweep.py %s\n",
      c.out_dir.c_str(), c.out_dir.c_str());
  std::printf("Sweep time %.1f s; total %.1f s (%.1f s cpu)\n", o.seconds,
              std::chrono::duration<double>(Clock::now() - start).count(),
              static_cast<double>(std::clock()) / CLOCKS_PER_SEC);
  for (const auto& r : o.rows)
    if (!r.merge_ok) {
      std::fprintf(stderr,
                   "error: %s at %ld images: a run failed or its merged model does not reproduce "
                   "its unmerged predictions\n",
                   arms[r.arm].label.c_str(), static_cast<long>(r.size));
      return 3;
    }
  return 0;
}

int run(const Config& c, const hra::experiments::Ranks& ranks) {
  const auto start = Clock::now();
  if (ranks.root()) std::filesystem::create_directories(c.out_dir);
  std::printf("threads: Eigen %d, hra %d; ranks: %d; shift: %s; data: %s\n", Eigen::nbThreads(),
              hra::num_threads(), ranks.size(), c.shift.c_str(), c.data_dir.c_str());
  Checkpointer checkpoint(c);
  Runtime rt{ranks, checkpoint.enabled() ? &checkpoint : nullptr};
  const Tasks t = make_tasks(c);
  std::printf("source: %ld training images; target (%s): %ld training, %ld %s images\n",
              static_cast<long>(t.source_train.size()), c.shift.c_str(),
              static_cast<long>(t.target_train.size()), static_cast<long>(t.target_eval.size()),
              t.eval_name.c_str());

  int status = 0;
  for (const auto& arch : c.archs) {
    const auto arch_start = Clock::now();
    status = std::max(status, run_arch(arch_config(c, arch), t, rt));
    std::printf("%s comparison: %.1f s\n", arch == "mlp" ? "MLP" : "CNN",
                std::chrono::duration<double>(Clock::now() - arch_start).count());
  }
  std::printf("\nChart: python3 scripts/plot_finetune.py %s\n", c.out_dir.c_str());
  std::printf("Total time %.1f s (%.1f s cpu)\n",
              std::chrono::duration<double>(Clock::now() - start).count(),
              static_cast<double>(std::clock()) / CLOCKS_PER_SEC);
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<Config> config;
  try {
    config = parse_args(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  if (!config) {
    print_usage(stdout);
    return 0;
  }
  // Outside the try: an error on one rank must abort every rank (the others would wait in a
  // collective for ever), after its message is printed.
  std::unique_ptr<hra::experiments::MpiSession> mpi;
  try {
    mpi = std::make_unique<hra::experiments::MpiSession>(config->mpi, &argc, &argv);
    const hra::experiments::Ranks ranks = mpi->ranks();
    // Rank 0 alone prints; the others keep stderr for errors.
    if (!ranks.root() && !std::freopen("/dev/null", "w", stdout))
      throw std::runtime_error("cannot redirect stdout to /dev/null");
    return config->sweep ? run_sweep(*config, ranks) : run(*config, ranks);
  } catch (const Stopped& e) {
    std::printf("%s\n", e.what());
    return stopped_exit_code;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    if (mpi) mpi->abort(2);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    if (mpi) mpi->abort(1);
    return 1;
  }
}
