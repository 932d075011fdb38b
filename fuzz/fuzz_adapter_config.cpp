// libFuzzer target for the PEFT adapter loader (hra/io/peft_load.hpp), at its memory-level entry
// points: parse_config() on the adapter_config.json bytes, safetensors::parse() on the
// adapter_model.safetensors bytes, then load_hra_adapters() / load_lora_adapters() into two
// small layers ("net.fc1" 6 -> 5, "net.fc2" 5 -> 3).
//
// Input: byte 0 = flags (bit 0 LoRA, bit 1 double layers, bit 2 allow unmapped tensors, bit 3
// rescale LoRA B, bit 4 Gram-Schmidt layers, bit 5 layers with a trainable bias, bits 6-7 the
// layers' rank - 1), bytes 1-2 = length L of the config (little-endian), then L bytes of config
// and the rest as the weights file.
//
// What must hold, else the target aborts (a crash for libFuzzer):
//   - every input is loaded or refused with hra::peft::error or hra::safetensors::error (any
//     other exception escapes and is a crash), without sanitizer reports or leaks;
//   - a refused load leaves both layers exactly as they were;
//   - an accepted load leaves finite parameters, saves again (hra_adapter_files /
//     lora_adapter_files) without an exception, and those files load into fresh layers with
//     identical parameters.
//
// Built with -DHRA_FUZZ_SEED_WRITER, this file is a program that writes valid inputs for every
// flag combination into the directory given as its argument, to seed the corpus.
#include <hra/io.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace st = hra::safetensors;
namespace peft = hra::peft;

