"""The router's Prometheus metrics (its own registry, so several routers can live in one process).

  kvserve:router_requests_total{instance}            requests answered by the instance (any status)
  kvserve:router_attempts_total{instance}            attempts sent to it (retries included)
  kvserve:router_failed_attempts_total{instance,reason}  attempts on it that failed before any byte reached
                                                     the client: connect, read (connection lost), status (5xx)
  kvserve:router_retries_total{instance}             attempts sent to it because another instance failed
  kvserve:router_no_instance_total{reason}           requests answered 503 by the router itself
  kvserve:router_stream_errors_total{instance}       streams cut by the instance after the first byte
  kvserve:router_instance_healthy{instance,slot}     1 while routable traffic may go there, else 0
  kvserve:router_instance_inflight{instance}         requests in flight on it through this router
  kvserve:router_instance_load{instance}             the load least-load sees (Instance.load())
  kvserve:router_health_check_failures_total{instance}
  kvserve:router_instance_transitions_total{instance,to}   healthy/unhealthy transitions
  kvserve:router_kv_prompt_tokens_total{instance}    prompt tokens of requests routed by kv-aware
  kvserve:router_kv_predicted_hit_tokens_total{instance}   of those, predicted prefix-cache hits
  kvserve:router_kv_predicted_hit_rate               predicted hits / prompt tokens, all instances
  kvserve:router_kv_index_blocks{instance}           block hashes the KV index holds for the instance
  kvserve:router_kv_events_total{type}               KV event block hashes ingested (stored/removed) and
                                                     all_cleared events; type="gap" counts lost batches
  kvserve:router_pd_requests_total{outcome}          prefill/decode requests: ok, prefill_failed,
                                                     no_transfer_params, decode_failed, no_pair
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvserve.router.instances import Instance
from kvserve.router.kv_index import KVIndex

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    def __init__(self, instances: Iterable[Instance], kv_index: KVIndex | None = None) -> None:
        self.registry = r = CollectorRegistry()
        self._instances = list(instances)
        self._kv_index = kv_index
        inst = ["instance"]
        self.requests = Counter("kvserve:router_requests", "Requests answered by each instance.", inst, registry=r)
        self.attempts = Counter("kvserve:router_attempts", "Attempts sent to each instance (retries included).",
                                inst, registry=r)
        self.failed_attempts = Counter("kvserve:router_failed_attempts",
                                       "Attempts that failed before any byte reached the client.",
                                       ["instance", "reason"], registry=r)
        self.retries = Counter("kvserve:router_retries", "Attempts sent after another instance failed.", inst,
                               registry=r)
        self.no_instance = Counter("kvserve:router_no_instance", "Requests the router answered 503 itself.",
                                   ["reason"], registry=r)
        self.stream_errors = Counter("kvserve:router_stream_errors",
                                     "Streams the instance cut after the first byte.", inst, registry=r)
        self.healthy = Gauge("kvserve:router_instance_healthy", "1 if the instance is healthy, else 0.",
                             ["instance", "slot"], registry=r)
        self.inflight = Gauge("kvserve:router_instance_inflight", "Requests in flight through this router.",
                              inst, registry=r)
        self.load = Gauge("kvserve:router_instance_load", "Load as least-load sees it (requests).", inst,
                          registry=r)
        self.check_failures = Counter("kvserve:router_health_check_failures", "Failed health checks.", inst,
                                      registry=r)
        self.transitions = Counter("kvserve:router_instance_transitions", "Health transitions.",
                                   ["instance", "to"], registry=r)
        self.kv_prompt_tokens = Counter("kvserve:router_kv_prompt_tokens",
                                        "Prompt tokens of requests routed by the kv-aware policy.", inst, registry=r)
        self.kv_hit_tokens = Counter("kvserve:router_kv_predicted_hit_tokens",
                                     "Predicted prefix-cache hit tokens of those requests.", inst, registry=r)
        self.kv_hit_rate = Gauge("kvserve:router_kv_predicted_hit_rate",
                                 "Predicted prefix-cache hit tokens / prompt tokens (kv-aware).", registry=r)
        self.kv_index_blocks = Gauge("kvserve:router_kv_index_blocks", "Block hashes indexed per instance.",
                                     inst, registry=r)
        self.kv_events = Counter("kvserve:router_kv_events", "KV events ingested.", ["type"], registry=r)
        self.pd_requests = Counter("kvserve:router_pd_requests", "Prefill/decode requests by outcome.",
                                   ["outcome"], registry=r)
        self._kv_prompt_sum = 0
        self._kv_hit_sum = 0
        for i in self._instances:  # every series exists from the start (dashboards, absent() alerts)
            self.healthy.labels(i.url, i.slot).set(0)
            for c in (self.requests, self.attempts, self.retries, self.stream_errors, self.check_failures):
                c.labels(i.url)

    def set_health(self, inst: Instance, healthy: bool) -> None:
        self.healthy.labels(inst.url, inst.slot).set(1 if healthy and inst.role_fits else 0)
        self.transitions.labels(inst.url, "healthy" if healthy else "unhealthy").inc()

    def kv_routed(self, inst: Instance, prompt_tokens: int, hit_tokens: int) -> None:
        self.kv_prompt_tokens.labels(inst.url).inc(prompt_tokens)
        self.kv_hit_tokens.labels(inst.url).inc(hit_tokens)
        self._kv_prompt_sum += prompt_tokens
        self._kv_hit_sum += hit_tokens
        if self._kv_prompt_sum:
            self.kv_hit_rate.set(self._kv_hit_sum / self._kv_prompt_sum)

    def render(self) -> bytes:
        for i in self._instances:
            self.inflight.labels(i.url).set(i.inflight)
            self.load.labels(i.url).set(i.load())
            self.healthy.labels(i.url, i.slot).set(1 if i.routable else 0)
            if self._kv_index is not None:
                self.kv_index_blocks.labels(i.url).set(self._kv_index.num_blocks(i.url))
        return generate_latest(self.registry)
