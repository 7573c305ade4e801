"""An instance's Prometheus /metrics text -> the load and role the router routes by.

Names read (kvserve exports them under vLLM's names, kvserve/metrics.py, so a vLLM instance is
read the same way); counts with several label sets (one per model name) are summed, usage fractions maxed:
  vllm:num_requests_running, vllm:num_requests_waiting            queue
  vllm:kv_cache_usage_perc (else vllm:gpu_cache_usage_perc)       KV usage, fraction in [0, 1]
  vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total   prefix cache, in tokens
  kvserve:instance_info{role="prefill|decode|both", block_size="16"}   role and block size (gauge = 1)
  vllm:cache_config_info{block_size="16"}                         block size as vLLM reports it

`kvserve:instance_info` is the contract for prefill/decode roles: an instance that does not export
it has no reported role (today's kvserve and other OpenAI servers), which is fine for plain
`--instance` routing and disqualifies it from a `--prefill`/`--decode` slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

ROLES = ("prefill", "decode", "both")


@dataclass(slots=True)
class InstanceStats:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: Optional[float] = None
    prefix_queries: Optional[float] = None
    prefix_hits: Optional[float] = None
    role: Optional[str] = None  # None: the instance does not report one
    block_size: Optional[int] = None

    @property
    def queue(self) -> float:
        return self.running + self.waiting


def parse_metrics(text: str) -> InstanceStats:
    """Parse exposition text; ValueError when it is not Prometheus text."""
    sums: dict[str, float] = {}
    stats = InstanceStats()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name in _SUMMED:
                sums[name] = sums.get(name, 0.0) + float(sample.value)
            elif name in _MAXED:  # a fraction: several label sets must not add up past 1
                sums[name] = max(sums.get(name, 0.0), float(sample.value))
            elif name == "kvserve:instance_info" and sample.value:
                role = sample.labels.get("role")
                if role in ROLES:
                    stats.role = role
                stats.block_size = _int_label(sample.labels.get("block_size")) or stats.block_size
            elif name == "vllm:cache_config_info" and stats.block_size is None:
                stats.block_size = _int_label(sample.labels.get("block_size"))
    stats.running = sums.get("vllm:num_requests_running", 0.0)
    stats.waiting = sums.get("vllm:num_requests_waiting", 0.0)
    usage = sums.get("vllm:kv_cache_usage_perc", sums.get("vllm:gpu_cache_usage_perc"))
    stats.kv_usage = usage
    stats.prefix_queries = sums.get("vllm:prefix_cache_queries_total")
    stats.prefix_hits = sums.get("vllm:prefix_cache_hits_total")
    return stats


_SUMMED = frozenset({
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
})
_MAXED = frozenset({"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"})


def _int_label(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
