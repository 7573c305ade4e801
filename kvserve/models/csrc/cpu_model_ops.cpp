// kvserve's CPU model kernels (float32): a linear layer on weights packed in column blocks, and
// the fused elementwise ops of a decoder layer (RMSNorm, residual add + RMSNorm, rotary, SwiGLU).
//
// Why: a decode step reads every weight once for a handful of rows, so it is bound by memory
// bandwidth; oneDNN and MKL reach about half to 80% of it on the 2-core machines this project runs
// on (benchmarks/cpu_linear.py).  This kernel streams each weight block from memory exactly once per
// call and reuses it, from L2, for every row of the input.
//
// Layout (`pack_weight` in kvserve/models/cpu_gemm.py): W [N, K] -> P [ceil(N / 16), K, 16] with
// P[b, k, j] = W[16 b + j, k] (zero rows pad N to a multiple of 16).  One block is 16 output
// columns over all of K, contiguous: 36 KB for K = 576, so a block stays in L2 while every row of
// x multiplies it.
//
// Microkernel: MR rows of x (MR <= 6) times one block: 2 x MR AVX2 accumulators of 8 floats, one
// broadcast of x[m, k] per row and two loads of P[b, k, 0:16] per k (the classic 6x16 register
// block: 12 accumulators + 2 weight vectors + 1 broadcast = 15 of the 16 ymm registers).  Where the
// compiler targets AVX-512 (-march=native on such a CPU) the 12 x 32 microkernel512 below is used
// instead: 2.4x the AVX2 kernel's throughput at 512 rows there, and 29.8 of 32 GB/s at one row.
// Threads split the column blocks (at::parallel_for: torch's own pool and thread count).
// Rows are taken MC at a time so the x panel (MC x K floats) stays in L2 next to the block.
//
// Result: y = x W^T + b, equal to F.linear up to float rounding (the sum over k runs in order,
// in 8-wide lanes; tests/unit/models/test_cpu_gemm.py holds it to F.linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVSERVE_AVX2 1
#endif
#if defined(__AVX512F__)
#define KVSERVE_AVX512 1  // the linear's AVX-512 microkernel; the elementwise ops keep their AVX2 code
#endif

namespace {

constexpr int64_t kNR = 16;  // output columns per block
constexpr int kMR = 6;       // rows per microkernel call

#ifdef KVSERVE_AVX2
// y[0:MR, 0:ncols] (+)= x[0:MR, 0:K] . block[0:K, 0:16] (+ bias); `accumulate` adds to what y holds
// (a later K slice), otherwise y is overwritten; the bias goes in with the first slice only.
template <int MR>
inline void microkernel(const float* x, int64_t ldx, const float* block, int64_t K, float* y, int64_t ldy,
                        int64_t ncols, const float* bias, bool accumulate) {
  __m256 acc[MR][2];
  _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
    acc[m][0] = _mm256_setzero_ps();
    acc[m][1] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* w = block + k * kNR;
    const __m256 w0 = _mm256_loadu_ps(w);
    const __m256 w1 = _mm256_loadu_ps(w + 8);
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * ldx + k);
      acc[m][0] = _mm256_fmadd_ps(b, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(b, w1, acc[m][1]);
    }
  }
  if (bias != nullptr && ncols == kNR) {
    const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm256_add_ps(acc[m][0], b0);
      acc[m][1] = _mm256_add_ps(acc[m][1], b1);
    }
  }
  _Pragma("GCC unroll 8") for (int m = 0; m < MR; ++m) {
    float* out = y + m * ldy;
    if (ncols == kNR) {
      if (accumulate) {
        acc[m][0] = _mm256_add_ps(acc[m][0], _mm256_loadu_ps(out));
        acc[m][1] = _mm256_add_ps(acc[m][1], _mm256_loadu_ps(out + 8));
      }
      _mm256_storeu_ps(out, acc[m][0]);
      _mm256_storeu_ps(out + 8, acc[m][1]);
    } else {  // the last, partial block: only the real columns are written
      alignas(32) float tmp[kNR];
      _mm256_store_ps(tmp, acc[m][0]);
      _mm256_store_ps(tmp + 8, acc[m][1]);
      for (int64_t j = 0; j < ncols; ++j)
        out[j] = (accumulate ? out[j] : 0.0f) + tmp[j] + (bias != nullptr ? bias[j] : 0.0f);
    }
  }
}
#else
template <int MR>
inline void microkernel(const float* x, int64_t ldx, const float* block, int64_t K, float* y, int64_t ldy,
                        int64_t ncols, const float* bias, bool accumulate) {
  float acc[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = block + k * kNR;
    for (int m = 0; m < MR; ++m) {
      const float b = x[m * ldx + k];
      for (int64_t j = 0; j < kNR; ++j) acc[m][j] += b * w[j];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < ncols; ++j)
      y[m * ldy + j] = (accumulate ? y[m * ldy + j] : 0.0f) + acc[m][j] + (bias != nullptr ? bias[j] : 0.0f);
}
#endif

using Kernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const float*, bool);
constexpr Kernel kKernels[kMR + 1] = {nullptr,          microkernel<1>, microkernel<2>, microkernel<3>,
                                      microkernel<4>, microkernel<5>, microkernel<6>};

