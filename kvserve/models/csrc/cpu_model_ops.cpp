// kvserve's CPU model kernels (float32): a linear layer on weights packed in column blocks.
//
// Why: a decode step reads every weight once for a handful of rows, so it is bound by memory
// bandwidth; oneDNN and MKL reach about half of it on the 2-core AMD machines this project runs on
// (benchmarks/cpu_linear.py).  This kernel streams each weight block from memory exactly once per
// call and reuses it, from L2, for every row of the input.
//
// Layout (`pack_weight` in kvserve/models/cpu_gemm.py): W [N, K] -> P [ceil(N / 16), K, 16] with
// P[b, k, j] = W[16 b + j, k] (zero rows pad N to a multiple of 16).  One block is 16 output
// columns over all of K, contiguous: 36 KB for K = 576, so a block stays in L2 while every row of
// x multiplies it.
//
// Microkernel: MR rows of x (MR <= 6) times one block: 2 x MR AVX2 accumulators of 8 floats, one
// broadcast of x[m, k] per row and two loads of P[b, k, 0:16] per k (the classic 6x16 register
// block: 12 accumulators + 2 weight vectors + 1 broadcast = 15 of the 16 ymm registers).
// Threads split the column blocks (at::parallel_for: torch's own pool and thread count).
// Rows are taken MC at a time so the x panel (MC x K floats) stays in L2 next to the block.
//
// Result: y = x W^T + b, equal to F.linear up to float rounding (the sum over k runs in order,
// in 8-wide lanes; tests/unit/models/test_cpu_gemm.py holds it to F.linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVSERVE_AVX2 1
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

// K is taken kKC at a time: a block's K slice (kKC x 16 floats, 16 KB) stays in L1 while every
// row strip of the panel multiplies it.
constexpr int64_t kKC = 256;
// Rows per x panel: all weights are streamed from memory once per panel, so panels are large
// (MC x K floats up to 2 MB, in L3); the hot part of a panel is the strip a microkernel reads.
int64_t rows_per_panel(int64_t K) { return std::max<int64_t>(kMR, (2048 * 1024 / 4 / std::max<int64_t>(K, 1)) / kMR * kMR); }

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
  const int64_t mc = rows_per_panel(K);
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
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("blocked_linear", &blocked_linear, "y = x W^T + b with W packed in [NB, K, 16] column blocks");
}
