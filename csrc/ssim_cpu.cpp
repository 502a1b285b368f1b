// Pairwise SSIM on the CPU: every image of x against every image of y.
//
// SSIM as skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False):
// a separable Gaussian window of K taps, 'valid' filtering (the cropped border), mean of the SSIM map,
// mean over channels. Per image, the filtered mean and variance maps are computed once (double
// accumulation). Per pair only the cross term filter(x*y) and the formula remain.
//
// Vectorisation: y is packed in blocks of LANES images interleaved pixel by pixel ([C, H, W, LANES]),
// so one vector lane is one pair (x_n, y_m) and every arithmetic op of the per-pair computation is a
// full-width vector op, whatever the image size. OpenMP runs over tiles of x rows; within a tile each
// packed y block is reused by all rows while it sits in L1/L2.
#include "cpu_isa.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int LANES = 8;
constexpr int64_t ROW_TILE = 8;  // x images per OpenMP work item
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));

// std::allocator does not promise 32-byte alignment for vf in a TU built without AVX; AVX code needs it.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using VecBuf = std::vector<vf, Aligned64<vf>>;

// The hot loop is compiled twice, for the baseline ISA and for AVX2+FMA, and picked at run time (cpu_isa.h).

struct Geometry {
  int64_t C, H, W, K, Ho, Wo;
};

// Filtered mean and variance ('valid' region) of every plane of `n` images [n, C, H, W].
void image_stats(const float* img, int64_t n, const Geometry& G, const float* g, float* mu, float* var) {
  at::parallel_for(0, n * G.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> r1(G.H * G.Wo), r2(G.H * G.Wo);
    for (int64_t p = begin; p < end; ++p) {
      const float* src = img + p * G.H * G.W;
      for (int64_t h = 0; h < G.H; ++h)
        for (int64_t wo = 0; wo < G.Wo; ++wo) {
          double s1 = 0, s2 = 0;
          for (int64_t k = 0; k < G.K; ++k) {
            double v = src[h * G.W + wo + k];
            s1 += g[k] * v;
            s2 += g[k] * v * v;
          }
          r1[h * G.Wo + wo] = s1;
          r2[h * G.Wo + wo] = s2;
        }
      for (int64_t ho = 0; ho < G.Ho; ++ho)
        for (int64_t wo = 0; wo < G.Wo; ++wo) {
          double m = 0, q = 0;
          for (int64_t k = 0; k < G.K; ++k) {
            m += g[k] * r1[(ho + k) * G.Wo + wo];
            q += g[k] * r2[(ho + k) * G.Wo + wo];
          }
          mu[p * G.Ho * G.Wo + ho * G.Wo + wo] = static_cast<float>(m);
          var[p * G.Ho * G.Wo + ho * G.Wo + wo] = static_cast<float>(q - m * m);
        }
    }
  });
}

// [n, C, P] → [ceil(n / LANES), C, P, LANES]; missing lanes are zero (their results are discarded).
VecBuf pack_lanes(const float* src, int64_t n, int64_t plane) {
  int64_t blocks = (n + LANES - 1) / LANES;
  VecBuf out(blocks * plane);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < plane; ++i) {
      vf v = {};
      for (int l = 0; l < LANES; ++l) {
        int64_t m = b * LANES + l;
        if (m < n) v[l] = src[m * plane + i];
      }
      out[b * plane + i] = v;
    }
  return out;
}

