// The double sweep of hra_bench: the small layers fully, the headline layer at r = 8, n = 512
// (without PEFT's dense algorithm, whose r + 1 saved 4096 x 4096 doubles would need 1.2 GB).
#include "bench_cases.hpp"

namespace hra_bench {

void register_double(const Config& cfg) {
  const std::vector<Index> ranks{2, 8, 32, 128}, batches{1, 64, 512};
  for (Index d : {256, 1024}) register_shape<double>(cfg, d, d, ranks, batches, true);
  register_shape<double>(cfg, 4096, 4096, {8}, {512}, false);
}

}  // namespace hra_bench
