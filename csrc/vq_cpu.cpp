// Nearest-codebook assignment on the CPU: for each of M vectors of dim d (1..16), the index of the
// nearest of K codes and the squared distance to it, without an M x K distance matrix.
//
// Distances are direct differences sum_j (x_j - c_j)^2 in fp32, never |x|^2 + |c|^2 - 2 x.c (which
// cancels catastrophically when x is close to a code). Ties go to the lowest code index. Rows are
// split across OpenMP threads; within a row block the codebook is walked in tiles small enough to
// stay in L1, stored transposed ([d, K]) so the inner loop over codes vectorises.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

namespace {

constexpr int64_t kCodeTile = 256;  // codes per tile: 256 * 16 dims * 4 B = 16 KiB, fits L1
constexpr int64_t kRowBlock = 64;   // rows per OpenMP work item

template <int D>
void assign_block(const float* x, const float* cT, int64_t K, int64_t r0, int64_t r1, int64_t* out_idx,
                  float* out_dist) {
  alignas(64) float dist[kCodeTile];
  float best[kRowBlock];
  int64_t best_idx[kRowBlock];
  for (int64_t r = r0; r < r1; ++r) {
    best[r - r0] = std::numeric_limits<float>::infinity();
    best_idx[r - r0] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kCodeTile) {
    const int64_t kn = std::min(kCodeTile, K - k0);
    for (int64_t r = r0; r < r1; ++r) {
      float xr[D];
      for (int j = 0; j < D; ++j) xr[j] = x[r * D + j];
#pragma omp simd
      for (int64_t k = 0; k < kn; ++k) {
        float s = 0.f;
        for (int j = 0; j < D; ++j) {
          const float t = xr[j] - cT[j * K + k0 + k];
          s += t * t;
        }
        dist[k] = s;
      }
      float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
      for (int64_t k = 0; k < kn; ++k) m = dist[k] < m ? dist[k] : m;
      // Strictly smaller only: an equal distance in a later tile keeps the earlier (lower) index.
      if (m < best[r - r0]) {
        int64_t k = 0;
        while (dist[k] != m) ++k;  // first occurrence within the tile = lowest index
        best[r - r0] = m;
        best_idx[r - r0] = k0 + k;
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    out_idx[r] = best_idx[r - r0];
    if (out_dist) out_dist[r] = best[r - r0];
  }
}

template <int D>
void assign_all(const float* x, const float* cT, int64_t M, int64_t K, int64_t* out_idx, float* out_dist) {
#pragma omp parallel for schedule(static)
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    assign_block<D>(x, cT, K, r0, std::min(M, r0 + kRowBlock), out_idx, out_dist);
  }
}

using AssignFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t*, float*);

template <int... Ds>
constexpr std::array<AssignFn, sizeof...(Ds)> make_table(std::integer_sequence<int, Ds...>) {
  return {&assign_all<Ds + 1>...};
}

void check_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "vq_assign: x must be [M, d] and codebook [K, d], got ",
              x.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(x.size(1) == codebook.size(1), "vq_assign: x has d=", x.size(1), " but codebook has d=",
              codebook.size(1));
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= 16, "vq_assign: d must be in 1..16, got ", x.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "vq_assign: the codebook is empty");
  TORCH_CHECK(x.scalar_type() == at::kFloat && codebook.scalar_type() == at::kFloat,
              "vq_assign: x and codebook must be float32");
}

// Returns (index int64 [M], squared distance float32 [M]). Rows holding NaN get index 0, distance inf.
std::tuple<at::Tensor, at::Tensor> vq_assign_cpu(const at::Tensor& x_in, const at::Tensor& codebook) {
  check_inputs(x_in, codebook);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cT = codebook.t().contiguous();  // [d, K]: consecutive codes adjacent in memory
  const int64_t M = x.size(0), K = codebook.size(0), d = x.size(1);
  at::Tensor idx = at::empty({M}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({M}, x.options());
  static constexpr auto table = make_table(std::make_integer_sequence<int, 16>{});
  if (M > 0) table[d - 1](x.data_ptr<float>(), cT.data_ptr<float>(), M, K, idx.data_ptr<int64_t>(),
                          dist.data_ptr<float>());
  return {idx, dist};
}

// d = 1 with a sorted codebook: binary search among the midpoints, then a look at the neighbours so
// that rounding of the midpoints and exact ties still give the (lowest-index) nearest code.
// `sorted` [K] ascending, `canon` [K] int64: for each sorted position, the lowest original index among
// codes equal to it.
std::tuple<at::Tensor, at::Tensor> vq_assign_sorted1d_cpu(const at::Tensor& x_in, const at::Tensor& sorted_in,
                                                          const at::Tensor& canon_in) {
  TORCH_CHECK(x_in.dim() == 1 && sorted_in.dim() == 1 && canon_in.dim() == 1,
              "vq_assign_sorted1d: x, sorted and canon must be 1-D");
  TORCH_CHECK(sorted_in.size(0) >= 1 && sorted_in.size(0) == canon_in.size(0),
              "vq_assign_sorted1d: sorted and canon must have the same non-zero length");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && sorted_in.scalar_type() == at::kFloat &&
                  canon_in.scalar_type() == at::kLong,
              "vq_assign_sorted1d: x and sorted must be float32, canon int64");
  const at::Tensor x = x_in.contiguous(), sorted = sorted_in.contiguous(), canon = canon_in.contiguous();
  const int64_t M = x.size(0), K = sorted.size(0);
  at::Tensor idx = at::empty({M}, canon.options());
  at::Tensor dist = at::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = sorted.data_ptr<float>();
  const int64_t* cp = canon.data_ptr<int64_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i) {
    const float v = xp[i];
    // first sorted position with value >= v; the nearest code is there or just below it
    const int64_t pos = std::lower_bound(sp, sp + K, v) - sp;
    float best = std::numeric_limits<float>::infinity();
    int64_t best_idx = 0;
    for (int64_t s = std::max<int64_t>(pos - 2, 0); s < std::min<int64_t>(pos + 2, K); ++s) {
      const float t = v - sp[s];
      const float e = t * t;
      if (e < best || (e == best && cp[s] < best_idx)) {
        best = e;
        best_idx = cp[s];
      }
    }
    ip[i] = best_idx;
    dp[i] = best;
  }
  return {idx, dist};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfkernels, m) {
  m.def("vq_assign(Tensor x, Tensor codebook) -> (Tensor, Tensor)");
  m.def("vq_assign_sorted1d(Tensor x, Tensor sorted, Tensor canon) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nfkernels, CPU, m) {
  m.impl("vq_assign", &vq_assign_cpu);
  m.impl("vq_assign_sorted1d", &vq_assign_sorted1d_cpu);
}
