"""The engine's side of prefill/decode disaggregation, as one KV source (core/kv_sources.py).

Prefill side (a request with `kv_transfer_params: {"do_remote_decode": true}`): the request
runs as any other (chunked, prefix-cached) and samples its first token; when it finishes
(`on_finished`, its blocks still held, their KV written by the step that just ran) its
prompt blocks are copied out of the pool and published on the transport, and the request
carries the decode side's parameters out (`Request.kv_transfer_out`).

Decode side (a request with a prefill answer's parameters):
  add      `prepare`: the parameters are checked against this engine (block size, pool
           layout, the prompt's own block hashes); the first token is appended as already
           generated.  If it already ends the request (max_tokens 1, EOS), the request
           finishes at once (`take_finished`), nothing fetched.
  admit    `plan`: after the device prefix hit, this source supplies the rest of the
           prompt (never computed here).  First a plan that is not ready: the request
           waits in WAITING_FOR_KV while a worker thread fetches only the blocks after the
           device hit; other requests keep running.
  fetched  `poll` requeues it; `plan` again (the device hit may have moved; a shrunken hit
           is fetched again) and `placed` hands the fetched blocks to the runner as one
           KVLoad into the fresh device blocks: the full blocks (registered in the prefix
           cache under the prompt's hashes) and the partial last one.
  failure  a fetch that raises, or outlives the timeout, finishes the request with
           FINISHED_ERROR and a message starting with KV_TRANSFER_ERROR (the server
           answers an OpenAI error `kv_transfer_failed`); it is never recomputed.

Every outcome is counted (`stats`).  Threads: fetches run on a small pool; the engine
thread only reads finished futures (`poll`), so no lock is needed beyond the futures'.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from kvserve.core.kv_sources import KVPlan, KVSource
from kvserve.disagg.params import ExportRequest, ImportParams, Layout, parse_params
from kvserve.disagg.transport import KVTransport, TransferError
from kvserve.protocol import KVLoad
from kvserve.request import Request, RequestStatus
from kvserve.worker.kv_transfer import gather_blocks

if TYPE_CHECKING:
    from kvserve.core.kv_cache_manager import KVCacheManager

logger = logging.getLogger(__name__)

# Every transfer failure's message starts with this (the server maps it to `kv_transfer_failed`).
KV_TRANSFER_ERROR = "KV transfer failed: "
_EXPIRE_EVERY_S = 0.5
_FETCH_THREADS = 2
# A shrunken device hit re-fetches; after this many fetches the request fails instead.
_MAX_FETCHES = 3

StopCheck = Callable[[Request, int], Optional[RequestStatus]]


@dataclass(slots=True)
class _Fetch:
    start: int  # first block fetched
    deadline: float  # wall time
    future: "cf.Future[torch.Tensor]"
    t0: float


class RemotePeerSource(KVSource):
    name = "remote"

    def __init__(self, kv: KVCacheManager, transport: KVTransport, layout: Layout,
                 kv_caches: Sequence[torch.Tensor], timeout_s: float) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.transport = transport
        self.layout = layout
        self.kv_caches = kv_caches
        self.dtype = kv_caches[0].dtype
        # One host block: [num_layers, 2, block_size, num_kv_heads, head_dim]
        self.block_shape = (layout.num_layers, 2, self.block_size, layout.num_kv_heads, layout.head_dim)
        self.timeout_s = timeout_s
        self._pool = cf.ThreadPoolExecutor(_FETCH_THREADS, thread_name_prefix="kv-transfer-fetch")
        self._exports: set[str] = set()  # request ids to export when they finish
        self._imports: dict[str, ImportParams] = {}  # request ids waiting to import
        self._inflight: dict[str, _Fetch] = {}
        self._fetched: dict[str, tuple[int, torch.Tensor]] = {}  # rid -> (first block, blocks)
        self._num_fetches: dict[str, int] = {}
        self._host: dict[str, list[torch.Tensor]] = {}  # placed, for the runner (take_loaded)
        self._finished: list[tuple[str, RequestStatus, Optional[str | int]]] = []
        self._closed = threading.Event()
        # Expires this instance's exports and sweeps what dead producers left (every role).
        self._reaper = threading.Thread(target=self._reap, name="kv-export-reaper", daemon=True)
        self._reaper.start()
        self.stats: dict[str, float] = {k: 0 for k in (
            "requests_local", "requests_exported", "export_failed", "export_skipped", "requests_imported",
            "import_all_cached", "import_first_token_final", "import_failed_error", "import_failed_timeout",
            "import_aborted", "tokens_exported", "tokens_imported", "tokens_import_cached", "bytes_imported",
            "bytes_exported", "fetch_seconds", "exports_expired")}

    # ------------------------------------------------------------ requests
    def prepare(self, request: Request, check_stop: StopCheck) -> None:
        """At add time; ValueError (a 400) for parameters this engine cannot use."""
        parsed = parse_params(request.kv_transfer_params)
        if parsed is None:
            self.stats["requests_local"] += 1
            return
        if request.sampling_params.n != 1 or request.num_samples_to_fork != 1:
            raise ValueError("kv_transfer_params needs n == 1")
        if isinstance(parsed, ExportRequest):
            self._exports.add(request.request_id)
            return
        self._check_import(request, parsed)
        request.append_output_token(parsed.first_token_id)  # generated by the prefill instance
        status = check_stop(request, parsed.first_token_id)
        if status is not None:  # the first token already ends it: nothing to fetch
            self.stats["import_first_token_final"] += 1
            self._release(parsed)
            self._finished.append((request.request_id, status, request.stop_reason))
            return
        self._imports[request.request_id] = parsed

    def _check_import(self, request: Request, p: ImportParams) -> None:
        if request.sampling_params.prompt_logprobs is not None:
            raise ValueError("kv_transfer_params cannot be combined with prompt_logprobs (echo with logprobs)")
        if p.block_size != self.block_size:
            raise ValueError(f"kv_transfer_params.block_size is {p.block_size}; this instance's is {self.block_size}")
        if p.layout != self.layout:
            raise ValueError(f"the prefill instance's KV layout {p.layout.to_json()} differs from this "
                             f"instance's {self.layout.to_json()} (another model or dtype)")
        if p.num_prompt_tokens != request.num_prompt_tokens:
            raise ValueError(f"kv_transfer_params is for a {p.num_prompt_tokens}-token prompt; this one has "
                             f"{request.num_prompt_tokens} tokens")
        if tuple(request.block_hashes[:len(p.block_hashes)]) != p.block_hashes:
            raise ValueError("kv_transfer_params.block_hashes do not match this prompt's blocks (another "
                             "prompt, tokenizer or model)")

    # -------------------------------------------------------------- plans
    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        rid = request.request_id
        p = self._imports.get(rid)
        if p is None:
            return None
        P, bs = p.num_prompt_tokens, self.block_size
        d = num_supplied // bs
        if num_supplied >= P:  # every prompt block is in the device cache already
            self.stats["import_all_cached"] += 1
            self.stats["tokens_import_cached"] += P
            self._forget(rid, release=True)
            return None
        fetched = self._fetched.get(rid)
        if fetched is not None:
            start, blocks = fetched
            if d >= start:
                fill = list(request.block_hashes[d:P // bs])
                return KVPlan(self, P - num_supplied, fill_hashes=fill, state=(d, blocks[d - start:]))
            del self._fetched[rid]  # the device hit shrank meanwhile: fetch from the new hit
        return KVPlan(self, P - num_supplied, ready=False, state=d,
                      cost_s=(p.num_blocks - d) * self.stats_seconds_per_block())

    def stats_seconds_per_block(self) -> float:
        n = self.stats["bytes_imported"]
        if not n:
            return 1e-3
        per_byte = self.stats["fetch_seconds"] / n
        return per_byte * self.block_nbytes

    @property
    def block_nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.block_shape:
            n *= d
        return n

    def fetch(self, request: Request, plan: KVPlan) -> None:
        rid = request.request_id
        p = self._imports[rid]
        start: int = plan.state
        self._num_fetches[rid] = self._num_fetches.get(rid, 0) + 1
        if self._num_fetches[rid] > _MAX_FETCHES:
            self._fail(rid, "error", f"the device prefix cache kept losing blocks while {_MAX_FETCHES} "
                                     "fetches ran")
            return
        now = time.time()
        deadline = min(now + self.timeout_s, max(now, p.expires_at))
        future = self._pool.submit(self.transport.fetch, p.locator, start, p.num_blocks - start, self.dtype,
                                   self.block_shape, max(0.0, deadline - now))
        self._inflight[rid] = _Fetch(start, deadline, future, now)

    def _reap(self) -> None:
        """Reaper thread: drop exports past their deadline, also while the engine is idle (an
        idle engine does not step, and a decode instance may never come)."""
        while not self._closed.wait(_EXPIRE_EVERY_S):
            try:
                self.stats["exports_expired"] += self.transport.expire(time.time())
            except Exception:  # noqa: BLE001 - try again next round
                logger.exception("expiring KV exports failed")

    def poll(self) -> list[str]:
        now = time.time()
        ready = []
        for rid, f in list(self._inflight.items()):
            if f.future.done():
                del self._inflight[rid]
                exc = f.future.exception()
                if exc is not None:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "error"
                    self._fail(rid, kind, f"{exc}" if isinstance(exc, TransferError)
                               else f"{type(exc).__name__}: {exc}")
                    continue
                blocks = f.future.result()
                self.stats["fetch_seconds"] += now - f.t0
                self.stats["bytes_imported"] += blocks.numel() * blocks.element_size()
                self._fetched[rid] = (f.start, blocks)
                ready.append(rid)
            elif now > f.deadline:
                del self._inflight[rid]
                f.future.cancel()  # a fetch still running finishes into nothing
                self._fail(rid, "timeout", f"the blocks did not arrive within {self.timeout_s:g} s")
        return ready

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        rid = request.request_id
        p = self._imports[rid]
        d, blocks = plan.state
        ids = list(block_ids)
        if p.num_prompt_tokens % self.block_size:
            # The partial last prompt block: the block right after the full ones, allocated by
            # the KV manager as room for this step's tokens (the first token goes into it too).
            ids.append(self.kv.block_ids(rid)[p.num_prompt_tokens // self.block_size])
        if len(ids) != blocks.shape[0]:
            raise RuntimeError(f"{rid}: {blocks.shape[0]} fetched blocks for {len(ids)} device blocks")
        self._host[rid] = list(blocks.unbind(0))
        self.stats["requests_imported"] += 1
        self.stats["tokens_imported"] += p.num_prompt_tokens - d * self.block_size
        self.stats["tokens_import_cached"] += d * self.block_size
        self._forget(rid, release=True)
        return [KVLoad(rid, 0, ids)]

    def take_loaded(self, request_id: str) -> Optional[list[torch.Tensor]]:
        """The runner's copy-in (through RoutedHostIO): placed blocks of `request_id`, or None."""
        return self._host.pop(request_id, None)

    def take_finished(self) -> list[tuple[str, RequestStatus, Optional[str | int]]]:
        out, self._finished = self._finished, []
        return out

    @property
    def num_fetches_in_flight(self) -> int:
        return len(self._inflight)

    def wait(self, timeout: float) -> None:
        """Block until some fetch finishes (or `timeout`): for an engine with nothing else to run."""
        futures = [f.future for f in self._inflight.values()]
        if futures:
            cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)

    # ------------------------------------------------------------- finish
    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        rid = request.request_id
        if rid in self._imports:
            if rid in self._inflight or rid in self._fetched:
                self.stats["import_aborted"] += int(request.status != RequestStatus.FINISHED_ERROR)
            self._forget(rid, release=True)
        self._host.pop(rid, None)  # copies a failed step never took
        if rid in self._exports:
            self._exports.discard(rid)
            if request.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED) \
                    and request.num_output_tokens >= 1:
                self._export(request, kv)
            else:
                self.stats["export_skipped"] += 1

    def _export(self, request: Request, kv: KVCacheManager) -> None:
        P, bs = request.num_prompt_tokens, self.block_size
        num_blocks = -(-P // bs)
        ids = kv.block_ids(request.request_id)[:num_blocks]
        try:
            if len(ids) != num_blocks:
                raise RuntimeError(f"{len(ids)} device blocks for a {P}-token prompt")
            blocks = gather_blocks(self.kv_caches, ids)  # [n, L, 2, bs, H, D], owns its memory
            tid = uuid.uuid4().hex
            expires = time.time() + self.timeout_s
            locator = self.transport.publish(tid, blocks, expires)
        except Exception as exc:  # noqa: BLE001 - the request answers without parameters
            logger.exception("exporting the KV of %s failed", request.request_id)
            self.stats["export_failed"] += 1
            request.kv_transfer_out = {"error": f"{KV_TRANSFER_ERROR}{type(exc).__name__}: {exc}"}
            return
        params = ImportParams(tid, self.transport.scheme, locator, P, request.output_token_ids[0], bs,
                              tuple(request.block_hashes[:P // bs]), self.layout, expires)
        request.kv_transfer_out = params.to_json()
        self.stats["requests_exported"] += 1
        self.stats["tokens_exported"] += P
        self.stats["bytes_exported"] += blocks.numel() * blocks.element_size()

    def discard(self, request_id: str) -> None:
        """The engine refused the request after `prepare` (e.g. its prompt does not fit)."""
        self._exports.discard(request_id)
        self._forget(request_id, release=True)
        self._finished = [f for f in self._finished if f[0] != request_id]

    # ------------------------------------------------------------ helpers
    def _fail(self, rid: str, kind: str, why: str) -> None:
        self.stats[f"import_failed_{kind}"] += 1
        logger.warning("KV transfer of %s failed: %s", rid, why)
        self._forget(rid, release=True)
        self._finished.append((rid, RequestStatus.FINISHED_ERROR, KV_TRANSFER_ERROR + why))

    def _forget(self, rid: str, release: bool) -> None:
        p = self._imports.pop(rid, None)
        f = self._inflight.pop(rid, None)
        if f is not None:
            f.future.cancel()
        self._fetched.pop(rid, None)
        self._num_fetches.pop(rid, None)
        if release and p is not None:
            self._release(p)

    def _release(self, p: ImportParams) -> None:
        try:
            self.transport.release(p.locator)
        except Exception:  # noqa: BLE001 - the producer's expiry frees it anyway
            logger.exception("releasing transfer %s failed", p.transfer_id)

    def snapshot(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.stats)
        d["exports_held"] = self.transport.num_exports
        d["fetches_in_flight"] = len(self._inflight)
        return d

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()
