// nfkernels::decode_attention on CPU: one new query per row over the first kv_len slots of a static KV cache.
//
// One task per (row, KV head): the G query heads that read this KV head score every filled slot together, so
// each key row is read once for all G of them; softmax in float32; then each value row is read once and added
// into G accumulators. K and V are read exactly once and nothing past kv_len is touched: at the batch sizes
// generation runs at, a decode step is bound by those bytes (torch's SDPA reached ~11 GB/s on a 2-core EPYC,
// about 40 % of what the machine streams, over a cache sliced to the filled prefix).
#include "cpu_isa.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores

inline __attribute__((always_inline)) v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline __attribute__((always_inline)) void store8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }

inline __attribute__((always_inline)) float hsum8(v8 x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// exp on 8 lanes for x <= 0 (scores minus their max): 2^k * e^r with |r| <= ln2 / 2, e^r by its degree-7 Taylor
// polynomial (truncation error < 1e-8 relative, below float32's rounding); below -87 the result is 0, where expf's
// is at most 1.6e-38.
inline __attribute__((always_inline)) v8 exp8_nonpositive(v8 x) {
  typedef int32_t vi8 __attribute__((vector_size(32)));
  const v8 zero = {};
  const vi8 lo = x < -87.f;
  x = lo ? zero - 87.f : x;
  const v8 kf = __builtin_convertvector(__builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi8), v8);
  const v8 r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;  // ln2 in two parts (Cephes): r exact to float
  v8 p = zero + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi8 bits = (__builtin_convertvector(kf, vi8) + 127) << 23;
  v8 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const v8 out = p * scale;
  return lo ? zero : out;
}

// q [G, d] (one KV head's query heads), k, v [n, d] (its filled slots) → out [G, d]. scores: G * n scratch.
// D8 > 0: d = 8 * D8, known at compile time, so a key or value row is D8 vectors held in registers; D8 = 0: any d.
template <int D8>
inline __attribute__((always_inline)) void attend_body(const float* q, const float* k, const float* v, int64_t G,
                                                       int64_t n, int64_t d, float scale, float* scores,
                                                       float* out) {
  for (int64_t s = 0; s < n; ++s) {
    const float* ks = k + s * d;
    if constexpr (D8 > 0) {
      v8 kr[D8];
      for (int c = 0; c < D8; ++c) kr[c] = load8(ks + 8 * c);
      for (int64_t g = 0; g < G; ++g) {
        v8 acc = kr[0] * load8(q + g * d);
        for (int c = 1; c < D8; ++c) acc += kr[c] * load8(q + g * d + 8 * c);
        scores[g * n + s] = hsum8(acc) * scale;
      }
    } else {
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.f;
        for (int64_t j = 0; j < d; ++j) dot += q[g * d + j] * ks[j];
        scores[g * n + s] = dot * scale;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) m = std::max(m, sg[s]);
    float sum = 0.f;
    int64_t s = 0;
    v8 sum8 = {};
    for (; s + 8 <= n; s += 8) {
      const v8 e = exp8_nonpositive(load8(sg + s) - m);
      store8(sg + s, e);
      sum8 += e;
    }
    sum = hsum8(sum8);
    for (; s < n; ++s) {
      sg[s] = std::exp(sg[s] - m);
      sum += sg[s];
    }
    const float inv = 1.f / sum;
    for (s = 0; s < n; ++s) sg[s] *= inv;
  }
  if constexpr (D8 > 0) {
    for (int64_t g = 0; g < G; ++g) {
      v8 acc[D8] = {};
      const float* pg = scores + g * n;
      for (int64_t s = 0; s < n; ++s) {
        const float p = pg[s];
        for (int c = 0; c < D8; ++c) acc[c] += p * load8(v + s * d + 8 * c);
      }
      for (int c = 0; c < D8; ++c) store8(out + g * d + 8 * c, acc[c]);
    }
  } else {
    std::fill(out, out + G * d, 0.f);
    for (int64_t s = 0; s < n; ++s)
      for (int64_t g = 0; g < G; ++g) {
        const float p = scores[g * n + s];
        for (int64_t j = 0; j < d; ++j) out[g * d + j] += p * v[s * d + j];
      }
  }
}

inline __attribute__((always_inline)) void attend_any(const float* q, const float* k, const float* v, int64_t G,
                                                      int64_t n, int64_t d, float scale, float* scores, float* out) {
  switch (d) {
    case 16: return attend_body<2>(q, k, v, G, n, d, scale, scores, out);
    case 32: return attend_body<4>(q, k, v, G, n, d, scale, scores, out);
    case 48: return attend_body<6>(q, k, v, G, n, d, scale, scores, out);
    case 64: return attend_body<8>(q, k, v, G, n, d, scale, scores, out);
    default: return attend_body<0>(q, k, v, G, n, d, scale, scores, out);
  }
}

using AttendFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float, float*, float*);

void attend_base(const float* q, const float* k, const float* v, int64_t G, int64_t n, int64_t d, float scale,
                 float* scores, float* out) {
  attend_any(q, k, v, G, n, d, scale, scores, out);
}

#ifdef NFK_X86_DISPATCH
__attribute__((target("avx2,fma"))) void attend_avx2(const float* q, const float* k, const float* v, int64_t G,
                                                     int64_t n, int64_t d, float scale, float* scores, float* out) {
  attend_any(q, k, v, G, n, d, scale, scores, out);
}
#endif

AttendFn pick_attend_fn() {
#ifdef NFK_X86_DISPATCH
  if (nfk::use_avx2()) return attend_avx2;
#endif
  return attend_base;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& kv_len) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be [B, H, 1, d], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: k_cache and v_cache must be [B, H_kv, S_max, d] alike, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), H_kv = k_cache.size(1), S_max = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == d && H_kv >= 1 && H % H_kv == 0,
              "decode_attention: caches ", k_cache.sizes(), " do not fit q ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "decode_attention: the C++ op takes float32 q and caches");
  TORCH_CHECK(kv_len.numel() == 1 && kv_len.scalar_type() == at::kLong, "decode_attention: kv_len must be one int64");
  const int64_t n = kv_len.item<int64_t>();  // a CPU tensor: no device sync
  TORCH_CHECK(1 <= n && n <= S_max, "decode_attention: kv_len must be in [1, S_max = ", S_max, "], got ", n);
  const at::Tensor qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  at::Tensor out = at::empty({B, H, 1, d}, q.options());
  const int64_t G = H / H_kv;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const float *pq = qc.data_ptr<float>(), *pk = kc.data_ptr<float>(), *pv = vc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const AttendFn attend = pick_attend_fn();
  // [B, H, 1, d] holds a row's query heads h = hk * G + g contiguously: KV head hk's G queries are one [G, d] block
  at::parallel_for(0, B * H_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * n);
    for (int64_t t = begin; t < end; ++t) {  // t = b * H_kv + hk
      const int64_t b = t / H_kv, hk = t % H_kv;
      const int64_t cache = (b * H_kv + hk) * S_max * d;
      attend(pq + t * G * d, pk + cache, pv + cache, G, n, d, scale, scores.data(), po + t * G * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfkernels, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(nfkernels, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }
