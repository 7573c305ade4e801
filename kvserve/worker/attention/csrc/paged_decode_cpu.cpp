// Paged decode attention for CPU, reading K/V straight from the block pool.
//
// The torch path gathers every request's blocks into a padded [B, L, KVH, D]
// copy before attending, which triples KV memory traffic and pays for the
// padding.  This kernel walks each request's block table instead, so every
// cached K/V row is read exactly once and padding costs nothing.
//
// Work item = (request b, KV head h): the G = H / KVH query heads of a GQA
// group share each K/V row while it is in cache.  Two passes per item:
//   1. scores[g, t] = scale * <q[b, h*G+g], K[t, h]>, tracking the row max
//   2. out[b, h*G+g] = sum_t softmax(scores[g])[t] * V[t, h]
// Accumulation is float32 whatever the storage dtype (float32 only for now).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
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

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH;
      const int64_t L = lp[b];
      TORCH_CHECK(L >= 1 && L <= MB * BS, "seq_len out of range for the block table");
      scores.assign(G * L, 0.f);
      const float* qb = qp + (b * H + h * G) * D;
      std::vector<float> mx(G, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = tp[b * MB + t / BS];
        const float* krow = kp + (blk * BS + t % BS) * row + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float s = fscale * dot(qb + g * D, krow, D);
          scores[g * L + t] = s;
          if (s > mx[g]) mx[g] = s;
        }
      }
      std::vector<float> denom(G, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        for (int64_t t = 0; t < L; ++t) {
          sg[t] = std::exp(sg[t] - mx[g]);
          denom[g] += sg[t];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = tp[b * MB + t / BS];
        const float* vrow = vp + (blk * BS + t % BS) * row + h * D;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + t], vrow, acc.data() + g * D, D);
      }
      float* ob = op + (b * H + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        for (int64_t i = 0; i < D; ++i) ob[g * D + i] = acc[g * D + i] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
}
