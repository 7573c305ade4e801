"""Speculative-decoding metrics on /metrics, under vLLM's names where vLLM has one.

  vllm:spec_decode_num_drafts_total                      verifications that drafted >= 1 token
  vllm:spec_decode_num_draft_tokens_total                proposed draft tokens
  vllm:spec_decode_num_accepted_tokens_total             accepted draft tokens
  vllm:spec_decode_num_accepted_tokens_per_pos_total{position="j"}   accepted at draft position j (0-based)
  kvserve:spec_decode_num_draft_tokens_per_pos_total{position="j"}   proposed at draft position j
  kvserve:spec_decode_acceptance_rate                    accepted / proposed, since start
  kvserve:spec_decode_acceptance_rate_per_pos{position="j"}          accepted / proposed at position j
  kvserve:spec_decode_mean_acceptance_length             1 + accepted / drafts (tokens per verifying step)

Rendered from the engine's cumulative SpecDecodeMetrics.as_dict() in the latest
stats snapshot; nothing is rendered without speculative decoding.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class SpecDecodeCollector:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: Optional[dict[str, Any]] = None  # SpecDecodeMetrics.as_dict()

    def collect(self) -> Iterator[Metric]:
        s = self.stats  # one snapshot for the whole render
        if not s:
            return
        m = [self.model_name]
        for name, key, doc in (
            ("vllm:spec_decode_num_drafts", "num_drafts", "Verifications of requests that drafted tokens."),
            ("vllm:spec_decode_num_draft_tokens", "num_draft_tokens", "Draft tokens proposed."),
            ("vllm:spec_decode_num_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted."),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, s.get(key, 0))
            yield c
        for name, key, doc, family in (
            ("vllm:spec_decode_num_accepted_tokens_per_pos", "accepted_per_position",
             "Draft tokens accepted at each draft position (0-based).", CounterMetricFamily),
            ("kvserve:spec_decode_num_draft_tokens_per_pos", "proposed_per_position",
             "Draft tokens proposed at each draft position (0-based).", CounterMetricFamily),
            ("kvserve:spec_decode_acceptance_rate_per_pos", "acceptance_rate_per_position",
             "Accepted / proposed draft tokens at each draft position (0-based).", GaugeMetricFamily),
        ):
            f = family(name, doc, labels=["model_name", "position"])
            for j, v in enumerate(s.get(key, ())):
                f.add_metric([self.model_name, str(j)], v)
            yield f
        for name, key, doc in (
            ("kvserve:spec_decode_acceptance_rate", "acceptance_rate", "Accepted / proposed draft tokens since start."),
            ("kvserve:spec_decode_mean_acceptance_length", "mean_acceptance_length",
             "Tokens emitted per verifying step: 1 + accepted / drafts."),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, s.get(key, 0.0))
            yield g
