// A Llama-family decoder stack (every layer and the final norm) run in one C++ call per step, on
// CPU float32, from the same kernels the Python layers call one by one.
//
// Why: a decode step at a few rows is bound by reading the weights, and each Python-level op of a
// layer (norm, projection, rotary, KV write, attention, residual) costs microseconds of dispatch
// and allocation around a few microseconds of work: ~25 ops x 30 layers a step.  Here a layer is
// those same kernels called from C++, and the KV write is a row copy instead of two index_copy_.
//
// Results are bitwise those of the Python layers with the fused ops (kvserve/models/llama.py,
// layers.py with fused_ops enabled, the CPU attention backend): the same kernels in the same
// order, the residual adds fused into the next norm exactly as add_rms_norm already does (x + r
// is commutative in IEEE arithmetic).  The exception is a model with q/k norms, whose per-head
// RMSNorm and rotary run here in C++ where the Python path uses torch ops: equal up to rounding.
// tests/unit/worker/test_cpu_decoder_stack.py holds both.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#define KVSERVE_KERNELS_ONLY  // the included sources leave out their Python modules
#include "../../models/csrc/cpu_model_ops.cpp"
#include "../attention/csrc/paged_decode_cpu.cpp"
#include "../attention/csrc/paged_prefill_cpu.cpp"

namespace {

// Weights of one layer, packed as kvserve.models.cpu_linear packs them (column blocks), and the
// plain [N, K] projections where the model keeps them for MKL at prefill sizes (else empty).
struct LayerWeights {
  torch::Tensor input_norm, qkv, qkv_bias, q_norm, k_norm, o, post_norm, gate_up, down;
  torch::Tensor qkv_plain, o_plain, gate_up_plain, down_plain;
};

bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

c10::optional<torch::Tensor> optional_of(const torch::Tensor& t) {
  return present(t) ? c10::optional<torch::Tensor>(t) : c10::nullopt;
}

}  // namespace

