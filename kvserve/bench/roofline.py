"""Analytical lower bounds for serving a transformer (after Fu 2024, "Challenges in Deploying
Long-Context Transformers: A Theoretical Peak Performance Analysis").

Inputs: a Hugging Face `config.json` (dense, GQA, MoE and DeepSeek MLA) and a hardware spec
(peak FLOP/s, memory bandwidth, memory size).  Every time is `max(compute, memory)`: perfect
overlap, perfect kernels, so a real system is slower; measured/bound tells how close it gets.

Counting conventions (stated once, used everywhere):
* Parameters are weight matrices (attention, MLP/experts, router, embeddings, LM head); norms and
  biases are ignored (<0.1% of any model here).
* FLOPs: 2 per multiply-add.  A token costs 2 * (active matmul params) -- the input embedding is a
  lookup, not a matmul, and is excluded; the LM head is included -- plus attention: per layer,
  2 * heads * (d_qk + d_v) per (query, key) pair.  Causal attention over n new tokens after c
  cached ones has n*c + n(n+1)/2 pairs.
* MLA (DeepSeek-V2): the cache holds the compressed latent (kv_lora_rank + qk_rope_head_dim per
  layer); attention FLOPs use the unabsorbed head dims (qk_nope + qk_rope, v_head_dim).
* MoE: active params use num_experts_per_tok routed experts (+ shared experts).  Weight *bytes
  read* in a step with T tokens assume balanced routing: each layer touches the expected number
  of distinct experts, E * (1 - (1 - k/E)^T).
* Bytes read per forward pass: the matmul weights touched (not the embedding table, unless tied to
  the LM head) plus the KV cache read by attention plus the KV written for new tokens.
* Sliding windows are ignored (full attention).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from kvserve.bench.errors import BenchInputError
from kvserve.bench.paths import shared_data_dir

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "float32": 4, "tf32": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "int8": 1, "float8": 1,
    "int4": 0.5, "fp4": 0.5,
}


def dtype_bytes(name: str) -> float:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise BenchInputError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


# ----------------------------------------------------------------------------- hardware


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    name: str
    peak_flops: float  # FLOP/s for the dtype in use
    mem_bandwidth: float  # bytes/s
    mem_bytes: float  # device memory capacity


# Dense (no sparsity) bf16 tensor-core peaks and HBM bandwidths from NVIDIA's data sheets.
HW_PRESETS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec("H100 SXM", 989e12, 3.35e12, 80e9),
    "h200": HardwareSpec("H200 SXM", 989e12, 4.8e12, 141e9),
    "a100": HardwareSpec("A100 SXM 80GB", 312e12, 2.039e12, 80e9),
}

# Per-direction bandwidths in bytes/s.
LINK_PRESETS: dict[str, float] = {
    "pcie4": 32e9,  # PCIe 4.0 x16
    "pcie5": 64e9,  # PCIe 5.0 x16
    "nvlink": 450e9,  # NVLink 4 (H100), 900 GB/s bidirectional
    "100gbe": 12.5e9,  # 100 Gb Ethernet
}


def hardware_from_probe(path: str | Path) -> HardwareSpec:
    """A spec from a `kvserve hw-probe --output` JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return HardwareSpec(
            str(data.get("name", f"probe:{p.name}")),
            float(data["matmul_flops"]),
            float(data["mem_bandwidth"]),
            float(data["mem_bytes"]),
        )
    except FileNotFoundError:
        raise BenchInputError(f"{p}: hardware file not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchInputError(
            f"{p}: not a hw-probe result (need matmul_flops, mem_bandwidth, mem_bytes): {exc}"
        ) from None


def resolve_hardware(name_or_path: str) -> HardwareSpec:
    """`h100`/`h200`/`a100`, `cpu-local` (the cached hw-probe result, probing now if there is
    none), or a path to a hw-probe JSON file."""
    key = name_or_path.lower()
    if key in HW_PRESETS:
        return HW_PRESETS[key]
    if key == "cpu-local":
        from kvserve.bench.hw_probe import cached_or_probe

        return hardware_from_probe(cached_or_probe())
    if Path(name_or_path).exists():
        return hardware_from_probe(name_or_path)
    raise BenchInputError(
        f"unknown hardware {name_or_path!r}: use {', '.join(HW_PRESETS)}, cpu-local, or a hw-probe JSON file"
    )


