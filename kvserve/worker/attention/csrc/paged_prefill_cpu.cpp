// Paged prefill / multi-query attention for CPU, reading K/V straight from the block pool.
//
// One call handles every prefill chunk of a step (fresh prompts, chunks after a cached
// prefix, speculative-verification queries): chunk c's queries sit at positions
// start_pos .. start_pos + q_len - 1 and attend causally to every cached position up to
// their own.  No gathered context, no materialised mask.
//
// Layout: "query lanes".  A work item is (chunk, KV head, tile of P query positions); its
// R = G * P query rows (the G query heads of the KV head times the P positions) are spread
// over NV = ceil(R / 16) vectors of 16 lanes, stored transposed (Qt[v][d][lane], already
// scaled).  Then for each tile of up to 16 keys of one block:
//   S[j][v]  = sum_d K[j][d] * Qt[v][d]        K[j][d] broadcast, one FMA per 16 query rows
//   causal mask, online softmax                 all vertical: max/exp/sum per lane, no shuffles
//   Ot[v][d] = Ot[v][d] * corr + sum_j P[j][v] * V[j][d]
// so each K/V row, read from the pool in its natural layout, serves all G heads of its
// group (GQA without repeating K/V) and every FMA does 16 useful multiply-adds.  Query
// rows are transposed in and out once per work item, which is cheap next to the key loop.
//
// Work items are ordered by cost (later causal tiles see more keys) and taken from an
// atomic counter, so the threads of at::parallel_for stay balanced.
//
// Vec16 below is the 16-lane vector: one zmm (AVX-512), two ymm (AVX2) or a plain array
// (portable, for the compiler to vectorize).  Same algorithm on every path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int W = 16;        // lanes per vector
constexpr int kMaxVecs = 4;  // query rows per work item <= kMaxVecs * W
constexpr float kExpMin = -87.f;  // exp below this is returned as exactly 0

// exp(x) for x <= 0 (scores minus their running max): x = n ln2 + r, |r| <= ln2/2, exp(r)
// by Cephes expf's degree-6 polynomial (~1 ulp), times 2^n.  x < -87 (and -inf) gives 0.
inline float exp_neg_scalar(float x) {
  if (!(x >= kExpMin)) return 0.f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return std::ldexp(p, static_cast<int>(n));
}

