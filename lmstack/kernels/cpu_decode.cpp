// lmstack CPU decode kernels: one call runs a whole decode step (every layer + lm_head) of the Transformer
// for B sequences with one new token each, over the serving engine's paged KV pool, in fp32.
//
// Why: at batch 1 on a CPU a small model's step is ~40 small matrix-vector products plus ~250 tiny
// element-wise ops. In eager PyTorch each op pays dispatcher + OpenMP wake-up cost, and MKL's sgemv reads
// weights that do not fit in cache at ~40% of the memory bandwidth. Here every matrix-vector product is a
// streaming dot product over row-major weights (4 rows at a time, AVX2/FMA when the compiler targets it),
// split statically across the threads of ONE OpenMP parallel region per step; the phases of a layer are
// separated by a barrier that spins ~4k pauses, then sleeps on a futex, so a step pays one thread wake-up
// instead of ~40 (under OMP_WAIT_POLICY=PASSIVE each wake-up is a futex round trip). Norms, RoPE, the KV write
// and the softmax run in-line; nothing is allocated inside the region.
//
// Contract (checked by tests against the eager path and transformers): the same math as
// lmstack.model.transformer.Transformer.hidden_states + lm_head with lmstack.serve.runner.PagedAttention:
//   h = embed[ids]; per layer: a = rmsnorm(h) ; qkv = a @ Wqkv^T (+ b) ; [q_norm, k_norm per head] ;
//   RoPE(q, k) at pos ; k, v -> pool slot of pos ; o = softmax(q k^T / sqrt(D)) v over positions
//   [lo, pos] (GQA) ; h += o @ Wo^T ; a = rmsnorm(h) ; h += (silu(a Wg^T) * (a Wu^T)) @ Wd^T
//   logits = rmsnorm(h) @ Wlm^T
//
// Weight-only quantized matrices (lmstack.quant.packed) are read as stored, never dequantized as a whole:
//   int8 (N, K) + scale (N,):       y[n] = s[n] * sum_k q[n,k] x[k]
//   int4 uint8 (N, K/2) + scale, zero (N, G), two values per byte (low nibble = even column),
//        W[n,k] = (q - 8) s[n,g] + z[n,g]:  y[n] = sum_g s[n,g] sum_{k in g} q x + (z - 8 s)[n,g] sum_{k in g} x
// Each int8 / int4 weight is widened to fp32 in registers and multiplied in fp32 (activations stay fp32,
// so the result is the eager module's up to summation order). For int4 each thread first splits x into its
// even / odd columns and per-group sums (K floats, nothing next to the N x K weight reads).
//
// With act_q8 (the default from Python, LMSTACK_KERNEL_ACT_Q8=0 turns it off) and AVX2, a quantized matrix
// instead meets an int8 copy of its input: x is cut into blocks of 32, each block gets d_b = max|x_b| / 127 and
// xq = round(x / d_b) in [-127, 127], and the products are integer dot products of 32 weights with 32 xq
// (_mm256_maddubs_epi16 multiplies unsigned by signed bytes into pairs of int16, _mm256_madd_epi16 sums the pairs
// into int32, exact: |w| <= 127 and 2 * 127 * 127 < 2^15), scaled once per block in fp32:
//   int8: y[n] = s[n] * sum_b d_b * sum_{k in b} q[n,k] xq[k]             (unsigned |q|, xq with q's sign)
//   int4: y[n] = sum_g s[n,g] sum_{b in g} d_b sum_{k in b} q[n,k] xq[k] + (z - 8 s)[n,g] sum_{k in g} d_b xq[k]
// (q in [0, 15] is already unsigned; xq is stored per block as its 16 even then 16 odd columns, the order of the
// 16 low then 16 high nibbles of the block's 16 bytes). Both are exactly W x_hat with x_hat_k = d_b xq_k: the only
// new error is the rounding of x, |x_k - x_hat_k| <= d_b / 2, so each output moves by at most
// sum_b d_b / 2 * sum_{k in b} |W[n,k]|. (The zero-point term must use the sums of x_hat, not of x: an int4
// group's (q - 8) s + z is not centred, and s sum q (x_hat - x) alone is a bias the zero term would not cancel.)
// tests/test_kernel_quant.py checks the kernel against a reference whose linear inputs are rounded the same way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <atomic>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_AVX2 1
#endif

