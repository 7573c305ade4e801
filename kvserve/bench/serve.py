"""`kvserve bench serve`: drive an OpenAI-compatible server with a workload and report.

Steps: build the workload (datasets.py) -> check the server answers (client.discover_model) ->
for each request rate: send times (arrivals.py), run (client.run_requests), summarize
(metrics.py) -> print tables, write the JSON result file and PNG plots.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from kvserve.bench import tenants
from kvserve.bench.arrivals import replay_send_times, synthetic_send_times
from kvserve.bench.client import RequestResult, discover_model, normalize_base_url, run_requests
from kvserve.bench.datasets import BenchRequest, LengthDist, random_requests, sharegpt_requests, trace_requests
from kvserve.bench.errors import BenchInputError
from kvserve.bench.metrics import SLO, BenchSummary, summarize
from kvserve.bench.paths import DATASETS, default_file
from kvserve.bench.report import print_table, summary_rows, write_result_file
from kvserve.bench.tokens import IdsRenderer, Renderer, TextRenderer, load_tokenizer, tokenizer_vocab_size
from kvserve.bench.traces import READERS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_renderer(prompt_format: str, tokenizer: Any | None, vocab_size: int) -> Renderer:
    if prompt_format == "text":
        if tokenizer is None:
            raise BenchInputError("--prompt-format text needs --tokenizer (a local HF tokenizer directory)")
        return TextRenderer(tokenizer)
    if tokenizer is not None:
        special = frozenset(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
        return IdsRenderer(tokenizer_vocab_size(tokenizer), exclude=special)
    return IdsRenderer(vocab_size)


def build_workload(args: argparse.Namespace) -> list[BenchRequest]:
    """The requests for `args.dataset`, with messages about anything skipped."""
    dataset = args.dataset
    path = Path(args.trace_file) if args.trace_file else None
    if dataset == "trace" and path is None:
        raise BenchInputError("--dataset trace needs --trace-file PATH")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None

    if dataset == "sharegpt":
        if tokenizer is None:
            raise BenchInputError("--dataset sharegpt needs --tokenizer to count (and, with ids, encode) prompt tokens")
        return sharegpt_requests(
            path or default_file("sharegpt"), args.num_prompts, tokenizer, LengthDist.parse(args.output_len),
            args.prompt_format, args.seed, args.max_input_len,
        )

    renderer = make_renderer(args.prompt_format, tokenizer, args.vocab_size)
    if dataset == "random":
        return random_requests(
            args.num_prompts, LengthDist.parse(args.input_len), LengthDist.parse(args.output_len), renderer, args.seed
        )

    file = path or default_file(dataset)
    records = READERS[dataset](file)
    if args.length_scale is not None:
        records = scale_lengths(records, args.length_scale)
    requests, skipped = trace_requests(records, args.num_prompts, renderer, args.seed, args.block_size, str(file))
    if skipped:
        _log(f"note: skipped {skipped} row(s) of {file} with 0 input or output tokens (failed in the original trace)")
    if isinstance(renderer, TextRenderer) and renderer.repaired:
        _log(f"note: {renderer.repaired} text prompt(s) did not round-trip exactly; their lengths are exact "
             f"but shared prefixes may differ")
    return requests


def scale_lengths(records: list[Any], factor: float) -> list[Any]:
    """--length-scale: each record's input and output lengths times `factor`, at least 1 (0 stays 0:
    a failed trace row stays skipped).  Mooncake rows name their prefix blocks, so they cannot be scaled."""
    if not (factor > 0 and math.isfinite(factor)):
        raise BenchInputError(f"--length-scale must be a positive number, got {factor}")
    if any(r.hash_ids for r in records):
        raise BenchInputError("--length-scale does not apply to traces with prefix blocks (hash_ids: mooncake)")

    def f(n: int) -> int:
        return max(1, round(n * factor)) if n > 0 else 0

    return [dataclasses.replace(r, input_len=f(r.input_len), output_len=f(r.output_len)) for r in records]


def parse_rates(values: Sequence[str] | None) -> list[float]:
    rates: list[float] = []
    for v in values or ["inf"]:
        try:
            r = float(v)
        except ValueError:
            raise BenchInputError(f"--request-rate values must be numbers or inf, got {v!r}") from None
        if not r > 0:
            raise BenchInputError(f"--request-rate must be > 0, got {v!r}")
        rates.append(r)
    return rates


def _roofline(args: argparse.Namespace) -> tuple[Any, Any, float, float] | None:
    if not args.roofline_config:
        return None
    from kvserve.bench import roofline as rl

    spec = rl.load_model_spec(args.roofline_config)
    hw = rl.resolve_hardware(args.hw)
    w = rl.dtype_bytes(args.dtype)
    kv = rl.dtype_bytes(args.kv_dtype) if args.kv_dtype else w
    return spec, hw, w, kv


def _attach_roofline(summary: BenchSummary, results: Sequence[RequestResult], roof: tuple[Any, Any, float, float]) -> None:
    from kvserve.bench import roofline as rl

    spec, hw, w, kv = roof
    tokens = [(r.prompt_len, r.output_tokens) for r in results if r.success]
    if not tokens:
        return
    bound = rl.workload_bound(spec, hw, tokens, w, kv)
    summary.roofline_bound_s = bound.time_s
    summary.roofline_fraction = rl.fraction_of_bound(bound.time_s, summary.duration_s)


def _run_once(
    args: argparse.Namespace, base_url: str, model: str, requests: list[BenchRequest], send_times: list[float],
    label: str,
) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    bar = tqdm(total=len(requests), desc=f"bench {label}", unit="req", disable=args.no_progress, file=sys.stderr)
    try:
        return asyncio.run(
            run_requests(
                base_url, model, requests, send_times, args.max_concurrency,
                json.loads(args.extra_body) if args.extra_body else None, args.request_timeout,
                on_done=lambda _r: bar.update(1),
            )
        )
    finally:
        bar.close()


def _only_tenant(args: argparse.Namespace, requests: list[BenchRequest], times: list[float],
                 tenant_of: dict[int, str]) -> tuple[list[BenchRequest], list[float]]:
    """--only-tenant: that tenant's requests at their send times in the mixed workload."""
    if not args.only_tenant:
        return requests, times
    kept = [(q, t) for q, t in zip(requests, times) if tenant_of.get(q.index) == args.only_tenant]
    if not kept:
        raise BenchInputError(f"--only-tenant {args.only_tenant!r}: no request has that tenant (see --tenants)")
    return [q for q, _ in kept], [t for _, t in kept]