#if defined(__AVX512F__)
#define KVSERVE_PATH "avx512"
struct Vec16 {
  __m512 v;
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16 set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec16 operator*(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec16 operator+(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec16 operator-(Vec16 a, Vec16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec16 max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
  // a where key_pos <= pos (lane-wise), else -inf
  friend Vec16 causal(Vec16 a, Vec16 key_pos, Vec16 pos) {
    const __mmask16 keep = _mm512_cmp_ps_mask(key_pos.v, pos.v, _CMP_LE_OQ);
    return {_mm512_mask_blend_ps(keep, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), a.v)};
  }
  friend Vec16 exp_neg(Vec16 a) {
    const __mmask16 ok = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
    const __m512 x = _mm512_max_ps(a.v, _mm512_set1_ps(kExpMin));
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
    return {_mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n))};
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define KVSERVE_PATH "avx2"
inline __m256 exp_neg8(__m256 a) {
  const __m256 ok = _mm256_cmp_ps(a, _mm256_set1_ps(kExpMin), _CMP_GE_OQ);
  const __m256 x = _mm256_max_ps(a, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n in the exponent bits (n >= -126 since x >= -87)
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(ok, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}
struct Vec16 {
  __m256 lo, hi;
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Vec16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo); _mm256_storeu_ps(p + 8, hi); }
  friend Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  friend Vec16 operator*(Vec16 a, Vec16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  friend Vec16 operator+(Vec16 a, Vec16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  friend Vec16 operator-(Vec16 a, Vec16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  friend Vec16 max(Vec16 a, Vec16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  friend Vec16 causal(Vec16 a, Vec16 key_pos, Vec16 pos) {
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    return {_mm256_blendv_ps(ninf, a.lo, _mm256_cmp_ps(key_pos.lo, pos.lo, _CMP_LE_OQ)),
            _mm256_blendv_ps(ninf, a.hi, _mm256_cmp_ps(key_pos.hi, pos.hi, _CMP_LE_OQ))};
  }
  friend Vec16 exp_neg(Vec16 a) { return {exp_neg8(a.lo), exp_neg8(a.hi)}; }
};
#else
#define KVSERVE_PATH "portable"
struct Vec16 {
  float x[W];
  static Vec16 load(const float* p) { Vec16 r; for (int i = 0; i < W; ++i) r.x[i] = p[i]; return r; }
  static Vec16 set1(float a) { Vec16 r; for (int i = 0; i < W; ++i) r.x[i] = a; return r; }
  static Vec16 zero() { return set1(0.f); }
  void store(float* p) const { for (int i = 0; i < W; ++i) p[i] = x[i]; }
#define KVSERVE_LANEWISE(expr) Vec16 r; for (int i = 0; i < W; ++i) r.x[i] = (expr); return r;
  friend Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { KVSERVE_LANEWISE(a.x[i] * b.x[i] + c.x[i]) }
  friend Vec16 operator*(Vec16 a, Vec16 b) { KVSERVE_LANEWISE(a.x[i] * b.x[i]) }
  friend Vec16 operator+(Vec16 a, Vec16 b) { KVSERVE_LANEWISE(a.x[i] + b.x[i]) }
  friend Vec16 operator-(Vec16 a, Vec16 b) { KVSERVE_LANEWISE(a.x[i] - b.x[i]) }
  friend Vec16 max(Vec16 a, Vec16 b) { KVSERVE_LANEWISE(a.x[i] > b.x[i] ? a.x[i] : b.x[i]) }
  friend Vec16 causal(Vec16 a, Vec16 k, Vec16 p) {
    KVSERVE_LANEWISE(k.x[i] <= p.x[i] ? a.x[i] : -std::numeric_limits<float>::infinity())
  }
  friend Vec16 exp_neg(Vec16 a) { KVSERVE_LANEWISE(exp_neg_scalar(a.x[i])) }
#undef KVSERVE_LANEWISE
};
#endif

// One chunk of the step, as the caller describes it.
struct Chunk {
  int64_t q_start, q_len, start_pos, table_off;  // table_off: its first block id in `block_ids`
};

struct WorkItem {
  int64_t chunk, h0, h1;  // KV heads h0 .. h1 - 1
  int64_t p0, np;         // query positions p0 .. p0 + np - 1 of the chunk (chunk-relative)
  int64_t cost;           // ~ query rows x keys
};

struct Problem {
  const float* q; int64_t q_row;    // q[t][hq][d] at q + t * q_row + hq * D + d
  float* out; int64_t out_row;
  const float* k; const float* v;   // pools [NB, BS, KVH, D], contiguous
  const int64_t* block_ids;
  int64_t BS, KVH, G, D;
  float scale;
};

// Per thread scratch, 64-byte aligned: per KV head of an item its transposed queries,
// output accumulators and running max / sum; the scores of one key tile.
struct Scratch {
  std::vector<float> mem;
  float *qt, *ot, *ml, *s;
  int64_t head_floats;  // qt and ot floats per KV head
  Scratch(int64_t D, int64_t heads) : mem(heads * (2 * kMaxVecs * D * W + 2 * kMaxVecs * W) + kMaxVecs * W * W + W) {
    float* base = mem.data();
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64 / sizeof(float);
    head_floats = kMaxVecs * D * W;
    qt = base;
    ot = qt + heads * head_floats;
    ml = ot + heads * head_floats;  // [heads][2][kMaxVecs * W]: m then l
    s = ml + heads * 2 * kMaxVecs * W;
  }
};

// S[j][v] = K[j] . Qt[v] for keys j0 .. j0 + KJ - 1 (KJ keys at once: KJ * NV independent FMA chains).
template <int NV, int KJ>
inline void scores(const float* kb, int64_t row, int64_t D, const float* qt, float* s, int64_t j0) {
  Vec16 acc[KJ][NV];
  for (int j = 0; j < KJ; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = Vec16::zero();
  const float* kr = kb + j0 * row;
  for (int64_t d = 0; d < D; ++d) {
    Vec16 qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = Vec16::load(qt + (v * D + d) * W);
    for (int j = 0; j < KJ; ++j) {
      const Vec16 kj = Vec16::set1(kr[j * row + d]);
      for (int v = 0; v < NV; ++v) acc[j][v] = fma(kj, qv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < KJ; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v].store(s + ((j0 + j) * kMaxVecs + v) * W);
}

// Ot[v][d] = Ot[v][d] * corr[v] + sum_{j < n} P[j][v] * V[j][d], d in blocks of DB accumulators.
template <int DB>
inline void accumulate_block(const float* vb, int64_t row, int64_t n, const float* pv, float* ot, Vec16 corr, int64_t d0) {
  Vec16 acc[DB];
  for (int i = 0; i < DB; ++i) acc[i] = Vec16::load(ot + (d0 + i) * W) * corr;
  for (int64_t j = 0; j < n; ++j) {
    const Vec16 p = Vec16::load(pv + j * kMaxVecs * W);
    const float* vr = vb + j * row + d0;
    for (int i = 0; i < DB; ++i) acc[i] = fma(p, Vec16::set1(vr[i]), acc[i]);
  }
  for (int i = 0; i < DB; ++i) acc[i].store(ot + (d0 + i) * W);
}

// The key tile starting at `kbase` (up to W keys of one block), for prefetching.
struct TileRef {
  const float* k = nullptr;  // this head's row 0 of the tile in the K pool; V likewise
  const float* v = nullptr;
  int64_t n = 0;
};

inline TileRef tile_at(const Problem& pb, const int64_t* table, int64_t kbase, int64_t n_keys, int64_t h) {
  if (kbase >= n_keys) return {};
  const int64_t off = kbase % pb.BS, row = pb.KVH * pb.D;
  const int64_t first = (table[kbase / pb.BS] * pb.BS + off) * row + h * pb.D;
  return {pb.k + first, pb.v + first, std::min({static_cast<int64_t>(W), pb.BS - off, n_keys - kbase})};
}

// Prefetch (into L2) rows j0 .. j1 - 1 of a later tile's K and V, a few rows per group of keys
// computed: blocks sit anywhere in the pool, so the hardware prefetcher cannot follow a
// sequence from one block to the next, and a burst of a whole tile's lines at once fills
// the line-fill buffers and stalls the loads behind it.
inline void prefetch_rows(const TileRef& t, int64_t row, int64_t D, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < std::min(j1, t.n); ++j)
    for (int64_t d = 0; d < D; d += 16) {
      __builtin_prefetch(t.k + j * row + d, 0, 2);
      __builtin_prefetch(t.v + j * row + d, 0, 2);
    }
}

template <int NV>
void attend_item(const Problem& pb, const Chunk& c, const WorkItem& it, Scratch& sc) {
  const int64_t D = pb.D, G = pb.G, BS = pb.BS, row = pb.KVH * D;
  const int64_t R = G * it.np;  // lane r = p * G + g: position p0 + p, query head h * G + g
  const int64_t nh = it.h1 - it.h0;
  float* s = sc.s;
  // Transpose the tile's queries in (scaled), zero the accumulators.  Padding lanes get
  // zero queries and the tile's last position: finite, harmless, never written out.
  float posf[kMaxVecs * W];
  const int64_t last_pos = c.start_pos + it.p0 + it.np - 1;
  for (int64_t r = 0; r < NV * W; ++r) posf[r] = static_cast<float>(r < R ? c.start_pos + it.p0 + r / G : last_pos);
  Vec16 pos[NV];
  for (int v = 0; v < NV; ++v) pos[v] = Vec16::load(posf + v * W);
  for (int64_t hh = 0; hh < nh; ++hh) {
    const int64_t h = it.h0 + hh;
    float* qt = sc.qt + hh * sc.head_floats;
    float* ml = sc.ml + hh * 2 * kMaxVecs * W;
    std::fill(qt, qt + NV * D * W, 0.f);
    std::fill(sc.ot + hh * sc.head_floats, sc.ot + hh * sc.head_floats + NV * D * W, 0.f);
    std::fill(ml, ml + kMaxVecs * W, -std::numeric_limits<float>::infinity());
    std::fill(ml + kMaxVecs * W, ml + 2 * kMaxVecs * W, 0.f);
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = pb.q + (c.q_start + it.p0 + r / G) * pb.q_row + (h * G + r % G) * D;
      float* col = qt + (r / W) * D * W + r % W;
      for (int64_t d = 0; d < D; ++d) col[d * W] = qr[d] * pb.scale;
    }
  }
  const int64_t first_pos = c.start_pos + it.p0;  // no key below this position needs a mask
  const int64_t n_keys = last_pos + 1;
  const int64_t* table = pb.block_ids + c.table_off;
  for (int64_t kbase = 0; kbase < n_keys; kbase += std::min<int64_t>(W, BS - kbase % BS)) {
    // Keys kbase .. kbase + n - 1: at most W, all in one block.
    const int64_t off = kbase % BS;
    const int64_t n = std::min({static_cast<int64_t>(W), BS - off, n_keys - kbase});
    const int64_t blk = table[kbase / BS];
    const bool masked = kbase + n - 1 > first_pos;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t h = it.h0 + hh;
      const float* qt = sc.qt + hh * sc.head_floats;
      float* ot = sc.ot + hh * sc.head_floats;
      float* ml = sc.ml + hh * 2 * kMaxVecs * W;
      const float* kb = pb.k + (blk * BS + off) * row + h * D;
      const float* vb = pb.v + (blk * BS + off) * row + h * D;
      const TileRef ahead = tile_at(pb, table, kbase + n, n_keys, h);  // the next tile
      constexpr int KJ = NV == 1 ? 8 : NV == 2 ? 4 : 2;
      int64_t j = 0;
      for (; j + KJ <= n; j += KJ) {
        prefetch_rows(ahead, row, D, j, j + KJ);
        scores<NV, KJ>(kb, row, D, qt, s, j);
      }
      for (; j < n; ++j) scores<NV, 1>(kb, row, D, qt, s, j);
      prefetch_rows(ahead, row, D, n - n % KJ, W);
      for (int v = 0; v < NV; ++v) {
        float* sv = s + v * W;
        Vec16 mt = Vec16::set1(-std::numeric_limits<float>::infinity());
        for (int64_t jj = 0; jj < n; ++jj) {
          Vec16 x = Vec16::load(sv + jj * kMaxVecs * W);
          if (masked) {
            x = causal(x, Vec16::set1(static_cast<float>(kbase + jj)), pos[v]);
            x.store(sv + jj * kMaxVecs * W);
          }
          mt = max(mt, x);
        }
        // Key 0 is in the first tile and visible to every lane, so m is finite from then on
        // and corr = exp(-inf) = 0 only on the first tile, where ot and l are still zero.
        const Vec16 m_old = Vec16::load(ml + v * W);
        const Vec16 m_new = max(m_old, mt);
        const Vec16 corr = exp_neg(m_old - m_new);
        Vec16 sum = Vec16::zero();
        for (int64_t jj = 0; jj < n; ++jj) {
          const Vec16 p = exp_neg(Vec16::load(sv + jj * kMaxVecs * W) - m_new);  // masked -> 0
          p.store(sv + jj * kMaxVecs * W);
          sum = sum + p;
        }
        fma(Vec16::load(ml + kMaxVecs * W + v * W), corr, sum).store(ml + kMaxVecs * W + v * W);
        m_new.store(ml + v * W);
        float* otv = ot + v * D * W;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) accumulate_block<8>(vb, row, n, sv, otv, corr, d);
        for (; d < D; ++d) accumulate_block<1>(vb, row, n, sv, otv, corr, d);
      }
    }
  }
  // Normalise and transpose out.
  for (int64_t hh = 0; hh < nh; ++hh) {
    const int64_t h = it.h0 + hh;
    const float* ot = sc.ot + hh * sc.head_floats;
    const float* l = sc.ml + hh * 2 * kMaxVecs * W + kMaxVecs * W;
    for (int64_t r = 0; r < R; ++r) {
      float* orow = pb.out + (c.q_start + it.p0 + r / G) * pb.out_row + (h * G + r % G) * D;
      const float* col = ot + (r / W) * D * W + r % W;
      const float iv = 1.f / l[r];
      for (int64_t d = 0; d < D; ++d) orow[d] = col[d * W] * iv;
    }
  }
}

void attend(const Problem& pb, const Chunk& c, const WorkItem& it, Scratch& sc) {
  switch ((pb.G * it.np + W - 1) / W) {
    case 1: return attend_item<1>(pb, c, it, sc);
    case 2: return attend_item<2>(pb, c, it, sc);
    case 3: return attend_item<3>(pb, c, it, sc);
    default: return attend_item<4>(pb, c, it, sc);
  }
}

}  // namespace

// Writes attention for every chunk into `out` (rows q_start .. q_start + q_len - 1 of each).
// out, q: [T, H, D] (rows may be strided, each row's [H, D] contiguous); k_cache, v_cache:
// [num_blocks, block_size, KVH, D] contiguous float32, the chunks' new K/V already written;
// chunks: [N, 4] int64 (q_start, q_len, start_pos, offset of the chunk's block ids in
// block_ids); block_ids: int64, chunk c's table = block_ids[off_c : off_c + ceil(ctx_len / BS)].
void paged_prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             torch::Tensor chunks, torch::Tensor block_ids, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
              k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "paged_prefill_attention: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, H, D]");
  const int64_t H = q.size(1), D = q.size(2);
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == D && out.stride(2) == 1 && out.stride(1) == D,
              "each row of q and out must be a contiguous [H, D]");
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && v_cache.sizes() == k_cache.sizes() && H % KVH == 0, "shape mismatch");
  const int64_t G = H / KVH;
  TORCH_CHECK(G <= kMaxVecs * W, "more than 64 query heads per KV head");
  chunks = chunks.to(torch::kInt64).contiguous();
  block_ids = block_ids.to(torch::kInt64).contiguous();
  TORCH_CHECK(chunks.dim() == 2 && chunks.size(1) == 4, "chunks must be [N, 4]");
  const int64_t N = chunks.size(0), T = q.size(0), nids = block_ids.numel();
  const int64_t* cp = chunks.data_ptr<int64_t>();
  const int64_t* ids = block_ids.data_ptr<int64_t>();