class DecoderStack {
 public:
  // `layers`: per layer, 13 tensors in LayerWeights' order (an empty tensor where a model has none:
  // qkv bias, q/k norms, the plain projections); the projections as [N / 16, K, 16] column blocks.
  // `plain_from_rows`: steps of at least this many tokens run the projections through at::linear on
  // the plain weights, as the Python layers do (kvserve.models.cpu_linear_rows); -1: never.
  DecoderStack(std::vector<std::vector<torch::Tensor>> layers, torch::Tensor final_norm, int64_t num_heads,
               int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size, double eps, double scale,
               int64_t plain_from_rows)
      : final_norm_(std::move(final_norm)), H_(num_heads), KVH_(num_kv_heads), D_(head_dim),
        I_(intermediate_size), eps_(eps), scale_(scale), plain_from_rows_(plain_from_rows) {
    TORCH_CHECK(H_ > 0 && KVH_ > 0 && H_ % KVH_ == 0 && D_ % 2 == 0, "DecoderStack: bad head shape");
    for (auto& l : layers) {
      TORCH_CHECK(l.size() == 13, "DecoderStack: 13 tensors per layer");
      LayerWeights w{l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11], l[12]};
      for (const torch::Tensor* p : {&w.qkv, &w.o, &w.gate_up, &w.down})
        TORCH_CHECK(p->dim() == 3 && p->size(2) == kNR && p->is_contiguous() && p->scalar_type() == torch::kFloat32,
                    "DecoderStack: projections must be packed column blocks");
      if (plain_from_rows_ >= 0) {
        const std::pair<const torch::Tensor*, const torch::Tensor*> pairs[] = {
            {&w.qkv_plain, &w.qkv}, {&w.o_plain, &w.o}, {&w.gate_up_plain, &w.gate_up}, {&w.down_plain, &w.down}};
        for (const auto& [plain, packed] : pairs)
          TORCH_CHECK(plain->dim() == 2 && plain->scalar_type() == torch::kFloat32 &&
                          plain->size(1) == packed->size(1) && plain->size(0) <= packed->size(0) * kNR,
                      "DecoderStack: plain_from_rows needs every plain [N, K] projection");
      }
      TORCH_CHECK(present(w.q_norm) == present(w.k_norm), "DecoderStack: q and k norms go together");
      layers_.push_back(std::move(w));
    }
    TORCH_CHECK(!layers_.empty(), "DecoderStack: no layers");
    qk_norm_ = present(layers_[0].q_norm);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // h: [T, hidden] embeddings; cos, sin: [T, head_dim]; kv_caches: per layer [2, NB, BS, KVH, D];
  // slot_mapping: [T] int64; the first `num_decodes` tokens are single-token queries over
  // decode_tables [num_decodes, MB] / decode_seq_lens [num_decodes]; the rest are prefill chunks
  // (chunks [N, 4] / block_ids as the prefill kernel takes them; N may be 0).  Returns the final
  // norm of the last hidden state, [T, hidden].
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<torch::Tensor>& kv_caches, torch::Tensor slot_mapping, int64_t num_decodes,
                        const torch::Tensor& decode_tables, const torch::Tensor& decode_seq_lens,
                        const torch::Tensor& chunks, const torch::Tensor& block_ids) {
    check_rows(h, "h");
    const int64_t T = h.size(0);
    TORCH_CHECK(static_cast<int64_t>(kv_caches.size()) == num_layers(), "one KV cache per layer");
    TORCH_CHECK(num_decodes >= 0 && num_decodes <= T, "num_decodes out of range");
    const bool has_prefill = chunks.defined() && chunks.numel() > 0;
    TORCH_CHECK(has_prefill || num_decodes == T, "tokens after the decodes but no prefill chunks");
    slot_mapping = slot_mapping.to(torch::kInt64).contiguous();
    TORCH_CHECK(slot_mapping.numel() == T, "slot_mapping: one slot per token");
    const int64_t q_size = H_ * D_, kv_size = KVH_ * D_, width = q_size + 2 * kv_size;
    const auto& cache0 = kv_caches[0];
    TORCH_CHECK(cache0.dim() == 5 && cache0.size(0) == 2 && cache0.size(3) == KVH_ && cache0.size(4) == D_ &&
                    cache0.is_contiguous() && cache0.scalar_type() == torch::kFloat32,
                "kv cache: contiguous float32 [2, NB, BS, KVH, D]");
    const int64_t num_slots = cache0.size(1) * cache0.size(2);
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range");

    torch::Tensor x = rms_norm(h, layers_[0].input_norm, eps_);
    auto attn = torch::empty({T, q_size}, h.options());
    for (int64_t li = 0; li < num_layers(); ++li) {
      const LayerWeights& w = layers_[li];
      const auto& cache = kv_caches[li];
      TORCH_CHECK(cache.sizes() == cache0.sizes() && cache.is_contiguous(), "kv caches differ in shape");
      auto qkv = project(x, w.qkv, w.qkv_plain, optional_of(w.qkv_bias), width);
      if (qk_norm_) norm_heads(qkv, w.q_norm, w.k_norm);
      rope_inplace(qkv, cos, sin, H_ + KVH_, D_);
      write_kv(qkv, cache, slots, q_size, kv_size);
      attend(qkv, cache, attn, num_decodes, decode_tables, decode_seq_lens, has_prefill, chunks, block_ids);
      auto o = project(attn, w.o, w.o_plain, c10::nullopt, h.size(1));
      auto hx = add_rms_norm(o, h, w.post_norm, eps_);  // h + attention, and its norm
      h = hx[0];
      auto act = silu_and_mul(project(hx[1], w.gate_up, w.gate_up_plain, c10::nullopt, 2 * I_));
      auto mlp = project(act, w.down, w.down_plain, c10::nullopt, h.size(1));
      // h + MLP, with the next layer's input norm (or the final norm) in the same pass.
      const torch::Tensor& next_norm = li + 1 < num_layers() ? layers_[li + 1].input_norm : final_norm_;
      auto hn = add_rms_norm(mlp, h, next_norm, eps_);
      h = hn[0];
      x = hn[1];
    }
    return x;
  }

 private:
  // x W^T (+ b): the blocked kernel, or at::linear on the plain weight from plain_from_rows_ rows on
  // (the same call, on the same input, as the Python layers' F.linear: bitwise equal).
  torch::Tensor project(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& plain,
                        const c10::optional<torch::Tensor>& bias, int64_t out_features) const {
    if (plain_from_rows_ >= 0 && x.size(0) >= plain_from_rows_) return at::linear(x, plain, bias);
    return blocked_linear(x, packed, bias, out_features);
  }

  // Per-head RMSNorm of the q and k heads of qkv, in place (Qwen3's q_norm / k_norm).
  void norm_heads(torch::Tensor& qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm) const {
    const int64_t T = qkv.size(0), W = qkv.size(1);
    float* p = qkv.data_ptr<float>();
    const float *qw = q_norm.data_ptr<float>(), *kw = k_norm.data_ptr<float>();
    const float eps = static_cast<float>(eps_);
    at::parallel_for(0, T, row_grain(W), [&](int64_t t0, int64_t t1) {
      std::vector<float> tmp(D_);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t hd = 0; hd < H_ + KVH_; ++hd) {
          float* row = p + t * W + hd * D_;
          rms_norm_row(row, hd < H_ ? qw : kw, eps, D_, tmp.data());
          std::memcpy(row, tmp.data(), D_ * sizeof(float));
        }
    });
  }

  // The step's new K and V rows into their cache slots.
  void write_kv(const torch::Tensor& qkv, const torch::Tensor& cache, const int64_t* slots, int64_t q_size,
                int64_t kv_size) const {
    const int64_t T = qkv.size(0), W = qkv.size(1);
    const float* src = qkv.data_ptr<float>();
    float* kc = cache.data_ptr<float>();
    float* vc = kc + cache.size(1) * cache.size(2) * kv_size;  // cache[1]
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(kc + slots[t] * kv_size, src + t * W + q_size, kv_size * sizeof(float));
      std::memcpy(vc + slots[t] * kv_size, src + t * W + q_size + kv_size, kv_size * sizeof(float));
    }
  }

  // Attention of every query row into attn [T, H * D]: decodes through the decode kernel, prefill
  // chunks through the prefill kernel (as kvserve.worker.attention.cpu_paged does).
  void attend(const torch::Tensor& qkv, const torch::Tensor& cache, torch::Tensor& attn, int64_t num_decodes,
              const torch::Tensor& decode_tables, const torch::Tensor& decode_seq_lens, bool has_prefill,
              const torch::Tensor& chunks, const torch::Tensor& block_ids) const {
    const int64_t T = qkv.size(0);
    auto q = qkv.narrow(1, 0, H_ * D_).view({T, H_, D_});  // rows strided, each [H, D] contiguous
    auto k_cache = cache.select(0, 0), v_cache = cache.select(0, 1);
    if (num_decodes > 0) {
      auto out = paged_decode_attention(q.narrow(0, 0, num_decodes), k_cache, v_cache, decode_tables,
                                        decode_seq_lens, scale_);
      attn.narrow(0, 0, num_decodes).copy_(out.view({num_decodes, H_ * D_}));
    }
    if (has_prefill) paged_prefill_attention(attn.view({T, H_, D_}), q, k_cache, v_cache, chunks, block_ids, scale_);
  }

  std::vector<LayerWeights> layers_;
  torch::Tensor final_norm_;
  int64_t H_, KVH_, D_, I_;
  double eps_, scale_;
  int64_t plain_from_rows_;
  bool qk_norm_ = false;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<std::vector<std::vector<torch::Tensor>>, torch::Tensor, int64_t, int64_t, int64_t, int64_t, double,
                    double, int64_t>(),
           py::arg("layers"), py::arg("final_norm"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("intermediate_size"), py::arg("eps"), py::arg("scale"),
           py::arg("plain_from_rows") = -1)
      .def("num_layers", &DecoderStack::num_layers)
      .def("forward", &DecoderStack::forward, "every decoder layer and the final norm of one step",
           py::arg("h"), py::arg("cos"), py::arg("sin"), py::arg("kv_caches"), py::arg("slot_mapping"),
           py::arg("num_decodes"), py::arg("decode_tables"), py::arg("decode_seq_lens"), py::arg("chunks"),
           py::arg("block_ids"));
}