// SSIM of image x against the LANES images of one packed y block; one lane per pair.
// `rows` is scratch of H * Wo + W vectors. Results go through `out` (not a vector return value, whose ABI
// would differ between the AVX2 and the baseline clone).
// KT > 0 fixes the window length at compile time (the pinned 11 taps) so the tap loops unroll.
template <int KT>
inline __attribute__((always_inline)) void ssim_block_body(const float* x, const float* mux, const float* vx, const vf* y, const vf* muy, const vf* vy,
                const vf* taps, const Geometry& G, float c1, float c2, vf* rows, float* out) {
  const int64_t H = G.H, W = G.W, K = KT > 0 ? KT : G.K, Ho = G.Ho, Wo = G.Wo;
  vf* z = rows + H * Wo;  // one row of products x * y
  vf total = {};
  for (int64_t c = 0; c < G.C; ++c) {
    const float* xc = x + c * H * W;
    const vf* yc = y + c * H * W;
    // Row pass: rows[h][wo] = sum_k g[k] * x[h][wo+k] * y[h][wo+k].
    for (int64_t h = 0; h < H; ++h) {
      const float* xr = xc + h * W;
      const vf* yr = yc + h * W;
      for (int64_t w = 0; w < W; ++w) z[w] = xr[w] * yr[w];
      int64_t wo = 0;
      for (; wo + 4 <= Wo; wo += 4) {  // four outputs share each tap and three of four loads
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t k = 0; k < K; ++k) {
          const vf t = taps[k];
          a0 += t * z[wo + k];
          a1 += t * z[wo + k + 1];
          a2 += t * z[wo + k + 2];
          a3 += t * z[wo + k + 3];
        }
        vf* r = rows + h * Wo + wo;
        r[0] = a0, r[1] = a1, r[2] = a2, r[3] = a3;
      }
      for (; wo < Wo; ++wo) {
        vf acc = {};
        for (int64_t k = 0; k < K; ++k) acc += taps[k] * z[wo + k];
        rows[h * Wo + wo] = acc;
      }
    }
    // Column pass and the SSIM formula, pixel by pixel.
    const float* mxc = mux + c * Ho * Wo;
    const float* vxc = vx + c * Ho * Wo;
    const vf* myc = muy + c * Ho * Wo;
    const vf* vyc = vy + c * Ho * Wo;
    auto formula = [&](int64_t p, vf xy) {
      const float mx = mxc[p];
      const vf my = myc[p];
      const vf mxy = mx * my;
      const vf a1 = 2.0f * mxy + c1;
      const vf a2 = 2.0f * (xy - mxy) + c2;
      const vf b1 = mx * mx + my * my + c1;
      const vf b2 = vxc[p] + vyc[p] + c2;
      total += (a1 * a2) / (b1 * b2);
    };
    for (int64_t ho = 0; ho < Ho; ++ho) {
      const vf* col = rows + ho * Wo;
      int64_t wo = 0;
      for (; wo + 4 <= Wo; wo += 4) {  // four independent accumulators, each tap loaded once
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t k = 0; k < K; ++k) {
          const vf t = taps[k];
          const vf* r = col + k * Wo + wo;
          a0 += t * r[0];
          a1 += t * r[1];
          a2 += t * r[2];
          a3 += t * r[3];
        }
        formula(ho * Wo + wo, a0), formula(ho * Wo + wo + 1, a1);
        formula(ho * Wo + wo + 2, a2), formula(ho * Wo + wo + 3, a3);
      }
      for (; wo < Wo; ++wo) {
        vf xy = {};
        for (int64_t k = 0; k < K; ++k) xy += taps[k] * col[k * Wo + wo];
        formula(ho * Wo + wo, xy);
      }
    }
  }
  total /= static_cast<float>(G.C * Ho * Wo);
  for (int l = 0; l < LANES; ++l) out[l] = total[l];
}

void ssim_block_base(const float* x, const float* mux, const float* vx, const vf* y, const vf* muy, const vf* vy,
                     const vf* taps, const Geometry& G, float c1, float c2, vf* rows, float* out) {
  if (G.K == 11)
    ssim_block_body<11>(x, mux, vx, y, muy, vy, taps, G, c1, c2, rows, out);
  else
    ssim_block_body<0>(x, mux, vx, y, muy, vy, taps, G, c1, c2, rows, out);
}

#ifdef NFK_X86_DISPATCH
__attribute__((target("avx2,fma"))) void ssim_block_avx2(const float* x, const float* mux, const float* vx,
                                                          const vf* y, const vf* muy, const vf* vy, const vf* taps,
                                                          const Geometry& G, float c1, float c2, vf* rows,
                                                          float* out) {
  if (G.K == 11)
    ssim_block_body<11>(x, mux, vx, y, muy, vy, taps, G, c1, c2, rows, out);
  else
    ssim_block_body<0>(x, mux, vx, y, muy, vy, taps, G, c1, c2, rows, out);
}
#endif

using BlockFn = void (*)(const float*, const float*, const float*, const vf*, const vf*, const vf*, const vf*,
                         const Geometry&, float, float, vf*, float*);

