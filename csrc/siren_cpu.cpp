// Batched SIREN on CPU: N independent fields (each its own flat weight vector) over one coordinate grid.
//
//   siren_forward(params [N,P], coords [C,in], dims, omega0)            -> [N, C, out]
//   siren_backward(grad_out [N,C,out], params, coords, dims, omega0)    -> grad_params [N, P]
//   siren_fit_steps(params!, exp_avg!, exp_avg_sq!, coords, target [N,C,out], active?, dims, omega0,
//                   step, n_steps, lr, beta1, beta2, eps)               -> per-field MSE [N] of the last step
//
// `dims` = [in, hidden, ..., hidden, out]; the flat layout per layer is W [out, in] row-major then b [out]
// (nfkernels/siren.py). Parallelism is over fields; a field's whole fit (all steps) runs on one thread
// so its weights, Adam state and image stay in L1/L2. Pixels are processed in tiles of kTile, with
// activations stored feature-major ([feature][pixel]) so every inner loop runs over contiguous pixels
// and vectorises. The tail tile is zero-padded and masked out of the loss. sin and cos of each
// pre-activation come from one polynomial evaluation (vectorisable, unlike libm's sinf) and cos is kept
// for the backward pass. The hot loops are compiled twice, for AVX2+FMA and for the baseline ISA,
// and picked at run time (setup.py builds for x86-64-v2, which has neither).
#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kTile = 32;  // pixels per tile: 4 AVX2 vectors
#define NFK_INLINE inline __attribute__((always_inline))

struct Net {
  std::vector<int64_t> dims;   // [in, h, ..., out]
  std::vector<int64_t> w_off;  // offset of layer l's weight in the flat vector; its bias follows
  int64_t n_layers = 0, n_params = 0, max_width = 0;
  float omega0 = 30.f;

  Net(c10::IntArrayRef d, double w0) : dims(d.begin(), d.end()), omega0(static_cast<float>(w0)) {
    TORCH_CHECK(dims.size() >= 3, "siren: dims must be [in, hidden..., out] with at least one hidden layer");
    n_layers = static_cast<int64_t>(dims.size()) - 1;
    for (int64_t l = 0; l < n_layers; ++l) {
      TORCH_CHECK(dims[l] >= 1 && dims[l + 1] >= 1, "siren: layer widths must be positive");
      w_off.push_back(n_params);
      n_params += dims[l] * dims[l + 1] + dims[l + 1];
    }
    for (auto v : dims) max_width = std::max(max_width, v);
  }
  int64_t in() const { return dims.front(); }
  int64_t out() const { return dims.back(); }
};

// sin(x) and cos(x) together: Cody-Waite reduction by pi/2 and Cephes' minimax polynomials on
// [-pi/4, pi/4]. Only arithmetic and selects, so `omp simd` loops over it vectorise. Max abs error
// ~1e-7 for |x| < 1e4 (SIREN pre-activations times omega0 stay far below that).
NFK_INLINE void sincos_poly(float x, float& s, float& c) {
  const float q = std::nearbyint(x * 0.636619772367581343f);  // x * 2/pi
  const int qi = static_cast<int>(q);
  float r = x - q * 1.5703125f;
  r = r - q * 4.837512969970703125e-4f;
  r = r - q * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float ps = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float pc = 1.f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const bool swap = qi & 1;
  float sv = swap ? pc : ps, cv = swap ? ps : pc;
  s = (qi & 2) ? -sv : sv;
  c = ((qi + 1) & 2) ? -cv : cv;
}

// 8 floats as one value: GCC lowers it to one AVX register (two SSE registers on the baseline ISA). Used in
// the two matrix routines so their accumulators provably live in registers (float arrays + `omp simd`
// were kept on the stack).
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads/stores
constexpr int kVec = kTile / 8;
NFK_INLINE v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
NFK_INLINE void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
// A shuffle, not v8{x, x, ...}: GCC lowers that constructor for the baseline ISA before inlining, so even the
// AVX2 copy built it from 7 vinsertps + vinsertf128 (perf: the weight-gradient loop's bottleneck); this is one
// vbroadcastss, and the fit runs ~1.3x faster.
NFK_INLINE v8 splat8(float x) {
  const v8 r = {x};
  return __builtin_shufflevector(r, r, 0, 0, 0, 0, 0, 0, 0, 0);
}

