"""CacheBlend counters on /metrics, from the engine's ChunkStats snapshot (cumulative).

    kvserve:cacheblend_chunk_hits_total / _chunk_misses_total   document chunks found / computed
    kvserve:cacheblend_requests_total                          requests blended
    kvserve:cacheblend_fallbacks_total                         requests with chunks run as full prefills
    kvserve:cacheblend_tokens_reused_total                     chunk tokens placed from cache, not recomputed
    kvserve:cacheblend_tokens_recomputed_total                 chunk tokens the selection recomputed
    kvserve:cacheblend_recomputed_fraction                     recomputed / chunk tokens since start
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_COUNTERS = (
    ("kvserve:cacheblend_chunk_hits", "hits", "Document chunks found in the chunk cache."),
    ("kvserve:cacheblend_chunk_misses", "misses", "Document chunks computed (and cached) because none was cached."),
    ("kvserve:cacheblend_requests", "blends", "Requests whose prompt was blended from cached chunks."),
    ("kvserve:cacheblend_fallbacks", "fallbacks",
     "Requests with document chunks run as ordinary prefills (chunked prefill, KV pool short)."),
    ("kvserve:cacheblend_tokens_reused", "tokens_reused", "Chunk tokens whose cached KV was used as is."),
    ("kvserve:cacheblend_tokens_recomputed", "tokens_recomputed", "Chunk tokens recomputed by the selection."),
)


class CacheBlendCollector:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Optional[dict[str, Any]] = None  # dataclasses.asdict(ChunkStats)

    def collect(self) -> Iterator[Metric]:
        s = self.stats  # one snapshot for the whole render
        if s is None:
            return
        m = [self.model_name]
        for name, key, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, s.get(key, 0))
            yield c
        g = GaugeMetricFamily("kvserve:cacheblend_recomputed_fraction",
                              "Recomputed / all chunk tokens of blended requests since start.", labels=["model_name"])
        chunked = s.get("tokens_chunked", 0)
        g.add_metric(m, s.get("tokens_recomputed", 0) / chunked if chunked else 0.0)
        yield g
