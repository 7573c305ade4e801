"""Prometheus metrics of prefill/decode disaggregation, from the engine's cumulative counters
(`DisaggEngine.stats()`, sent with every engine snapshot).  `kvserve:instance_info{role,
block_size}` itself is set by the server at start (kvserve.metrics.ServerMetrics.set_instance_info).

  kvserve:prompt_tokens_computed_total            prompt tokens this instance computed (a decode
                                                  instance computes none of a transferred request)
  kvserve:kv_transfer_tokens_total{direction}     prompt tokens exported (out) / imported (in)
  kvserve:kv_transfer_cached_tokens_total         prompt tokens of imported requests found in this
                                                  instance's prefix cache (not transferred)
  kvserve:kv_transfer_bytes_total{direction}      bytes exported / fetched
  kvserve:kv_transfer_requests_total{outcome}     one per request by outcome: local (no transfer),
                                                  exported, export_failed, export_skipped (aborted
                                                  or failed before its export), imported,
                                                  all_cached (nothing to fetch), first_token_final
                                                  (the prefill's token ended it), failed_error,
                                                  failed_timeout, aborted (while fetching)
  kvserve:kv_transfer_fetch_seconds               summary: fetch time (count: fetches that arrived)
  kvserve:kv_transfer_exports_expired_total       exports dropped unread at their deadline
  kvserve:kv_transfer_exports_held                gauge: exports waiting for a decode instance
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

# outcome label -> DisaggEngine.stats() key
OUTCOMES = {
    "local": "requests_local", "exported": "requests_exported", "export_failed": "export_failed",
    "export_skipped": "export_skipped", "imported": "requests_imported", "all_cached": "import_all_cached",
    "first_token_final": "import_first_token_final", "failed_error": "import_failed_error",
    "failed_timeout": "import_failed_timeout", "aborted": "import_aborted",
}


class DisaggCollector:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Optional[dict[str, Any]] = None

    def collect(self) -> Iterator[Metric]:
        st = self.stats
        if not st:
            return
        m = [self.model_name]
        c = CounterMetricFamily("kvserve:prompt_tokens_computed", "Prompt tokens computed by this instance.",
                                labels=["model_name"])
        c.add_metric(m, st.get("prompt_tokens_computed", 0))
        yield c
        for name, doc, out_key, in_key in (
            ("kvserve:kv_transfer_tokens", "Prompt tokens whose KV this instance exported (out) or imported (in).",
             "tokens_exported", "tokens_imported"),
            ("kvserve:kv_transfer_bytes", "KV bytes exported (out) or fetched (in).", "bytes_exported",
             "bytes_imported"),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name", "direction"])
            c.add_metric(m + ["out"], st.get(out_key, 0))
            c.add_metric(m + ["in"], st.get(in_key, 0))
            yield c
        c = CounterMetricFamily("kvserve:kv_transfer_cached_tokens",
                                "Prompt tokens of imported requests already in this instance's prefix cache.",
                                labels=["model_name"])
        c.add_metric(m, st.get("tokens_import_cached", 0))
        yield c
        c = CounterMetricFamily("kvserve:kv_transfer_requests", "Requests by KV-transfer outcome.",
                                labels=["model_name", "outcome"])
        for outcome, key in OUTCOMES.items():
            c.add_metric(m + [outcome], st.get(key, 0))
        yield c
        s = SummaryMetricFamily("kvserve:kv_transfer_fetch_seconds", "Time to fetch a request's KV blocks.",
                                labels=["model_name"])
        s.add_metric(m, count_value=st.get("requests_imported", 0), sum_value=st.get("fetch_seconds", 0.0))
        yield s
        c = CounterMetricFamily("kvserve:kv_transfer_exports_expired", "Exports dropped unread at their deadline.",
                                labels=["model_name"])
        c.add_metric(m, st.get("exports_expired", 0))
        yield c
        g = GaugeMetricFamily("kvserve:kv_transfer_exports_held", "Exports waiting for a decode instance.",
                              labels=["model_name"])
        g.add_metric(m, st.get("exports_held", 0))
        yield g
