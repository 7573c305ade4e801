"""The engine process: `LLMEngine`'s step loop behind two pipes.

Runs in a child started with multiprocessing's "spawn" method (see
async_engine.py).  Between steps it takes every command the API process has
sent (add, abort, shutdown); after each step it sends one `StepOutputs` with
the per-request deltas of that step and a stats snapshot.  When idle it
blocks on the input pipe, so an idle server uses no CPU (with KV offload
tiers, only once their background loads and saves are done: until then it
wakes every _TIER_STATS_INTERVAL_S to send their counters).  On exit it
closes the engine, so queued KV saves reach the tiers.

Invariants:
  * the loop never dies of a request: a rejected add becomes an error delta
    for that request, a failing step fails the requests in the engine and
    the loop goes on;
  * the process exits when told to (Shutdown) or when the API process is gone
    (EOF on the input pipe, broken output pipe) - never on SIGINT/SIGTERM,
    which belong to the API process so that it can drain in-flight requests.
"""
from __future__ import annotations

import importlib
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

from kvserve.engine.engine_ipc import (
    AbortRequests, AddRequest, EngineInfo, EngineStatsSnapshot, PositionLogprobs, Ready, RequestDelta,
    SampleDelta, Shutdown, StartupFailed, StepOutputs, dumps, loads,
)
from kvserve.outputs import Logprob, RequestOutput

logger = logging.getLogger("kvserve.engine_process")

DEFAULT_ENGINE_FACTORY = "kvserve.engine.llm_engine:LLMEngine"

# When the engine has work but nothing could be scheduled (and so nothing
# changed), wait this long before trying again instead of spinning.
_NO_PROGRESS_SLEEP_S = 0.001
# KV tier counters are read at most this often while the engine is busy (every
# idle iteration reads them); an idle engine whose tier I/O threads are still
# loading or saving wakes this often to report their progress.
_TIER_STATS_INTERVAL_S = 0.5
# On shutdown the engine writes queued KV saves and its cached device blocks to the persistent
# tiers for at most this long: under the API process's wait for the engine to exit
# (AsyncEngine.shutdown, 10 s), after which it kills the engine.
ENGINE_CLOSE_TIMEOUT_S = 8.0


@dataclass
class EngineProcessConfig:
    """How to build the engine in the child: `factory(**engine_kwargs)`.

    `engine_factory` is "module:attribute" so that tests can substitute an
    engine with injected faults; it must produce an object with LLMEngine's verbs
    (add_request, abort, step, has_unfinished_requests, engine_info,
    stats_snapshot, request_ids, kv_tier_io_pending; kv_tier_stats and close
    optional).  The loop uses only these, never the engine's insides.
    """

    engine_kwargs: dict[str, Any]
    engine_factory: str = DEFAULT_ENGINE_FACTORY
    log_level: int = logging.INFO
    # Send the prefix cache's stored/removed block hashes with each step (the engine's
    # enable_kv_events / take_kv_events verbs; routers read them, entrypoints/openai/kv_events.py).
    kv_events: bool = False
    # Environment the child starts with where the user has not set the variable.  OpenMP
    # threads that spin while they wait (the default) burn the CPU the API process needs
    # every step, and collapse when the cores are oversubscribed (measured on 2 shared
    # cores: 5x lower throughput, 4.7x more CPU per token); passive waiting costs a futex
    # wake-up per parallel region instead.  A bounded spin (GOMP_SPINCOUNT, libgomp's, which
    # PyTorch's CPU wheels use) covers the microsecond gaps between the ops of one forward
    # pass and sleeps in the engine's Python work between steps: on 2 cores it raised HTTP
    # throughput from 84% to 94% of the offline engine and cut idle TTFT from 82 to 66 ms
    # (benchmarks/server_overhead.py, docs/benchmarks.md).
    env_defaults: dict[str, str] = field(default_factory=lambda: {"OMP_WAIT_POLICY": "PASSIVE",
                                                                  "GOMP_SPINCOUNT": "10000"})


def load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"engine factory must be 'module:attribute', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    if not callable(factory):
        raise ValueError(f"engine factory {spec!r} is not callable")
    return factory  # type: ignore[no-any-return]