namespace {

#ifdef LMSTACK_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

inline float dot(const float* a, const float* b, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#ifdef LMSTACK_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

// out[r] = dot(x, W[r]) for 4 consecutive rows of W (row stride K): 4 independent streams per x load.
inline void dot4(const float* x, const float* W, int64_t K, float* out) {
  const float *w0 = W, *w1 = W + K, *w2 = W + 2 * K, *w3 = W + 3 * K;
  int64_t k = 0;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#ifdef LMSTACK_AVX2
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    c0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + k), c0);
    c1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1 + k), c1);
    c2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2 + k), c2);
    c3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3 + k), c3);
  }
  s0 = hsum(c0); s1 = hsum(c1); s2 = hsum(c2); s3 = hsum(c3);
#endif
  for (; k < K; ++k) {
    s0 += x[k] * w0[k]; s1 += x[k] * w1[k]; s2 += x[k] * w2[k]; s3 += x[k] * w3[k];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

enum Kind { kF32 = 0, kI8 = 1, kI4 = 2 };

// One weight matrix (N, K) of the step: fp32 row-major, int8 per-channel or int4 group-wise.
struct Mat {
  const void* w = nullptr;
  const float* s = nullptr;  // int8: (N,); int4: (N, G)
  const float* z = nullptr;  // int4: (N, G)
  int kind = kF32;
  int64_t N = 0, K = 0, G = 1;
};

// A matrix given as up to 3 row blocks read one after the other (q | k | v, gate | up) so that separately stored
// layers need no concatenated copy; all blocks of the same kind, K and group count.
struct MatList {
  Mat m[3];
  int64_t off[4] = {0, 0, 0, 0};
  int n = 0;
  int64_t N = 0;
  void add(const Mat& x) {
    if (x.N == 0) return;
    m[n] = x;
    off[n + 1] = off[n] + x.N;
    N = off[n + 1];
    ++n;
  }
  const Mat& first() const { return m[0]; }
};

// x prepared for one matrix: x itself; for int4 also even / odd columns (K/2 each) and per-group sums (G);
// with act_q8 the int8 blocks xq (K) and their scales xd (K / 32) instead of the even / odd columns.
struct Act {
  const float* x;
  const float* xe;
  const float* xo;
  const float* xs;
  const int8_t* xq = nullptr;
  const float* xd = nullptr;
};

// out[r] = s[r] * dot(x, q[r]) for R consecutive int8 rows (row stride K)
template <int R>
inline void dot_i8(const float* x, const int8_t* W, int64_t K, const float* s, float* out) {
  int64_t k = 0;
  float t[R];
  for (int r = 0; r < R; ++r) t[r] = 0.f;
#ifdef LMSTACK_AVX2
  __m256 c[R];
  for (int r = 0; r < R; ++r) c[r] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      __m128i b = _mm_loadu_si128((const __m128i*)(W + r * K + k));
      c[r] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), c[r]);
      c[r] = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), c[r]);
    }
  }
  for (int r = 0; r < R; ++r) t[r] = hsum(c[r]);
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) t[r] += x[k] * (float)W[r * K + k];
  for (int r = 0; r < R; ++r) out[r] = t[r] * s[r];
}

// R consecutive int4 rows: W rows of K/2 bytes, S / Z rows of G groups of gs = K / G columns (gs % 32 == 0)
template <int R>
inline void dot_i4(const Act& a, const uint8_t* W, int64_t K, int64_t G, const float* S, const float* Z,
                   float* out) {
  const int64_t K2 = K / 2, gh = K2 / G;
  float t[R];
  for (int r = 0; r < R; ++r) t[r] = 0.f;
#ifdef LMSTACK_AVX2
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 ce[R], co[R];
    for (int r = 0; r < R; ++r) ce[r] = co[r] = _mm256_setzero_ps();
    for (int64_t j = g * gh, je = j + gh; j < je; j += 8) {
      __m256 e = _mm256_loadu_ps(a.xe + j), o = _mm256_loadu_ps(a.xo + j);
      for (int r = 0; r < R; ++r) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(W + r * K2 + j)));
        ce[r] = _mm256_fmadd_ps(e, _mm256_cvtepi32_ps(_mm256_and_si256(b, m4)), ce[r]);
        co[r] = _mm256_fmadd_ps(o, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), co[r]);
      }
    }
    for (int r = 0; r < R; ++r) tot[r] = _mm256_fmadd_ps(_mm256_add_ps(ce[r], co[r]), _mm256_set1_ps(S[r * G + g]), tot[r]);
  }
  for (int r = 0; r < R; ++r) t[r] = hsum(tot[r]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t j = g * gh; j < (g + 1) * gh; ++j) {
        uint8_t b = W[r * K2 + j];
        acc += a.xe[j] * (float)(b & 0x0F) + a.xo[j] * (float)(b >> 4);
      }
      t[r] += acc * S[r * G + g];
    }