// out[o][t] = bias[o] + sum_i Wt(o, i) * in[i][t], where Wt(o, i) = W[o * so + i * si]. Forward uses
// (so, si) = (fan_in, 1); the backward input-gradient uses the transposed weight (1, fan_in) and no bias.
// Two outputs at a time (8 vector accumulators) so each loaded input vector feeds two FMAs.
NFK_INLINE void dense_tile(const float* W, int64_t so, int64_t si, const float* bias, int64_t n_in, int64_t n_out,
                           const float* in, float* out) {
  int64_t o = 0;
  for (; o + 2 <= n_out; o += 2) {
    v8 a0[kVec], a1[kVec];
    const v8 b0 = splat8(bias ? bias[o] : 0.f), b1 = splat8(bias ? bias[o + 1] : 0.f);
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) a0[v] = b0, a1[v] = b1;
    for (int64_t i = 0; i < n_in; ++i) {
      const v8 w0 = splat8(W[o * so + i * si]), w1 = splat8(W[(o + 1) * so + i * si]);
      const float* x = in + i * kTile;
#pragma GCC unroll 4
      for (int v = 0; v < kVec; ++v) {
        const v8 xv = load8(x + 8 * v);
        a0[v] += w0 * xv, a1[v] += w1 * xv;
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) store8(out + o * kTile + 8 * v, a0[v]), store8(out + (o + 1) * kTile + 8 * v, a1[v]);
  }
  for (; o < n_out; ++o) {
    v8 a0[kVec];
    const v8 b0 = splat8(bias ? bias[o] : 0.f);
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) a0[v] = b0;
    for (int64_t i = 0; i < n_in; ++i) {
      const v8 w0 = splat8(W[o * so + i * si]);
      const float* x = in + i * kTile;
#pragma GCC unroll 4
      for (int v = 0; v < kVec; ++v) a0[v] += w0 * load8(x + 8 * v);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) store8(out + o * kTile + 8 * v, a0[v]);
  }
}

// dW[o][i] += sum_t g[o][t] * x[i][t]; db[o] += sum_t g[o][t], for narrow layers (fan_in < 8 or fan_out < 4):
// one reduction over the tile per weight.
NFK_INLINE void weight_grad_narrow(const float* g, const float* x, int64_t n_in, int64_t n_out, float* dW, float* db) {
  for (int64_t o = 0; o < n_out; ++o) {
    const float* go = g + o * kTile;
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int t = 0; t < kTile; ++t) sb += go[t];
    db[o] += sb;
    for (int64_t i = 0; i < n_in; ++i) {
      const float* x0 = x + i * kTile;
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int t = 0; t < kTile; ++t) s0 += go[t] * x0[t];
      dW[o * n_in + i] += s0;
    }
  }
}

constexpr int kOB = 4, kIB = 16;  // weight-gradient register block: 4 outputs × 16 inputs = 8 AVX2 accumulators

