"""`kvserve bench serve` against a real `kvserve serve` (the session's tiny-model server).

tests/unit/bench/test_bench_serve_e2e.py pins the client's arithmetic against a fake server
with known pacing; these tests check that the harness and the real server fit together: every
request succeeds with the requested lengths, the latencies and throughputs are sane, the result
file and the plots are written, and a trace's shared prefixes reach the server's prefix cache.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.harness import REPO, ServerProcess, get_metrics, metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The e2e model is a tiny Llama with the gpt2 tokenizer (vocabulary 50257); stay inside it.
VOCAB = 50000


def bench_serve(base_url: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """`kvserve bench serve` as a user runs it, in its own process."""
    cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", "bench", "serve", "--base-url", base_url,
           "--no-progress", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc


def check_latency(stats: dict[str, Any] | None, count: int, positive: bool = True) -> None:
    assert stats is not None and stats["count"] == count
    # An ITL gap between two chunks read together can be ~0; TTFT, TPOT, E2E never are.
    assert (stats["min"] > 0 if positive else stats["min"] >= 0) and stats["p50"] > 0
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert stats["min"] - 1e-9 <= stats["mean"] <= stats["max"] + 1e-9


def check_run(run: dict[str, Any], num_requests: int) -> None:
    s, reqs = run["summary"], run["requests"]
    assert (s["num_requests"], s["completed"], s["failed"]) == (num_requests, num_requests, 0)
    assert s["errors"] == {} and s["output_len_mismatches"] == 0
    assert len(reqs) == num_requests
    for r in reqs:
        assert r["success"] and r["error"] is None
        # Token-id prompts and ignore_eos: the server's usage matches the workload exactly.
        assert r["output_tokens"] == r["usage_completion_tokens"] == r["expected_output_len"]
        assert r["usage_prompt_tokens"] == r["prompt_len"]
        # One gap per SSE chunk after the first; the server may put several tokens in one chunk
        # (deltas of steps the API process had not sent yet are merged).
        assert 1 <= r["token_events"] <= r["output_tokens"]
        assert len(r["itl_ms"]) == r["token_events"] - 1 and all(g >= 0 for g in r["itl_ms"])
        assert 0 < r["ttft_ms"] <= r["e2el_ms"] and r["tpot_ms"] > 0
        assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2el_ms"] + 1e-6
    assert s["total_input_tokens"] == sum(r["prompt_len"] for r in reqs)
    assert s["total_output_tokens"] == sum(r["expected_output_len"] for r in reqs)
    assert s["duration_s"] > 0
    # Throughput is over the run's duration (first send to last completion).
    assert s["request_throughput"] == s["completed"] / s["duration_s"] > 0
    assert 0 < s["output_throughput"] < s["total_token_throughput"]
    check_latency(s["ttft"], num_requests)
    check_latency(s["tpot"], num_requests)
    check_latency(s["e2el"], num_requests)
    check_latency(s["itl"], sum(len(r["itl_ms"]) for r in reqs), positive=False)
    assert s["ttft"]["p50"] <= s["e2el"]["p50"]


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path


def test_random_workload_two_rates(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "results" / "kvserve.json"
    proc = bench_serve(server.base_url, "--dataset", "random", "--num-prompts", "6",
                       "--input-len", "uniform:8:40", "--output-len", "uniform:4:8", "--vocab-size", str(VOCAB),
                       "--request-rate", "20", "inf", "--max-concurrency", "3", "--seed", "1",
                       "--goodput", "ttft:60000", "e2el:120000", "--result-file", str(out))
    doc = json.loads(out.read_text())
    assert doc["format"] == "kvserve-bench-serve/1"
    assert doc["config"]["model"] == "tiny"  # the first name /v1/models lists
    assert doc["config"]["num_requests"] == 6
    assert [r["request_rate"] for r in doc["runs"]] == ["20", "inf"]
    for run in doc["runs"]:
        check_run(run, 6)
        s = run["summary"]
        assert s["slo_attainment"] == 1.0 and s["good_requests"] == 6 and s["goodput"] > 0
    # Same seed, same workload at both rates.
    lens = [[(r["prompt_len"], r["expected_output_len"]) for r in run["requests"]] for run in doc["runs"]]
    assert lens[0] == lens[1]
    check_png(out.parent / "kvserve-latency-cdf.png")
    check_png(out.parent / "kvserve-rate-sweep.png")
    assert "TTFT" in proc.stdout


def test_trace_with_shared_prefixes_hits_the_prefix_cache(server: ServerProcess, tmp_path: Path) -> None:
    # Mooncake-style trace: hash ids are 16-token blocks (the server's block size), so requests
    # sharing leading hash ids share whole KV blocks.  One at a time, so each finds the last.
    records = [
        {"timestamp": 0, "input_length": 64, "output_length": 4, "hash_ids": [901, 902, 903, 904]},
        {"timestamp": 20, "input_length": 60, "output_length": 5, "hash_ids": [901, 902, 903, 905]},
        {"timestamp": 40, "input_length": 40, "output_length": 3, "hash_ids": [901, 902, 906]},
    ]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "trace.json"
    before = get_metrics(server.base_url)
    bench_serve(server.base_url, "--dataset", "mooncake", "--trace-file", str(trace), "--block-size", "16",
                "--vocab-size", str(VOCAB), "--replay-timestamps", "--max-concurrency", "1",
                "--seed", "7", "--result-file", str(out), "--plot-dir", str(tmp_path / "plots"))
    doc = json.loads(out.read_text())
    (run,) = doc["runs"]
    assert run["request_rate"] == "replay"
    check_run(run, 3)
    assert [r["prompt_len"] for r in run["requests"]] == [64, 60, 40]
    assert [r["expected_output_len"] for r in run["requests"]] == [4, 5, 3]
    check_png(tmp_path / "plots" / "trace-latency-cdf.png")
    assert not (tmp_path / "plots" / "trace-rate-sweep.png").exists()  # one run: no sweep
    # Request 2 shares 3 blocks with request 1, request 3 shares 2 with both.
    after = get_metrics(server.base_url)
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
    assert hits >= (3 + 2) * 16