def resolve_link(name_or_gbs: str) -> float:
    """A link preset name, or a number in GB/s; returns bytes/s."""
    key = name_or_gbs.lower()
    if key in LINK_PRESETS:
        return LINK_PRESETS[key]
    try:
        value = float(name_or_gbs) * 1e9
    except ValueError:
        raise BenchInputError(
            f"unknown link {name_or_gbs!r}: use {', '.join(LINK_PRESETS)} or a number in GB/s"
        ) from None
    if not value > 0:
        raise BenchInputError(f"link bandwidth must be > 0, got {name_or_gbs!r}")
    return value


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the roofline needs from a config.  Parameter counts are per model (all layers)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    attn_params_per_layer: int
    d_qk: int  # query/key dim per head used for attention FLOPs
    d_v: int  # value dim per head
    kv_elems_per_token_per_layer: int  # cache elements per token per layer
    dense_mlp_params: int  # summed over the dense-MLP layers
    moe_layers: int
    num_experts: int  # routed experts per MoE layer (0 if dense)
    experts_per_token: int
    expert_params: int  # one routed expert
    shared_params_per_moe_layer: int  # shared experts + router + shared gates
    is_mla: bool = False

    # -- parameter counts
    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def _body(self, experts_per_layer: float) -> float:
        return (
            self.num_layers * self.attn_params_per_layer
            + self.dense_mlp_params
            + self.moe_layers * (self.shared_params_per_moe_layer + experts_per_layer * self.expert_params)
        )

    @property
    def total_params(self) -> int:
        """Every weight stored (memory capacity)."""
        head = 0 if self.tie_embeddings else self.lm_head_params
        return int(self._body(self.num_experts)) + self.embedding_params + head

    @property
    def active_params(self) -> int:
        """Weights one token multiplies with (FLOPs): body with k experts plus the LM head."""
        return self.body_active_params + self.lm_head_params

    @property
    def body_active_params(self) -> int:
        """Weights one token multiplies with before the LM head (body with k experts)."""
        return int(self._body(self.experts_per_token))

    def weight_params_read(self, tokens_in_step: int) -> float:
        """Weights streamed from memory by one forward pass over `tokens_in_step` tokens."""
        if self.num_experts:
            k, e = self.experts_per_token, self.num_experts
            touched = e * (1.0 - (1.0 - k / e) ** max(tokens_in_step, 1))
        else:
            touched = 0.0
        # The LM head matrix is read in full; the embedding table only row by row (negligible).
        return self._body(touched) + self.lm_head_params

    def kv_bytes_per_token(self, kv_dtype_bytes: float) -> float:
        return self.num_layers * self.kv_elems_per_token_per_layer * kv_dtype_bytes

    def attn_flops_per_pair(self) -> float:
        """FLOPs for one (query, key) pair summed over layers: QK^T and PV."""
        return self.num_layers * 2.0 * self.num_heads * (self.d_qk + self.d_v)


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def model_spec_from_config(cfg: dict[str, Any], name: str = "model") -> ModelSpec:
    """Build a `ModelSpec` from a Hugging Face config dict."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchInputError(f"{name}: config lacks a required field ({exc})") from None
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=h // heads))
    inter = int(_get(cfg, "intermediate_size", default=4 * h))
    tie = bool(cfg.get("tie_word_embeddings", False))

    # Attention.
    if cfg.get("kv_lora_rank"):  # DeepSeek MLA
        r = int(cfg["kv_lora_rank"])
        d_rope = int(cfg["qk_rope_head_dim"])
        d_nope = int(cfg["qk_nope_head_dim"])
        d_v = int(_get(cfg, "v_head_dim", default=d_nope))
        q_rank = cfg.get("q_lora_rank")
        q_params = h * heads * (d_nope + d_rope) if not q_rank else h * q_rank + q_rank * heads * (d_nope + d_rope)
        attn = q_params + h * (r + d_rope) + r * heads * (d_nope + d_v) + heads * d_v * h
        d_qk, kv_elems, mla = d_nope + d_rope, r + d_rope, True
    else:
        attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
        d_qk, d_v, kv_elems, mla = head_dim, head_dim, 2 * kv_heads * head_dim, False

    # MLP / MoE.  Gated (SwiGLU) MLPs: 3 matrices of hidden x intermediate.
    n_experts = int(_get(cfg, "num_local_experts", "n_routed_experts", "num_experts", default=0))
    if n_experts:
        k = int(_get(cfg, "num_experts_per_tok", default=2))
        moe_inter = int(_get(cfg, "moe_intermediate_size", default=inter))
        moe_mask = _moe_layer_mask(cfg, layers)
        moe_layers = sum(moe_mask)
        shared = h * n_experts  # router
        if cfg.get("n_shared_experts"):  # DeepSeek
            shared += int(cfg["n_shared_experts"]) * 3 * h * moe_inter
        if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE: one shared expert + its gate
            shared += 3 * h * int(cfg["shared_expert_intermediate_size"]) + h
        dense = (layers - moe_layers) * 3 * h * inter
        expert = 3 * h * moe_inter
    else:
        k = moe_layers = expert = shared = 0
        dense = layers * 3 * h * inter
    return ModelSpec(
        name=name, num_layers=layers, hidden_size=h, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=vocab, tie_embeddings=tie, attn_params_per_layer=attn,
        d_qk=d_qk, d_v=d_v, kv_elems_per_token_per_layer=kv_elems, dense_mlp_params=dense,
        moe_layers=moe_layers, num_experts=n_experts, experts_per_token=k, expert_params=expert,
        shared_params_per_moe_layer=shared, is_mla=mla,
    )


def _moe_layer_mask(cfg: dict[str, Any], layers: int) -> list[bool]:
    """Which layers are MoE (DeepSeek first_k_dense_replace/moe_layer_freq; Qwen
    decoder_sparse_step/mlp_only_layers; Mixtral all)."""
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(_get(cfg, "moe_layer_freq", "decoder_sparse_step", default=1) or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return [i >= first_dense and (i + 1) % freq == 0 and i not in mlp_only for i in range(layers)]


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """A config.json path, a model directory holding one, or a name in shared/data/configs."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        candidate = shared_data_dir() / "configs" / f"{name_or_path}.json"
        if candidate.exists():
            p = candidate
        else:
            known = sorted(x.stem for x in (shared_data_dir() / "configs").glob("*.json"))
            raise BenchInputError(f"{name_or_path}: no such config file; known names: {', '.join(known)}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BenchInputError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise BenchInputError(f"{p}: expected a JSON object")
    return model_spec_from_config(cfg, name=p.stem if p.name != "config.json" else p.parent.name)


# ----------------------------------------------------------------------------- bounds


@dataclass(frozen=True, slots=True)
class Bound:
    """A lower bound: time = max(compute_s, memory_s)."""

    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def _bound(flops: float, nbytes: float, hw: HardwareSpec) -> Bound:
    return Bound(flops, nbytes, flops / hw.peak_flops, nbytes / hw.mem_bandwidth)


def attention_pairs(cached: int, new: int) -> float:
    """(query, key) pairs when `new` tokens attend causally after `cached` tokens."""
    return new * cached + new * (new + 1) / 2.0


def prefill_bound(
    m: ModelSpec, hw: HardwareSpec, prompt_len: int, w_bytes: float = 2, kv_bytes: float | None = None,
    cached_len: int = 0,
) -> Bound:
    """One request's prefill of `prompt_len` new tokens (after `cached_len` cached ones)."""
    kvb = w_bytes if kv_bytes is None else kv_bytes
    # Only the last prompt position's logits are needed (to sample the first output token).
    flops = (2.0 * m.body_active_params * prompt_len + 2.0 * m.lm_head_params
             + m.attn_flops_per_pair() * attention_pairs(cached_len, prompt_len))
    nbytes = (
        m.weight_params_read(prompt_len) * w_bytes
        + m.kv_bytes_per_token(kvb) * (cached_len + prompt_len)  # read cached, write new
    )
    return _bound(flops, nbytes, hw)


def decode_step_bound(
    m: ModelSpec, hw: HardwareSpec, batch: int, context: int, w_bytes: float = 2, kv_bytes: float | None = None
) -> Bound:
    """One decode step: `batch` requests, each with `context` tokens already cached."""
    kvb = w_bytes if kv_bytes is None else kv_bytes
    flops = batch * (2.0 * m.active_params + m.attn_flops_per_pair() * (context + 1))
    nbytes = m.weight_params_read(batch) * w_bytes + batch * (context + 1) * m.kv_bytes_per_token(kvb)
    return _bound(flops, nbytes, hw)


def max_concurrent_requests(
    m: ModelSpec, hw: HardwareSpec, context: int, w_bytes: float = 2, kv_bytes: float | None = None
) -> int:
    """How many requests of `context` tokens fit in memory beside the weights (0 if none)."""
    kvb = w_bytes if kv_bytes is None else kv_bytes
    free = hw.mem_bytes - m.total_params * w_bytes
    per_request = context * m.kv_bytes_per_token(kvb)
    if free <= 0 or per_request <= 0:
        return 0
    return int(free // per_request)


def swap_time_s(m: ModelSpec, context: int, link_bandwidth: float, kv_bytes: float = 2) -> float:
    """Time to move one request's KV cache of `context` tokens over a link (one direction)."""
    return context * m.kv_bytes_per_token(kv_bytes) / link_bandwidth


def workload_bound(
    m: ModelSpec,
    hw: HardwareSpec,
    requests: Iterable[tuple[int, int]],
    w_bytes: float = 2,
    kv_bytes: float | None = None,
) -> Bound:
    """Lower bound on serving a whole workload of (prompt_len, output_len) pairs.

    Compute: every request processes prompt_len + output_len - 1 tokens (the last output token is
    sampled, never fed back), causally, and applies the LM head at its output_len sampled positions
    only (an engine never needs prompt positions' logits unless prompt logprobs are asked for).  Memory: each request's decode steps are sequential, so
    there are at least max(output_len) forward passes, each streaming the weights (all requests
    batched, so MoE touches experts for the whole batch); plus each decode step reads its request's
    KV, and every processed token's KV is written once.  Capacity limits and scheduling are
    ignored, so this is below anything achievable.  Prefix-cache hits are not modelled."""
    kvb = w_bytes if kv_bytes is None else kv_bytes
    kv_tok = m.kv_bytes_per_token(kvb)
    reqs = [(int(p), int(o)) for p, o in requests]
    if not reqs:
        return _bound(0.0, 0.0, hw)
    flops = 0.0
    kv_traffic = 0.0
    for p, o in reqs:
        t = p + max(o, 1) - 1
        # The LM head runs only where a token is sampled: o positions, not all t.
        flops += (2.0 * m.body_active_params * t + 2.0 * m.lm_head_params * max(o, 1)
                  + m.attn_flops_per_pair() * attention_pairs(0, t))
        # decode step j (1..d, d = o-1) reads the p + j - 1 cached tokens: sum = d*p + d(d-1)/2;
        # the prefill reads nothing cached; all t processed tokens are written once.
        d = max(o, 1) - 1
        kv_traffic += (d * p + d * (d - 1) / 2.0) * kv_tok + t * kv_tok
    passes = max(max(o for _, o in reqs), 1)
    nbytes = passes * m.weight_params_read(len(reqs)) * w_bytes + kv_traffic
    return _bound(flops, nbytes, hw)


def summarize_model(m: ModelSpec, w_bytes: float, kv_bytes: float) -> dict[str, Any]:
    return {
        "name": m.name,
        "total_params": m.total_params,
        "active_params": m.active_params,
        "weight_bytes": m.total_params * w_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token(kv_bytes),
        "mla": m.is_mla,
        "moe": bool(m.num_experts),
        "spec": asdict(m),
    }


def fraction_of_bound(bound_s: float, measured_s: float) -> float | None:
    """bound / measured (1.0 = at the roofline); None if undefined."""
    if not (measured_s > 0 and math.isfinite(measured_s)):
        return None
    return bound_s / measured_s


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.3f} us"


def format_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3f} {unit}"
    return f"{b:.0f} B"


