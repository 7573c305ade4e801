"""Shared pieces of the KV-tier benchmarks (benchmarks/kv_tiers_*.py).

- random-weight Llama models of a given shape, saved once in HF format;
- an in-process arrival-time replay of a request list through LLMEngine, with
  TTFT taken from RequestOutput.metrics (arrival = the request's scheduled
  arrival, so time spent queued or waiting for a tier load counts);
- percentiles and tier-stat summaries.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# SmolLM2-135M's shape (random weights): prefill of 2k tokens costs real time on a CPU.
SMOL135_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                     max_position_embeddings=8192)
# A small model for the multi-turn replay (16 KiB of fp32 KV per token).
SMALL_SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=True, max_position_embeddings=4096)


def build_llama(out_dir: Path, shape: dict[str, Any], seed: int = 0, std: float | None = None) -> Path:
    """A random-weight LlamaForCausalLM of `shape` in out_dir (kept if already there)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape)
    if std is not None:
        cfg.initializer_range = std
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).float().eval().save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@dataclass
class ReplayRequest:
    arrival_s: float          # offset from the replay start
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ttft_s: float
    prompt_len: int
    cached_tokens: int        # device + tier prefix hits at admission
    output_len: int


def replay(engine: Any, reqs: Sequence[ReplayRequest]) -> tuple[list[RequestResult], float]:
    """Add each request at its arrival time (between engine steps), run until all finish.

    Returns per-request results (in input order) and the wall time of the replay."""
    from kvserve import SamplingParams

    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    results: dict[int, RequestResult] = {}
    t0 = time.time()
    nxt = 0
    while len(results) < len(reqs):
        now = time.time() - t0
        while nxt < len(order) and reqs[order[nxt]].arrival_s <= now:
            i = order[nxt]
            r = reqs[i]
            sp = SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
            engine.add_request({"prompt_token_ids": r.prompt_token_ids}, sp, request_id=str(i),
                               arrival_time=t0 + r.arrival_s)
            nxt += 1
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    m = out.metrics
                    results[int(out.request_id)] = RequestResult(
                        m.first_token_time - m.arrival_time, len(out.prompt_token_ids), out.num_cached_tokens,
                        len(out.outputs[0].token_ids))
        elif nxt < len(order):
            time.sleep(max(0.0, min(0.05, reqs[order[nxt]].arrival_s - (time.time() - t0))))
    return [results[i] for i in range(len(reqs))], time.time() - t0


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def tier_summary(stats: dict[str, Any] | None) -> dict[str, Any]:
    """Compact per-tier hits/bytes/latency from LLMEngine.kv_tier_stats()."""
    if not stats:
        return {}
    out: dict[str, Any] = {}
    for name, t in stats["tiers"].items():
        out[name] = {"hits": t["hits"], "store_hits": t["store_hits"], "puts": t["puts"],
                     "MiB_read": round(t["bytes_read"] / 2**20, 1), "MiB_written": round(t["bytes_written"] / 2**20, 1),
                     "ms_per_get": round(1000 * t["get_latency_s"] / max(1, t["gets"]), 3),
                     "ms_per_put": round(1000 * t["put_latency_s"] / max(1, t["puts"]), 3),
                     "corrupt": t["corrupt"], "errors": t["errors"]}
    o = stats["offload"]
    keys = ("loads_started", "blocks_used", "blocks_on_device", "blocks_truncated", "blocks_discarded",
            "saves_queued", "saves_skipped", "saves_dropped")
    out["engine"] = {k: o[k] for k in keys}
    io = stats["io"]
    out["engine"]["ms_per_load"] = round(1000 * io["load_wall_s"] / max(1, io["loads"]), 2)
    return out


def dump(path: str | None, payload: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {path}")