BlockFn pick_block_fn() {
#ifdef NFK_X86_DISPATCH
  if (nfk::use_avx2()) return ssim_block_avx2;
#endif
  return ssim_block_base;
}

struct Prepared {
  Geometry G;
  int64_t N, M;
  at::Tensor x, mux, vx;          // x [N, C, H, W] and its statistics [N, C, Ho, Wo]
  VecBuf y, muy, vy;     // packed y and its statistics
  VecBuf taps;           // the window, broadcast to every lane
  float c1, c2;
};

Prepared prepare(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& window, double c1, double c2) {
  TORCH_CHECK(x_in.dim() == 4 && y_in.dim() == 4, "ssim: x and y must be [N, C, H, W], got ", x_in.sizes(), " and ",
              y_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat, "ssim: x and y must be float32");
  TORCH_CHECK(x_in.device().is_cpu() && y_in.device().is_cpu(), "ssim: the C++ op runs on CPU tensors");
  TORCH_CHECK(x_in.sizes().slice(1) == y_in.sizes().slice(1), "ssim: x and y images differ in shape: ",
              x_in.sizes(), " vs ", y_in.sizes());
  TORCH_CHECK(window.dim() == 1 && window.size(0) % 2 == 1, "ssim: window must be 1-D with an odd length");
  Prepared P;
  P.x = x_in.contiguous();
  at::Tensor y = y_in.contiguous();
  at::Tensor g = window.to(at::kFloat).contiguous();
  P.N = P.x.size(0);
  P.M = y.size(0);
  Geometry& G = P.G;
  G = {P.x.size(1), P.x.size(2), P.x.size(3), g.size(0), 0, 0};
  TORCH_CHECK(G.H >= G.K && G.W >= G.K, "ssim: images (", G.H, "x", G.W, ") are smaller than the window (", G.K, ")");
  G.Ho = G.H - G.K + 1;
  G.Wo = G.W - G.K + 1;
  const float* gp = g.data_ptr<float>();
  P.mux = at::empty({P.N, G.C, G.Ho, G.Wo}, P.x.options());
  P.vx = at::empty_like(P.mux);
  image_stats(P.x.data_ptr<float>(), P.N, G, gp, P.mux.data_ptr<float>(), P.vx.data_ptr<float>());
  at::Tensor muy = at::empty({P.M, G.C, G.Ho, G.Wo}, y.options()), vy = at::empty_like(muy);
  image_stats(y.data_ptr<float>(), P.M, G, gp, muy.data_ptr<float>(), vy.data_ptr<float>());
  P.y = pack_lanes(y.data_ptr<float>(), P.M, G.C * G.H * G.W);
  P.muy = pack_lanes(muy.data_ptr<float>(), P.M, G.C * G.Ho * G.Wo);
  P.vy = pack_lanes(vy.data_ptr<float>(), P.M, G.C * G.Ho * G.Wo);
  for (int64_t k = 0; k < G.K; ++k) {
    vf t = {};
    t += gp[k];
    P.taps.push_back(t);
  }
  P.c1 = static_cast<float>(c1);
  P.c2 = static_cast<float>(c2);
  return P;
}

// Run ssim_block over every (x row, y block) pair that `symmetric` leaves (only blocks reaching the
// upper triangle m >= n when x is y) and hand each result to sink(thread, n, m0, values).
template <class Sink>
void for_each_block(const Prepared& P, bool symmetric, int nthreads, Sink sink) {
  const Geometry& G = P.G;
  const int64_t blocks = (P.M + LANES - 1) / LANES, tiles = (P.N + ROW_TILE - 1) / ROW_TILE;
  const int64_t xplane = G.C * G.H * G.W, yplane = xplane, splane = G.C * G.Ho * G.Wo;
  const float* x = P.x.data_ptr<float>();
  const float* mux = P.mux.data_ptr<float>();
  const float* vx = P.vx.data_ptr<float>();
  const BlockFn ssim_block = pick_block_fn();
#pragma omp parallel num_threads(nthreads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    VecBuf rows(G.H * G.Wo + G.W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * ROW_TILE, n1 = std::min(P.N, n0 + ROW_TILE);
      const int64_t b0 = symmetric ? n0 / LANES : 0;
      for (int64_t b = b0; b < blocks; ++b)
        for (int64_t n = n0; n < n1; ++n) {
          if (symmetric && (b + 1) * LANES <= n) continue;
          float s[LANES];
          ssim_block(x + n * xplane, mux + n * splane, vx + n * splane, P.y.data() + b * yplane,
                     P.muy.data() + b * splane, P.vy.data() + b * splane, P.taps.data(), G, P.c1, P.c2,
                     rows.data(), s);
          sink(tid, n, b * LANES, s);
        }
    }
  }
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

