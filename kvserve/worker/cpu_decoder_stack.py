"""A Llama-family model's decoder layers in one C++ call per step (worker/csrc/cpu_decoder_stack.cpp).

It lives in the worker, not in kvserve.models, because it binds a model to the worker's attention
backend (its KV layout and kernels): models never import the worker.

Why: at the few rows of a decode step the weights' reads are the step's real work, and the
Python around each layer (module calls, ~25 torch ops, their allocations) cost a few ms a step
on 30 layers: 10-20% of a batch-1 step on the 2-core machines (docs/benchmarks.md, session 12).
The stack calls the very kernels the Python layers call (blocked linear, fused norms, rotary,
the paged decode and prefill attention kernels), in the same order, so its hidden states equal
the Python path's bit for bit (q/k-norm models: up to rounding).

`attach(model, backend)` builds the stack when every piece it needs is there: a float32 CPU
model of the Llama family with every projection packed in column blocks
(kvserve.models.cpu_linear), the fused ops enabled, and the C++ CPU attention backend with its
prefill kernel.  Otherwise, or with KVSERVE_CPU_STACK=0 (for A/B runs), nothing is attached and
the model runs its Python layers: the reference path, held equal in
tests/unit/worker/test_cpu_decoder_stack.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from kvserve.models.llama import LlamaForCausalLM
from kvserve.protocol import ForwardContext
from kvserve.utils.cpp_ext import CppExtension
from kvserve.worker.attention.cpu_paged import CpuPagedAttention, pack_prefill_chunks

logger = logging.getLogger(__name__)

ENV = "KVSERVE_CPU_STACK"  # "1" (default) or "0": the Python layers

_CSRC = Path(__file__).resolve().parent / "csrc"
_MODEL_CSRC = Path(__file__).resolve().parents[1] / "models" / "csrc"
_ATTN_CSRC = Path(__file__).resolve().parent / "attention" / "csrc"
_EXT = CppExtension("kvserve_cpu_decoder_stack", _CSRC / "cpu_decoder_stack.cpp", "the CPU decoder stack extension",
                    includes=(_MODEL_CSRC / "cpu_model_ops.cpp", _ATTN_CSRC / "paged_decode_cpu.cpp",
                              _ATTN_CSRC / "paged_prefill_cpu.cpp"))


def load() -> Optional[Any]:
    return _EXT.load()


_EMPTY_LONG = torch.empty(0, dtype=torch.int64)


class CpuDecoderStack:
    """The C++ stack of one model, and the backend whose steps it runs (its KV layout and kernels)."""

    def __init__(self, native: Any, backend: Any) -> None:
        self.native = native
        self.backend = backend

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Embeddings h [T, hidden], cos/sin [T, 1, head_dim] -> final-norm hidden states [T, hidden]."""
        meta = ctx.meta
        T = h.shape[0]
        if meta.prefills:
            chunks, block_ids = pack_prefill_chunks(meta.prefills)
        else:
            chunks = block_ids = _EMPTY_LONG
        D = meta.num_decode_tokens
        tables = meta.decode_block_tables if D else _EMPTY_LONG
        seq_lens = meta.decode_seq_lens if D else _EMPTY_LONG
        return self.native.forward(h, cos.view(T, -1), sin.view(T, -1), ctx.kv_caches, meta.slot_mapping, D,
                                   tables, seq_lens, chunks, block_ids)


def _projections(layer: Any) -> tuple[Any, Any, Any, Any]:
    """A decoder layer's four projections, in the order the stack takes them."""
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _packed_blocks(linear: Any) -> Optional[torch.Tensor]:
    packed = getattr(linear, "packed_weight", None)
    return packed if packed is not None and packed.dim() == 3 else None


def build(model: torch.nn.Module, backend: Any) -> Optional[CpuDecoderStack]:
    """The stack for `model` run with attention `backend`, or None where some part is missing
    (the reason is logged at debug level)."""
    def no(reason: str) -> None:
        logger.debug("CPU decoder stack off: %s", reason)
        return None

    if os.environ.get(ENV, "1") == "0":
        return no(f"{ENV}=0")
    if not isinstance(model, LlamaForCausalLM):
        return no(f"{type(model).__name__} is not a Llama-family model")
    if type(backend) is not CpuPagedAttention or backend._prefill_ext is None:
        return no(f"attention backend {type(backend).__name__} is not the C++ CPU one with its prefill kernel")
    cfg = model.cfg
    empty = torch.empty(0)
    layers = []
    # Where the projections keep their plain weights for MKL at prefill sizes (cpu_linear_rows),
    # the stack takes the same threshold so that it stays bitwise equal to the Python layers.
    from_rows = {m.plain_from_rows for layer in model.layers for m in _projections(layer)}
    if len(from_rows) != 1:
        return no("the projections take F.linear from different row counts")
    plain_from_rows = from_rows.pop()
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.ext is None or mlp.ext is None or layer.input_layernorm.ext is None:
            return no("the fused layer ops are off")
        packed = [_packed_blocks(m) for m in _projections(layer)]
        if any(p is None for p in packed):
            return no("a projection is not packed in column blocks")
        if layer.input_layernorm.weight.dtype != torch.float32 or layer.input_layernorm.weight.device.type != "cpu":
            return no("not a float32 CPU model")
        qkv, o, gate_up, down = packed
        plain = [m.weight.detach() if plain_from_rows is not None else empty for m in _projections(layer)]
        bias = attn.qkv_proj.bias
        q_norm = attn.q_norm.weight if attn.qk_norm else empty
        k_norm = attn.k_norm.weight if attn.qk_norm else empty
        layers.append([layer.input_layernorm.weight.detach(), qkv, empty if bias is None else bias.detach(),
                       q_norm.detach(), k_norm.detach(), o, layer.post_attention_layernorm.weight.detach(),
                       gate_up, down, *plain])
    native_module = load()
    if native_module is None:
        return no("the extension could not be built")
    native = native_module.DecoderStack(layers, model.norm.weight.detach(), cfg.num_heads, cfg.num_kv_heads,
                                        cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, backend.scale,
                                        -1 if plain_from_rows is None else plain_from_rows)
    return CpuDecoderStack(native, backend)


def attach(model: torch.nn.Module, backend: Any) -> bool:
    """Build the stack for `model` and hand it to the model (its `decoder_stack`); True if attached."""
    stack = build(model, backend)
    if stack is None:
        return False
    model.decoder_stack = stack  # type: ignore[assignment]
    return True
