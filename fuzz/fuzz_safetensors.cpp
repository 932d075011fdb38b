// libFuzzer target for the safetensors reader: any input must either parse or be rejected with
// an hra::safetensors::error; a parsed file must survive every getter and a write/read round
// trip. Anything else (another exception, a sanitizer report, a leak) is a crash.
//
// Built with -DHRA_FUZZ_SEED_WRITER instead, this file is a small program that writes valid
// files into the directory given as its argument, to seed the corpus.
#include <hra/io/safetensors.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace st = hra::safetensors;

#ifndef HRA_FUZZ_SEED_WRITER

namespace {

template <typename Scalar>
void read_every_way(const st::TensorFile& file, const std::string& name, const st::Tensor& t) {
  for (st::NonFinite mode : {st::NonFinite::allow, st::NonFinite::reject}) {
    try {
      const auto values = file.get_array<Scalar>(name, mode);
      if (values.size() != t.numel()) std::abort();
    } catch (const st::tensor_error&) {
    }
    try {
      const auto m = file.get_matrix<Scalar>(name, mode);
      if (t.shape.size() != 2 || m.rows() != t.shape[0] || m.cols() != t.shape[1]) std::abort();
      (void)file.get_matrix<Scalar>(name, m.rows(), m.cols(), mode);
    } catch (const st::tensor_error&) {
    }
    try {
      const auto v = file.get_vector<Scalar>(name, mode);
      if (t.shape.size() != 1 || v.size() != t.shape[0]) std::abort();
      (void)file.get_vector<Scalar>(name, v.size(), mode);
    } catch (const st::tensor_error&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Strict first (the format's rules), then with unused buffer bytes allowed.
  st::TensorFile file;
  st::ReadOptions lax;
  lax.allow_unindexed_bytes = true;
  try {
    file = st::parse(data, size, "<fuzz>");
  } catch (const st::format_error&) {
    try {
      file = st::parse(data, size, "<fuzz>", lax);
    } catch (const st::format_error&) {
      return 0;
    }
  }
  for (const auto& [name, tensor] : file.tensors()) {
    read_every_way<float>(file, name, tensor);
    read_every_way<double>(file, name, tensor);
  }
  // What was accepted writes out and reads back unchanged (any exception here is a bug).
  const st::TensorFile again = st::parse(st::serialize(file));
  if (again.tensors() != file.tensors() || again.metadata() != file.metadata()) std::abort();
  return 0;
}

#else  // HRA_FUZZ_SEED_WRITER

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  Eigen::MatrixXf m(2, 3);
  m << 1, -2, 3.5f, 0, 1e-6f, 65504;

  st::TensorFile matrix;
  matrix.put_matrix("weight", m);
  st::save(dir + "/seed_f32_matrix.safetensors", matrix);

  st::TensorFile mixed;
  mixed.metadata()["format"] = "pt";
  mixed.put_matrix("a.hra_u", m.cast<double>().transpose().eval(), st::Dtype::F64);
  mixed.put_vector("b.bias", Eigen::VectorXf::LinSpaced(3, -1, 1), st::Dtype::F16);
  mixed.put_matrix("c.bf16", m, st::Dtype::BF16);
  st::save(dir + "/seed_mixed.safetensors", mixed);

  st::TensorFile shapes;
  shapes.put_array<float>("scalar", {}, {3.0f});
  shapes.put_array<float>("empty", {0, 4}, {});
  shapes.put_array<float>("cube", {2, 1, 2}, {1, 2, 3, 4}, st::Dtype::F16);
  st::save(dir + "/seed_shapes.safetensors", shapes);

  st::save(dir + "/seed_empty.safetensors", st::TensorFile());
  return 0;
}

#endif