  const Problem pb{q.data_ptr<float>(), q.stride(0), out.data_ptr<float>(), out.stride(0),
                   k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), ids, BS, KVH, G, D,
                   static_cast<float>(scale)};
  // Positions per tile: as many as fill kMaxVecs vectors with the G heads of a group.
  const int64_t P = std::max<int64_t>(1, kMaxVecs * W / G);
  std::vector<Chunk> cs(N);
  std::vector<WorkItem> items;
  // Short chunks (all of a chunk's query rows in one vector: speculative verification,
  // decode-like chunks) take all KV heads in one work item when there are enough chunks to
  // keep the threads busy: the item then reads whole K/V rows, the pool's contiguous runs,
  // which the hardware prefetcher streams (one item per head reads a third of each line run).
  const int64_t max_threads = at::get_num_threads();
  const bool group_heads = N >= 2 * max_threads;
  for (int64_t i = 0; i < N; ++i) {
    const Chunk c{cp[4 * i], cp[4 * i + 1], cp[4 * i + 2], cp[4 * i + 3]};
    TORCH_CHECK(c.q_len >= 1 && c.start_pos >= 0 && c.q_start >= 0 && c.q_start + c.q_len <= T,
                "chunk ", i, " out of range");
    const int64_t nblk = (c.start_pos + c.q_len + BS - 1) / BS;
    TORCH_CHECK(c.table_off >= 0 && c.table_off + nblk <= nids, "chunk ", i, ": block table out of range");
    for (int64_t j = 0; j < nblk; ++j)
      TORCH_CHECK(ids[c.table_off + j] >= 0 && ids[c.table_off + j] < NB, "block id out of range");
    cs[i] = c;
    for (int64_t p0 = 0; p0 < c.q_len; p0 += P) {
      const int64_t np = std::min(P, c.q_len - p0);
      const int64_t cost = np * (c.start_pos + p0 + np);
      if (group_heads && G * c.q_len <= W) {
        items.push_back({i, 0, KVH, p0, np, cost * KVH});
      } else {
        for (int64_t h = 0; h < KVH; ++h) items.push_back({i, h, h + 1, p0, np, cost});
      }
    }
  }
  // Longest first, handed out one at a time: the threads finish together.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t threads = std::min<int64_t>(max_threads, n_items);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(D, group_heads ? KVH : 1);
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i; (i = next.fetch_add(1)) < n_items;) attend(pb, cs[items[i].chunk], items[i], sc);
  });
}

std::string simd_path() { return KVSERVE_PATH; }

// Left out where another source includes this one for its kernels (cpu_decoder_stack.cpp).
#ifndef KVSERVE_KERNELS_ONLY
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "paged causal multi-query attention for a step's prefill chunks (CPU, float32), into out");
  m.def("simd_path", &simd_path, "which vector path this build uses: avx512, avx2 or portable");
}
#endif