#endif
  for (int r = 0; r < R; ++r) {
    float c = 0.f;
    for (int64_t g = 0; g < G; ++g) c += (Z[r * G + g] - 8.f * S[r * G + g]) * a.xs[g];
    out[r] = t[r] + c;
  }
}

#ifdef LMSTACK_AVX2
// out[r] = s[r] * sum_b xd[b] * (q[r, b] . xq[b]) for R int8 rows (row stride K, K % 32 == 0)
template <int R>
inline void dot_i8q(const Act& a, const int8_t* W, int64_t K, const float* s, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 c[R];
  for (int r = 0; r < R; ++r) c[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(a.xq + 32 * b));
    const __m256 d = _mm256_set1_ps(a.xd[b]);
    for (int r = 0; r < R; ++r) {
      const __m256i w = _mm256_loadu_si256((const __m256i*)(W + r * K + 32 * b));
      // |w| (unsigned) times xq carrying w's sign: the signed product, in maddubs' unsigned x signed form
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w)), ones);
      c[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, c[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(c[r]) * s[r];
}

// one int4 row against the block-permuted xq, streaming: each 32-weight block's integer dot product is scaled
// once by s[g] * xd[b] (8 such products computed with one vector multiply), two blocks per iteration into two
// accumulators; then the zero-point term sum_g (z - 8 s)[g] xs[g] on the rounded activations' group sums, as two
// vector dot products (a scalar float reduction is not vectorized without -ffast-math: it cost half as much as the
// integer dot products at group size 32)
inline float dot_i4q1(const Act& a, const uint8_t* W, int64_t K, int64_t G, const float* S, const float* Z) {
  const int64_t nb = K / 32, bpg = nb / G;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i m4 = _mm_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  alignas(32) float ds[8];
  auto block = [&](int64_t b) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(W + 16 * b));
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(a.xq + 32 * b));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
  };
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int64_t n8 = std::min<int64_t>(8, nb - b0);
    if (bpg == 1 && n8 == 8)
      _mm256_store_ps(ds, _mm256_mul_ps(_mm256_loadu_ps(S + b0), _mm256_loadu_ps(a.xd + b0)));
    else
      for (int64_t j = 0; j < n8; ++j) ds[j] = S[(b0 + j) / bpg] * a.xd[b0 + j];
    int64_t j = 0;
    for (; j + 2 <= n8; j += 2) {
      const __m256 p0 = block(b0 + j), p1 = block(b0 + j + 1);
      acc0 = _mm256_fmadd_ps(p0, _mm256_broadcast_ss(ds + j), acc0);
      acc1 = _mm256_fmadd_ps(p1, _mm256_broadcast_ss(ds + j + 1), acc1);
    }
    if (j < n8) acc0 = _mm256_fmadd_ps(block(b0 + j), _mm256_broadcast_ss(ds + j), acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + (dot(Z, a.xs, G) - 8.f * dot(S, a.xs, G));
}
#endif