def report_lines(
    m: ModelSpec, hw: HardwareSpec, w_bytes: float, kv_bytes: float, prompt_len: int, batch: int,
    context: int, link_bw: float | None, link_name: str | None,
) -> list[tuple[str, str]]:
    """(label, value) rows for the `kvserve roofline` table."""
    pre = prefill_bound(m, hw, prompt_len, w_bytes, kv_bytes)
    dec = decode_step_bound(m, hw, batch, context, w_bytes, kv_bytes)
    rows: list[tuple[str, str]] = [
        ("model", m.name + (" (MoE)" if m.num_experts else "") + (" (MLA)" if m.is_mla else "")),
        ("hardware", f"{hw.name}: {hw.peak_flops / 1e12:.3f} TFLOP/s, {hw.mem_bandwidth / 1e9:.1f} GB/s, "
                     f"{hw.mem_bytes / 1e9:.1f} GB"),
        ("params total / active", f"{m.total_params / 1e9:.3f} B / {m.active_params / 1e9:.3f} B"),
        ("weight bytes", format_bytes(m.total_params * w_bytes)),
        ("KV bytes per token", f"{m.kv_bytes_per_token(kv_bytes):,.0f} B"),
        (f"prefill {prompt_len} tokens", f"{format_seconds(pre.time_s)} ({pre.bound_by}-bound; "
                                         f"compute {format_seconds(pre.compute_s)}, memory {format_seconds(pre.memory_s)})"),
        (f"decode step batch {batch} @ context {context}",
         f"{format_seconds(dec.time_s)} ({dec.bound_by}-bound; compute {format_seconds(dec.compute_s)}, "
         f"memory {format_seconds(dec.memory_s)}) = {batch / dec.time_s:,.1f} tok/s max"),
        (f"max concurrent requests @ {context} tokens", f"{max_concurrent_requests(m, hw, context, w_bytes, kv_bytes):,}"),
    ]
    if link_bw is not None:
        t = swap_time_s(m, context, link_bw, kv_bytes)
        rows.append((f"swap {context}-token KV over {link_name or 'link'} ({link_bw / 1e9:g} GB/s)",
                     f"{format_seconds(t)} ({format_bytes(context * m.kv_bytes_per_token(kv_bytes))})"))
    return rows


def workload_tokens(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip((int(x) for x in prompt_lens), (int(y) for y in output_lens)))
