"""`kvserve roofline --placement` (bench/placement.py): per-instance goodput and the placement search,
on hand-made costs whose answers are worked out in the comments, and on the roofline bounds."""
from __future__ import annotations

import json

import pytest

from kvserve.bench import placement as pl
from kvserve.bench import roofline as rl
from kvserve.entrypoints.cli import main


def costs(kv_bytes: float = 0.0, max_batch: int = 10_000) -> pl.PhaseCosts:
    # One GPU: prefill 0.1 s; decode step 10 ms + 1 ms per request.  t GPUs: everything t times faster.
    return pl.PhaseCosts(prefill_s=lambda tp: 0.1 / tp, decode_step_s=lambda tp, b: (0.01 + 0.001 * b) / tp,
                         max_batch=lambda tp: max_batch * tp, kv_bytes_per_request=kv_bytes)


def test_prefill_goodput_is_the_md1_bound() -> None:
    # TTFT = D + R D^2 / (2 (1 - R D)) <= 0.3 with D = 0.1: W = 0.2, R <= 2W / (D (D + 2W)) = 0.4 / 0.05 = 8.
    g = pl.prefill_goodput(costs(), pl.Targets(0.3, 0.05, 100), 1)
    assert g.rate == pytest.approx(8.0) and g.limited_by == "ttft"
    d, r = 0.1, g.rate
    assert d + r * d * d / (2 * (1 - r * d)) == pytest.approx(0.3)  # exactly at the target
    # 1 GB of KV over 10 GB/s adds X = 0.1 s: W = 0.1, R = 0.2 / (0.1 * 0.3) = 6.67 (the link allows 10/s).
    g = pl.prefill_goodput(costs(kv_bytes=1e9), pl.Targets(0.3, 0.05, 100, link_bandwidth=10e9), 1)
    assert g.rate == pytest.approx(20 / 3) and g.transfer_s == pytest.approx(0.1) and g.limited_by == "ttft"
    # Over 5 GB/s with TTFT 1 s: W = 0.7, R = 1.4 / 0.15 = 9.33, but the link moves only 5 prompts/s.
    g = pl.prefill_goodput(costs(kv_bytes=1e9), pl.Targets(1.0, 0.05, 100, link_bandwidth=5e9), 1)
    assert g.rate == pytest.approx(5.0) and g.limited_by == "link"
    # Over 2 GB/s the transfer alone (0.5 s) overruns a 0.3 s target.
    g = pl.prefill_goodput(costs(kv_bytes=1e9), pl.Targets(0.3, 0.05, 100, link_bandwidth=2e9), 1)
    assert g.rate == 0 and g.limited_by == "infeasible"


def test_decode_goodput_takes_the_largest_batch_within_tpot() -> None:
    # 0.01 + 0.001 B <= 0.05 -> B = 40, a 0.05 s step; 100 tokens each: 40 / (100 * 0.05) = 8 requests/s.
    g = pl.decode_goodput(costs(), pl.Targets(1.0, 0.05, 100), 1)
    assert (g.batch, g.step_s, g.limited_by) == (40, pytest.approx(0.05), "tpot") and g.rate == pytest.approx(8.0)
    # Only 20 fit in memory: a 0.03 s step, 20 / 3 = 6.67 requests/s.
    g = pl.decode_goodput(costs(max_batch=20), pl.Targets(1.0, 0.05, 100), 1)
    assert (g.batch, g.limited_by) == (20, "memory") and g.rate == pytest.approx(20 / 3)
    # One request's step (11 ms) already misses a 10 ms target.
    assert pl.decode_goodput(costs(), pl.Targets(1.0, 0.01, 100), 1).limited_by == "infeasible"