// out[0..R) = x . W[n + r] for R rows of any kind
template <int R>
inline void rows(const Act& a, const Mat& m, int64_t n, float* out) {
  const int64_t K = m.K;
#ifdef LMSTACK_AVX2
  if (a.xq) {
    // one row after the other, not R interleaved: reading R rows (R row streams a K-byte stride apart) at once
    // ran at ~40% of the one-stream speed here (AVX2 EPYC, 1 thread: int8 3.1 vs 7.6 GB/s), the integer dot
    // products being too cheap to hide the hardware prefetcher's misses
    for (int r = 0; r < R; ++r) {
      if (m.kind == kI4 && n + r + 4 < m.N) {  // the scales and zero points of the row 4 ahead: a separate stream
        const int64_t row = (n + r + 4) * m.G;  // (1 float per 32 weights) that the hardware prefetcher missed
        for (int64_t i = 0; i < m.G; i += 16) {
          _mm_prefetch((const char*)(m.s + row + i), _MM_HINT_T0);
          _mm_prefetch((const char*)(m.z + row + i), _MM_HINT_T0);
        }
        _mm_prefetch((const char*)(m.s + row + m.G - 1), _MM_HINT_T0);
        _mm_prefetch((const char*)(m.z + row + m.G - 1), _MM_HINT_T0);
      }
      if (m.kind == kI8)
        dot_i8q<1>(a, (const int8_t*)m.w + (n + r) * K, K, m.s + n + r, out + r);
      else
        out[r] = dot_i4q1(a, (const uint8_t*)m.w + (n + r) * (K / 2), K, m.G, m.s + (n + r) * m.G, m.z + (n + r) * m.G);
    }
    return;
  }
#endif
  if (m.kind == kF32) {
    const float* W = (const float*)m.w + n * K;
    if constexpr (R == 4) {
      dot4(a.x, W, K, out);
    } else {
      for (int r = 0; r < R; ++r) out[r] = dot(a.x, W + r * K, K);
    }
  } else if (m.kind == kI8) {
    dot_i8<R>(a.x, (const int8_t*)m.w + n * K, K, m.s + n, out);
  } else {
    dot_i4<R>(a, (const uint8_t*)m.w + n * (K / 2), K, m.G, m.s + n * m.G, m.z + n * m.G, out);
  }
}

// out[0..R) = x . W[n + r] across the row blocks of a MatList
template <int R>
inline void rows(const Act& a, const MatList& ml, int64_t n, float* out) {
  int i = 0;
  while (n >= ml.off[i + 1]) ++i;
  if (n + R <= ml.off[i + 1]) {
    rows<R>(a, ml.m[i], n - ml.off[i], out);
  } else {
    for (int r = 0; r < R; ++r) rows<1>(a, ml, n + r, out + r);
  }
}

// Per-thread scratch for int4 activations: even / odd columns and group sums of M rows of K; with q8 the int8
// blocks of a quantized matrix's input (and group sums for int4).
struct ActBuf {
  std::vector<float> buf;
  std::vector<int8_t> qbuf;
  std::vector<Act> acts;
  bool q8 = false;
  // prepare M rows of x (M, K) for matrix m; returns the Act of each row
  const Act* prepare(const float* x, int64_t M, const Mat& m) {
    acts.resize(M);
    const int64_t K = m.K;
#ifdef LMSTACK_AVX2
    if (q8 && m.kind != kF32 && K % 32 == 0) {
      const int64_t nb = K / 32, G = m.kind == kI4 ? m.G : 0, per = nb + G;
      if ((int64_t)buf.size() < M * per) buf.resize(M * per);
      if ((int64_t)qbuf.size() < M * K) qbuf.resize(M * K);
      for (int64_t i = 0; i < M; ++i) {
        const float* xi = x + i * K;
        float *xd = buf.data() + i * per, *xs = xd + nb;
        int8_t* xq = qbuf.data() + i * K;
        for (int64_t b = 0; b < nb; ++b) {
          const float* xb = xi + 32 * b;
          float amax = 0.f;
          for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
          const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
          xd[b] = d;
          int8_t* qb = xq + 32 * b;
          for (int j = 0; j < 32; ++j) {  // int4: 16 even then 16 odd columns (the nibble order)
            const int src = m.kind == kI4 ? (j < 16 ? 2 * j : 2 * (j - 16) + 1) : j;
            qb[j] = (int8_t)std::nearbyint(xb[src] * inv);
          }
        }
        for (int64_t g = 0; g < G; ++g) {  // the sums of the rounded x (not of x): the zero-point term then
          const int64_t bpg = nb / G;        // cancels with sum q x_hat as in W x_hat (W's groups are not centred)
          float sum = 0.f;
          for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
            int32_t t = 0;
            for (int j = 0; j < 32; ++j) t += xq[32 * b + j];
            sum += xd[b] * (float)t;
          }
          xs[g] = sum;
        }
        acts[i] = Act{xi, nullptr, nullptr, G ? xs : nullptr, xq, xd};
      }
      return acts.data();
    }
#endif
    if (m.kind != kI4) {
      for (int64_t i = 0; i < M; ++i) acts[i] = Act{x + i * K, nullptr, nullptr, nullptr};
      return acts.data();
    }
    const int64_t G = m.G, gs = K / G, per = K + G;
    if ((int64_t)buf.size() < M * per) buf.resize(M * per);
    for (int64_t i = 0; i < M; ++i) {
      const float* xi = x + i * K;
      float *xe = buf.data() + i * per, *xo = xe + K / 2, *xs = xe + K;
      for (int64_t j = 0; j < K / 2; ++j) {
        xe[j] = xi[2 * j];
        xo[j] = xi[2 * j + 1];
      }
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) sum += xi[k];
        xs[g] = sum;
      }
      acts[i] = Act{xi, xe, xo, xs};
    }
    return acts.data();
  }
};