namespace {

struct Flags {
  bool lora, use_double, allow_unmapped, rescale, gram_schmidt, bias;
  Eigen::Index rank;
  explicit Flags(std::uint8_t b)
      : lora(b & 1),
        use_double(b & 2),
        allow_unmapped(b & 4),
        rescale(b & 8),
        gram_schmidt(b & 16),
        bias(b & 32),
        rank(1 + ((b >> 6) & 3)) {
    if (lora && rank > 3) rank = 3;  // LoRA's rank <= min(d_in, d_out) = 3 for fc2
  }
};

template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

template <typename Scalar>
Matrix<Scalar> pattern(Eigen::Index rows, Eigen::Index cols, int seed) {
  Matrix<Scalar> m(rows, cols);
  for (Eigen::Index j = 0; j < cols; ++j)
    for (Eigen::Index i = 0; i < rows; ++i)
      m(i, j) = static_cast<Scalar>(
          std::sin(1.0 + seed + 0.7 * static_cast<double>(i) + 1.3 * static_cast<double>(j)));
  return m;
}

template <typename Scalar>
hra::HraLinear<Scalar> make_hra(Eigen::Index d_in, Eigen::Index d_out, const Flags& f, int seed) {
  hra::HraOptions o;
  o.rank = f.rank;
  o.variant = f.gram_schmidt ? hra::Variant::gram_schmidt : hra::Variant::chain;
  o.init = hra::Init::random;
  o.seed = static_cast<std::uint64_t>(seed);
  std::optional<Vector<Scalar>> bias;
  if (f.bias) bias = pattern<Scalar>(d_out, 1, seed + 5);
  return hra::HraLinear<Scalar>(
      hra::WeightMatrix<Scalar>::owned(pattern<Scalar>(d_out, d_in, seed)), bias, o,
      f.bias ? hra::BiasMode::all : hra::BiasMode::none);
}

template <typename Scalar>
hra::LoraLinear<Scalar> make_lora(Eigen::Index d_in, Eigen::Index d_out, const Flags& f, int seed) {
  hra::LoraOptions o;
  o.rank = f.rank;
  o.alpha = 2.0 * static_cast<double>(f.rank);
  o.seed = static_cast<std::uint64_t>(seed);
  std::optional<Vector<Scalar>> bias;
  if (f.bias) bias = pattern<Scalar>(d_out, 1, seed + 5);
  hra::LoraLinear<Scalar> layer(
      hra::WeightMatrix<Scalar>::owned(pattern<Scalar>(d_out, d_in, seed)), bias, o,
      f.bias ? hra::BiasMode::all : hra::BiasMode::none);
  layer.set_lora_weights(layer.lora_a(), pattern<Scalar>(d_out, f.rank, seed + 9));
  return layer;
}

/// Everything a load may write, to compare before and after.
template <typename Scalar>
std::vector<Matrix<Scalar>> state(const hra::HraLinear<Scalar>& l) {
  std::vector<Matrix<Scalar>> s{l.weight()};
  if (l.bias()) s.push_back(*l.bias());
  for (const auto& a : l.adapters()) s.push_back(a.chain().reflectors());
  return s;
}

template <typename Scalar>
std::vector<Matrix<Scalar>> state(const hra::LoraLinear<Scalar>& l) {
  std::vector<Matrix<Scalar>> s{l.weight(), l.lora_a(), l.lora_b()};
  if (l.bias()) s.push_back(*l.bias());
  return s;
}

template <typename Scalar>
bool all_finite(const std::vector<Matrix<Scalar>>& s) {
  for (const auto& m : s)
    if (!m.allFinite()) return false;
  return true;
}

struct Hra {
  template <typename Scalar>
  static auto make(Eigen::Index d_in, Eigen::Index d_out, const Flags& f, int seed) {
    return make_hra<Scalar>(d_in, d_out, f, seed);
  }
  template <typename Modules>
  static void load(const peft::AdapterConfig& c, const st::TensorFile& w, const Modules& m,
                   const peft::LoadOptions& o) {
    peft::load_hra_adapters(c, w, m, o);
  }
  template <typename Modules>
  static peft::AdapterFiles save(const Modules& m, const peft::SaveOptions& o = {}) {
    return peft::hra_adapter_files(m, o);
  }
};

struct Lora {
  template <typename Scalar>
  static auto make(Eigen::Index d_in, Eigen::Index d_out, const Flags& f, int seed) {
    return make_lora<Scalar>(d_in, d_out, f, seed);
  }
  template <typename Modules>
  static void load(const peft::AdapterConfig& c, const st::TensorFile& w, const Modules& m,
                   const peft::LoadOptions& o) {
    peft::load_lora_adapters(c, w, m, o);
  }
  template <typename Modules>
  static peft::AdapterFiles save(const Modules& m, const peft::SaveOptions& o = {}) {
    return peft::lora_adapter_files(m, o);
  }
};

template <typename Kind, typename Scalar>
void run(const Flags& f, const peft::AdapterConfig& config, const st::TensorFile& weights) {
  auto fc1 = Kind::template make<Scalar>(6, 5, f, 1);
  auto fc2 = Kind::template make<Scalar>(5, 3, f, 2);
  using Layer = decltype(fc1);
  const std::map<std::string, Layer*> modules{{"net.fc1", &fc1}, {"net.fc2", &fc2}};
  const auto before1 = state(fc1), before2 = state(fc2);
  peft::LoadOptions options;
  options.allow_unmapped_tensors = f.allow_unmapped;
  options.rescale_lora_b = f.rescale;
  try {
    Kind::load(config, weights, modules, options);
  } catch (const peft::error&) {
    if (state(fc1) != before1 || state(fc2) != before2) std::abort();
    return;
  } catch (const st::error&) {
    if (state(fc1) != before1 || state(fc2) != before2) std::abort();
    return;
  }
  if (!all_finite(state(fc1)) || !all_finite(state(fc2))) std::abort();

  // Accepted: what hra writes for these layers must load back unchanged (no exception allowed).
  const peft::AdapterFiles files = Kind::save(modules);
  const peft::AdapterConfig config2 = peft::parse_config(files.config_text(), "<fuzz resave>");
  const st::TensorFile weights2 = st::parse(st::serialize(files.weights), "<fuzz resave>");
  auto again1 = Kind::template make<Scalar>(6, 5, f, 3);
  auto again2 = Kind::template make<Scalar>(5, 3, f, 4);
  Kind::load(config2, weights2,
             std::map<std::string, Layer*>{{"net.fc1", &again1}, {"net.fc2", &again2}},
             peft::LoadOptions{});
  // Frozen weights differ by construction; compare what was loaded.
  auto loaded = [](const Layer& l) {
    auto s = state(l);
    s.erase(s.begin());
    return s;
  };
  if (loaded(again1) != loaded(fc1) || loaded(again2) != loaded(fc2)) std::abort();
}

}  // namespace

