"""Benchmark harness: workloads, trace readers, an SSE client, metrics, plots and a roofline model.

Modules, one job each:
  errors.py    BenchInputError: bad input reported as one clear line (file, line, URL)
  paths.py     where the shared data directory is
  traces.py    readers for Azure / Mooncake / BurstGPT / custom traces -> TraceRecord
  tokens.py    token-id and text prompt synthesis (incl. exact-length text via a tokenizer)
  datasets.py  random / sharegpt / trace datasets -> BenchRequest
  arrivals.py  Poisson / gamma / replayed send times
  client.py    async httpx client for streaming /v1/completions -> RequestResult
  metrics.py   TTFT / TPOT / ITL / E2EL statistics, throughput, goodput
  report.py    summary table and JSON result file
  plots.py     latency CDFs and rate-sweep plots (matplotlib, Agg)
  serve.py     `kvserve bench serve` orchestration
  offline.py   `kvserve bench offline`: in-process engine vs HF transformers
  roofline.py  analytical lower bounds (Fu 2024) from a model config and a hardware spec
  hw_probe.py  measure this machine's fp32 matmul FLOP/s and memory bandwidth
  cli.py       argparse wiring for `bench serve|offline`, `roofline`, `hw-probe`
"""
