// Paged decode attention for CPU, reading K/V straight from the block pool.
//
// The torch path gathers every request's blocks into a padded [B, L, KVH, D]
// copy before attending, which triples KV memory traffic and pays for the
// padding.  This kernel walks each request's block table instead, so every
// cached K/V row is read exactly once and padding costs nothing.
//
// Work item = (request b, KV head h): the G = H / KVH query heads of a GQA
// group share each K/V row while it is in cache.  One pass over the request's
// blocks with an online softmax (flash-decoding): per block, the G x BS scores,
// their running max m and sum l, and the output accumulator rescaled by
// exp(m_old - m_new) whenever the max grows.  Next block's K and V rows are
// prefetched while this one is computed (blocks sit anywhere in the pool, so the
// hardware prefetcher cannot follow a request from one block to the next), and
// exp runs vectorized (exp_ps below) instead of one libm call per score.
// Accumulation is float32 whatever the storage dtype (float32 only for now).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 (scores minus their max), vectorizable: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes expf's coefficients,
// ~1 ulp), 2^n assembled in the exponent bits.  Below -87 the result is 0.
inline float exp_neg(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline void prefetch_rows(const float* base, int64_t rows, int64_t stride, int64_t d) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(base + t * stride + i, 0, 1);
}


#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVSERVE_AVX2 1

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// One request, all its query heads, head_dim D = 8 * ND (AVX2 registers).  Blocks are walked in
// order and each is read whole (all KV heads: one contiguous run, the next block prefetched),
// as the portable loop below does; per query head, within a block, the scaled q and the output
// accumulator live in registers (the portable loop keeps the accumulator in memory for every
// token, which made it store-bound) and go back to `acc` once per block.
template <int ND>
void attend_request_avx2(const float* qb, const float* kp, const float* vp, const int64_t* table, int64_t L,
                         int64_t BS, int64_t KVH, int64_t H, float scale, float* ob, float* scores, float* acc_mem,
                         float* mx, float* denom) {
  constexpr int64_t D = ND * 8;
  const int64_t G = H / KVH, row = KVH * D, nblocks = (L + BS - 1) / BS;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t hq = 0; hq < H; ++hq) {
    mx[hq] = -std::numeric_limits<float>::infinity();
    denom[hq] = 0.f;
  }
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t blk = table[j], n = std::min(BS, L - j * BS);
    if (j + 1 < nblocks) {
      const int64_t nxt = table[j + 1], nn = std::min(BS, L - (j + 1) * BS);
      prefetch_rows(kp + nxt * BS * row, 1, 0, nn * row);
      prefetch_rows(vp + nxt * BS * row, 1, 0, nn * row);
    }
    for (int64_t hq = 0; hq < H; ++hq) {
      const int64_t h = hq / G;
      const float* kb = kp + blk * BS * row + h * D;
      const float* vb = vp + blk * BS * row + h * D;
      float* am = acc_mem + hq * D;
      __m256 q[ND], acc[ND];
      for (int i = 0; i < ND; ++i) {
        q[i] = _mm256_mul_ps(_mm256_loadu_ps(qb + hq * D + 8 * i), vscale);
        acc[i] = j == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(am + 8 * i);
      }
      float bmax = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const float* kr = kb + t * row;
        __m256 s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(kr));
        __m256 s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(kr + 8));
        for (int i = 2; i + 1 < ND; i += 2) {
          s0 = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(kr + 8 * i), s0);
          s1 = _mm256_fmadd_ps(q[i + 1], _mm256_loadu_ps(kr + 8 * i + 8), s1);
        }
        const float sc = hsum(_mm256_add_ps(s0, s1));
        scores[t] = sc;
        bmax = sc > bmax ? sc : bmax;
      }
      const float m_new = bmax > mx[hq] ? bmax : mx[hq];
      const float correction = exp_neg(mx[hq] - m_new);  // 0 on the first block (mx = -inf)
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        scores[t] = exp_neg(scores[t] - m_new);
        sum += scores[t];
      }
      denom[hq] = denom[hq] * correction + sum;
      mx[hq] = m_new;
      const __m256 c = _mm256_set1_ps(correction);
      for (int i = 0; i < ND; ++i) acc[i] = _mm256_mul_ps(acc[i], c);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 w = _mm256_set1_ps(scores[t]);
        const float* vr = vb + t * row;
        for (int i = 0; i < ND; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + 8 * i), acc[i]);
      }
      for (int i = 0; i < ND; ++i) _mm256_storeu_ps(am + 8 * i, acc[i]);
    }
  }
  for (int64_t hq = 0; hq < H; ++hq) {
    const __m256 inv = _mm256_set1_ps(1.f / denom[hq]);
    for (int i = 0; i < ND; ++i)
      _mm256_storeu_ps(ob + hq * D + 8 * i, _mm256_mul_ps(_mm256_loadu_ps(acc_mem + hq * D + 8 * i), inv));
  }
}
#endif

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] (contiguous);
// block_tables: [B, max_blocks] int64; seq_lens: [B] int64 (context incl. the new token).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_decode_attention: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "shape mismatch");
  const int64_t G = H / KVH;
  const int64_t MB = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = KVH * D;  // floats between consecutive tokens in a block

  // One work item per request: its blocks are read once each, whole (all KV heads:
  // one contiguous BS x KVH x D run), so the reads stream instead of hopping.
