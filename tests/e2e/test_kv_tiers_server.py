"""KV offload tiers through the server: `kvserve serve --kv-tiers ...` and the per-tier /metrics.

The server runs with a device KV cache far smaller than the prompt set (as in
tests/parity/test_tiers_parity.py), so the first pass evicts blocks into the cpu tier and the
second pass finds them there.
"""
from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvserve.engine.engine_ipc import EngineStatsSnapshot
from kvserve.entrypoints.serve_cli import check_kv_tier_options
from kvserve.metrics import ServerMetrics
from tests.e2e.harness import REPO, ServerProcess, get_metrics, metric, wait_for

BLOCK = 8
TIER = "0:cpu"


# ------------------------------------------------------------------ no server
@pytest.mark.parametrize("tiers,codec,fragment", [
    ("cpu:lots", "raw", "invalid size 'lots'"),
    ("tape:1GiB", "raw", "unknown tier scheme 'tape'"),
    ("cpu", "raw", "expected cpu:SIZE"),
    ("disk:/tmp", "raw", "expected disk:PATH:SIZE"),
    ("cpu:1GiB:ttl=5", "raw", "unknown option(s) ttl"),
    ("cpu:1GiB:codec=zip", "raw", "unknown KV codec 'zip'"),
    (" , ", "raw", "empty spec"),
    ("cpu:1GiB", "int9", "--kv-codec"),
])
def test_bad_kv_tier_options_are_named(tiers: str, codec: str, fragment: str) -> None:
    problem = check_kv_tier_options(tiers, codec)
    assert problem is not None and fragment in problem and "\n" not in problem


@pytest.mark.parametrize("tiers,codec", [
    (None, "raw"), ("cpu:4GiB", "int8"), ("cpu:4GiB,disk:/var/cache/kvserve:20GiB:codec=fp8", "raw"),
    ("redis://127.0.0.1:6379/0?ttl=60", "cachegen"),
])
def test_good_kv_tier_options_pass(tiers: str | None, codec: str) -> None:
    assert check_kv_tier_options(tiers, codec) is None


def _tier_snapshot(hits: int) -> dict:
    tier = dict(gets=10, hits=hits, misses=10 - hits, puts=7, dropped_puts=1, bytes_read=4096 * hits,
                bytes_written=4096 * 6, get_latency_s=0.02, put_latency_s=0.03, evictions=2, corrupt=1, errors=0,
                used_bytes=8192, capacity_bytes=1 << 20, codec="raw", store_hits=hits)
    redis = dict(tier, capacity_bytes=None, used_bytes=None)
    return {"tiers": {"0:cpu": tier, "1:redis": redis},
            "io": {"loads": 3, "blocks_loaded": hits, "load_wall_s": 0.3, "saves": 6, "save_wall_s": 0.1,
                   "saves_dropped": 2, "errors": 0},
            "offload": {"blocks_used": hits - 1}, "num_waiting_for_kv": 1}


def test_collector_renders_the_engine_counters_as_they_are() -> None:
    m = ServerMetrics("tiny")
    assert b"kv_tier" not in m.render()  # no tiers: nothing rendered
    m.on_engine_stats(EngineStatsSnapshot(kv_tiers=_tier_snapshot(hits=4)))
    m.on_engine_stats(EngineStatsSnapshot(kv_tiers=_tier_snapshot(hits=5)))  # cumulative, not added up
    samples = {(s.name, s.labels.get("tier")): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
               if s.name.startswith("kvserve:")}
    assert samples[("kvserve:kv_tier_hits_total", TIER)] == 5
    assert samples[("kvserve:kv_tier_misses_total", TIER)] == 5
    assert samples[("kvserve:kv_tier_lookups_total", "1:redis")] == 10
    assert samples[("kvserve:kv_tier_read_bytes_total", TIER)] == 5 * 4096
    assert samples[("kvserve:kv_tier_written_bytes_total", TIER)] == 6 * 4096
    assert samples[("kvserve:kv_tier_corrupt_total", TIER)] == 1
    assert samples[("kvserve:kv_tier_dropped_puts_total", TIER)] == 1
    assert samples[("kvserve:kv_tier_get_seconds_count", TIER)] == 10
    assert samples[("kvserve:kv_tier_get_seconds_sum", TIER)] == pytest.approx(0.02)
    assert samples[("kvserve:kv_tier_put_seconds_sum", TIER)] == pytest.approx(0.03)
    assert samples[("kvserve:kv_tier_capacity_bytes", TIER)] == 1 << 20
    assert ("kvserve:kv_tier_capacity_bytes", "1:redis") not in samples
    assert samples[("kvserve:kv_offload_load_seconds_count", None)] == 3
    assert samples[("kvserve:kv_offload_blocks_used_total", None)] == 4
    assert samples[("kvserve:kv_offload_saves_dropped_total", None)] == 2
    assert samples[("kvserve:num_requests_waiting_for_kv", None)] == 1


