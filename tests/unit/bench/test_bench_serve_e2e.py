"""`kvserve bench serve` end to end against a fake OpenAI-compatible SSE server on 127.0.0.1."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from .fake_openai_server import FAIL_HTTP, FAIL_MID_STREAM


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_random_sweep_writes_json_and_pngs(cli, fake_server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    fake_server.state.bodies.clear()
    out = tmp_path / "res" / "run.json"
    rc = cli([
        "bench", "serve", "--base-url", fake_server.base_url + "/v1", "--dataset", "random",
        "--num-prompts", "12", "--input-len", "uniform:4:30", "--output-len", "uniform:3:6",  # avoids the failure-triggering lengths 7, 13
        "--vocab-size", "500", "--request-rate", "100", "inf", "--max-concurrency", "6",
        "--goodput", "ttft:2000", "e2el:5000", "--result-file", str(out), "--no-progress",
        "--roofline-config", "qwen2.5-0.5b", "--hw", "h100",
    ])
    assert rc == 0
    doc = _load(out)
    assert doc["config"]["model"] == "fake-model"  # discovered from /v1/models
    assert [r["request_rate"] for r in doc["runs"]] == ["100", "inf"]
    state = fake_server.state
    assert len(state.bodies) == 24
    for run in doc["runs"]:
        s = run["summary"]
        assert (s["completed"], s["failed"]) == (12, 0)
        assert s["output_len_mismatches"] == 0
        assert s["roofline_bound_s"] > 0 and 0 < s["roofline_fraction"] < 1
        assert s["slo_attainment"] == pytest.approx(1.0)
        assert s["total_output_tokens"] == sum(r["expected_output_len"] for r in run["requests"])
        for r in run["requests"]:
            assert r["success"] and r["output_tokens"] == r["expected_output_len"]
            assert len(r["itl_ms"]) == r["output_tokens"] - 1
            # the fake server waits 20 ms before the first token and 5 ms between tokens
            assert r["ttft_ms"] >= state.prefill_delay_s * 1e3 * 0.95
            assert r["ttft_ms"] + sum(r["itl_ms"]) <= r["e2el_ms"] + 1e-6
        # One gap can shrink when the client's event loop reads two chunks late, but the average
        # cannot fall below the server's pacing.
        gaps = [g for r in run["requests"] for g in r["itl_ms"]]
        assert sum(gaps) / len(gaps) >= state.token_delay_s * 1e3 * 0.9
    # The requests carried token ids, max_tokens and ignore_eos, with lengths as recorded.
    by_len = sorted(len(b["prompt"]) for b in state.bodies[:12])
    assert by_len == sorted(r["prompt_len"] for r in doc["runs"][0]["requests"])
    assert all(b["ignore_eos"] is True and b["stream"] is True for b in state.bodies)
    assert all(isinstance(t, int) and 0 <= t < 500 for b in state.bodies for t in b["prompt"])
    # At most 6 in flight: scheduled at t=0 (inf rate) but 6 later ones start after earlier finish.
    inf_run = doc["runs"][1]["requests"]
    assert sorted(r["start_s"] for r in inf_run)[6] > min(r["ttft_ms"] for r in inf_run) / 1e3
    for png in ("run-latency-cdf.png", "run-rate-sweep.png"):
        data = (out.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "goodput" in printed


def test_failures_are_counted_with_their_error(cli, fake_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace.csv"
    rows = [(0.0, 5, 4), (0.01, 6, FAIL_HTTP), (0.02, 7, 3), (0.03, 8, FAIL_MID_STREAM), (0.04, 9, 2)]
    trace.write_text("timestamp,input_length,output_length\n" + "".join(f"{t},{i},{o}\n" for t, i, o in rows))
    out = tmp_path / "fail.json"
    rc = cli(["bench", "serve", "--base-url", fake_server.base_url, "--dataset", "trace", "--trace-file",
              str(trace), "--replay-timestamps", "--time-scale", "2", "--vocab-size", "100",
              "--result-file", str(out), "--no-plots", "--no-progress"])
    assert rc == 0  # some requests succeeded; failures are reported, not fatal
    run = _load(out)["runs"][0]
    assert run["request_rate"] == "replay"
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["errors"] == {"HTTP 500: injected failure": 1, "stream error: injected stream error": 1}
    reqs = run["requests"]
    assert [r["scheduled_s"] for r in reqs] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    assert [r["success"] for r in reqs] == [True, False, True, False, True]
    assert not (tmp_path / "fail-latency-cdf.png").exists()


def test_all_failed_exits_nonzero(cli, fake_server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"input_length": 4, "output_length": FAIL_HTTP}) + "\n" for _ in range(3)))
    rc = cli(["bench", "serve", "--base-url", fake_server.base_url, "--dataset", "trace", "--trace-file",
              str(trace), "--vocab-size", "100", "--no-progress"])
    assert rc == 1
    assert "every request failed" in capsys.readouterr().err


def test_text_prompts_and_mooncake(cli, fake_server, tmp_path: Path, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    from kvserve.bench.tokens import load_tokenizer

    fake_server.state.bodies.clear()
    trace = tmp_path / "mc.jsonl"
    recs = [{"timestamp": 0, "input_length": 40, "output_length": 3, "hash_ids": [1, 2, 3]},
            {"timestamp": 5, "input_length": 35, "output_length": 2, "hash_ids": [1, 2, 9]}]
    trace.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "mc.json"
    tok_dir = shared_data / "tokenizers/gpt2"
    rc = cli(["bench", "serve", "--base-url", fake_server.base_url, "--dataset", "mooncake", "--trace-file",
              str(trace), "--block-size", "16", "--prompt-format", "text", "--tokenizer", str(tok_dir),
              "--result-file", str(out), "--no-plots", "--no-progress"])
    assert rc == 0
    tok = load_tokenizer(tok_dir)
    # rate=inf sends both at once, so the server may see them in either order: sort by length.
    ids = sorted((tok.encode(b["prompt"], add_special_tokens=False) for b in fake_server.state.bodies),
                 key=len, reverse=True)
    assert [len(x) for x in ids] == [40, 35]
    assert ids[0][:32] == ids[1][:32] and ids[0][32] != ids[1][32]  # two shared 16-token blocks


def test_unreachable_server(cli, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rc = cli(["bench", "serve", "--base-url", url, "--num-prompts", "2", "--no-progress",
              "--result-file", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and url in err and "cannot reach server" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_broken_trace_message(cli, fake_server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "azure.csv"
    bad.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46.6805900,374,44\r\n"
                    b"2023-11-16 18:15:47.0000000,,44\r\n")
    rc = cli(["bench", "serve", "--base-url", fake_server.base_url, "--dataset", "azure-conv", "--trace-file",
              str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:3:" in err and "ContextTokens" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--request-rate", "0"], "--request-rate"),
        (["--goodput", "ttft"], "--goodput"),
        (["--input-len", "uniform:9:3"], "length distribution"),
        (["--dataset", "trace"], "--trace-file"),
        (["--dataset", "sharegpt"], "--tokenizer"),
        (["--extra-body", "[1]"], "--extra-body"),
        (["--replay-timestamps", "--request-rate", "5"], "either"),
    ],
)
def test_bad_arguments(cli, fake_server, capsys, args: list[str], fragment: str) -> None:  # type: ignore[no-untyped-def]
    rc = cli(["bench", "serve", "--base-url", fake_server.base_url, "--num-prompts", "2", "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err