#ifdef KVSERVE_AVX2
  if (D == 64 || D == 128) {  // the register-resident path (head sizes of the models we serve)
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(BS), acc(H * D), mx(H), denom(H);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t L = lp[b];
        TORCH_CHECK(L >= 1 && L <= MB * BS, "seq_len out of range for the block table");
        auto attend = D == 64 ? attend_request_avx2<8> : attend_request_avx2<16>;
        attend(qp + b * H * D, kp, vp, tp + b * MB, L, BS, KVH, H, fscale, op + b * H * D, scores.data(), acc.data(),
               mx.data(), denom.data());
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(H * BS), acc(H * D), mx(H), denom(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t L = lp[b];
      TORCH_CHECK(L >= 1 && L <= MB * BS, "seq_len out of range for the block table");
      const float* qb = qp + b * H * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(denom.begin(), denom.end(), 0.f);
      const int64_t nblocks = (L + BS - 1) / BS;
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t blk = tp[b * MB + j];
        const int64_t n = std::min(BS, L - j * BS);  // tokens of this block in the context
        if (j + 1 < nblocks) {
          const int64_t nxt = tp[b * MB + j + 1];
          const int64_t nn = std::min(BS, L - (j + 1) * BS);
          prefetch_rows(kp + nxt * BS * row, 1, 0, nn * row);
          prefetch_rows(vp + nxt * BS * row, 1, 0, nn * row);
        }
        for (int64_t hq = 0; hq < H; ++hq) {  // query head; its KV head is hq / G
          const float* kb = kp + blk * BS * row + (hq / G) * D;
          const float* vb = vp + blk * BS * row + (hq / G) * D;
          const float* qg = qb + hq * D;
          float* pg = p.data() + hq * BS;
          int64_t t = 0;
          for (; t + 4 <= n; t += 4) {  // four independent sums: the FMA chains overlap
            const float* k0 = kb + t * row;
            const float* k1 = k0 + row;
            const float* k2 = k1 + row;
            const float* k3 = k2 + row;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < D; ++i) {
              s0 += qg[i] * k0[i];
              s1 += qg[i] * k1[i];
              s2 += qg[i] * k2[i];
              s3 += qg[i] * k3[i];
            }
            pg[t] = fscale * s0;
            pg[t + 1] = fscale * s1;
            pg[t + 2] = fscale * s2;
            pg[t + 3] = fscale * s3;
          }
          for (; t < n; ++t) pg[t] = fscale * dot(qg, kb + t * row, D);
          float bmax = -std::numeric_limits<float>::infinity();
          for (int64_t u = 0; u < n; ++u) bmax = pg[u] > bmax ? pg[u] : bmax;
          const float m_new = bmax > mx[hq] ? bmax : mx[hq];
          const float correction = exp_neg(mx[hq] - m_new);  // 0 on the first block (mx = -inf)
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t u = 0; u < n; ++u) {
            pg[u] = exp_neg(pg[u] - m_new);
            sum += pg[u];
          }
          denom[hq] = denom[hq] * correction + sum;
          mx[hq] = m_new;
          float* ag = acc.data() + hq * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) ag[i] *= correction;
          for (int64_t u = 0; u < n; ++u) {
            const float w = pg[u];
            const float* vrow = vb + u * row;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ag[i] += w * vrow[i];
          }
        }
      }
      float* ob = op + b * H * D;
      for (int64_t hq = 0; hq < H; ++hq) {
        const float inv = 1.f / denom[hq];
        for (int64_t i = 0; i < D; ++i) ob[hq * D + i] = acc[hq * D + i] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
}
