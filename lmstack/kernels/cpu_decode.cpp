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

// y[m, n] (+)= x[m, :] . W[n, :] (+ b[n]) for m < M and this thread's rows n. x (M, K), W (N, K) row-major.
void linear(const float* x, int64_t M, int64_t K, const float* W, const float* b, int64_t N, float* y,
            int64_t ldy, bool accumulate, int tid, int nt) {
  int64_t n0, n1;
  share(N, 4, tid, nt, n0, n1);
  float r[4];
  for (int64_t n = n0; n < n1; n += 4) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float* ym = y + m * ldy;
      if (n + 4 <= n1) {
        dot4(xm, W + n * K, K, r);
      } else {
        for (int64_t j = 0; n + j < n1; ++j) r[j] = dot(xm, W + (n + j) * K, K);
      }
      for (int64_t j = 0; j < 4 && n + j < n1; ++j) {
        float v = r[j] + (b ? b[n + j] : 0.f);
        ym[n + j] = accumulate ? ym[n + j] + v : v;
      }
    }
  }
}

// act[m, i] = silu(x . Wg[i]) * (x . Wu[i]) with W = [Wg; Wu] (2I, K) row-major, this thread's i.
void swiglu(const float* x, int64_t M, int64_t K, const float* W, int64_t I, float* act, int tid, int nt) {
  int64_t i0, i1;
  share(I, 4, tid, nt, i0, i1);
  float g[4], u[4];
  for (int64_t i = i0; i < i1; i += 4) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      if (i + 4 <= i1) {
        dot4(xm, W + i * K, K, g);
        dot4(xm, W + (I + i) * K, K, u);
      } else {
        for (int64_t j = 0; i + j < i1; ++j) {
          g[j] = dot(xm, W + (i + j) * K, K);
          u[j] = dot(xm, W + (I + i + j) * K, K);
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

}  // namespace

// weights: 9 per layer: input_norm, qkv_w (H+2KV)D x hidden, qkv_b or empty, q_norm or empty, k_norm or empty,
// o_w hidden x HD, post_norm, gate_up_w 2I x hidden, down_w hidden x I.
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& lo,
                       const at::Tensor& block_tables, at::TensorList k_pool, at::TensorList v_pool,
                       at::TensorList weights, const at::Tensor& embed, const at::Tensor& final_norm,
                       const at::Tensor& lm_head, const at::Tensor& inv_freq, int64_t n_heads, int64_t n_kv,
                       int64_t head_dim, int64_t block_size, double eps, int64_t num_threads) {
  const int64_t B = ids.size(0), L = k_pool.size();
  const int64_t hidden = embed.size(1), V = lm_head.size(0), H = n_heads, KV = n_kv, D = head_dim;
  const int64_t QKV = (H + 2 * KV) * D, I = weights[7].size(0) / 2, nb = block_tables.size(1);
  TORCH_CHECK((int64_t)weights.size() == 9 * L && (int64_t)v_pool.size() == L, "decode_step: weight list");
  TORCH_CHECK(embed.scalar_type() == at::kFloat && embed.is_contiguous() && lm_head.is_contiguous(),
              "decode_step: fp32 contiguous weights expected");
  for (const auto& w : weights)
    TORCH_CHECK(!w.defined() || w.numel() == 0 || (w.scalar_type() == at::kFloat && w.is_contiguous()),
                "decode_step: every weight must be a contiguous fp32 tensor");
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
  int64_t wbytes = (QKV + H * D + 3 * I) * hidden * 4;
  int nt = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : at::get_num_threads(),
                                                      1 + wbytes * B / (64 << 10)));
  std::vector<float> scratch((size_t)nt * max_ctx);
  SpinBarrier bar(nt);
  float* lg = logits.data_ptr<float>();
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), T = omp_get_num_threads();
    float* sc = scratch.data() + (size_t)tid * max_ctx;
#pragma omp single
    bar.n = T;  // the runtime may grant fewer threads than asked (nested regions); implicit barrier after
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = &weights[9 * l];
      float* kp = k_pool[l].data_ptr<float>();
      float* vp = v_pool[l].data_ptr<float>();
      if (tid == 0)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, fptr(w[0]), hidden, eps, a + b * hidden);
      bar.wait();
      linear(a, B, hidden, fptr(w[1]), fptr(w[2]), QKV, qkv, QKV, false, tid, T);
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
      linear(o, B, H * D, fptr(w[5]), nullptr, hidden, h, hidden, true, tid, T);
      bar.wait();
      if (tid == 0)
        for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, fptr(w[6]), hidden, eps, a + b * hidden);
      bar.wait();
      swiglu(a, B, hidden, fptr(w[7]), I, mlp, tid, T);
      bar.wait();
      linear(mlp, B, I, fptr(w[8]), nullptr, hidden, h, hidden, true, tid, T);
      bar.wait();
    }
    if (tid == 0)
      for (int64_t b = 0; b < B; ++b) rmsnorm(h + b * hidden, final_norm.data_ptr<float>(), hidden, eps, a + b * hidden);
    bar.wait();
    linear(a, B, hidden, lm_head.data_ptr<float>(), nullptr, V, lg, V, false, tid, T);
  }
  return logits;
}

TORCH_LIBRARY(lmstack_cpu, m) {
  m.def("decode_step(Tensor ids, Tensor pos, Tensor lo, Tensor block_tables, Tensor[] k_pool, Tensor[] v_pool, "
        "Tensor[] weights, Tensor embed, Tensor final_norm, Tensor lm_head, Tensor inv_freq, int n_heads, "
        "int n_kv, int head_dim, int block_size, float eps, int num_threads=0) -> Tensor");
  m.impl("decode_step", c10::DispatchKey::CPU, TORCH_FN(decode_step));
}