#ifndef HRA_FUZZ_SEED_WRITER

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 3) return 0;
  const Flags flags(data[0]);
  const std::size_t config_size =
      std::min<std::size_t>(size - 3, static_cast<std::size_t>(data[1]) | (data[2] << 8));
  const std::string_view config_text(reinterpret_cast<const char*>(data + 3), config_size);
  const std::uint8_t* weights_bytes = data + 3 + config_size;
  const std::size_t weights_size = size - 3 - config_size;

  peft::AdapterConfig config;
  try {
    config = peft::parse_config(config_text, "<fuzz config>");
  } catch (const peft::config_error&) {
    return 0;
  }
  st::TensorFile weights;
  try {
    weights = st::parse(weights_bytes, weights_size, "<fuzz weights>");
  } catch (const st::format_error&) {
    return 0;
  }
  if (flags.lora) {
    if (flags.use_double)
      run<Lora, double>(flags, config, weights);
    else
      run<Lora, float>(flags, config, weights);
  } else {
    if (flags.use_double)
      run<Hra, double>(flags, config, weights);
    else
      run<Hra, float>(flags, config, weights);
  }
  return 0;
}

#else  // HRA_FUZZ_SEED_WRITER

namespace {

template <typename Kind, typename Scalar>
std::string seed_input(std::uint8_t flag_byte, st::Dtype dtype) {
  const Flags f(flag_byte);
  auto fc1 = Kind::template make<Scalar>(6, 5, f, 1);
  auto fc2 = Kind::template make<Scalar>(5, 3, f, 2);
  using Layer = decltype(fc1);
  peft::SaveOptions options;
  options.dtype = dtype;
  const peft::AdapterFiles files =
      Kind::save(std::map<std::string, Layer*>{{"net.fc1", &fc1}, {"net.fc2", &fc2}}, options);
  const std::string config = files.config_text();
  const std::string weights = st::serialize(files.weights);
  std::string out(1, static_cast<char>(flag_byte));
  out.push_back(static_cast<char>(config.size() & 0xFF));
  out.push_back(static_cast<char>((config.size() >> 8) & 0xFF));
  return out + config + weights;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const st::Dtype dtypes[] = {st::Dtype::F32, st::Dtype::F64, st::Dtype::F16, st::Dtype::BF16};
  int n = 0;
  for (int rank = 1; rank <= 4; ++rank) {
    for (int bits = 0; bits < 64; ++bits) {
      // A spread of the flag combinations: every kind, scalar, variant and bias, ranks 1-4.
      if ((bits & 4) || (bits & 8)) continue;  // options that only relax: reached by mutation
      const auto flag_byte = static_cast<std::uint8_t>(bits | ((rank - 1) << 6));
      const Flags f(flag_byte);
      if (f.lora && f.gram_schmidt) continue;
      const st::Dtype dtype = dtypes[(n++) % 4];
      std::string input;
      if (f.lora)
        input = f.use_double ? seed_input<Lora, double>(flag_byte, dtype)
                             : seed_input<Lora, float>(flag_byte, dtype);
      else
        input = f.use_double ? seed_input<Hra, double>(flag_byte, dtype)
                             : seed_input<Hra, float>(flag_byte, dtype);
      const std::string path = dir + "/seed_adapter_" + std::to_string(flag_byte);
      std::FILE* out = std::fopen(path.c_str(), "wb");
      if (!out || std::fwrite(input.data(), 1, input.size(), out) != input.size()) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        return 1;
      }
      std::fclose(out);
    }
  }
  return 0;
}

#endif
