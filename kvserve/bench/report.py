"""Printing the summary table and writing the JSON result file."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from kvserve.bench.client import RequestResult
from kvserve.bench.metrics import BenchSummary, LatencyStats


def sanitize(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def request_record(r: RequestResult) -> dict[str, Any]:
    return {
        "index": r.index,
        "success": r.success,
        "error": r.error or None,
        "prompt_len": r.prompt_len,
        "expected_output_len": r.expected_output_len,
        "output_tokens": r.output_tokens,
        "token_events": r.token_events,
        "usage_prompt_tokens": r.usage_prompt_tokens,
        "usage_completion_tokens": r.usage_completion_tokens,
        "scheduled_s": r.scheduled_s,
        "start_s": r.start_s,
        "ttft_ms": _ms(r.ttft_s),
        "tpot_ms": _ms(r.tpot_s),
        "e2el_ms": _ms(r.e2el_s),
        "itl_ms": [g * 1e3 for g in r.itl_s],
        "scheduling": r.scheduling,
    }


def rate_label(rate: float | None) -> str:
    if rate is None:
        return "replay"
    return "inf" if math.isinf(rate) else f"{rate:g}"


def write_result_file(
    path: str | Path,
    config: dict[str, Any],
    runs: Sequence[tuple[BenchSummary, Sequence[RequestResult]]],
) -> Path:
    doc = {
        "format": "kvserve-bench-serve/1",
        "config": config,
        "runs": [
            {
                "request_rate": rate_label(s.request_rate),
                "summary": s.to_dict(),
                "requests": [request_record(r) for r in results],
            }
            for s, results in runs
        ],
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(sanitize(doc), indent=1) + "\n")
    return p


def summary_rows(s: BenchSummary) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [
        ("request rate (offered)", rate_label(s.request_rate) + ("" if s.request_rate is None else " req/s")),
        ("requests: completed / failed", f"{s.completed} / {s.failed}"),
        ("duration", f"{s.duration_s:.2f} s"),
        ("input / output tokens", f"{s.total_input_tokens:,} / {s.total_output_tokens:,}"),
        ("request throughput", f"{s.request_throughput:.3f} req/s"),
        ("output token throughput", f"{s.output_throughput:.1f} tok/s"),
        ("total token throughput", f"{s.total_token_throughput:.1f} tok/s"),
    ]
    for name, st in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E latency", s.e2el)):
        rows.append((f"{name} ms mean / p50 / p90 / p99", _fmt_stats(st)))
    if s.slo is not None:
        targets = ", ".join(f"{k[:-3]}<={v:g}ms" for k, v in asdict(s.slo).items() if v is not None)
        rows.append((f"goodput ({targets})", f"{s.goodput:.3f} req/s"))
        rows.append(("SLO attainment", f"{(s.slo_attainment or 0.0) * 100:.1f} %"))
    if s.roofline_bound_s is not None:
        from kvserve.bench.roofline import format_seconds

        frac = f"{s.roofline_fraction * 100:.3g} %" if s.roofline_fraction is not None else "n/a"
        rows.append(("roofline lower bound / fraction reached", f"{format_seconds(s.roofline_bound_s)} / {frac}"))
    if s.output_len_mismatches:
        rows.append(("output length != requested", f"{s.output_len_mismatches} requests"))
    for err, n in list(s.errors.items())[:5]:
        rows.append((f"error x{n}", err[:120]))
    return rows


def _fmt_stats(st: LatencyStats | None) -> str:
    if st is None:
        return "n/a"
    return f"{st.mean:.2f} / {st.p50:.2f} / {st.p90:.2f} / {st.p99:.2f}"


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A two-column table with rich if it is installed, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max((len(k) for k, _ in rows), default=10)
        print(f"==== {title} ====")
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        return
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    for k, v in rows:
        table.add_row(k, v)
    Console(width=max(100, Console().width)).print(table)
