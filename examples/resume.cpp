// Resume from a checkpoint: train k steps, save a checkpoint (parameters, Adam's moments and step
// counts, the batch sampler's generator, the step number), build a fresh model and optimiser,
// load it and continue. The resumed run equals an uninterrupted one bit for bit: the same
// losses at every step and the same final parameters (exit 1 otherwise).
//
//   resume [--out DIR]      (default DIR: resume_out; the checkpoint is DIR/checkpoint)
#include <hra/hra.hpp>
#include <hra/io.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

namespace {

using Matrix = hra::Sequentialf::Matrix;

// Everything a training run owns. Every part of it that changes while training is saved.
struct Run {
  hra::Sequentialf model;
  hra::Adam<float> adam{{/*lr=*/1e-2}};
  std::mt19937_64 sampler{42};  // draws each step's batch
  int step = 0;

  Run() {
    std::srand(1);  // the "pretrained" weights: the same in every run
    hra::HraOptions o;
    o.rank = 4;
    o.seed = 2;
    model.emplace<hra::HraLinearf>("fc1", Matrix(Matrix::Random(32, 16) / 4.0f), o);
    model.set_activation("fc1", hra::Activation::gelu_tanh);
    model.emplace<hra::Linearf>(
        "head", hra::WeightMatrix<float>::owned(Matrix::Random(4, 32) / 6.0f), std::nullopt);
  }
};

// `steps` Adam steps on random batches of 16 of the data's columns; returns the losses.
std::vector<float> train(Run& run, int steps, const Matrix& x, const Matrix& y) {
  std::vector<float> losses;
  Matrix xb(x.rows(), 16), yb(y.rows(), 16);
  for (int s = 0; s < steps; ++s, ++run.step) {
    for (Eigen::Index j = 0; j < xb.cols(); ++j) {
      const auto col = static_cast<Eigen::Index>(run.sampler() % x.cols());
      xb.col(j) = x.col(col);
      yb.col(j) = y.col(col);
    }
    const Matrix residual = run.model.forward(xb) - yb;
    losses.push_back(residual.squaredNorm() / 16.0f);
    run.model.backward(residual / 8.0f, /*compute_input_gradient=*/false);
    run.adam.step(run.model.parameters());
  }
  return losses;
}

void save(Run& run, const std::filesystem::path& dir) {
  hra::checkpoint::Writer<float> w;
  w.parameters("model", run.model.parameters());
  w.optimizer("adam", run.adam, run.model.parameters());
  w.rng("sampler", run.sampler);
  w.metadata()["step"] = run.step;
  w.save(dir);  // atomic: a crash leaves the previous checkpoint or this one
}

void load(Run& run, const std::filesystem::path& dir) {
  auto r = hra::checkpoint::Reader<float>::load(dir);
  if (!r) throw std::runtime_error("no checkpoint in " + dir.string());
  // Each call checks names, shapes and values and only stages the change; apply() makes them.
  r->parameters("model", run.model.parameters());
  r->optimizer("adam", run.adam, run.model.parameters());
  r->rng("sampler", run.sampler);
  const int step = r->metadata().at("step");
  r->apply();
  run.step = step;
}

}  // namespace

int main(int argc, char** argv) {
  std::filesystem::path out = "resume_out";
  if (argc == 3 && std::strcmp(argv[1], "--out") == 0) {
    out = argv[2];
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: resume [--out DIR]\n");
    return 2;
  }
  std::srand(7);
  const Matrix x = Matrix::Random(16, 256), y = Matrix::Random(4, 256);
  const int k = 20, total = 50;

  Run uninterrupted;
  const std::vector<float> expected = train(uninterrupted, total, x, y);

  std::vector<float> losses;
  {
    Run first;
    losses = train(first, k, x, y);
    save(first, out / "checkpoint");
  }  // the first run ends here: nothing of it survives but the checkpoint
  Run resumed;
  load(resumed, out / "checkpoint");
  std::printf("resumed at step %d\n", resumed.step);
  for (float l : train(resumed, total - k, x, y)) losses.push_back(l);

  bool same = losses == expected;
  const auto a = uninterrupted.model.parameters(), b = resumed.model.parameters();
  for (std::size_t i = 0; i < a.size(); ++i) same = same && a[i].value == b[i].value;
  for (int s = 0; s < total; s += 10)
    std::printf("step %2d  loss %.6f (uninterrupted %.6f)\n", s, losses[s], expected[s]);
  if (!same) {
    std::printf("the resumed run differs from the uninterrupted one\n");
    return 1;
  }
  std::printf("resumed run equals the uninterrupted one bit for bit (%d steps, checkpoint at %d)\n",
              total, k);
  return 0;
}