#ifdef KVSERVE_AVX512
// The AVX-512 microkernel: up to 12 rows of x times TWO adjacent column blocks (32 columns, one
// zmm per block and row): 24 accumulators + 2 weight vectors + 1 broadcast = 27 of the 32 zmm
// registers; per k, 2 weight loads and 12 broadcasts feed 24 FMAs, so the FMA ports, not the
// loads, set the pace.  The two blocks are separate streams (block b and b + 1 of the packing), so
// the layout is the same as the AVX2 path's.  `nblocks` is 1 for a last, unpaired block; `ncols`
// is the number of real columns of the last block (< 16 only for a padded weight).
constexpr int kMR512 = 12;

// Software prefetch distance of the weight streams, in k steps (64 B per stream each: 16 = 1 KB
// ahead).  The hardware prefetchers alone left a decode step's linears at about memory time plus
// compute time (no overlap: rows 8 cost 4-5 ms more than rows 1 over all SmolLM2 weights); 1 KB
// ahead in L1 measured 20.0-20.8 vs 21.7-24.2 ms at rows 1, 23.6-24.4 vs 27.8-31.1 at rows 8 and
// 26.1-28.9 vs 30.9-34.5 at rows 12 (benchmarks/cpu_linear.py, interleaved runs, session 10);
// 8 and 32 were in between, 24 no better; NTA (session 9) was 2.5x slower.
constexpr int64_t kPrefetchK = 16;

// x[m, k] is read at x[m * ldx + k] (rows of x as they are), or, with PACKED, at x[k * kMR512 + m]
// (a strip packed k-major by pack_strips: the 12 broadcasts of a k are one cache line).
// `ahead` (may be null): the first `ahead_k` k steps of a later K slice, 64 B per stream and k,
// `ahead_stride` floats between its two streams (0: one stream), prefetched into L2 one line per
// stream and k step while this call computes from L1 (see blocked_linear).
template <int MR, int NB, bool PACKED>
inline void microkernel512(const float* x, int64_t ldx, const float* block, int64_t block_stride, int64_t K, float* y,
                           int64_t ldy, int64_t ncols_last, const float* bias, bool accumulate, int64_t pf,
                           const float* ahead, int64_t ahead_stride, int64_t ahead_k) {
  __m512 acc[MR][NB];
  _Pragma("GCC unroll 12") for (int m = 0; m < MR; ++m) {
    _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  }
  const float* w1p = block + (NB > 1 ? block_stride : 0);
  for (int64_t k = 0; k < K; ++k) {
    if (pf > 0) {
      _mm_prefetch(reinterpret_cast<const char*>(block + (k + pf) * kNR), _MM_HINT_T0);
      if (NB > 1) _mm_prefetch(reinterpret_cast<const char*>(w1p + (k + pf) * kNR), _MM_HINT_T0);
    }
    if (k < ahead_k) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k * kNR), _MM_HINT_T1);
      if (ahead_stride > 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + ahead_stride + k * kNR), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(block + k * kNR);
    const __m512 w1 = NB > 1 ? _mm512_loadu_ps(w1p + k * kNR) : w0;
    _Pragma("GCC unroll 12") for (int m = 0; m < MR; ++m) {
      const __m512 b = _mm512_set1_ps(PACKED ? x[k * kMR512 + m] : x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(b, w0, acc[m][0]);
      if (NB > 1) acc[m][NB - 1] = _mm512_fmadd_ps(b, w1, acc[m][NB - 1]);
    }
  }
  _Pragma("GCC unroll 2") for (int j = 0; j < NB; ++j) {
    // Only the last block of the weight can be partial; a mask keeps its padding columns unwritten.
    const int64_t cols = j == NB - 1 ? ncols_last : kNR;
    const __mmask16 mask = cols >= kNR ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + j * kNR) : _mm512_setzero_ps();
    _Pragma("GCC unroll 12") for (int m = 0; m < MR; ++m) {
      float* out = y + m * ldy + j * kNR;
      __m512 v = acc[m][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, out));
      else if (bias != nullptr) v = _mm512_add_ps(v, bv);
      _mm512_mask_storeu_ps(out, mask, v);
    }
  }
}