// The same for wide layers, as a sum of outer products over the tile's pixels: with the input transposed
// to xT [kTile][n_in_pad] (zero-padded to kIB), each pixel adds g[o..o+3][t] ⊗ xT[t][i..i+15] into
// accumulators held in registers, so there is no horizontal reduction per weight.
NFK_INLINE void weight_grad_wide(const float* g, const float* xT, int64_t n_in, int64_t n_in_pad, int64_t n_out,
                                 float* dW, float* db) {
  for (int64_t o = 0; o < n_out; ++o) {
    const float* go = g + o * kTile;
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int t = 0; t < kTile; ++t) sb += go[t];
    db[o] += sb;
  }
  for (int64_t o0 = 0; o0 < n_out; o0 += kOB) {
    const int64_t no = std::min<int64_t>(kOB, n_out - o0);
    for (int64_t i0 = 0; i0 < n_in_pad; i0 += kIB) {
      v8 acc[kOB][2] = {};
      for (int t = 0; t < kTile; ++t) {
        const v8 x0 = load8(xT + t * n_in_pad + i0), x1 = load8(xT + t * n_in_pad + i0 + 8);
#pragma GCC unroll 4
        for (int k = 0; k < kOB; ++k) {
          const v8 gk = splat8(k < no ? g[(o0 + k) * kTile + t] : 0.f);
          acc[k][0] += gk * x0, acc[k][1] += gk * x1;
        }
      }
      const int64_t ni = std::min<int64_t>(kIB, n_in - i0);
      for (int k = 0; k < no; ++k)
        for (int64_t j = 0; j < ni; ++j) dW[(o0 + k) * n_in + i0 + j] += acc[k][j / 8][j % 8];
    }
  }
}

// Per-thread scratch for one tile: the input tile, every layer's activation (sin) and cos, two gradient
// buffers and the output.
struct Work {
  std::vector<float> x, act, cosv, g0, g1, out, xT;
  explicit Work(const Net& net)
      : x(net.in() * kTile), act(net.n_layers * net.max_width * kTile), cosv(net.n_layers * net.max_width * kTile),
        g0(net.max_width * kTile), g1(net.max_width * kTile), out(net.out() * kTile),
        xT(kTile * ((net.max_width + kIB - 1) / kIB) * kIB, 0.f) {}
  // Input of layer l: the coordinate tile for l == 0, else the sine output of layer l - 1.
  const float* layer_in(const Net& net, int64_t l) const {
    return l == 0 ? x.data() : act.data() + (l - 1) * net.max_width * kTile;
  }
};

// Transposed, zero-padded coordinate tile: x[i][t] = coords[t0 + t][i].
NFK_INLINE int load_coords(const Net& net, const float* coords, int64_t C, int64_t t0, Work& w) {
  const int n = static_cast<int>(std::min<int64_t>(kTile, C - t0));
  const int64_t in = net.in();
  for (int64_t i = 0; i < in; ++i)
    for (int t = 0; t < kTile; ++t) w.x[i * kTile + t] = t < n ? coords[(t0 + t) * in + i] : 0.f;
  return n;
}

// Forward of one tile for the field with flat weights p; fills w.out and (kKeep) the activations / cos.
template <bool kKeep>
NFK_INLINE void forward_tile(const Net& net, const float* p, Work& w) {
  const int64_t L = net.n_layers, stride = net.max_width * kTile;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t fi = net.dims[l], fo = net.dims[l + 1];
    const float* W = p + net.w_off[l];
    const float* in = w.layer_in(net, l);
    if (l == L - 1) {
      dense_tile(W, fi, 1, W + fo * fi, fi, fo, in, w.out.data());
      break;
    }
    float* z = w.g0.data();  // pre-activation scratch
    dense_tile(W, fi, 1, W + fo * fi, fi, fo, in, z);
    float* s = w.act.data() + l * stride;
    float* c = w.cosv.data() + l * stride;
    const float w0 = net.omega0;
    const int64_t n = fo * kTile;
    if (kKeep) {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) sincos_poly(w0 * z[k], s[k], c[k]);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        float cc;
        sincos_poly(w0 * z[k], s[k], cc);
      }
    }
  }
}