struct SpinBarrier {
  // Spin briefly (a phase is a few microseconds when every thread is on a core), then sleep on a futex
  // (std::atomic::wait) so that a thread whose partner was descheduled by a busy machine gives its core up
  // instead of burning it. The releaser only makes the wake-up syscall when someone sleeps.
  std::atomic<int> count{0}, gen{0}, sleepers{0};
  int n;
  explicit SpinBarrier(int n_) : n(n_) {}
  void wait() {  // sequentially consistent: the sleeper's (sleepers++, load gen) and the releaser's
                 // (gen++, load sleepers) must not both miss each other
    if (n == 1) return;
    int g = gen.load();
    if (count.fetch_add(1) == n - 1) {
      count.store(0);
      gen.fetch_add(1);
      if (sleepers.load() > 0) gen.notify_all();
      return;
    }
    for (int spins = 0; spins < 4096; ++spins) {
      if (gen.load(std::memory_order_acquire) != g) return;
#ifdef LMSTACK_AVX2
      _mm_pause();
#endif
    }
    sleepers.fetch_add(1);
    while (gen.load() == g) gen.wait(g);
    sleepers.fetch_sub(1);
  }
};

// [lo, hi) of this thread's share of n items in units of `unit` (the last share takes the remainder)
inline void share(int64_t n, int64_t unit, int tid, int nt, int64_t& lo, int64_t& hi) {
  int64_t u = (n + unit - 1) / unit;
  lo = std::min(n, u * tid / nt * unit);
  hi = std::min(n, u * (tid + 1) / nt * unit);
}

// y[m, n] (+)= x[m, :] . W[n, :] (+ b[n]) for m < M and this thread's rows n. x (M, K) row-major.
void linear(const float* x, int64_t M, const MatList& W, const float* b, float* y, int64_t ldy, bool accumulate,
            ActBuf& ab, int tid, int nt) {
  int64_t n0, n1;
  share(W.N, 4, tid, nt, n0, n1);
  if (n0 >= n1) return;
  const Act* acts = ab.prepare(x, M, W.first());
  float r[4];
  for (int64_t n = n0; n < n1; n += 4) {
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * ldy;
      if (n + 4 <= n1) {
        rows<4>(acts[m], W, n, r);
      } else {
        for (int64_t j = 0; n + j < n1; ++j) rows<1>(acts[m], W, n + j, r + j);
      }
      for (int64_t j = 0; j < 4 && n + j < n1; ++j) {
        float v = r[j] + (b ? b[n + j] : 0.f);
        ym[n + j] = accumulate ? ym[n + j] + v : v;
      }
    }
  }
}