using Kernel512 = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, const float*,
                           bool, int64_t, const float*, int64_t, int64_t);
template <int NB, bool PACKED>
struct Kernels512 {
  static constexpr Kernel512 table[kMR512 + 1] = {
      nullptr,
      microkernel512<1, NB, PACKED>, microkernel512<2, NB, PACKED>, microkernel512<3, NB, PACKED>,
      microkernel512<4, NB, PACKED>, microkernel512<5, NB, PACKED>, microkernel512<6, NB, PACKED>,
      microkernel512<7, NB, PACKED>, microkernel512<8, NB, PACKED>, microkernel512<9, NB, PACKED>,
      microkernel512<10, NB, PACKED>, microkernel512<11, NB, PACKED>, microkernel512<12, NB, PACKED>};
};

// Rows m0..m1 of x [M, K] into `out` as strips of kMR512 rows, each strip K slices of kKC columns,
// each slice k-major ([kc][kMR512], rows past m1 zero): slice (s, k0) starts at
// out + s * kMR512 * K + k0 * kMR512.
inline void pack_strips(const float* x, int64_t K, int64_t m0, int64_t m1, float* out) {
  for (int64_t s = 0; m0 + s * kMR512 < m1; ++s) {
    float* strip = out + s * kMR512 * K;
    const int64_t rows = std::min<int64_t>(kMR512, m1 - m0 - s * kMR512);
    for (int64_t k = 0; k < K; ++k) {
      float* dst = strip + k * kMR512;
      for (int64_t m = 0; m < rows; ++m) dst[m] = x[(m0 + s * kMR512 + m) * K + k];
      for (int64_t m = rows; m < kMR512; ++m) dst[m] = 0.f;
    }
  }
}
#endif

// K is taken kKC at a time: a block's K slice (kKC x 16 floats, 16 KB) stays in L1 while every
// row strip of the panel multiplies it (the AVX-512 path's pair of blocks: 32 KB).
constexpr int64_t kKC = 256;
// Rows per x panel: all weights are streamed from memory once per panel, so panels are large
// (MC x K floats up to 2 MB, in L3); the hot part of a panel is the strip a microkernel reads.
int64_t rows_per_panel(int64_t K, int64_t mr) {
  return std::max<int64_t>(mr, (2048 * 1024 / 4 / std::max<int64_t>(K, 1)) / mr * mr);
}

}  // namespace