// Backward of one tile given dL/d(out) in w.g0 ([out][t]); accumulates into grad (flat, like p).
NFK_INLINE void backward_tile(const Net& net, const float* p, Work& w, float* grad) {
  const int64_t L = net.n_layers, stride = net.max_width * kTile;
  float* g = w.g0.data();
  float* gin = w.g1.data();
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t fi = net.dims[l], fo = net.dims[l + 1];
    const float* W = p + net.w_off[l];
    float* dW = grad + net.w_off[l];
    const float* x = w.layer_in(net, l);
    if (fi >= 8 && fo >= kOB) {
      // Padding columns may hold another layer's values: their sums land in lanes that are never stored.
      const int64_t fi_pad = (fi + kIB - 1) / kIB * kIB;
      for (int64_t i = 0; i < fi; ++i)
        for (int t = 0; t < kTile; ++t) w.xT[t * fi_pad + i] = x[i * kTile + t];
      weight_grad_wide(g, w.xT.data(), fi, fi_pad, fo, dW, dW + fo * fi);
    } else {
      weight_grad_narrow(g, x, fi, fo, dW, dW + fo * fi);
    }
    if (l == 0) break;
    dense_tile(W, 1, fi, nullptr, fo, fi, g, gin);  // dL/d(layer input) = W^T g
    const float* c = w.cosv.data() + (l - 1) * stride;
    const float w0 = net.omega0;
    const int64_t n = fi * kTile;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) gin[k] *= w0 * c[k];  // through sin(omega0 * z)
    std::swap(g, gin);
  }
}

// ---- the three kernels over a range of fields (compiled per ISA below) ----

NFK_INLINE void forward_fields(const Net& net, const float* params, const float* coords, int64_t C, float* out,
                               int64_t begin, int64_t end) {
  Work w(net);
  const int64_t P = net.n_params, O = net.out();
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t t0 = 0; t0 < C; t0 += kTile) {
      const int m = load_coords(net, coords, C, t0, w);
      forward_tile<false>(net, params + n * P, w);
      for (int t = 0; t < m; ++t)
        for (int64_t o = 0; o < O; ++o) out[(n * C + t0 + t) * O + o] = w.out[o * kTile + t];
    }
  }
}

NFK_INLINE void backward_fields(const Net& net, const float* grad_out, const float* params, const float* coords,
                                int64_t C, float* grad, int64_t begin, int64_t end) {
  Work w(net);
  const int64_t P = net.n_params, O = net.out();
  for (int64_t n = begin; n < end; ++n) {
    float* gp = grad + n * P;
    std::fill(gp, gp + P, 0.f);
    for (int64_t t0 = 0; t0 < C; t0 += kTile) {
      const int m = load_coords(net, coords, C, t0, w);
      forward_tile<true>(net, params + n * P, w);
      for (int64_t o = 0; o < O; ++o)
        for (int t = 0; t < kTile; ++t) w.g0[o * kTile + t] = t < m ? grad_out[(n * C + t0 + t) * O + o] : 0.f;
      backward_tile(net, params + n * P, w, gp);
    }
  }
}

struct AdamArgs {
  int64_t step, n_steps;
  float lr, beta1, beta2, eps;
};

NFK_INLINE void fit_fields(const Net& net, float* params, float* m1, float* m2, const float* coords,
                           const float* target, const bool* active, int64_t C, const AdamArgs& a, float* loss,
                           int64_t begin, int64_t end) {
  Work w(net);
  const int64_t P = net.n_params, O = net.out();
  std::vector<float> grad(P);
  const float scale = 2.f / static_cast<float>(C * O);  // d(mean squared error)/d(out)
  for (int64_t n = begin; n < end; ++n) {
    float* p = params + n * P;
    const float* y = target + n * C * O;
    const bool on = active == nullptr || active[n];
    double mse = 0.0;
    // An inactive field is only evaluated: its loss is the same at every step.
    for (int64_t s = 0; s < (on ? a.n_steps : 1); ++s) {
      std::fill(grad.begin(), grad.end(), 0.f);
      double sq = 0.0;
      for (int64_t t0 = 0; t0 < C; t0 += kTile) {
        const int m = load_coords(net, coords, C, t0, w);
        forward_tile<true>(net, p, w);
        float tile_sq = 0.f;
        for (int64_t o = 0; o < O; ++o)
          for (int t = 0; t < kTile; ++t) {
            const float e = t < m ? w.out[o * kTile + t] - y[(t0 + t) * O + o] : 0.f;
            tile_sq += e * e;
            w.g0[o * kTile + t] = scale * e;
          }
        sq += tile_sq;
        if (on) backward_tile(net, p, w, grad.data());
      }
      mse = sq / static_cast<double>(C * O);
      if (!on) break;
      // Adam exactly as siren_fit_steps_reference (bias-corrected, no weight decay).
      const double t = static_cast<double>(a.step + s + 1);
      const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta1), t));
      const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta2), t));
      const float b1 = a.beta1, b2 = a.beta2, lr = a.lr, eps = a.eps;
      float* mm = m1 + n * P;
      float* vv = m2 + n * P;
