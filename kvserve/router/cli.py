"""`kvserve router`: the OpenAI API in front of any number of instances (docs/router.md)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from kvserve.entrypoints.arg_types import bind_socket, configure_logging, port, positive_float, positive_int

logger = logging.getLogger("kvserve.router")

_POLICY_HELP = ("round-robin: in turn; least-load: fewest queued+running requests (scraped from each instance's "
                "/metrics), then lowest KV usage; kv-aware: most cached prefix minus load, from an index of the "
                "instances' KV blocks (default: %(default)s)")


def add_policy_arg(group: Any, flag: str = "--policy", default: str = "round-robin", intro: str = "") -> None:
    """The routing-policy flag, one definition for `kvserve router --policy` and the router that
    `kvserve serve --replicas/--pd` launches (`--router-policy`, kvserve/launch/cli_args.py)."""
    from kvserve.router.policies import policy_names

    group.add_argument(flag, default=default, choices=policy_names(), help=intro + _POLICY_HELP)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "router", help="route OpenAI API requests over several serving instances",
        description="An OpenAI-compatible front for kvserve (or any OpenAI-compatible) instances: picks an "
                    "instance per request (round-robin, least-load or KV-aware), passes streams through "
                    "unchanged, checks health, retries a failed instance elsewhere and exports /metrics.")
    src = p.add_argument_group("instances")
    src.add_argument("--instance", action="append", default=[], metavar="URL",
                     help="a replica, http://HOST:PORT (repeat for more)")
    src.add_argument("--prefill", action="append", default=[], metavar="URL",
                     help="a prefill instance of a prefill/decode split (repeatable; needs --decode). It only "
                          "gets requests while it reports role 'prefill' in its /metrics")
    src.add_argument("--decode", action="append", default=[], metavar="URL",
                     help="a decode instance of a prefill/decode split (repeatable; needs --prefill)")
    net = p.add_argument_group("HTTP")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    net.add_argument("--port", type=port, default=8080, help="port to bind (default: %(default)s)")
    net.add_argument("--max-request-bytes", type=positive_int, default=4 * 2**20, metavar="BYTES",
                     help="largest request body; larger ones get 413 (default: 4 MiB)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log level (default: %(default)s)")
    net.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                     help="log one line per HTTP request (default: off)")
    route = p.add_argument_group("routing")
    add_policy_arg(route)
    route.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="the instances' tokenizer directory (their MODEL_DIR); kv-aware tokenizes prompts "
                            "with it to compute the engine's block hashes")
    route.add_argument("--block-size", type=positive_int, default=16,
                       help="tokens per KV block; must equal the instances' --block-size (default: %(default)s)")
    route.add_argument("--kv-overlap-weight", type=float, default=1.0,
                       help="kv-aware: weight of blocks to compute against blocks in flight (default: %(default)s)")
    route.add_argument("--kv-index-capacity", type=positive_int, default=200_000, metavar="BLOCKS",
                       help="kv-aware: block hashes remembered per instance, least recently used dropped first "
                            "(default: %(default)s)")
    route.add_argument("--kv-index-ttl", type=positive_float, default=300.0, metavar="SECONDS",
                       help="kv-aware: how long a block predicted from a routing decision (not reported by the "
                            "instance) counts as cached (default: %(default)s)")
    route.add_argument("--kv-events", action=argparse.BooleanOptionalAction, default=True,
                       help="kv-aware: follow each instance's KV events (GET /kv_events: the block hashes it "
                            "stored and evicted) into the index, besides the routing predictions (default: on)")
    route.add_argument("--instance-api-key", default=None, metavar="KEY",
                       help="the instances' --api-key, sent on the router's own requests to them (/kv_events); "
                            "clients' requests carry their own (default: $KVSERVE_API_KEY)")
    route.add_argument("--max-attempts", type=positive_int, default=3,
                       help="instances tried per request before giving up (default: %(default)s)")
    health = p.add_argument_group("health checks")
    health.add_argument("--health-interval", type=positive_float, default=2.0, metavar="SECONDS",
                        help="time between checks of each instance's /health and /metrics (default: %(default)s)")
    health.add_argument("--health-timeout", type=positive_float, default=2.0, metavar="SECONDS",
                        help="a check slower than this fails (default: %(default)s)")
    health.add_argument("--unhealthy-after", type=positive_int, default=2, metavar="N",
                        help="failed checks in a row that remove an instance (a failed connection on a request "
                             "removes it at once) (default: %(default)s)")
    health.add_argument("--healthy-after", type=positive_int, default=1, metavar="N",
                        help="good checks in a row that re-admit it (default: %(default)s)")
    health.add_argument("--connect-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                        help="connecting to an instance (default: %(default)s)")
    health.add_argument("--read-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                        help="longest wait for an instance's next byte; a non-streamed answer must come whole "
                             "within it; a timeout is a 504 (default: %(default)s)")
    p.set_defaults(func=run_router)


def config_from_args(args: argparse.Namespace) -> Any:
    from kvserve.router.config import RouterConfig

    return RouterConfig(
        instances=tuple(args.instance), prefill=tuple(args.prefill), decode=tuple(args.decode),
        policy=args.policy, tokenizer=args.tokenizer, block_size=args.block_size,
        health_interval_s=args.health_interval, health_timeout_s=args.health_timeout,
        healthy_after=args.healthy_after, unhealthy_after=args.unhealthy_after, max_attempts=args.max_attempts,
        connect_timeout_s=args.connect_timeout, read_timeout_s=args.read_timeout,
        kv_overlap_weight=args.kv_overlap_weight, kv_index_capacity=args.kv_index_capacity,
        kv_index_ttl_s=args.kv_index_ttl, max_request_bytes=args.max_request_bytes, kv_events=args.kv_events,
        instance_api_key=args.instance_api_key or os.environ.get("KVSERVE_API_KEY") or None)


def run_router(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        if config.policy == "kv-aware" and not config.tokenizer:
            raise ValueError("--policy kv-aware needs --tokenizer DIR (the instances' tokenizer) to hash prompts "
                             "into the engine's block hashes")
    except ValueError as exc:
        sys.stderr.write(f"kvserve router: {exc}\n")
        return 2
    configure_logging(args.log_level)
    if args.log_level != "debug":  # httpx logs every request it sends at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    tokenizer = None
    if config.tokenizer:
        from kvserve.engine.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(config.tokenizer)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"kvserve router: cannot load the tokenizer from {config.tokenizer}: {exc}\n")
            return 2
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        sys.stderr.write(f"kvserve router: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}\n")
        return 1
    import uvicorn

    from kvserve.router.app import build_app
    from kvserve.router.service import Router

    router = Router(config, tokenizer)
    logger.info("routing %s over %d instance(s) with policy %s", "prefill/decode" if config.disaggregated
                else "replicas", len(router.pool), config.policy)
    # Clients keep idle connections open for various times (httpx: 5 s); the router keeps them
    # longer, so a client rarely reuses a connection the router is just closing.
    server = uvicorn.Server(uvicorn.Config(build_app(router), log_level=args.log_level, access_log=args.access_log,
                                           timeout_graceful_shutdown=30, timeout_keep_alive=30))
    with sock:
        server.run(sockets=[sock])
    return 0 if server.started else 1
