"""Prometheus metrics for the server, under vLLM's names so vLLM dashboards work unchanged.

Request timings are measured in the API process (what a client sees, from
arrival to each token reaching the server); engine gauges and counters come
from the snapshot the engine sends with every step.  Each `ServerMetrics`
owns its registry, so several servers can live in one process (tests).

Names (one per metric; where vLLM renamed a metric, both names are exported
because dashboards in use query either):
  vllm:num_requests_running / vllm:num_requests_waiting          gauges
  vllm:kv_cache_usage_perc (and older vllm:gpu_cache_usage_perc)  gauge, fraction in [0, 1] as in vLLM
  vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total  counters, in tokens
  vllm:num_preemptions_total                                      counter
  kvserve:preemptions_total{cause,mode}                           counter: cause kv_blocks (the pool ran
                                                                  out) | policy (a seat given to a waiting
                                                                  request), mode swap | recompute
  vllm:prompt_tokens_total / vllm:generation_tokens_total         counters
  vllm:request_success_total{finished_reason}                     counter (stop|length|abort|error)
  vllm:time_to_first_token_seconds                                histogram
  vllm:inter_token_latency_seconds (and older vllm:time_per_output_token_seconds)  histogram
  vllm:e2e_request_latency_seconds                                histogram
  vllm:request_prompt_tokens / vllm:request_generation_tokens     histograms
  kvserve:prefix_cache_hit_rate, kvserve:engine_steps_total, kvserve:engine_step_failures_total,
  kvserve:num_requests_queued_api
  kvserve:instance_info{role,block_size}                          gauge = 1: the instance's role (prefill |
                                                                  decode | both) and KV block size, which
                                                                  routers read (router/scrape.py)

With KV offload tiers (`--kv-tiers`), per tier, labelled tier="<level>:<scheme>" ("0:cpu", "1:disk"):
  kvserve:kv_tier_lookups_total / _hits_total / _misses_total     counters, in blocks (a corrupt
                                                                  entry or unreachable backend is a miss)
  kvserve:kv_tier_puts_total / _dropped_puts_total                counters, in blocks
  kvserve:kv_tier_read_bytes_total / _written_bytes_total         counters, stored (encoded) bytes
  kvserve:kv_tier_evictions_total / _corrupt_total / _errors_total counters
  kvserve:kv_tier_get_seconds / kvserve:kv_tier_put_seconds        summaries: _sum is the time spent in
                                                                  the tier's reads / writes, _count the blocks
  kvserve:kv_tier_used_bytes / kvserve:kv_tier_capacity_bytes      gauges (no capacity for Redis)
and for the engine's offload as a whole:
  kvserve:kv_offload_load_seconds                                 summary: submit -> blocks ready, per load
  kvserve:kv_offload_blocks_loaded_total / _blocks_used_total     counters: fetched from the tiers / placed
                                                                  into the device pool
  kvserve:kv_offload_blocks_saved_total / _saves_dropped_total    counters: written / refused (back-pressure)
  kvserve:kv_offload_errors_total                                 counter: tier I/O exceptions
  kvserve:num_requests_waiting_for_kv                             gauge: requests waiting for a tier load
These come straight from the engine's cumulative counters (LLMEngine.kv_tier_stats()).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvserve.engine.engine_ipc import EngineStatsSnapshot

# Bucket edges as in vLLM, so histogram_quantile panels line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

FINISH_REASONS = ("stop", "length", "abort", "error")

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Implements `EngineObserver` (kvserve.engine.async_engine) and renders /metrics."""

    def __init__(self, model_name: str, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting in the engine's queue.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: fraction of blocks in use (1 = full).")
        self.kv_usage_old = gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (older vLLM name).")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prefix_hit_rate = gauge("kvserve:prefix_cache_hit_rate",
                                     "Prefix-cache hits / queries since start, in tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Requests preempted (KV blocks reclaimed).")
        self._preemptions_by = Counter("kvserve:preemptions", "Preemptions by cause and mode (swap | recompute).",
                                       ["model_name", "cause", "mode"], registry=r)
        self.steps = counter("kvserve:engine_steps", "Engine steps run.")
        self.step_failures = counter("kvserve:engine_step_failures",
                                     "Engine steps that raised; their requests were failed.")
        self.api_queued = gauge("kvserve:num_requests_queued_api",
                                "Requests accepted by the API that have not produced a token yet.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that produced a token.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success_family = success
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between successive tokens of a sequence.",
                             ITL_BUCKETS)
        self.itl_old = histogram("vllm:time_per_output_token_seconds",
                                 "Time between successive tokens (older vLLM name).", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency from arrival to finish.",
                             E2E_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per request.", TOKEN_COUNT_BUCKETS)
        self._instance_info = Gauge("kvserve:instance_info", "This instance's role and KV block size (value 1).",
                                    ["model_name", "role", "block_size"], registry=r)
        # Engine counters arrive as cumulative totals; these are the totals already counted.
        self._seen = EngineStatsSnapshot()
        self.kv_tiers = KVTierCollector(model_name)
        r.register(self.kv_tiers)
        from kvserve.disagg.metrics import DisaggCollector  # prefill/decode transfer counters

        self.disagg = DisaggCollector(model_name)
        r.register(self.disagg)
        from kvserve.spec_decode.prometheus import SpecDecodeCollector

        self.spec_decode = SpecDecodeCollector(model_name)
        r.register(self.spec_decode)
        from kvserve.blend.prometheus import CacheBlendCollector  # document chunks (CacheBlend)

        self.cacheblend = CacheBlendCollector(model_name)
        r.register(self.cacheblend)

    def set_instance_info(self, role: str, block_size: int) -> None:
        """Export `kvserve:instance_info{role, block_size} 1` (one label set: the current one)."""
        self._instance_info.clear()
        self._instance_info.labels(self.model_name, role, str(block_size)).set(1)

    # ---------------------------------------------------------- EngineObserver
    def on_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, num_tokens: int, inter_token_s: Optional[float]) -> None:
        self.generation_tokens.inc(num_tokens)
        if inter_token_s is not None:
            self.itl.observe(inter_token_s)
            self.itl_old.observe(inter_token_s)

    def on_finished(self, reason: str, e2e_s: float, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        counter = self.success.get(reason)
        if counter is None:
            counter = self.success[reason] = self._success_family.labels(self.model_name, reason)
        counter.inc()
        self.e2e.observe(e2e_s)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)

    def on_engine_stats(self, stats: EngineStatsSnapshot) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_usage_old.set(stats.kv_cache_usage)
        seen = self._seen
        # max(0, ...): a restarted engine would start its totals from zero again.
        self.prefix_queries.inc(max(0, stats.prefix_cache_queries - seen.prefix_cache_queries))
        self.prefix_hits.inc(max(0, stats.prefix_cache_hits - seen.prefix_cache_hits))
        self.preemptions.inc(max(0, stats.num_preemptions - seen.num_preemptions))
        for key, total in stats.preemptions_by.items():
            cause, _, mode = key.partition("/")
            self._preemptions_by.labels(self.model_name, cause, mode).inc(
                max(0, total - seen.preemptions_by.get(key, 0)))
        self.steps.inc(max(0, stats.num_steps - seen.num_steps))
        self.step_failures.inc(max(0, stats.num_step_failures - seen.num_step_failures))
        if stats.prefix_cache_queries:
            self.prefix_hit_rate.set(stats.prefix_cache_hits / stats.prefix_cache_queries)
        self.kv_tiers.stats = stats.kv_tiers
        self.disagg.stats = stats.disagg
        self.spec_decode.stats = stats.spec_decode
        self.cacheblend.stats = stats.cacheblend
        self._seen = stats

    # ------------------------------------------------------------------ render
    def render(self, num_queued_api: int = 0) -> bytes:
        self.api_queued.set(num_queued_api)
        return generate_latest(self.registry)


