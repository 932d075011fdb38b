// Quickstart: adapt a frozen linear layer with Householder reflections inside a model, train
// it, merge it. Exits 1 if the merged model's output differs from the unmerged one.
#include <hra/hra.hpp>

#include <cstdio>

int main() {
  using Matrix = hra::Sequentialf::Matrix;
  const Eigen::Index d_in = 64, d_out = 32, n = 256;

  // A "pretrained" frozen weight W and a toy target: the outputs of W after a rotation of the
  // inputs in one plane, which W H x can represent for the right reflections in H.
  Matrix w = Matrix::Random(d_out, d_in);
  Matrix x = Matrix::Random(d_in, n);
  Matrix rotated = x;
  const float c = 0.6f, s = 0.8f;
  rotated.row(0) = c * x.row(0) - s * x.row(1);
  rotated.row(1) = s * x.row(0) + c * x.row(1);
  const Matrix target = w * rotated;

  // y = W H x with H = H_1 ... H_r. Only U (d_in x r) trains; symmetric init makes H = I.
  // A model holds named modules (any hra::Layer) with an activation after each; here one.
  hra::HraOptions options;
  options.rank = 4;
  options.seed = 1;
  hra::Sequentialf model;
  model.emplace<hra::HraLinearf>("fc", w, options);
  std::printf("trainable parameters: %ld (W has %ld); %s\n",
              static_cast<long>(model.num_trainable_parameters()), static_cast<long>(w.size()),
              model.parameters().front().name.c_str());

  hra::Adam<float> adam({/*lr=*/2e-2});
  for (int step = 0; step <= 300; ++step) {
    const Matrix& y = model.forward(x);
    const Matrix residual = y - target;
    const float loss = residual.squaredNorm() / static_cast<float>(n);  // mean squared error
    model.backward((2.0f / static_cast<float>(n)) * residual, /*compute_input_gradient=*/false);
    adam.step(model.parameters());
    if (step % 50 == 0) std::printf("step %3d  loss %.5f\n", step, loss);
  }

  // Merge: W <- W H, after which the model is the plain product; check nothing changed.
  Matrix unmerged, merged;
  model.predict(x, unmerged);
  model.merge();
  model.predict(x, merged);
  const float diff = (merged - unmerged).cwiseAbs().maxCoeff();
  std::printf("max |merged - unmerged| = %.3g\n", diff);
  if (!(diff < 1e-3f * unmerged.cwiseAbs().maxCoeff())) {
    std::printf("merged output differs\n");
    return 1;
  }
  std::printf("merged output matches the unmerged layer\n");
  model.unmerge();  // back to W, with the adapter trainable again
  return 0;
}
