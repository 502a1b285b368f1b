// nfkernels::sample_next on CPU: CFG mix, temperature, top-k, top-p and the draw, one row per OpenMP task.
// Same semantics and the same counter-based RNG (splitmix64 of seed + golden * (row * V + col + 1)) as
// nfkernels/sampling.py's torch backend, so both give the same tokens for the same seed.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline double hash_uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + counter * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return (static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53;  // in (0, 1)
}

at::Tensor sample_next_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& uncond_logits,
                           double cfg_scale, double temperature, int64_t top_k, double top_p,
                           const at::Tensor& seed) {
  TORCH_CHECK(logits.dim() == 2, "sample_next: logits must be [B, V]");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "sample_next: seed must be one int64");
  TORCH_CHECK(temperature > 0, "sample_next: temperature must be > 0");
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor lc = logits.to(at::kFloat).contiguous();
  at::Tensor lu;
  const bool cfg = uncond_logits.has_value() && uncond_logits->defined();
  if (cfg) {
    TORCH_CHECK(uncond_logits->sizes() == logits.sizes(), "sample_next: uncond_logits shape mismatch");
    lu = uncond_logits->to(at::kFloat).contiguous();
  }
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kCPU).item<int64_t>());  // a CPU tensor: no device sync
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* pc = lc.data_ptr<float>();
  const float* pu = cfg ? lu.data_ptr<float>() : nullptr;
  int64_t* po = out.data_ptr<int64_t>();
  const float scale = static_cast<float>(cfg_scale), temp = static_cast<float>(temperature);
  const float neg_inf = -std::numeric_limits<float>::infinity();

#pragma omp parallel
  {
    std::vector<float> row(V), sorted(V);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < V; ++i) {
        float l = pc[b * V + i];
        if (cfg) {
          const float u = pu[b * V + i];
          if (l != u) l = u + scale * (l - u);
        }
        row[i] = l / temp;
      }
      if (top_k > 0 && top_k < V) {  // keep values >= the k-th largest
        sorted = row;
        std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
        const float kth = sorted[top_k - 1];
        for (int64_t i = 0; i < V; ++i)
          if (!(row[i] >= kth)) row[i] = neg_inf;
      }
      const float mx = *std::max_element(row.begin(), row.end());
      if (top_p < 1.0) {  // keep values >= the first (descending) value where the cumulative mass reaches p
        sorted = row;
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        double z = 0.0;
        for (int64_t i = 0; i < V; ++i) z += std::exp(static_cast<double>(sorted[i] - mx));
        double cum = 0.0;
        float thr = sorted[V - 1];
        for (int64_t i = 0; i < V; ++i) {
          cum += std::exp(static_cast<double>(sorted[i] - mx)) / z;
          if (cum >= top_p) { thr = sorted[i]; break; }
        }
        for (int64_t i = 0; i < V; ++i)
          if (!(row[i] >= thr)) row[i] = neg_inf;
      }
      // Exponential race: argmax w_i / E_i, w_i = exp(l_i - max) (0 where removed), E_i = -log(U_i).
      int64_t best = 0;
      double best_score = -1.0;
      for (int64_t i = 0; i < V; ++i) {
        const double w = static_cast<double>(std::exp(row[i] - mx));
        const double e = -std::log(hash_uniform(s, static_cast<uint64_t>(b * V + i + 1)));
        const double score = w / e;
        if (score > best_score) { best_score = score; best = i; }
      }
      po[b] = best;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfkernels, m) {
  m.def("sample_next(Tensor logits, Tensor? uncond_logits, float cfg_scale, float temperature, int top_k, "
        "float top_p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(nfkernels, CPU, m) { m.impl("sample_next", &sample_next_cpu); }