def run_serve(args: argparse.Namespace) -> int:
    base_url = normalize_base_url(args.base_url)
    if args.extra_body:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise BenchInputError(f"--extra-body must be a JSON object: {exc}") from None
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchInputError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise BenchInputError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.replay_timestamps and args.request_rate:
        raise BenchInputError("use either --replay-timestamps or --request-rate, not both")
    if args.length_scale is not None and args.dataset in ("random", "sharegpt"):
        raise BenchInputError("--length-scale applies to trace datasets; set --input-len/--output-len instead")
    if args.only_tenant and not args.tenants:
        raise BenchInputError("--only-tenant needs --tenants (the mix it is taken from)")
    if args.tenants:
        tenants.parse_tenants(args.tenants)  # bad specs fail before the server is contacted
    if args.slo_classes:
        tenants.parse_slo_classes(args.slo_classes)
    slo = SLO.parse(args.goodput) if args.goodput else None
    rates = parse_rates(args.request_rate)
    roof = _roofline(args)

    model = asyncio.run(discover_model(base_url, args.model))  # fail fast if the server is down
    requests = build_workload(args)
    tenant_of, class_of = tenants.assign(requests, args.tenants, args.slo_classes, args.seed)
    order = [c.name for c in tenants.parse_slo_classes(args.slo_classes)] if args.slo_classes else []
    for r in requests:
        r.body = tenants.body_fields(r.index, tenant_of, class_of, order) or None
    _log(f"benchmarking {base_url} model={model!r}: {len(requests)} requests from {args.dataset}")

    runs: list[tuple[BenchSummary, list[RequestResult]]] = []
    if args.replay_timestamps:
        schedules: list[tuple[float | None, list[float]]] = [
            (None, replay_send_times([r.timestamp_s for r in requests], args.time_scale))
        ]
    else:
        schedules = [(r, synthetic_send_times(len(requests), r, args.burstiness, args.seed)) for r in rates]
    for rate, times in schedules:
        label = "replay" if rate is None else f"rate={'inf' if math.isinf(rate) else f'{rate:g}'}"
        sent, times = _only_tenant(args, requests, times, tenant_of)
        results, duration = _run_once(args, base_url, model, sent, times, label)
        summary = summarize(results, duration, slo)
        summary.request_rate = rate
        if roof is not None:
            _attach_roofline(summary, results, roof)
        if tenant_of:
            summary.tenants = tenants.tenant_report(results, sent, tenant_of, times, weights=args.tenant_weights)
        if class_of:
            summary.slo_classes = tenants.class_report(results, class_of, duration)
        runs.append((summary, results))
        print_table(f"kvserve bench serve: {args.dataset}, {label}",
                    summary_rows(summary) + tenants.report_rows(summary.tenants, summary.slo_classes))

    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(base_url=base_url, model=model, num_requests=len(requests))
    if args.result_file:
        out = write_result_file(args.result_file, config, runs)
        _log(f"wrote {out}")
    _write_plots(args, runs)

    failed_runs = [s for s, _ in runs if s.completed == 0]
    if failed_runs:
        first = next(iter(failed_runs[0].errors), "unknown error")
        _log(f"error: every request failed in {len(failed_runs)} run(s); first error: {first}")
        return 1
    return 0


def _write_plots(args: argparse.Namespace, runs: list[tuple[BenchSummary, list[RequestResult]]]) -> None:
    if args.no_plots:
        return
    plot_dir = Path(args.plot_dir) if args.plot_dir else (Path(args.result_file).parent if args.result_file else None)
    if plot_dir is None:
        return
    from kvserve.bench.plots import plot_latency_cdfs, plot_rate_sweep
    from kvserve.bench.report import rate_label

    stem = Path(args.result_file).stem if args.result_file else "bench-serve"
    cdf = plot_latency_cdfs([(f"rate {rate_label(s.request_rate)}", r) for s, r in runs],
                            plot_dir / f"{stem}-latency-cdf.png")
    _log(f"wrote {cdf}")
    if len(runs) > 1:
        sweep = plot_rate_sweep([s for s, _ in runs], plot_dir / f"{stem}-rate-sweep.png")
        _log(f"wrote {sweep}")
