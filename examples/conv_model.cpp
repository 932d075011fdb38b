// A conv model: two frozen convolutions adapted with Householder reflections (HraConv2d) and a
// trainable linear head in an hra::Sequential, trained a few steps on synthetic images, then
// merged. Exits 1 unless training lowered the loss and the merged model predicts what the
// unmerged one does.
#include <hra/hra.hpp>

#include <cstdio>
#include <optional>

namespace {

using Matrix = hra::Sequentialf::Matrix;

// 1 x 12 x 12 images -> conv 1->4 3x3 stride 2 padding 1 (4 x 6 x 6) -> ReLU
//                    -> conv 4->8 3x3 stride 2 padding 1 (8 x 3 x 3) -> ReLU -> linear 72->3.
// A batch is C H W x n: each column one image in PyTorch's C,H,W order. `weights_seed` draws
// the "pretrained" convolutions, `head_seed` the head.
hra::Sequentialf make_model(unsigned weights_seed, unsigned head_seed) {
  const auto g1 = hra::Conv2dGeometry(1, 12, 12, 4, 3, 3).stride(2).padding(1);
  const auto g2 =
      hra::Conv2dGeometry(4, g1.out_height(), g1.out_width(), 8, 3, 3).stride(2).padding(1);
  hra::HraOptions o;
  o.rank = 4;  // r reflections over the fan-in (C_in kh kw); symmetric init: H = I at the start
  o.seed = 1;
  std::srand(weights_seed);
  hra::Sequentialf model;
  const Matrix w1 = Matrix::Random(4, g1.fan_in()), w2 = Matrix::Random(8, g2.fan_in()) * 0.4f;
  model.emplace<hra::HraConv2df>("conv1", g1, w1, o);
  model.set_activation("conv1", hra::Activation::relu);
  model.emplace<hra::HraConv2df>("conv2", g2, w2, o);
  model.set_activation("conv2", hra::Activation::relu);
  std::srand(head_seed);
  model.emplace<hra::Linearf>("head",
                              hra::WeightMatrix<float>::owned(Matrix::Random(3, g2.output_size())),
                              std::nullopt);  // a Linear trains its weight unless told not to
  return model;
}

}  // namespace

int main() {
  const Eigen::Index n = 64;
  std::srand(11);
  const Matrix x = Matrix::Random(144, n);
  // The target: what the same convolutions give after a change the adapters can learn (here
  // other pretrained weights), read out by the same head.
  Matrix target;
  make_model(/*weights_seed=*/5, /*head_seed=*/9).predict(x, target);

  hra::Sequentialf model = make_model(/*weights_seed=*/3, /*head_seed=*/9);
  std::printf("trainable parameters: %ld\n", static_cast<long>(model.num_trainable_parameters()));
  for (const auto& p : model.parameters())
    std::printf("  %-20s %ld x %ld\n", p.name.c_str(), static_cast<long>(p.value.rows()),
                static_cast<long>(p.value.cols()));

  hra::Adam<float> adam({/*lr=*/1e-2});
  float first = 0, loss = 0;
  for (int step = 0; step <= 60; ++step) {
    const Matrix residual = model.forward(x) - target;
    loss = residual.squaredNorm() / static_cast<float>(n);  // mean squared error
    if (step == 0) first = loss;
    // No input gradient: backward() stops at the first module with trainable parameters.
    model.backward((2.0f / static_cast<float>(n)) * residual, /*compute_input_gradient=*/false);
    adam.step(model.parameters());
    if (step % 20 == 0) std::printf("step %2d  loss %.5f\n", step, loss);
  }
  if (!(loss < 0.5f * first)) {
    std::printf("training did not lower the loss (%.5f -> %.5f)\n", first, loss);
    return 1;
  }

  // Merge: every convolution's W <- W H (the head has no adapter and is skipped).
  Matrix unmerged, merged;
  model.predict(x, unmerged);
  model.merge();
  model.predict(x, merged);
  const float diff = (merged - unmerged).cwiseAbs().maxCoeff();
  std::printf("max |merged - unmerged| = %.3g\n", diff);
  if (!(diff <= 1e-4f * unmerged.cwiseAbs().maxCoeff())) {
    std::printf("merged output differs\n");
    return 1;
  }
  model.unmerge();  // back to the frozen weights, the adapters trainable again
  std::printf("merged conv model matches the unmerged one\n");
  return 0;
}
