"""/metrics moving as requests run, and the small endpoints (models, health, tokenize, detokenize)."""
from __future__ import annotations

import httpx

from tests.e2e.harness import get_metrics, metric, wait_for

VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
    "vllm:time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
]


def test_metric_names_exist(server) -> None:  # type: ignore[no-untyped-def]
    text = httpx.get(server.base_url + "/metrics").text
    for name in VLLM_NAMES:
        assert f"\n{name}{{" in text, name
    assert 'vllm:request_success_total{finished_reason="stop"' in text
    assert 'model_name="tiny"' in text


def test_metrics_move_as_requests_run(server) -> None:  # type: ignore[no-untyped-def]
    # Counters only: the running gauge and KV usage *during* a request are checked in
    # test_concurrency.py on a stream held open by the client. Polling for them during a
    # 40-token request raced a fast machine, which finished it between two polls.
    before = get_metrics(server.base_url)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True}
    usage = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120).json()["usage"]
    assert usage["completion_tokens"] == 40

    after = wait_for(lambda: (lambda m: m if metric(m, "vllm:num_requests_running") == 0 else None)(
        get_metrics(server.base_url)), what="running back to 0")

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert metric(after, "vllm:kv_cache_usage_perc") == 0
    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert grew("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("vllm:generation_tokens_total") == 40
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 39
    assert grew("vllm:prefix_cache_queries_total") >= usage["prompt_tokens"]


def test_prefix_cache_hits_counted(server) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(1000, 1000 + 80))  # 5 full blocks of 16
    before = get_metrics(server.base_url)
    for _ in range(2):
        r = httpx.post(server.base_url + "/v1/completions",
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64
    after = get_metrics(server.base_url)
    assert metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total") >= 64


def test_models(client) -> None:  # type: ignore[no-untyped-def]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_health_and_version(server) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert "version" in httpx.get(server.base_url + "/version").json()


def test_tokenize_detokenize_roundtrip(server) -> None:  # type: ignore[no-untyped-def]
    tok = httpx.post(server.base_url + "/tokenize", json={"model": "tiny", "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) == 2
    assert tok["max_model_len"] == 1024
    assert tok["token_strs"] is None
    detok = httpx.post(server.base_url + "/detokenize", json={"model": "tiny", "tokens": tok["tokens"]}).json()
    assert detok == {"prompt": "Hello world"}


def test_engine_runs_in_its_own_process_with_passive_openmp(server) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    pid = server.engine_pid()
    assert pid != server.proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"OMP_WAIT_POLICY=PASSIVE" in environ
    assert b"GOMP_SPINCOUNT=10000" in environ  # bounded spin between operators (docs/benchmarks.md)
