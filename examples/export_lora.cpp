// Train an HRA adapter, export it as the exact LoRA adapter it is (a PEFT LoRA directory that
// LoRA-only stacks load), reload that with hra's LoRA loader and measure what each dtype costs.
//
//   export_lora [--out DIR]      (default DIR: lora_export_out)
//
// Writes DIR/hra (the PEFT HRA adapter, for the size comparison) and DIR/lora_f32, lora_f16,
// lora_bf16. Exits 1 if a reloaded LoRA's outputs differ from the HRA layer's by more than the
// dtype's rounding allows.
#include <hra/hra.hpp>
#include <hra/io.hpp>
#include <hra/io/sequential.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

namespace {

using Matrix = hra::HraLinearf::Matrix;
namespace peft = hra::peft;
namespace st = hra::safetensors;

double max_abs(const Eigen::MatrixXd& m) {
  return m.cwiseAbs().maxCoeff();
}

}  // namespace

int main(int argc, char** argv) {
  std::filesystem::path out = "lora_export_out";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      out = argv[++i];
    } else {
      std::fprintf(stderr, "usage: export_lora [--out DIR]\n");
      return 2;
    }
  }
  const Eigen::Index d_in = 256, d_out = 192, n = 512, rank = 8;

  // A "pretrained" frozen W and a target the adapter can reach: W after a rotation of the
  // inputs in two planes.
  std::srand(7);
  const Matrix w = Matrix::Random(d_out, d_in) / std::sqrt(static_cast<float>(d_in));
  const Matrix x = Matrix::Random(d_in, n);
  Matrix rotated = x;
  const float c = 0.8f, s = 0.6f;
  for (Eigen::Index p : {0, 2}) {
    rotated.row(p) = c * x.row(p) - s * x.row(p + 1);
    rotated.row(p + 1) = s * x.row(p) + c * x.row(p + 1);
  }
  const Matrix target = w * rotated;

  hra::HraOptions options;
  options.rank = rank;
  options.seed = 1;
  // The module name is the PEFT module name of every adapter file below.
  hra::Sequentialf model;
  model.emplace<hra::HraLinearf>("layer", w, options);
  hra::Adam<float> adam({/*lr=*/1e-2});
  for (int step = 0; step <= 200; ++step) {
    const Matrix residual = model.forward(x) - target;
    model.backward((2.0f / static_cast<float>(n)) * residual, /*compute_input_gradient=*/false);
    adam.step(model.parameters());
    if (step % 50 == 0)
      std::printf("step %3d  loss %.5f\n", step, residual.squaredNorm() / static_cast<float>(n));
  }
  Matrix y_hra;
  model.predict(x, y_hra);

  // The HRA adapter as PEFT saves it: d_in r numbers.
  peft::save_hra_adapters(out / "hra", model);  // its HRA modules, by name
  const auto hra_bytes = std::filesystem::file_size(out / "hra" / peft::weights_file_name);
  std::printf("\nHRA adapter: %ld numbers (d_in r), %s %ju bytes\n", static_cast<long>(d_in * rank),
              peft::weights_file_name, static_cast<std::uintmax_t>(hra_bytes));

  bool ok = true;
  std::printf("%-5s %11s %13s %13s %12s %10s\n", "dtype", "LoRA nums", "file bytes", "max|dW|",
              "max|dW|/|W|", "out rel");
  for (const st::Dtype dtype : {st::Dtype::F32, st::Dtype::F16, st::Dtype::BF16}) {
    const std::string name = std::string("lora_") + (dtype == st::Dtype::F32   ? "f32"
                                                     : dtype == st::Dtype::F16 ? "f16"
                                                                               : "bf16");
    peft::LoraExportOptions o;
    o.dtype = dtype;
    const peft::LoraExport e = peft::export_lora_adapters(out / name, model, o);
    const auto& report = e.report.front();

    // Reload with hra's LoRA loader into a LoRA layer over the same W (scale lora_alpha / r = 1).
    hra::LoraOptions lo;
    lo.rank = report.rank;
    lo.alpha = static_cast<double>(report.rank);
    hra::Sequentialf lora;
    lora.emplace<hra::LoraLinearf>("layer", w, lo);
    peft::load_lora_adapters(out / name, lora);
    Matrix y_lora;
    lora.predict(x, y_lora);
    const double out_rel = max_abs((y_lora - y_hra).cast<double>()) / max_abs(y_hra.cast<double>());
    const auto bytes = std::filesystem::file_size(out / name / peft::weights_file_name);
    std::printf("%-5s %11zu %13ju %13.3e %12.3e %10.3e\n", st::to_string(dtype),
                report.lora_numbers(), static_cast<std::uintmax_t>(bytes), report.max_weight_error,
                report.max_weight_error / report.max_weight, out_rel);
    // Rounding to the dtype, a few units of its last place (F32 also the float training).
    const double unit = dtype == st::Dtype::F32   ? 0x1p-24
                        : dtype == st::Dtype::F16 ? 0x1p-11
                                                  : 0x1p-8;
    if (!(out_rel <= 64 * unit)) {
      std::printf("reloaded %s LoRA differs from the HRA layer\n", st::to_string(dtype));
      ok = false;
    }
  }
  std::printf("LoRA numbers: r (d_in + d_out) = %ld, %.2fx the HRA adapter's d_in r\n",
              static_cast<long>(rank * (d_in + d_out)),
              static_cast<double>(d_in + d_out) / static_cast<double>(d_in));
  if (!ok) return 1;
  std::printf("reloaded LoRA matches the HRA layer in every dtype; adapters in %s\n",
              out.string().c_str());
  return 0;
}