def test_place_rounds_instances_up_and_prefers_fewer_gpus() -> None:
    t = pl.Targets(0.3, 0.05, 100)
    # 8 requests/s per prefill and per decode instance: 16/s needs exactly 2 + 2, 20/s needs 3 + 3.
    p16, p20 = pl.place(costs(), t, 16.0), pl.place(costs(), t, 20.0)
    assert p16 is not None and (p16.num_prefill, p16.num_decode, p16.gpus) == (2, 2, 4)
    assert p20 is not None and (p20.num_prefill, p20.num_decode, p20.gpus) == (3, 3, 6)
    assert p20.goodput_per_gpu == pytest.approx(20 / 6)
    # Two GPUs per instance: prefill D = 0.05, W = 0.25, R = 0.5 / (0.05 * 0.55) = 18.18/s; decode step
    # 5 ms + 0.5 ms per request: B = 90, 90 / (100 * 0.05) = 18/s.  At 18/s: tp 2 + tp 2 = 1 + 1 instances
    # = 4 GPUs, against 3 + 3 = 6 GPUs at tp 1 (and 5 mixed).
    best = pl.place(costs(), t, 18.0, tp_options=(1, 2))
    assert best is not None and (best.prefill.tp, best.num_prefill, best.decode.tp, best.num_decode) == (2, 1, 2, 1)
    assert best.prefill.rate == pytest.approx(0.5 / (0.05 * 0.55)) and best.decode.rate == pytest.approx(18.0)
    assert best.gpus == 4
    # At large rates: 1 / (1/8 + 1/8) = 4 requests/s per GPU at tp 1; tp 2 + tp 2: 1 / (2/18.18 + 2/18) = 4.52,
    # the best (prefill tp 2 + decode tp 1: 4.26).
    per_gpu, p, d = pl.best_ratio(costs(), t, (1, 2))  # type: ignore[misc]
    assert per_gpu == pytest.approx(1 / (2 / (0.5 / 0.0275) + 2 / 18.0)) and (p.tp, d.tp) == (2, 2)
    # Unreachable targets: no placement.
    assert pl.place(costs(), pl.Targets(0.05, 0.05, 100), 1.0) is None
    with pytest.raises(ValueError):
        pl.place(costs(), t, 0.0)


def test_roofline_costs_are_the_roofline_bounds() -> None:
    m, hw = rl.load_model_spec("llama-3.1-8b"), rl.HW_PRESETS["h100"]
    c = pl.roofline_costs(m, hw, 2048, 256)
    assert c.prefill_s(1) == rl.prefill_bound(m, hw, 2048).time_s
    assert c.decode_step_s(1, 8) == rl.decode_step_bound(m, hw, 8, 2048 + 128).time_s
    assert c.max_batch(1) == rl.max_concurrent_requests(m, hw, 2048 + 256)
    assert c.kv_bytes_per_request == 2048 * m.kv_bytes_per_token(2)
    # The 2048-token prefill is compute-bound: two ideal GPUs halve it.
    assert c.prefill_s(2) == pytest.approx(c.prefill_s(1) / 2)
    # An 8B model in bf16 (16 GB of weights) fits on one 80 GB GPU; more load needs more instances.
    t = pl.Targets(0.5, 0.05, 256, link_bandwidth=rl.LINK_PRESETS["100gbe"])
    low, high = pl.place(c, t, 1.0), pl.place(c, t, 100.0)
    assert low is not None and high is not None and low.gpus == 2 and high.gpus > low.gpus


def test_cli_placement_json_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["roofline", "--config", "llama-3.1-8b", "--hw", "h100", "--placement", "--ttft", "0.5", "--tpot",
            "0.05", "--prompt-len", "2048", "--output-len", "256", "--rates", "1", "100", "--tp", "1", "2",
            "--link-bandwidth", "100gbe", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["rate"] for p in doc["placements"]] == [1.0, 100.0]
    assert doc["placements"][0]["gpus"] == 2 and doc["placements"][1]["gpus"] > 2
    assert main(argv[:-1]) == 0 and "prefill (tp" in capsys.readouterr().out
    assert main(["roofline", "--config", "llama-3.1-8b", "--placement"]) == 2
    assert "--ttft" in capsys.readouterr().err
