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
//
// Paths: AVX-512 (attend_request_avx512: per 16-key tile, 16 dot products summed by one
// shuffle tree into a vector of scores, softmax on that vector; requests handed to the
// threads one by one from an atomic counter), AVX2 (attend_request_avx2), portable loop.
// The kernel is bound by memory latency, not compute: a request's blocks sit anywhere in
// the pool, so the AVX-512 path prefetches g_prefetch_blocks blocks ahead, the far block's
// lines spread over the query heads of the current one (a burst of hundreds of prefetches
// fills the line-fill buffers and stalls the loads behind it).  Measured in
// benchmarks/attention_cpu.py; numbers in docs/benchmarks.md.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
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

#if defined(__AVX512F__)
#define KVSERVE_AVX512 1

// How far ahead (in blocks) the pool is prefetched, and every how many floats a line is
// touched (16 = every 64-byte line).  Set by tuning on the 2-core AVX-512 machine (see
// docs/benchmarks.md, "CPU attention kernels (session 9)").
constexpr int kDefaultPrefetchBlocks = 2, kDefaultPrefetchStride = 16;
int g_prefetch_blocks = kDefaultPrefetchBlocks;
int g_prefetch_stride = kDefaultPrefetchStride;

// exp(x) for x <= 0, 16 lanes: as exp_neg above, 2^n by scalef; below -87 (and -inf) -> 0.
inline __m512 exp_neg16(__m512 a) {
  const __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  const __m512 x = _mm512_max_ps(a, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n));
}

// Sixteen vectors -> one vector of their sixteen horizontal sums, in key order (lane t =
// sum of x[t]).  A tree of 45 shuffles/adds (256-bit halves, 128-bit quarters, pairs, singles)
// instead of 16 separate reductions; the tree leaves lane 4i+j holding x[4j+i], which one
// permute puts back in order.
inline __m512 sum16(const __m512* x) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)
    a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(x[2 * k], x[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k) {
    const __m512d e = _mm512_castps_pd(b[2 * k]), f = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(e, f)), _mm512_castpd_ps(_mm512_unpackhi_pd(e, f)));
  }
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, w);
}

inline void prefetch_block(const float* base, int64_t floats) {
  for (int64_t i = 0; i < floats; i += g_prefetch_stride) __builtin_prefetch(base + i, 0, 2);
}