// x [M, K] float32 contiguous; packed [NB, K, 16]; bias [N] or empty; returns y [M, N].
torch::Tensor blocked_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                             int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kNR && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kFloat32, "packed: contiguous float32 [NB, K, 16]");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " columns, the weight ", packed.size(1));
  TORCH_CHECK(N > (NB - 1) * kNR && N <= NB * kNR, "N=", N, " does not fit ", NB, " blocks of 16");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined() && bias->numel() > 0) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == torch::kFloat32, "bias: [N] float32");
    bias_ptr = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* pp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#ifdef KVSERVE_AVX512
  // Work item = a pair of adjacent blocks (the last one alone when NB is odd).  With more than one
  // row strip, each thread first packs the panel's rows k-major (pack_strips; ~M x K copies, against
  // M x K x N FMAs) so a microkernel's broadcasts read one sequential stream.
  const int64_t mc = rows_per_panel(K, kMR512), pairs = (NB + 1) / 2;
  const bool packed_x = M > kMR512;
  const int64_t pf = kPrefetchK;
  at::parallel_for(0, pairs, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<float> panel(packed_x ? static_cast<size_t>((std::min(mc, M) + kMR512 - 1) / kMR512 * kMR512 * K) : 0);
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
      const int64_t m1 = std::min(M, m0 + mc);
      if (packed_x) pack_strips(xp, K, m0, m1, panel.data());
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t b = 2 * p, nb = std::min<int64_t>(2, NB - b);
        const float* block = pp + b * K * kNR;
        const int64_t col = b * kNR, ncols_last = std::min(kNR, N - (b + nb - 1) * kNR);
        const float* bb = bias_ptr != nullptr ? bias_ptr + col : nullptr;
        const Kernel512* table = packed_x ? (nb == 2 ? Kernels512<2, true>::table : Kernels512<1, true>::table)
                                          : (nb == 2 ? Kernels512<2, false>::table : Kernels512<1, false>::table);
        const int64_t strips = (m1 - m0 + kMR512 - 1) / kMR512;
        for (int64_t k0 = 0; k0 < K; k0 += kKC) {
          const int64_t kc = std::min(kKC, K - k0);
          // The slice the first strip will stream next: this pair's next K slice, or the first of
          // the thread's next pair.  The other strips compute from L1 while the memory bus would
          // idle, so they prefetch it into L2, split between them (~20% of a 32-row decode step's
          // linears was that idle time: weight stream and FMAs did not overlap).
          const float* next = nullptr;
          int64_t next_stride = 0, next_kc = 0;
          if (k0 + kKC < K) {
            next = block + (k0 + kKC) * kNR, next_stride = nb == 2 ? K * kNR : 0, next_kc = std::min(kKC, K - k0 - kKC);
          } else if (p + 1 < p_end) {
            next = pp + 2 * (p + 1) * K * kNR, next_stride = NB - 2 * (p + 1) >= 2 ? K * kNR : 0;
            next_kc = std::min(kKC, K);
          }
          const int64_t share = strips > 1 ? (next_kc + strips - 2) / (strips - 1) : 0;
          for (int64_t m = m0, s = 0; m < m1; m += kMR512, ++s) {
            const int rows = static_cast<int>(std::min<int64_t>(kMR512, m1 - m));
            const float* xs = packed_x ? panel.data() + (m - m0) * K + k0 * kMR512 : xp + m * K + k0;
            // Only the first strip of a slice reads the weights from memory (the rest find them
            // in L1), so only it prefetches ahead into L1; the others take a share of the next slice.
            const int64_t first_k = (s - 1) * share;
            const bool fetch_next = s > 0 && next != nullptr && first_k < next_kc;
            table[rows](xs, K, block + k0 * kNR, K * kNR, kc, yp + m * N + col, N, ncols_last,
                        k0 == 0 ? bb : nullptr, k0 > 0, m == m0 ? pf : 0,
                        fetch_next ? next + first_k * kNR : nullptr, next_stride,
                        fetch_next ? std::min(share, next_kc - first_k) : 0);
          }
        }
      }
    }
  });
#else
  const int64_t mc = rows_per_panel(K, kMR);
  at::parallel_for(0, NB, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
      const int64_t m1 = std::min(M, m0 + mc);
      for (int64_t b = b_begin; b < b_end; ++b) {
        const float* block = pp + b * K * kNR;
        const int64_t col = b * kNR, ncols = std::min(kNR, N - col);
        const float* bb = bias_ptr != nullptr ? bias_ptr + col : nullptr;
        for (int64_t k0 = 0; k0 < K; k0 += kKC) {
          const int64_t kc = std::min(kKC, K - k0);
          for (int64_t m = m0; m < m1; m += kMR) {
            const int rows = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            kKernels[rows](xp + m * K + k0, K, block + k0 * kNR, kc, yp + m * N + col, N, ncols,
                           k0 == 0 ? bb : nullptr, k0 > 0);
          }
        }
      }
    }
  });
#endif
  return y;
}

