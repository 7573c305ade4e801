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
