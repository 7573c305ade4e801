"""Metric computation on hand-made timings with answers worked out by hand."""
from __future__ import annotations

import pytest

from kvserve.bench.client import RequestResult
from kvserve.bench.errors import BenchInputError
from kvserve.bench.metrics import SLO, summarize


def _ok(i: int, prompt: int, ttft: float, e2el: float, out: int, itl: list[float]) -> RequestResult:
    return RequestResult(i, prompt, out, 0.0, success=True, ttft_s=ttft, e2el_s=e2el, itl_s=itl, output_tokens=out)


@pytest.fixture()
def results() -> list[RequestResult]:
    return [
        _ok(0, 100, 0.1, 1.0, 10, [0.1] * 9),  # TPOT (1.0-0.1)/9 = 0.1
        _ok(1, 200, 0.3, 2.3, 5, [0.5] * 4),  # TPOT (2.3-0.3)/4 = 0.5
        _ok(2, 300, 0.2, 0.2, 1, []),  # one token: no TPOT
        RequestResult(3, 400, 8, 0.0, success=False, error="HTTP 500: boom"),
    ]


def test_counts_and_throughput(results: list[RequestResult]) -> None:
    s = summarize(results, duration_s=4.0)
    assert (s.num_requests, s.completed, s.failed) == (4, 3, 1)
    assert s.errors == {"HTTP 500: boom": 1}
    assert s.total_input_tokens == 600  # failed request's prompt not counted
    assert s.total_output_tokens == 16
    assert s.request_throughput == pytest.approx(0.75)
    assert s.output_throughput == pytest.approx(4.0)
    assert s.total_token_throughput == pytest.approx(154.0)


def test_latency_stats(results: list[RequestResult]) -> None:
    s = summarize(results, duration_s=4.0)
    assert s.ttft is not None and s.tpot is not None and s.itl is not None and s.e2el is not None
    # TTFT [100, 300, 200] ms; linear-interpolated percentiles on sorted [100, 200, 300]
    assert (s.ttft.mean, s.ttft.p50, s.ttft.p90, s.ttft.p99) == pytest.approx((200, 200, 280, 298))
    assert s.ttft.count == 3
    # TPOT [100, 500] ms
    assert (s.tpot.mean, s.tpot.p50, s.tpot.p90, s.tpot.p99) == pytest.approx((300, 300, 460, 496))
    assert s.tpot.count == 2
    # ITL: nine 100 ms gaps and four 500 ms gaps
    assert s.itl.count == 13
    assert s.itl.mean == pytest.approx(2900 / 13)
    assert (s.itl.p50, s.itl.p90) == pytest.approx((100, 500))
    # E2EL [1000, 2300, 200]
    assert (s.e2el.mean, s.e2el.p50, s.e2el.max) == pytest.approx((3500 / 3, 1000, 2300))


def test_goodput_and_attainment(results: list[RequestResult]) -> None:
    # r0 meets both; r1 misses TTFT; r2 meets TTFT and has no TPOT (meets it); r3 failed
    s = summarize(results, 4.0, SLO.parse(["ttft:250", "tpot:200"]))
    assert s.good_requests == 2
    assert s.goodput == pytest.approx(0.5)
    assert s.slo_attainment == pytest.approx(0.5)
    s = summarize(results, 4.0, SLO.parse(["tpot:200"]))  # r1's TPOT 500 misses
    assert s.good_requests == 2
    s = summarize(results, 4.0, SLO.parse(["e2el:2500"]))
    assert s.good_requests == 3 and s.slo_attainment == pytest.approx(0.75)
    s = summarize(results, 4.0, SLO.parse(["ttft:50"]))
    assert s.good_requests == 0 and s.goodput == 0.0


def test_output_length_mismatch_is_counted() -> None:
    r = _ok(0, 10, 0.1, 0.5, 3, [0.2, 0.2])
    r.expected_output_len = 4
    assert summarize([r], 1.0).output_len_mismatches == 1


def test_all_failed_has_no_latencies() -> None:
    s = summarize([RequestResult(0, 5, 5, 0.0, error="x")], 1.0)
    assert s.completed == 0 and s.ttft is None and s.errors == {"x": 1}


@pytest.mark.parametrize("items", [["ttft"], ["foo:1"], ["ttft:abc"], ["tpot:0"], ["e2el:-5"]])
def test_slo_parse_rejects(items: list[str]) -> None:
    with pytest.raises(BenchInputError):
        SLO.parse(items)


def test_slo_parse() -> None:
    assert SLO.parse(["ttft:500", "TPOT:50.5", "e2el:1e4"]) == SLO(500.0, 50.5, 10000.0)