// ---------------------------------------------------------------------------------------------
// Fused elementwise layer ops (float32, rows of a [T, width] tensor; rows in parallel when the
// tensor is large enough to be worth it).  Each replaces several torch ops, which at the few rows
// of a decode step cost far more in dispatch than in arithmetic.  Reference: the torch code in
// kvserve/models/layers.py and rope.py, held equal in tests/unit/models/test_fused_ops.py.

namespace {

// Rows per parallel task: at least ~16K elements, so a decode step's few rows run on one thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// exp(x), vectorizable: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes
// expf's coefficients, ~1 ulp), 2^n assembled in the exponent bits; x is clamped to [-87, 88].
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
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

#ifdef KVSERVE_AVX2
// exp_approx on 8 lanes (the same steps, so the same results up to FMA rounding).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// weight * (h / sqrt(mean(h^2) + eps)) for one row, as HF's LlamaRMSNorm computes it in float32
// (the sum of squares in 8 lanes, so it vectorizes).
inline void rms_norm_row(const float* h, const float* weight, float eps, int64_t n, float* out) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += h[i + j] * h[i + j];
  float ss = 0.f;
  for (; i < n; ++i) ss += h[i] * h[i];
  for (int j = 0; j < 8; ++j) ss += lanes[j];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) out[k] = weight[k] * (h[k] * inv);
}

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), what,
              ": contiguous float32 [T, width]");
}

}  // namespace

// RMSNorm of x [T, H]: returns weight * x / rms(x).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.numel() == H && weight.is_contiguous() && weight.scalar_type() == torch::kFloat32, "weight: [H] float32");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, row_grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rms_norm_row(xp + t * H, wp, static_cast<float>(eps), H, op + t * H);
  });
  return out;
}

// The residual add and the next RMSNorm in one pass: h = x + residual, returns (h, RMSNorm(h)).
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual, const torch::Tensor& weight,
                                        double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ in shape");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.numel() == H && weight.is_contiguous() && weight.scalar_type() == torch::kFloat32, "weight: [H] float32");
  auto h = torch::empty_like(x);
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, T, row_grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < H; ++i) hp[t * H + i] = rp[t * H + i] + xp[t * H + i];
      rms_norm_row(hp + t * H, wp, static_cast<float>(eps), H, op + t * H);
    }
  });
  return {h, out};
}

// Rotary embedding (rotate-half form) applied in place to the first `num_heads` heads of each row
// of qkv [T, width] (the q and k heads of a fused q|k|v projection), head_dim D each, with
// cos/sin [T, D] (both halves of a row equal, as RotaryEmbedding's tables are).
void rope_inplace(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t num_heads,
                  int64_t head_dim) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t T = qkv.size(0), W = qkv.size(1), D = head_dim, half = D / 2;
  TORCH_CHECK(D % 2 == 0 && num_heads * D <= W, "rope_inplace: ", num_heads, " heads of ", D, " exceed width ", W);
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(), "cos/sin: [T, head_dim]");
  float* qp = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  at::parallel_for(0, T, row_grain(num_heads * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *c = cp + t * D, *s = sp + t * D;
      for (int64_t hd = 0; hd < num_heads; ++hd) {
        float* x = qp + t * W + hd * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// SwiGLU on a fused gate|up projection gate_up [T, 2 I]: returns silu(gate) * up, [T, I].
torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) == 2 * I, "gate_up: an even width");
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, row_grain(2 * I), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *g = gp + t * 2 * I, *u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
#ifdef KVSERVE_AVX2
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) o[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
    }
  });
  return out;
}

// Left out where another source includes this one for its kernels (cpu_decoder_stack.cpp).
#ifndef KVSERVE_KERNELS_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("blocked_linear", &blocked_linear, "y = x W^T + b with W packed in [NB, K, 16] column blocks");
  m.def("rms_norm", &rms_norm, "RMSNorm of x [T, H]");
  m.def("add_rms_norm", &add_rms_norm, "h = x + residual; returns (h, RMSNorm(h))");
  m.def("rope_inplace", &rope_inplace, "rotary embedding of the first num_heads heads of qkv [T, W], in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of gate_up [T, 2I]");
}
#endif