// act[m, i] = silu(x . Wg[i]) * (x . Wu[i]) with W = [Wg; Wu] (2I, K), this thread's i.
void swiglu(const float* x, int64_t M, const MatList& W, int64_t I, float* act, ActBuf& ab, int tid, int nt) {
  int64_t i0, i1;
  share(I, 4, tid, nt, i0, i1);
  if (i0 >= i1) return;
  const Act* acts = ab.prepare(x, M, W.first());
  float g[4], u[4];
  for (int64_t i = i0; i < i1; i += 4) {
    for (int64_t m = 0; m < M; ++m) {
      if (i + 4 <= i1) {
        rows<4>(acts[m], W, i, g);
        rows<4>(acts[m], W, I + i, u);
      } else {
        for (int64_t j = 0; i + j < i1; ++j) {
          rows<1>(acts[m], W, i + j, g + j);
          rows<1>(acts[m], W, I + i + j, u + j);
        }
      }
      for (int64_t j = 0; j < 4 && i + j < i1; ++j) act[m * I + i + j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  }
}

void rmsnorm(const float* x, const float* w, int64_t n, double eps, float* y) {
  double ss = 0.0;  // accumulate in double: cheap at these sizes and closest to the reference
  for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  float r = (float)(1.0 / std::sqrt(ss / n + eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

void rope(float* x, const float* cs, const float* sn, int64_t D) {
  int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    float a = x[i], b = x[i + h];
    x[i] = a * cs[i] - b * sn[i];
    x[i + h] = b * cs[i] + a * sn[i];
  }
}

const float* fptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// A weight of the step: fp32 (N, K); int8 (N, K) with scale (N,); uint8 (N, K/2) with scale and zero (N, G).
Mat make_mat(const at::Tensor& w, const at::Tensor* s, const at::Tensor* z, const char* what) {
  Mat m;
  TORCH_CHECK(w.defined() && w.dim() == 2 && w.is_contiguous(), "decode_step: ", what, " must be a contiguous matrix");
  m.w = w.data_ptr();
  m.N = w.size(0);
  m.K = w.size(1);
  auto st = w.scalar_type();
  if (st == at::kFloat) {
    m.kind = kF32;
    return m;
  }
  TORCH_CHECK(s && s->defined() && s->numel() && s->scalar_type() == at::kFloat && s->is_contiguous(),
              "decode_step: ", what, " is quantized but has no fp32 scale");
  m.s = s->data_ptr<float>();
  if (st == at::kChar) {
    m.kind = kI8;
    TORCH_CHECK(s->numel() == m.N, "decode_step: ", what, ": int8 scale must have one value per row");
    return m;
  }
  TORCH_CHECK(st == at::kByte, "decode_step: ", what, ": weights must be fp32, int8 or packed int4 (uint8)");
  TORCH_CHECK(z && z->defined() && z->sizes() == s->sizes() && z->scalar_type() == at::kFloat && z->is_contiguous(),
              "decode_step: ", what, ": int4 needs a zero point per group");
  TORCH_CHECK(s->dim() == 2 && s->size(0) == m.N, "decode_step: ", what, ": int4 scale must be (N, groups)");
  m.kind = kI4;
  m.K = 2 * w.size(1);
  m.G = s->size(1);
  TORCH_CHECK(m.G > 0 && m.K % m.G == 0 && (m.K / m.G) % 32 == 0, "decode_step: ", what,
              ": int4 group size must be a multiple of 32");
  m.z = z->data_ptr<float>();
  return m;
}

}  // namespace

// weights: 9 per layer: input_norm, qkv_w (H+2KV)D x hidden, qkv_b or empty, q_norm or empty, k_norm or empty,
// o_w hidden x HD, post_norm, gate_up_w 2I x hidden, down_w hidden x I.
// parts: 3 per layer, k_w, v_w, up_w when q/k/v and gate/up are stored apart (then weights hold q_w and gate_w in
// the qkv_w / gate_up_w slots), else empty.
// qscale / qzero: empty (every matrix fp32), or 7 per layer (qkv or q, o, gate_up or gate, down, k, v, up) + 1
// (lm_head), each empty for an fp32 matrix, the int8 / int4 scale and the int4 zero point otherwise (make_mat).
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& lo,
                       const at::Tensor& block_tables, at::TensorList k_pool, at::TensorList v_pool,
                       at::TensorList weights, const at::Tensor& embed, const at::Tensor& final_norm,
                       const at::Tensor& lm_head, const at::Tensor& inv_freq, int64_t n_heads, int64_t n_kv,
                       int64_t head_dim, int64_t block_size, double eps, int64_t num_threads,
                       at::TensorList parts, at::TensorList qscale, at::TensorList qzero, int64_t act_q8) {
  const int64_t B = ids.size(0), L = k_pool.size();
  const int64_t hidden = embed.size(1), H = n_heads, KV = n_kv, D = head_dim;
  const int64_t QKV = (H + 2 * KV) * D, nb = block_tables.size(1);
  TORCH_CHECK((int64_t)weights.size() == 9 * L && (int64_t)v_pool.size() == L && (int64_t)parts.size() == 3 * L,
              "decode_step: weight list");
  const bool quant = qscale.size() > 0;
  TORCH_CHECK(!quant || ((int64_t)qscale.size() == 7 * L + 1 && qzero.size() == qscale.size()),
              "decode_step: qscale / qzero need 7 per layer + 1 entries");
  TORCH_CHECK(embed.scalar_type() == at::kFloat && embed.is_contiguous(), "decode_step: fp32 contiguous embedding expected");
  const int mat_idx[4] = {1, 5, 7, 8};
  const char* mat_name[7] = {"qkv", "o_proj", "gate_up", "down_proj", "k_proj", "v_proj", "up_proj"};
  for (int64_t i = 0; i < 9 * L; ++i) {
    const auto& w = weights[i];
    bool is_mat = false;
    for (int j : mat_idx) is_mat |= (i % 9) == j;
    if (!is_mat)
      TORCH_CHECK(!w.defined() || w.numel() == 0 || (w.scalar_type() == at::kFloat && w.is_contiguous()),
                  "decode_step: norms and biases must be contiguous fp32 tensors");
  }
  auto mat = [&](const at::Tensor& w, int64_t qi, int name) -> Mat {
    if (!w.defined() || w.numel() == 0) return Mat{};
    return make_mat(w, quant ? &qscale[qi] : nullptr, quant ? &qzero[qi] : nullptr, mat_name[name]);
  };
  std::vector<MatList> mats(4 * L + 1);
  for (int64_t l = 0; l < L; ++l) {
    mats[4 * l].add(mat(weights[9 * l + 1], 7 * l, 0));
    mats[4 * l].add(mat(parts[3 * l], 7 * l + 4, 4));
    mats[4 * l].add(mat(parts[3 * l + 1], 7 * l + 5, 5));
    mats[4 * l + 1].add(mat(weights[9 * l + 5], 7 * l + 1, 1));
    mats[4 * l + 2].add(mat(weights[9 * l + 7], 7 * l + 2, 2));
    mats[4 * l + 2].add(mat(parts[3 * l + 2], 7 * l + 6, 6));
    mats[4 * l + 3].add(mat(weights[9 * l + 8], 7 * l + 3, 3));
  }
  mats[4 * L].add(make_mat(lm_head, quant ? &qscale[7 * L] : nullptr, quant ? &qzero[7 * L] : nullptr, "lm_head"));
  const int64_t I = mats[2].N / 2;
  for (int64_t l = 0; l < L; ++l) {
    bool ok = mats[4 * l].N == QKV && mats[4 * l + 1].N == hidden && mats[4 * l + 2].N == 2 * I && mats[4 * l + 3].N == hidden
              && mats[4 * l + 1].first().K == H * D && mats[4 * l + 3].first().K == I;
    for (int j = 0; j < 4; ++j) {
      const MatList& ml = mats[4 * l + j];
      for (int i = 0; i < ml.n; ++i)
        ok = ok && ml.m[i].kind == ml.m[0].kind && ml.m[i].K == ml.m[0].K && ml.m[i].G == ml.m[0].G;
    }
    ok = ok && mats[4 * l].first().K == hidden && mats[4 * l + 2].first().K == hidden;
    TORCH_CHECK(ok, "decode_step: weight shapes of layer ", l);
  }
  TORCH_CHECK(mats[4 * L].first().K == hidden, "decode_step: lm_head shape");
  const int64_t V = mats[4 * L].N;
  auto opt = embed.options();
  at::Tensor hbuf = at::empty({B, hidden}, opt), abuf = at::empty({B, hidden}, opt);
  at::Tensor qkvbuf = at::empty({B, QKV}, opt), obuf = at::empty({B, H * D}, opt);
  at::Tensor mbuf = at::empty({B, I}, opt), logits = at::empty({B, V}, opt);
  at::Tensor trig = at::empty({B, D}, opt);  // cos (D/2) | sin (D/2) per sequence
  float *h = hbuf.data_ptr<float>(), *a = abuf.data_ptr<float>(), *qkv = qkvbuf.data_ptr<float>();
  float *o = obuf.data_ptr<float>(), *mlp = mbuf.data_ptr<float>(), *tr = trig.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* lop = lo.data_ptr<int64_t>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const float* inv = inv_freq.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(idp[b] >= 0 && idp[b] < embed.size(0), "decode_step: token id out of range");
    std::copy_n(embed.data_ptr<float>() + idp[b] * hidden, hidden, h + b * hidden);
    for (int64_t i = 0; i < D / 2; ++i) {  // as Transformer.rope: fp32 position * inv_freq, then cos / sin
      float f = (float)pp[b] * inv[i];
      tr[b * D + i] = std::cos(f);
      tr[b * D + D / 2 + i] = std::sin(f);
    }
  }
  const float scale = 1.f / std::sqrt((float)D);
  int64_t max_ctx = 1;
  for (int64_t b = 0; b < B; ++b) max_ctx = std::max(max_ctx, pp[b] - lop[b] + 1);
  // threads: the caller's torch.set_num_threads, fewer when there is too little work to share
  int64_t wbytes = 0;
  for (int j = 0; j < 4; ++j) wbytes += weights[mat_idx[j]].nbytes();  // one layer's matrices
  for (int j = 0; j < 3; ++j) wbytes += parts[j].nbytes();
  int nt = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : at::get_num_threads(),
                                                      1 + wbytes * B / (64 << 10)));
  std::vector<float> scratch((size_t)nt * max_ctx);
  std::vector<ActBuf> actbufs(nt);
  for (auto& ab : actbufs) ab.q8 = act_q8 != 0;
  SpinBarrier bar(nt);
  float* lg = logits.data_ptr<float>();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    float* sc = scratch.data() + (size_t)tid * max_ctx;
    ActBuf& ab = actbufs[tid];