# ---------------------------------------------------------------- real server
def _prompts(seed: int = 0) -> list[list[int]]:
    """4 shared 'documents' of 6 blocks, each followed by 4 different questions (token ids)."""
    rng = random.Random(seed)
    docs = [[rng.randrange(1000, 20000) for _ in range(6 * BLOCK)] for _ in range(4)]
    return [doc + [rng.randrange(1000, 20000) for _ in range(rng.randrange(9, 20))] for doc in docs for _ in range(4)]


@pytest.fixture(scope="module")
def tier_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # 28 blocks of 8 tokens hold about 4 of the 16 prompts: the first pass overflows the device cache.
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("tier-logs") / "server.log",
                        "--served-model-name", "tiny", "--kv-tiers", "cpu:64MiB", "--block-size", str(BLOCK),
                        "--num-kv-blocks", "28", "--max-num-seqs", "4")
    srv.wait_ready()
    yield srv
    srv.stop()


def _complete(base_url: str, prompt: list[int]) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    resp = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_tier_hits_and_bytes_on_metrics(tier_server: ServerProcess) -> None:
    url = tier_server.base_url
    prompts = _prompts()
    first = [_complete(url, p) for p in prompts]
    second = [_complete(url, p) for p in prompts]
    assert second == first  # raw codec: blocks from the tier give the same greedy tokens

    def settled() -> dict | None:
        m = get_metrics(url)
        return m if metric(m, "kvserve:kv_tier_hits_total", tier=TIER) > 0 else None

    m = wait_for(settled, what="tier hits on /metrics")
    assert metric(m, "kvserve:kv_tier_read_bytes_total", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_written_bytes_total", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_puts_total", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_lookups_total", tier=TIER) >= metric(m, "kvserve:kv_tier_hits_total", tier=TIER)
    assert metric(m, "kvserve:kv_tier_get_seconds_count", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_get_seconds_sum", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_put_seconds_sum", tier=TIER) > 0
    assert metric(m, "kvserve:kv_tier_capacity_bytes", tier=TIER) == 64 * 2**20
    assert 0 < metric(m, "kvserve:kv_tier_used_bytes", tier=TIER) <= 64 * 2**20
    assert metric(m, "kvserve:kv_tier_corrupt_total", tier=TIER) == 0
    assert metric(m, "kvserve:kv_offload_blocks_used_total") > 0
    assert metric(m, "kvserve:kv_offload_load_seconds_count") > 0
    assert metric(m, "kvserve:kv_offload_errors_total") == 0

    def saves_settled() -> dict | None:
        # Saves finish in the background after the last request; the idle engine still reports them.
        m = get_metrics(url)
        saved = metric(m, "kvserve:kv_offload_blocks_saved_total")
        return m if saved > 0 and saved == metric(m, "kvserve:kv_tier_puts_total", tier=TIER) else None

    wait_for(saves_settled, what="the engine's saves and the tier's puts to agree")


def test_disk_tier_survives_a_restart(model_dir: Path, tmp_path: Path) -> None:
    """The engine process closes the engine on shutdown (queued saves written); a new server finds them."""
    args = ("--served-model-name", "tiny", "--kv-tiers", f"disk:{tmp_path / 'kv'}:64MiB",
            "--kv-offload-policy", "finish", "--block-size", str(BLOCK))
    prompt = _prompts()[0]
    srv = ServerProcess(model_dir, tmp_path / "first.log", *args).wait_ready()
    try:
        first = _complete(srv.base_url, prompt)
    finally:
        assert srv.stop() == 0
    srv = ServerProcess(model_dir, tmp_path / "second.log", *args).wait_ready()
    try:
        assert _complete(srv.base_url, prompt) == first
        m = wait_for(lambda: (lambda m: m if metric(m, "kvserve:kv_tier_hits_total", tier="0:disk") > 0 else None)(
            get_metrics(srv.base_url)), what="disk tier hits")
        assert metric(m, "kvserve:kv_tier_hits_total", tier="0:disk") >= len(prompt) // BLOCK - 1
        assert metric(m, "kvserve:kv_tier_capacity_bytes", tier="0:disk") == 64 * 2**20
    finally:
        srv.stop()


def test_default_server_has_no_tier_metrics(server: ServerProcess) -> None:
    assert "kv_tier" not in httpx.get(server.base_url + "/metrics").text


@pytest.mark.parametrize("spec,fragment", [
    ("cpu:lots", "invalid size 'lots'"),
    ("tape:1GiB", "unknown tier scheme 'tape'"),
])
def test_malformed_kv_tiers_exit_with_one_line(model_dir: Path, spec: str, fragment: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", str(model_dir),
                           "--kv-tiers", spec], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvserve serve: --kv-tiers") and fragment in lines[0]
    assert "Traceback" not in proc.stderr
