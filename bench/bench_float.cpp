// The float sweep of hra_bench (the headline scalar): square layers and one d_out != d_in layer.
#include <algorithm>

#include "bench_cases.hpp"

namespace hra_bench {

void register_float(const Config& cfg) {
  const std::vector<Index> ranks{2, 8, 32, 128}, batches{1, 64, 512};
  for (Index d : {256, 1024, 4096}) register_shape<float>(cfg, d, d, ranks, batches, true);
  register_shape<float>(cfg, 4096, 1024, ranks, batches, true);
  // The memory-bandwidth floor of merge at the headline layer.
  const Shape c{4096, 4096, 0, 0};
  const int threads = std::max(cfg.threads, cfg.blas_threads);
  add<float>(cfg, "copy", "op", c,
             [c, threads](benchmark::State& st) { bm_copy<float>(st, c, threads); });
}

}  // namespace hra_bench