at::Tensor ssim_pairwise_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& window, double c1, double c2,
                             bool symmetric) {
  Prepared P = prepare(x, y, window, c1, c2);
  TORCH_CHECK(!symmetric || P.N == P.M, "ssim: symmetric=True needs x and y to be the same set");
  at::Tensor out = at::empty({P.N, P.M}, P.x.options());
  float* o = out.data_ptr<float>();
  const int64_t M = P.M;
  for_each_block(P, symmetric, thread_count(), [&](int, int64_t n, int64_t m0, const float* s) {
    for (int l = 0; l < LANES && m0 + l < M; ++l) {
      const int64_t m = m0 + l;
      if (symmetric && m < n) continue;
      o[n * M + m] = s[l];
      if (symmetric) o[m * M + n] = s[l];
    }
  });
  return out;
}

// Best (largest SSIM, then lowest index) so far.
struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  void offer(float v, int64_t i) {
    if (v > value || (v == value && i < index)) value = v, index = i;
  }
};

// Row maxima (nearest y of each x) and column maxima (nearest x of each y) without the N x M matrix.
// exclude_self skips the pairs (i, i); symmetric says x is y, so each unordered pair is computed once
// and counts for both of its rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssim_nearest_cpu(const at::Tensor& x, const at::Tensor& y,
                                                                           const at::Tensor& window, double c1,
                                                                           double c2, bool exclude_self,
                                                                           bool symmetric) {
  Prepared P = prepare(x, y, window, c1, c2);
  TORCH_CHECK(!(exclude_self || symmetric) || P.N == P.M, "ssim_nearest: exclude_self/symmetric need N == M");
  const int nthreads = thread_count();
  const int64_t N = P.N, M = P.M;
  std::vector<Best> rows(N);
  // Per-thread column bests (and, when symmetric, the lower-triangle contributions to rows).
  std::vector<std::vector<Best>> cols(nthreads, std::vector<Best>(M));
  for_each_block(P, symmetric, nthreads, [&](int tid, int64_t n, int64_t m0, const float* s) {
    for (int l = 0; l < LANES && m0 + l < M; ++l) {
      const int64_t m = m0 + l;
      if ((symmetric && m < n) || (exclude_self && m == n)) continue;
      rows[n].offer(s[l], m);
      cols[tid][m].offer(s[l], n);
    }
  });
  auto vals = [](int64_t n) { return at::empty({n}, at::kFloat); };
  auto idxs = [](int64_t n) { return at::empty({n}, at::kLong); };
  at::Tensor rv = vals(N), ri = idxs(N), cv = vals(M), ci = idxs(M);
  for (int64_t m = 0; m < M; ++m) {
    Best b;
    for (int t = 0; t < nthreads; ++t) b.offer(cols[t][m].value, cols[t][m].index);
    cv.data_ptr<float>()[m] = b.value;
    ci.data_ptr<int64_t>()[m] = b.index;
  }
  for (int64_t n = 0; n < N; ++n) {
    Best b = rows[n];
    if (symmetric) b.offer(cv.data_ptr<float>()[n], ci.data_ptr<int64_t>()[n]);
    rv.data_ptr<float>()[n] = b.value;
    ri.data_ptr<int64_t>()[n] = b.index;
  }
  if (symmetric) cv.copy_(rv), ci.copy_(ri);
  return {rv, ri, cv, ci};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfkernels, m) {
  m.def("ssim_pairwise(Tensor x, Tensor y, Tensor window, float c1, float c2, bool symmetric) -> Tensor");
  m.def(
      "ssim_nearest(Tensor x, Tensor y, Tensor window, float c1, float c2, bool exclude_self, bool symmetric)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nfkernels, CPU, m) {
  m.impl("ssim_pairwise", &ssim_pairwise_cpu);
  m.impl("ssim_nearest", &ssim_nearest_cpu);
}
