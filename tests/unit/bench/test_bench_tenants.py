"""Tenants and SLO classes in `kvserve bench serve`: exact service accounting, the max-min fair
target, request tagging, and the report against the fake server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.bench.errors import BenchInputError
from kvserve.bench.fairness import TenantRequest, fairness_summary, max_min_targets, served_in_window, tenant_stats
from kvserve.bench.tenants import assign, body_fields, parse_slo_classes, parse_tenants


def test_max_min_targets_give_a_tenant_below_its_share_its_demand():
    # Capacity 100: b asks 20 < its half: it gets 20, a gets the other 80.
    assert max_min_targets(100, {"a": 500, "b": 20}, {}) == {"b": 20, "a": 80}
    # Both ask more than half: the weights split it.
    assert max_min_targets(90, {"a": 500, "b": 500}, {"a": 2.0}) == pytest.approx({"a": 60, "b": 30})
    # Three tenants, one small: the other two split the rest equally.
    assert max_min_targets(100, {"a": 500, "b": 500, "c": 10}, {}) == pytest.approx({"c": 10, "a": 45, "b": 45})


def test_service_in_a_window_counts_prompts_at_the_first_token_and_each_output_token():
    reqs = [TenantRequest("a", 0.0, 10, 3, [1.0, 2.0, 3.0]),  # all inside (0.5, 2.5]: prompt + 2 tokens
            TenantRequest("a", 0.0, 7, 2, [0.2, 0.6]),  # first token before the window: 1 token only
            TenantRequest("b", 1.0, 5, 2, [])]  # never started
    assert served_in_window(reqs, 0.5, 2.5) == {"a": (10, 3), "b": (0, 0)}
    stats = tenant_stats(reqs, -1.0, 2.5, censor_at=4.0)
    assert (stats["a"].served, stats["a"].demand) == (10 + 7 + 4, 10 + 3 + 7 + 2)
    assert stats["b"].ttft_p50_s == 3.0  # censored at 4.0: a lower bound
    assert stats["a"].ttft_p50_s == pytest.approx(0.6)  # median of 1.0 and 0.2


def test_fairness_summary_compares_with_the_target_ratio():
    reqs = [TenantRequest("heavy", 0.5, 50, 1, [1.0]), TenantRequest("light", 0.5, 50, 1, [1.0])]
    stats = tenant_stats(reqs, 0.0, 2.0)
    f = fairness_summary(stats, {"heavy": 2.0}, 2.0, "heavy", "light")
    assert f["served_ratio"] == pytest.approx(51 / 51)
    assert f["target_ratio"] == pytest.approx(1.0)  # each asked 51: both got all of it
    assert f["served_tokens_per_s"] == pytest.approx(102 / 2.0)


def test_specs_parse_and_bad_ones_say_why():
    assert parse_tenants("heavy:4, light:1") == [("heavy", 4.0), ("light", 1.0)]
    c = parse_slo_classes("interactive:1:1000/100,batch:2:20000")
    assert [(x.name, x.share, x.ttft_ms, x.tpot_ms) for x in c] == [("interactive", 1.0, 1000.0, 100.0),
                                                                     ("batch", 2.0, 20000.0, None)]
    for bad, msg in (("heavy", "NAME:SHARE"), ("a:0", "must be > 0"), ("a:1,a:2", "twice"), ("a:x", "not a number")):
        with pytest.raises(BenchInputError, match=msg):
            parse_tenants(bad)
    for bad in ("x:1", "x:1:0", "x:1:100/-5", ":1:100"):
        with pytest.raises(BenchInputError):
            parse_slo_classes(bad)


def test_assignment_is_seeded_and_classes_do_not_move_tenants():
    from kvserve.bench.datasets import BenchRequest

    reqs = [BenchRequest(i, [1], 1, 1) for i in range(2000)]
    t1, _ = assign(reqs, "heavy:4,light:1", None, seed=3)
    t2, classes = assign(reqs, "heavy:4,light:1", "interactive:1:1000/100,batch:1:20000", seed=3)
    assert t1 == t2  # adding classes keeps every request's tenant
    light = sum(t == "light" for t in t1.values())
    assert 300 < light < 500  # about a fifth
    body = body_fields(5, t2, classes, ["interactive", "batch"])
    c = classes[5]
    assert body["tenant"] == t2[5] and body["slo_ttft_ms"] == c.ttft_ms
    assert body["priority"] == (0 if c.name == "interactive" else 1)
    assert ("slo_tpot_ms" in body) == (c.name == "interactive")


def test_bench_serve_sends_tenants_and_slos_and_reports_them(cli, fake_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    state = fake_server.state
    state.bodies.clear()
    out = tmp_path / "mix.json"
    common = ["bench", "serve", "--base-url", fake_server.base_url, "--dataset", "random", "--num-prompts", "30",
              "--input-len", "uniform:4:30", "--output-len", "uniform:3:6", "--vocab-size", "500",
              "--request-rate", "200", "--tenants", "heavy:4,light:1", "--no-plots", "--no-progress"]
    rc = cli(common + ["--slo-classes", "interactive:1:1000/100,batch:1:20000", "--result-file", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    tenants_sent = [b["tenant"] for b in state.bodies]
    assert sorted(tenants_sent) == sorted(r["scheduling"]["tenant"] for r in run["requests"])
    assert {"heavy", "light"} == set(tenants_sent)
    assert all(b["slo_ttft_ms"] in (1000.0, 20000.0) and b["priority"] in (0, 1) for b in state.bodies)
    t = run["summary"]["tenants"]["tenants"]
    assert t["heavy"]["requests"] + t["light"]["requests"] == 30
    assert t["light"]["requests"] == tenants_sent.count("light")
    assert t["light"]["ttft_p50_s"] > 0.9 * state.prefill_delay_s
    c = run["summary"]["slo_classes"]
    assert sum(x["requests"] for x in c["classes"].values()) == 30
    # Each request meets its own class's targets (recomputed from its record and sent fields).
    met = [r["ttft_ms"] <= r["scheduling"]["slo_ttft_ms"]
           and (r["tpot_ms"] is None or r["tpot_ms"] <= r["scheduling"].get("slo_tpot_ms", float("inf")))
           for r in run["requests"]]
    assert c["good_requests"] == sum(met)
    assert c["classes"]["batch"]["met"] == sum(m for m, r in zip(met, run["requests"])
                                               if r["scheduling"]["slo_ttft_ms"] == 20000.0)
    # The light tenant alone: only its requests, at the same send times as in the mix.
    state.bodies.clear()
    alone = tmp_path / "alone.json"
    assert cli(common + ["--only-tenant", "light", "--result-file", str(alone)]) == 0
    arun = json.loads(alone.read_text())["runs"][0]
    assert [b["tenant"] for b in state.bodies] == ["light"] * t["light"]["requests"]
    mixed_light = sorted(r["scheduled_s"] for r in run["requests"] if r["scheduling"]["tenant"] == "light")
    assert sorted(r["scheduled_s"] for r in arun["requests"]) == pytest.approx(mixed_light)
    assert cli(common + ["--only-tenant", "nobody"]) != 0


def test_length_scale_scales_trace_lengths_and_keeps_failed_rows_failed():
    from kvserve.bench.serve import scale_lengths
    from kvserve.bench.traces import TraceRecord

    recs = [TraceRecord(0.0, 1000, 250), TraceRecord(1.0, 3, 0), TraceRecord(2.0, 4, 1)]
    assert [(r.input_len, r.output_len) for r in scale_lengths(recs, 0.1)] == [(100, 25), (1, 0), (1, 1)]
    with pytest.raises(BenchInputError, match="prefix blocks"):
        scale_lengths([TraceRecord(0.0, 1024, 2, hash_ids=(1, 2))], 0.5)
    with pytest.raises(BenchInputError, match="positive"):
        scale_lengths(recs, 0.0)