// One request, head_dim D = 16 * ND.  Per key tile (up to 16 keys of one block) and query
// head: 16 dot products as vectors, summed by one sum16 tree into a vector of 16 scores
// (lanes = keys), online softmax on that vector, then P.V with the head's accumulator in
// registers.  The G heads of a group read the same K/V rows, from L1 after the first.
template <int ND>
void attend_request_avx512(const float* qb, const float* kp, const float* vp, const int64_t* table, int64_t L,
                           int64_t BS, int64_t KVH, int64_t H, float scale, float* ob, float* acc_mem, float* mx,
                           float* denom) {
  constexpr int64_t D = ND * 16;
  const int64_t G = H / KVH, row = KVH * D, nblocks = (L + BS - 1) / BS;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t hq = 0; hq < H; ++hq) {
    mx[hq] = -std::numeric_limits<float>::infinity();
    denom[hq] = 0.f;
  }
  std::fill(acc_mem, acc_mem + H * D, 0.f);
  alignas(64) float pw[16];
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t blk = table[j];
    if (j == 0)  // the first blocks at once; later, one block per block, spread over its heads
      for (int64_t ahead = 1; ahead < g_prefetch_blocks && ahead < nblocks; ++ahead) {
        const int64_t nxt = table[ahead], nn = std::min(BS, L - ahead * BS);
        prefetch_block(kp + nxt * BS * row, nn * row);
        prefetch_block(vp + nxt * BS * row, nn * row);
      }
    const int64_t ahead = j + g_prefetch_blocks;
    const float* pf_k = nullptr;
    const float* pf_v = nullptr;
    int64_t pf_floats = 0, pf_step = 0;
    if (g_prefetch_blocks > 0 && ahead < nblocks) {
      pf_k = kp + table[ahead] * BS * row;
      pf_v = vp + table[ahead] * BS * row;
      pf_floats = std::min(BS, L - ahead * BS) * row;
      pf_step = ((pf_floats + H - 1) / H + g_prefetch_stride - 1) / g_prefetch_stride * g_prefetch_stride;
    }
    for (int64_t off = 0; off < BS && j * BS + off < L; off += 16) {
      const int64_t n = std::min<int64_t>({16, BS - off, L - j * BS - off});
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      for (int64_t hq = 0; hq < H; ++hq) {
        if (off == 0 && pf_k != nullptr) {  // this head's share of the block ahead
          const int64_t from = hq * pf_step, len = std::min(pf_step, pf_floats - from);
          if (len > 0) {
            prefetch_block(pf_k + from, len);
            prefetch_block(pf_v + from, len);
          }
        }
        const int64_t h = hq / G;
        const float* kb = kp + (blk * BS + off) * row + h * D;
        const float* vb = vp + (blk * BS + off) * row + h * D;
        __m512 q[ND], part[16];
        for (int i = 0; i < ND; ++i) q[i] = _mm512_mul_ps(_mm512_loadu_ps(qb + hq * D + 16 * i), vscale);
        for (int t = 0; t < 16; ++t) {
          if (t >= n) {
            part[t] = _mm512_setzero_ps();
            continue;
          }
          const float* kr = kb + t * row;
          __m512 s0 = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
          __m512 s1 = _mm512_mul_ps(q[1], _mm512_loadu_ps(kr + 16));
          for (int i = 2; i + 1 < ND; i += 2) {
            s0 = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(kr + 16 * i), s0);
            s1 = _mm512_fmadd_ps(q[i + 1], _mm512_loadu_ps(kr + 16 * i + 16), s1);
          }
          part[t] = _mm512_add_ps(s0, s1);
        }
        const __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                               sum16(part));
        const float m_new = std::max(mx[hq], _mm512_reduce_max_ps(sc));
        const float correction = exp_neg(mx[hq] - m_new);  // 0 on the first tile (mx = -inf)
        const __m512 p = exp_neg16(_mm512_sub_ps(sc, _mm512_set1_ps(m_new)));  // invalid lanes -> 0
        denom[hq] = denom[hq] * correction + _mm512_reduce_add_ps(p);
        mx[hq] = m_new;
        _mm512_store_ps(pw, p);
        float* am = acc_mem + hq * D;
        const __m512 c = _mm512_set1_ps(correction);
        // Even and odd keys into separate accumulators: half as long FMA chains.
        __m512 acc[ND], acc2[ND];
        for (int i = 0; i < ND; ++i) {
          acc[i] = _mm512_mul_ps(_mm512_loadu_ps(am + 16 * i), c);
          acc2[i] = _mm512_setzero_ps();
        }
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {
          const __m512 w0 = _mm512_set1_ps(pw[t]), w1 = _mm512_set1_ps(pw[t + 1]);
          const float* vr = vb + t * row;
          for (int i = 0; i < ND; ++i) {
            acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(vr + 16 * i), acc[i]);
            acc2[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(vr + row + 16 * i), acc2[i]);
          }
        }
        if (t < n) {
          const __m512 w0 = _mm512_set1_ps(pw[t]);
          for (int i = 0; i < ND; ++i) acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(vb + t * row + 16 * i), acc[i]);
        }
        for (int i = 0; i < ND; ++i) _mm512_storeu_ps(am + 16 * i, _mm512_add_ps(acc[i], acc2[i]));
      }
    }
  }
  for (int64_t hq = 0; hq < H; ++hq) {
    const __m512 inv = _mm512_set1_ps(1.f / denom[hq]);
    for (int i = 0; i < ND; ++i)
      _mm512_storeu_ps(ob + hq * D + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(acc_mem + hq * D + 16 * i), inv));
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
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= MB * BS, "seq_len out of range for the block table");

  // One work item per request: its blocks are read once each, whole (all KV heads:
  // one contiguous BS x KVH x D run), so the reads stream instead of hopping.
#ifdef KVSERVE_AVX512
  if (D == 64 || D == 128) {  // head sizes of the models we serve
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), B), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(H * D), mx(H), denom(H);
      for (int64_t w = begin; w < end; ++w)
        for (int64_t b; (b = next.fetch_add(1)) < B;) {  // one request at a time, first come first served
          auto attend = D == 64 ? attend_request_avx512<4> : attend_request_avx512<8>;
          attend(qp + b * H * D, kp, vp, tp + b * MB, lp[b], BS, KVH, H, fscale, op + b * H * D, acc.data(),
                 mx.data(), denom.data());
        }
    });
    return out;
  }
#endif
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

// Tuning knobs for benchmarks/attention_cpu.py --tune-prefetch (AVX-512 path only; no-ops
// elsewhere).  Process-wide: set them only when no decode is running.
void set_prefetch(int64_t blocks, int64_t stride) {
  TORCH_CHECK(blocks >= 0 && stride >= 1, "set_prefetch: blocks >= 0, stride >= 1");
#ifdef KVSERVE_AVX512
  g_prefetch_blocks = static_cast<int>(blocks);
  g_prefetch_stride = static_cast<int>(stride);
#endif
}

std::vector<int64_t> default_prefetch() {
#ifdef KVSERVE_AVX512
  return {kDefaultPrefetchBlocks, kDefaultPrefetchStride};
#else
  return {0, 16};
#endif
}

// Left out where another source includes this one for its kernels (cpu_decoder_stack.cpp).
#ifndef KVSERVE_KERNELS_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
  m.def("set_prefetch", &set_prefetch, "tuning: prefetch distance (blocks ahead) and stride (floats)");
  m.def("default_prefetch", &default_prefetch, "the built-in (blocks ahead, stride)");
}
#endif