def run_engine_process(config: EngineProcessConfig, in_conn: Connection, out_conn: Connection) -> None:
    """Child process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s")
    try:
        engine = load_factory(config.engine_factory)(**config.engine_kwargs)
    except BaseException as exc:  # noqa: BLE001 - report any startup failure to the parent
        logger.exception("engine failed to start")
        _send_quietly(out_conn, StartupFailed(f"{type(exc).__name__}: {exc}"))
        return
    kv_events = config.kv_events and hasattr(engine, "take_kv_events")
    if kv_events:
        engine.enable_kv_events()  # before the first request: the API side starts from an empty cache
    elif config.kv_events:
        logger.warning("the engine (%s) has no take_kv_events verb: no KV events are sent", config.engine_factory)
    info = EngineInfo(**engine.engine_info(), pid=os.getpid())
    if not _send_quietly(out_conn, Ready(info)):
        return
    try:
        EngineLoop(engine, in_conn, out_conn, kv_events=kv_events).run()
    finally:
        # Queued KV saves and the still-cached device blocks reach the persistent tiers
        # (a restarted server finds them), within ENGINE_CLOSE_TIMEOUT_S.
        close = getattr(engine, "close", None)
        if close is not None:
            try:
                close(timeout=ENGINE_CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - exiting anyway
                logger.exception("closing the engine failed")


def _send_quietly(conn: Connection, msg: Any) -> bool:
    try:
        conn.send_bytes(dumps(msg))
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _entries(position: dict[int, Logprob]) -> PositionLogprobs:
    # The output processor builds these dicts most-likely-first; keep that order.
    return [(tid, lp.logprob, lp.rank, lp.decoded_token or "") for tid, lp in position.items()]


class DeltaTracker:
    """Turns cumulative `RequestOutput`s into deltas (what is new since the last send).

    Relies on the output processor's invariant that a sample's visible text
    and token ids only grow (stop-string candidates are held back, never
    retracted), so a delta is always a suffix.
    """

    def __init__(self) -> None:
        # request id -> sample index -> [tokens sent, chars sent, finish sent (0/1)]
        self._sent: dict[str, dict[int, list[int]]] = {}
        self._prompt_logprobs_sent: set[str] = set()

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
        self._prompt_logprobs_sent.discard(request_id)

    def delta(self, out: RequestOutput) -> RequestDelta:
        sent = self._sent.setdefault(out.request_id, {})
        samples = []
        for c in out.outputs:
            state = sent.setdefault(c.index, [0, 0, 0])
            num_tokens, num_chars, finish_sent = state
            if finish_sent:
                continue
            new_ids = c.token_ids[num_tokens:]
            if len(c.text) < num_chars:  # would break the invariant above; never expected
                logger.error("request %s sample %d: text shrank from %d to %d chars", out.request_id,
                             c.index, num_chars, len(c.text))
            new_text = c.text[num_chars:]
            if not new_ids and not new_text and c.finish_reason is None:
                continue
            logprobs = None
            if c.logprobs is not None:
                logprobs = [_entries(p) for p in c.logprobs[num_tokens:num_tokens + len(new_ids)]]
            samples.append(SampleDelta(c.index, new_text, list(new_ids), logprobs, c.finish_reason, c.stop_reason))
            state[0] = num_tokens + len(new_ids)
            state[1] = max(num_chars, len(c.text))
            state[2] = int(c.finish_reason is not None)
        delta = RequestDelta(out.request_id, samples, out.finished, out.num_cached_tokens, error=out.error,
                             kv_transfer_params=getattr(out, "kv_transfer_params", None) if out.finished else None)
        if out.prompt_logprobs is not None and out.request_id not in self._prompt_logprobs_sent:
            self._prompt_logprobs_sent.add(out.request_id)
            delta.prompt_logprobs = [None if p is None else _entries(p) for p in out.prompt_logprobs]
        if out.finished:
            self.forget(out.request_id)
        return delta


class EngineLoop:
    def __init__(self, engine: Any, in_conn: Connection, out_conn: Connection, kv_events: bool = False) -> None:
        self.engine = engine
        self.kv_events = kv_events
        self.in_conn = in_conn
        self.out_conn = out_conn
        self.tracker = DeltaTracker()
        self.pending: list[RequestDelta] = []  # rejections to send with the next message
        self.num_step_failures = 0
        self._last_stats: Optional[EngineStatsSnapshot] = None
        self._tier_stats: Optional[dict[str, Any]] = None
        self._tier_stats_at = float("-inf")
        self._tier_io_pending = False

    def run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                commands = self._receive(0 if busy else self._idle_wait_s())
            except (EOFError, OSError):
                logger.info("API process is gone; engine exits")
                return
            if self._apply(commands):
                logger.info("engine shut down")
                return
            deltas, self.pending = self.pending, []
            if self.engine.has_unfinished_requests():
                deltas.extend(self._step())
            # Checked before the stats are read: once nothing is pending, the stats are final.
            self._tier_io_pending = self._kv_tier_io_pending()
            stats = self._stats(fresh_tier_stats=not self.engine.has_unfinished_requests())
            events = self._take_kv_events()
            if deltas or commands or events or stats != self._last_stats:
                self._last_stats = stats
                if not _send_quietly(self.out_conn, StepOutputs(deltas, stats, events or None)):
                    logger.info("API process is gone; engine exits")
                    return
            elif busy:
                time.sleep(_NO_PROGRESS_SLEEP_S)

    def _idle_wait_s(self) -> Optional[float]:
        """How long an idle loop waits for a command: until one comes, unless tier I/O is under way."""
        return _TIER_STATS_INTERVAL_S if self._tier_io_pending else None

    def _receive(self, timeout: Optional[float]) -> list[Any]:
        """Every command sent so far, after waiting up to `timeout` s (None: forever) for one."""
        if timeout != 0:
            self.in_conn.poll(timeout)  # wakes on data or EOF (then recv raises EOFError)
        commands: list[Any] = []
        while self.in_conn.poll(0):
            commands.extend(loads(self.in_conn.recv_bytes()))
        return commands

    def _apply(self, commands: list[Any]) -> bool:
        """Apply commands in order; True when told to shut down."""
        for cmd in commands:
            if isinstance(cmd, AddRequest):
                self._add(cmd)
            elif isinstance(cmd, AbortRequests):
                for rid in cmd.request_ids:
                    try:
                        self.engine.abort(rid)
                    except Exception:  # noqa: BLE001 - an abort must not take the loop down
                        logger.exception("abort of %s failed", rid)
                    self.tracker.forget(rid)
            elif isinstance(cmd, Shutdown):
                return True
            else:
                logger.error("unknown command %r ignored", type(cmd).__name__)
        return False

    def _add(self, cmd: AddRequest) -> None:
        prompt: dict[str, Any] = {"prompt_token_ids": cmd.prompt_token_ids, "prompt": cmd.prompt_text}
        if cmd.segment_lens is not None:  # CacheBlend: the same tokens, as segments
            starts = list(itertools.accumulate(cmd.segment_lens, initial=0))
            prompt = {"segments": [cmd.prompt_token_ids[a:b] for a, b in zip(starts, starts[1:])]}
        try:
            self.engine.add_request(prompt, cmd.params, request_id=cmd.request_id,
                                    arrival_time=cmd.arrival_time, priority=cmd.priority,
                                    tenant=cmd.tenant, slo=cmd.slo,
                                    **({"kv_transfer_params": cmd.kv_transfer_params}
                                       if cmd.kv_transfer_params is not None else {}))
        except Exception as exc:  # noqa: BLE001 - refuse this request, keep serving
            # AdmissionRejected (the policy refuses it for now) carries a retry delay: a 429.
            self.pending.append(RequestDelta(cmd.request_id, finished=True, error=str(exc), rejected=True,
                                             retry_after_s=getattr(exc, "retry_after_s", None)))

    def _step(self) -> list[RequestDelta]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - see the module invariants
            logger.exception("engine step raised; failing every request in the engine")
            self.num_step_failures += 1
            return self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        return [self.tracker.delta(out) for out in outputs]

    def _fail_all(self, message: str) -> list[RequestDelta]:
        """Abort every request the engine holds (freeing its blocks) and report an error for each."""
        deltas = []
        for rid in self.engine.request_ids():
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                logger.exception("abort of %s failed after a step failure", rid)
            self.tracker.forget(rid)
            deltas.append(RequestDelta(rid, finished=True, error=message))
        return deltas

    def _stats(self, fresh_tier_stats: bool) -> EngineStatsSnapshot:
        return EngineStatsSnapshot(**self.engine.stats_snapshot(), num_step_failures=self.num_step_failures,
                                   kv_tiers=self._kv_tier_stats(fresh_tier_stats))

    def _kv_tier_stats(self, fresh: bool) -> Optional[dict[str, Any]]:
        """The engine's KV tier stats, re-read when `fresh` or older than _TIER_STATS_INTERVAL_S."""
        now = time.monotonic()
        if fresh or now - self._tier_stats_at >= _TIER_STATS_INTERVAL_S:
            read = getattr(self.engine, "kv_tier_stats", None)
            try:
                self._tier_stats = read() if read is not None else None
            except Exception:  # noqa: BLE001 - metrics must not take the loop down
                logger.exception("reading the KV tier stats failed")
                self._tier_stats = None
            self._tier_stats_at = now
        return self._tier_stats

    def _take_kv_events(self) -> list[Any]:
        if not self.kv_events:
            return []
        try:
            return list(self.engine.take_kv_events())
        except Exception:  # noqa: BLE001 - events must not take the loop down
            logger.exception("taking the KV events failed")
            return []

    def _kv_tier_io_pending(self) -> bool:
        """True while the tier threads still load or save (their counters will move)."""
        return bool(self.engine.kv_tier_io_pending())