#pragma omp single
    bar.n = T;  // the runtime may grant fewer threads than asked (nested regions); implicit barrier after
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = &weights[9 * l];
      float* kp = k_pool[l].data_ptr<float>();
      float* vp = v_pool[l].data_ptr<float>();
      if (tid == 0)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, fptr(w[0]), hidden, eps, a + b * hidden);
      bar.wait();
      const MatList* lm = mats.data() + 4 * l;
      linear(a, B, lm[0], fptr(w[2]), qkv, QKV, false, ab, tid, T);
      bar.wait();
      if (tid == 0) {
        const float *qn = fptr(w[3]), *kn = fptr(w[4]);
        for (int64_t b = 0; b < B; ++b) {
          float* row = qkv + b * QKV;
          for (int64_t j = 0; j < H + KV; ++j) {  // q heads then k heads
            float* x = row + j * D;
            const float* nw = j < H ? qn : kn;
            if (nw) rmsnorm(x, nw, D, eps, x);
            rope(x, tr + b * D, tr + b * D + D / 2, D);
          }
          int64_t p = pp[b];
          int64_t slot = bt[b * nb + p / block_size] * block_size + p % block_size;
          std::copy_n(row + H * D, KV * D, kp + slot * KV * D);
          std::copy_n(row + (H + KV) * D, KV * D, vp + slot * KV * D);
        }
      }
      bar.wait();
      int64_t t0, t1;
      share(B * H, 1, tid, T, t0, t1);
      for (int64_t t = t0; t < t1; ++t) {
        int64_t b = t / H, hh = t % H, g = hh / (H / KV);
        const float* q = qkv + b * QKV + hh * D;
        int64_t p0 = lop[b], n = pp[b] - p0 + 1;
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; ++i) {
          int64_t p = p0 + i, slot = bt[b * nb + p / block_size] * block_size + p % block_size;
          sc[i] = dot(q, kp + (slot * KV + g) * D, D) * scale;
          mx = std::max(mx, sc[i]);
        }
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) sum += (sc[i] = std::exp(sc[i] - mx));
        float* out = o + b * H * D + hh * D;
        std::fill_n(out, D, 0.f);
        for (int64_t i = 0; i < n; ++i) {
          int64_t p = p0 + i, slot = bt[b * nb + p / block_size] * block_size + p % block_size;
          const float* vv = vp + (slot * KV + g) * D;
          float c = sc[i] / sum;
          for (int64_t d = 0; d < D; ++d) out[d] += c * vv[d];
        }
      }
      bar.wait();
      linear(o, B, lm[1], nullptr, h, hidden, true, ab, tid, T);
      bar.wait();
      if (tid == 0)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, fptr(w[6]), hidden, eps, a + b * hidden);
      bar.wait();
      swiglu(a, B, lm[2], I, mlp, ab, tid, T);
      bar.wait();
      linear(mlp, B, lm[3], nullptr, h, hidden, true, ab, tid, T);
      bar.wait();
    }
    if (tid == 0)
      for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, final_norm.data_ptr<float>(), hidden, eps, a + b * hidden);
    bar.wait();
    linear(a, B, mats[4 * L], nullptr, lg, V, false, ab, tid, T);
  }
  return logits;
}

TORCH_LIBRARY(lmstack_cpu, m) {
  m.def("decode_step(Tensor ids, Tensor pos, Tensor lo, Tensor block_tables, Tensor[] k_pool, Tensor[] v_pool, "
        "Tensor[] weights, Tensor embed, Tensor final_norm, Tensor lm_head, Tensor inv_freq, int n_heads, "
        "int n_kv, int head_dim, int block_size, float eps, int num_threads, Tensor[] parts, Tensor[] qscale, "
        "Tensor[] qzero, int act_q8=0) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
}