#pragma omp simd
      for (int64_t k = 0; k < P; ++k) {
        const float gk = grad[k];
        const float mk = b1 * mm[k] + (1.f - b1) * gk;
        const float vk = b2 * vv[k] + (1.f - b2) * gk * gk;
        mm[k] = mk, vv[k] = vk;
        p[k] -= (mk / bc1) / (std::sqrt(vk / bc2) + eps) * lr;
      }
    }
    loss[n] = static_cast<float>(mse);
  }
}

// One copy of each kernel per ISA. always_inline pulls the helpers into each copy, so they are
// compiled (and vectorised) for that copy's target.
#define NFK_DEFINE_ISA(SUFFIX, ATTR)                                                                           \
  ATTR void forward_fields_##SUFFIX(const Net& net, const float* params, const float* coords, int64_t C,     \
                                    float* out, int64_t b, int64_t e) {                                       \
    forward_fields(net, params, coords, C, out, b, e);                                                        \
  }                                                                                                           \
  ATTR void backward_fields_##SUFFIX(const Net& net, const float* go, const float* params, const float* coords, \
                                     int64_t C, float* grad, int64_t b, int64_t e) {                          \
    backward_fields(net, go, params, coords, C, grad, b, e);                                                  \
  }                                                                                                           \
  ATTR void fit_fields_##SUFFIX(const Net& net, float* params, float* m1, float* m2, const float* coords,      \
                                const float* target, const bool* active, int64_t C, const AdamArgs& a,        \
                                float* loss, int64_t b, int64_t e) {                                          \
    fit_fields(net, params, m1, m2, coords, target, active, C, a, loss, b, e);                                \
  }

NFK_DEFINE_ISA(base, )
#ifdef NFK_X86_DISPATCH
NFK_DEFINE_ISA(avx2, __attribute__((target("avx2,fma"))))
#else
#define forward_fields_avx2 forward_fields_base
#define backward_fields_avx2 backward_fields_base
#define fit_fields_avx2 fit_fields_base
#endif

// ---- argument checks and the ops ----

void check_common(const torch::Tensor& params, const torch::Tensor& coords, const Net& net) {
  TORCH_CHECK(params.device().is_cpu() && coords.device().is_cpu(), "siren (cpp): tensors must be on CPU");
  TORCH_CHECK(params.scalar_type() == torch::kFloat32 && coords.scalar_type() == torch::kFloat32,
              "siren (cpp): params and coords must be float32");
  TORCH_CHECK(params.dim() == 2 && params.size(1) == net.n_params, "siren (cpp): params must be [N, ", net.n_params,
              "], got ", params.sizes());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == net.in(), "siren (cpp): coords must be [C, ", net.in(), "], got ",
              coords.sizes());
}

// Fields per parallel task: one field is already ~1 ms of work at MNIST size.
constexpr int64_t kGrain = 1;

torch::Tensor siren_forward_cpu(const torch::Tensor& params, const torch::Tensor& coords, c10::IntArrayRef dims,
                                double omega0) {
  const Net net(dims, omega0);
  check_common(params, coords, net);
  auto p = params.contiguous();
  auto x = coords.contiguous();
  const int64_t N = p.size(0), C = x.size(0);
  auto out = torch::empty({N, C, net.out()}, p.options());
  if (N == 0 || C == 0) return out;
  const float* pp = p.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool avx2 = nfk::use_avx2();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    avx2 ? forward_fields_avx2(net, pp, xp, C, op, b, e) : forward_fields_base(net, pp, xp, C, op, b, e);
  });
  return out;
}