# (metric name, TierStats field, help) of the per-tier counters.
_TIER_COUNTERS = (
    ("kvserve:kv_tier_lookups", "gets", "Blocks requested from the KV tier (hits + misses)."),
    ("kvserve:kv_tier_hits", "hits", "Blocks found in the KV tier."),
    ("kvserve:kv_tier_misses", "misses", "Blocks not found in the KV tier (corrupt and unreachable included)."),
    ("kvserve:kv_tier_puts", "puts", "Blocks offered to the KV tier for writing."),
    ("kvserve:kv_tier_dropped_puts", "dropped_puts", "Blocks the KV tier did not store (too large, full, down)."),
    ("kvserve:kv_tier_read_bytes", "bytes_read", "Stored (encoded) bytes read from the KV tier."),
    ("kvserve:kv_tier_written_bytes", "bytes_written", "Stored (encoded) bytes written to the KV tier."),
    ("kvserve:kv_tier_evictions", "evictions", "Entries the KV tier removed to respect its size bound."),
    ("kvserve:kv_tier_corrupt", "corrupt", "Entries found corrupt (checksum, truncation, namespace) and dropped."),
    ("kvserve:kv_tier_errors", "errors", "I/O or connection errors of the KV tier."),
)
# (metric name, `io` or `offload` section, field, help) of the engine-wide offload counters.
_OFFLOAD_COUNTERS = (
    ("kvserve:kv_offload_blocks_loaded", "io", "blocks_loaded", "Blocks fetched from the KV tiers."),
    ("kvserve:kv_offload_blocks_used", "offload", "blocks_used", "Fetched blocks placed into the device KV cache."),
    ("kvserve:kv_offload_blocks_saved", "io", "saves", "Blocks written to the KV tiers."),
    ("kvserve:kv_offload_saves_dropped", "io", "saves_dropped",
     "Blocks not saved because too many bytes were already waiting to be written."),
    ("kvserve:kv_offload_errors", "io", "errors", "Unexpected exceptions from KV tier I/O (treated as misses)."),
)