torch::Tensor siren_backward_cpu(const torch::Tensor& grad_out, const torch::Tensor& params,
                                 const torch::Tensor& coords, c10::IntArrayRef dims, double omega0) {
  const Net net(dims, omega0);
  check_common(params, coords, net);
  const int64_t N = params.size(0), C = coords.size(0);
  TORCH_CHECK(grad_out.scalar_type() == torch::kFloat32 && grad_out.sizes() == torch::IntArrayRef({N, C, net.out()}),
              "siren_backward (cpp): grad_out must be float32 [N, C, out]");
  auto go = grad_out.contiguous();
  auto p = params.contiguous();
  auto x = coords.contiguous();
  auto grad = torch::zeros_like(p);
  if (N == 0 || C == 0) return grad;
  const float* gop = go.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  const bool avx2 = nfk::use_avx2();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    avx2 ? backward_fields_avx2(net, gop, pp, xp, C, gp, b, e) : backward_fields_base(net, gop, pp, xp, C, gp, b, e);
  });
  return grad;
}

torch::Tensor siren_fit_steps_cpu(torch::Tensor params, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                                  const torch::Tensor& coords, const torch::Tensor& target,
                                  const c10::optional<torch::Tensor>& active, c10::IntArrayRef dims, double omega0,
                                  int64_t step, int64_t n_steps, double lr, double beta1, double beta2, double eps) {
  const Net net(dims, omega0);
  check_common(params, coords, net);
  const int64_t N = params.size(0), C = coords.size(0);
  for (const auto* t : {&params, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat32 && t->sizes() == params.sizes(),
                "siren_fit_steps (cpp): params, exp_avg, exp_avg_sq must be contiguous float32 [N, P] (updated in place)");
  TORCH_CHECK(target.scalar_type() == torch::kFloat32 && target.sizes() == torch::IntArrayRef({N, C, net.out()}),
              "siren_fit_steps (cpp): target must be float32 [N, C, out]");
  TORCH_CHECK(n_steps >= 1 && step >= 0, "siren_fit_steps (cpp): need n_steps >= 1 and step >= 0");
  auto x = coords.contiguous();
  auto y = target.contiguous();
  torch::Tensor act;
  if (active.has_value()) {
    act = active->to(torch::kBool).contiguous();
    TORCH_CHECK(act.numel() == N && act.device().is_cpu(), "siren_fit_steps (cpp): active must be bool [N] on CPU");
  }
  auto loss = torch::zeros({N}, params.options());
  if (N == 0 || C == 0) return loss;
  const AdamArgs a{step, n_steps, static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                   static_cast<float>(eps)};
  float* pp = params.data_ptr<float>();
  float* m1 = exp_avg.data_ptr<float>();
  float* m2 = exp_avg_sq.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const bool* ap = act.defined() ? act.data_ptr<bool>() : nullptr;
  float* lp = loss.data_ptr<float>();
  const bool avx2 = nfk::use_avx2();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    avx2 ? fit_fields_avx2(net, pp, m1, m2, xp, yp, ap, C, a, lp, b, e)
         : fit_fields_base(net, pp, m1, m2, xp, yp, ap, C, a, lp, b, e);
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nfkernels, m) {
  m.def("siren_forward(Tensor params, Tensor coords, int[] dims, float omega0) -> Tensor");
  m.def("siren_backward(Tensor grad_out, Tensor params, Tensor coords, int[] dims, float omega0) -> Tensor");
  m.def(
      "siren_fit_steps(Tensor(a!) params, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor coords, Tensor target, "
      "Tensor? active, int[] dims, float omega0, int step, int n_steps, float lr, float beta1, float beta2, "
      "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(nfkernels, CPU, m) {
  m.impl("siren_forward", &siren_forward_cpu);
  m.impl("siren_backward", &siren_backward_cpu);
  m.impl("siren_fit_steps", &siren_fit_steps_cpu);
}