class KVTierCollector:
    """Renders the KV tier counters of the latest engine snapshot (`LLMEngine.kv_tier_stats()`).

    The engine's counters are cumulative, so they are exported as they are rather than
    re-counted here; nothing is rendered while `stats` is None (no tiers configured).
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Optional[dict[str, Any]] = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats  # one snapshot for the whole render (the event loop may swap it)
        if not stats:
            return
        labels = ["model_name", "tier"]
        tiers: dict[str, dict[str, Any]] = stats.get("tiers", {})
        for name, field, doc in _TIER_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for tier, t in tiers.items():
                family.add_metric([self.model_name, tier], t.get(field, 0))
            yield family
        for name, count, total, doc in (
            ("kvserve:kv_tier_get_seconds", "gets", "get_latency_s", "Time in KV tier reads (count: blocks read)."),
            ("kvserve:kv_tier_put_seconds", "puts", "put_latency_s", "Time in KV tier writes (count: blocks written)."),
        ):
            summary = SummaryMetricFamily(name, doc, labels=labels)
            for tier, t in tiers.items():
                summary.add_metric([self.model_name, tier], count_value=t.get(count, 0),
                                   sum_value=t.get(total, 0.0))
            yield summary
        for name, field, doc in (("kvserve:kv_tier_used_bytes", "used_bytes", "Stored bytes the KV tier holds."),
                                 ("kvserve:kv_tier_capacity_bytes", "capacity_bytes", "Size bound of the KV tier.")):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for tier, t in tiers.items():
                if t.get(field) is not None:  # Redis bounds itself: no capacity, no usage
                    gauge.add_metric([self.model_name, tier], t[field])
            yield gauge
        io, offload = stats.get("io", {}), stats.get("offload", {})
        loads = SummaryMetricFamily("kvserve:kv_offload_load_seconds",
                                    "Time from a KV tier load's submission to its blocks being ready.",
                                    labels=["model_name"])
        loads.add_metric([self.model_name], count_value=io.get("loads", 0), sum_value=io.get("load_wall_s", 0.0))
        yield loads
        for name, section, field, doc in _OFFLOAD_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], (io if section == "io" else offload).get(field, 0))
            yield family
        waiting = GaugeMetricFamily("kvserve:num_requests_waiting_for_kv",
                                    "Requests waiting for their blocks to be loaded from a KV tier.",
                                    labels=["model_name"])
        waiting.add_metric([self.model_name], stats.get("num_waiting_for_kv", 0))
        yield waiting
