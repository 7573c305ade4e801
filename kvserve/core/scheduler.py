"""Scheduler: which requests run this step, and how many tokens each.

Stall-free continuous batching (Sarathi-Serve): running decodes are scheduled
first, then running prefills continue in chunks, then waiting requests are
admitted, all under one per-step token budget (which the policy may lower, e.g.
to keep TPOT targets).  When blocks run out, the policy's victim is preempted:
by recompute (it resumes with whatever prefix is still cached) or, with a swap
manager (core/swap.py), by swapping its blocks to host memory, chosen per victim
by the manager's mode and cost model; a swapped request resumes with all its
tokens.  Preemptions are counted by cause and mode (`preemptions_by`).

Where a request's already-computed tokens come from is the KV sources' business
(core/kv_sources.py): at admission the scheduler asks them in order (the device
prefix cache, then e.g. the offload tiers) and keeps only the rule.  If every
plan is ready the request starts with the tokens they supply; if one is not
(a tier fetch), the request leaves the queue for WAITING_FOR_KV while that
source fetches, the others keep running, and it re-enters the queue when the
fetch is done.  Blocks to copy in (SchedulerOutput.kv_loads) and out (kv_saves),
and background loads to start (kv_fetches) or drop (kv_cancels), come from the
sources too and travel in the step; the executor reports finished loads in its
output (ModelRunnerOutput.kv_transfers_done), which update_from_output hands back
to the sources.  The scheduler never calls into the executor's tier I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from kvserve.config import SchedulerConfig
from kvserve.core.clock import Clock, wall_clock
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_offload import KVOffloadManager
from kvserve.core.kv_sources import DevicePrefixCache, KVPlan, KVSource, OffloadTiers
from kvserve.core.policies import SchedulingPolicy, make_policy
from kvserve.core.swap import SwapManager
from kvserve.protocol import ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput
from kvserve.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvserve.spec_decode.scheduling import SpecScheduling

# The step types live in kvserve.protocol; re-exported here for older imports.
__all__ = ["Scheduler", "ModelRunnerOutput", "SampledToken", "ScheduledRequest", "SchedulerOutput"]


@dataclass(slots=True)
class _Step:
    """The step schedule() is building: its output, the token budget left, and the
    requests scheduled so far with their token counts, in scheduling order."""

    out: SchedulerOutput
    budget: int
    scheduled: list[Request] = field(default_factory=list)
    num_new_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, request: Request, n: int) -> None:
        self.scheduled.append(request)
        self.num_new_tokens[request.request_id] = n
        self.budget -= n

    def drop(self, request: Request) -> None:
        """Unschedule `request` (displaced): its tokens go back to the budget."""
        if request in self.scheduled:
            self.scheduled.remove(request)
            self.budget += self.num_new_tokens.pop(request.request_id)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 offload: Optional[KVOffloadManager] = None, *, sources: Sequence[KVSource] = (),
                 policy: Optional[SchedulingPolicy] = None, clock: Clock = wall_clock,
                 swap: Optional[SwapManager] = None) -> None:
        """`sources`: KV sources asked after the device prefix cache (`offload` adds the
        offload tiers last); `policy`: an instance to use instead of `config.policy`'s;
        `clock`: where every time the scheduler records comes from (first token, finish);
        `swap`: host swap space for preemption by swap (None: recompute only)."""
        if config.max_model_len is None:
            raise ValueError("SchedulerConfig.max_model_len must be set for the scheduler "
                             "(EngineCore.from_config resolves it from the model)")
        self.config = config
        self.max_model_len: int = config.max_model_len
        self.kv = kv_manager
        self.clock = clock
        # The policy is the waiting queue (in service order) and also orders the
        # running requests and picks victims (see core/policies.py).
        self.policy = policy if policy is not None else make_policy(config.policy, clock, **config.policy_options())
        self.swap = swap
        self.waiting = self.policy
        self.running: list[Request] = []
        # Requests waiting while a KV source fetches their blocks.
        self.waiting_for_kv: dict[str, Request] = {}
        # Back from a fetch and not admitted yet: their next lookup repeats one admission.
        self._fetched: set[str] = set()
        self.sources: list[KVSource] = [DevicePrefixCache(kv_manager), *sources]
        self.offload = offload  # kept for inspection; the scheduler talks to its source
        if offload is not None:
            self.sources.append(OffloadTiers(offload, kv_manager, clock))
        self.requests: dict[str, Request] = {}
        # request id -> blocks of its table already sent to the executor (steps carry diffs).
        self._blocks_sent: dict[str, int] = {}
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        self.preemptions_by: dict[tuple[str, str], int] = {}  # (cause, mode) -> count
        # Samples forked during the last update (also returned by it).
        self.new_forks: list[Request] = []
        # Speculative decoding (kvserve/spec_decode/scheduling.py), set by the engine core.
        self.spec: Optional[SpecScheduling] = None
        # True while the caller has submitted every request it will until the running ones
        # finish (an offline batch, LLM.generate): once nobody waits, the batch's finish is
        # what counts, so adaptive speculation values drafts by the batch's longest request.
        self.closed_batch = False

    # -------------------------------------------------------------- requests
    def validate_fits(self, request: Request) -> None:
        """Refuse a request that could never be served (instead of hanging)."""
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty; at least one token is required")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, which leaves no room to "
                f"generate within max_model_len={self.max_model_len}" + self._pool_cap_note()
            )
        needed_blocks = -(-(request.num_prompt_tokens + 1) // self.kv.block_size)
        if needed_blocks > self.kv.num_blocks:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens and needs {needed_blocks} KV "
                f"blocks, but the KV cache has only {self.kv.num_blocks} blocks of "
                f"{self.kv.block_size} tokens; raise kv_cache_memory/num_kv_blocks"
            )

    def _pool_cap_note(self) -> str:
        """Why max_model_len is what it is, when the KV pool is what limits it (the default
        max_model_len is capped to what the pool holds)."""
        pool_tokens = self.kv.num_blocks * self.kv.block_size
        if self.max_model_len < pool_tokens:
            return ""
        return (f" (the KV cache has only {self.kv.num_blocks} KV blocks of {self.kv.block_size} tokens; "
                f"raise kv_cache_memory/num_kv_blocks)")

    def add_request(self, request: Request) -> None:
        """Queue `request`; ValueError if it can never run, AdmissionRejected (a ValueError)
        if the policy refuses it now (e.g. `slo` with reject: its TTFT is out of reach)."""
        self.validate_fits(request)
        self.policy.check_admission(request)
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def abort(self, request_id: str) -> Optional[Request]:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Optional[Request]:
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_KV:
            del self.waiting_for_kv[request_id]
        else:
            self.waiting.remove(request)
        self._finish(request, status)
        return request

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.finish_time = self.clock()
        for source in self.sources:
            source.on_finished(request, self.kv)
        self._fetched.discard(request.request_id)
        self._blocks_sent.pop(request.request_id, None)
        if self.swap is not None:
            self.swap.drop(request.request_id)
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_since_last_step.append(request.request_id)
        self.policy.on_finished(request)
        if self.spec is not None:
            self.spec.on_finished(request)

    def finish_from_sources(self) -> list[Request]:
        """Finish the requests KV sources ended before they ran (KVSource.take_finished: a
        failed transfer, or supplied tokens that already finish the request); the engine
        reports them like requests that finished in a step."""
        done: list[Request] = []
        for source in self.sources:
            for rid, status, reason in source.take_finished():
                request = self.finish_request(rid, status)
                if request is not None:
                    request.stop_reason = reason
                    done.append(request)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0 or bool(self.waiting_for_kv)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_for_kv)

    @property
    def num_waiting_for_kv(self) -> int:
        return len(self.waiting_for_kv)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """The next step, by one rule: each request it runs gets min(its tokens not yet
        computed, the budget left) tokens (at most long_prefill_token_threshold): first the
        running requests (short of blocks, the policy's victims are preempted), then
        waiting requests while there is room, then drafts for speculative decoding."""
        step = _Step(SchedulerOutput(), self.policy.step_token_budget(self.running, self.config.max_num_batched_tokens))
        if self.swap is not None:
            self.swap.begin_step()
        self._requeue_fetched()
        self._schedule_running(step)
        self._schedule_waiting(step)
        # Speculative decoding: drafts for the decodes, in the budget left (never preempting).
        drafts = (self.spec.add_drafts(self, step.scheduled, step.num_new_tokens, step.budget)
                  if self.spec is not None else {})
        return self._emit(step, drafts)

    def _schedule_running(self, step: _Step) -> None:
        """1. Running requests, in the policy's order (by default decodes first, then
        unfinished prefill chunks).  Short of blocks, the policy's victim among those not
        scheduled yet is preempted, until the request fits or is itself the victim."""
        for request in self.policy.order_running(self.running):
            if step.budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._num_tokens_to_run(request, step.budget)
            if n <= 0:
                continue
            while self.kv.allocate_slots(request, n) is None:
                victim = self.policy.victim([r for r in self.running if r not in step.scheduled])
                self._preempt(victim, step.out)
                if victim is request:
                    break
            if request.status == RequestStatus.RUNNING:
                step.add(request, n)

    def _schedule_waiting(self, step: _Step) -> None:
        """2. Waiting requests, in the policy's order, while there is room.  A request that
        does not fit blocks the ones behind it (no starvation of long prompts by short
        ones); one whose KV a source must fetch first leaves for WAITING_FOR_KV."""
        preempted_now = set(step.out.preempted_ids)
        # Displacement victims come from the requests running before this admission loop
        # (one admitted in this step, possibly with tier loads in flight, is never one).
        seated = list(self.running)
        while step.budget > 0 and len(self.waiting):
            request = self.waiting.peek()
            assert request is not None
            if request.request_id in preempted_now:
                break  # it just lost its blocks for lack of room; don't thrash
            if len(self.running) >= self.config.max_num_seqs and not self._displace(request, seated, step,
                                                                                   preempted_now):
                break
            admitted = self._admit(request, step)
            if admitted is None:
                continue  # it waits for its blocks; admit the next request
            if not admitted:
                break

    def _displace(self, head: Request, seated: list[Request], step: _Step, preempted_now: set[str]) -> bool:
        """Every seat is taken: the policy may give the head one (fair, priority) by preempting
        a request seated before the admission loop.  False if it does not."""
        displaced = self.policy.displace(head, [r for r in seated if r.status == RequestStatus.RUNNING])
        if displaced is None:
            return False
        step.drop(displaced)
        self._preempt(displaced, step.out, cause="policy")
        preempted_now.add(displaced.request_id)
        # Its step slots were allocated above: with swap they are copied out with the
        # rest (only tokens already computed count); the blocks go back to the pool.
        return True

    def _admit(self, request: Request, step: _Step) -> Optional[bool]:
        """Start the head of the queue in this step.  True: admitted; None: it left for
        WAITING_FOR_KV (a source fetches its KV); False: the pool cannot hold it now."""
        swapped = self.swap is not None and self.swap.is_swapped(request.request_id)
        plans = self._supplied(request, swapped)
        if plans is None:
            return None
        n = self._num_tokens_to_run(request, step.budget)
        placed = self._place(request, n, plans, swapped, step.out)
        if placed is None:
            return False
        self.waiting.pop()
        self._fetched.discard(request.request_id)
        for plan, block_ids in zip(plans, placed):
            step.out.kv_loads.extend(plan.source.placed(request, plan, block_ids))
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = request.num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        step.add(request, n)
        return True

    def _supplied(self, request: Request, swapped: bool) -> Optional[list[KVPlan]]:
        """Set the request's num_computed_tokens to what is already computed and return the
        KV sources' plans supplying it; None when a source must fetch first (the request
        then waits in WAITING_FOR_KV)."""
        if self.kv.holds_blocks(request.request_id):
            return []  # a forked n > 1 sample: it already holds its shared prompt blocks
        if swapped:
            return []  # swapped out: it resumes with all its computed tokens (swap-in, _place)
        if request.sampling_params.prompt_logprobs is not None:
            # Prompt logprobs need the logits of every prompt position, so such a
            # request never reads cached KV (from any source); vLLM does the same.
            request.num_computed_tokens = 0
            return []
        plans = self._find_plans(request)
        if plans and not plans[-1].ready:
            self._wait_for_kv(request, plans[-1])
            return None
        request.num_computed_tokens = sum(p.num_tokens for p in plans)
        return plans

    def _place(self, request: Request, n: int, plans: list[KVPlan], swapped: bool,
               out: SchedulerOutput) -> Optional[list[list[int]]]:
        """Device blocks for the supplied tokens and `n` more: its host swap slots copied in,
        or the plans executed by the KV manager (per plan, the blocks it got).  None: the
        pool is short (nothing placed; one holding no blocks starts over next time)."""
        if swapped:
            return [] if n > 0 and self._swap_in(request, n, out) else None
        placed = self.kv.allocate_plans(request, n, plans) if n > 0 else None
        if placed is None and not self.kv.holds_blocks(request.request_id):
            request.num_computed_tokens = 0
        return placed

    def _emit(self, step: _Step, drafts: dict[str, list[int]]) -> SchedulerOutput:
        """3. The step as plain data.  num_computed_tokens is committed later, from the
        executor's output (update_from_output): the tokens it accepted."""
        out = step.out
        for request in step.scheduled:
            n = step.num_new_tokens[request.request_id]
            out.requests.append(self._scheduled_request(request, n, drafts.get(request.request_id, ())))
            out.num_batched_tokens += n
            self.policy.on_scheduled(request, n)
        out.finished_ids = self._finished_since_last_step
        self._finished_since_last_step = []
        self._take_transfers(out)  # evictions of this schedule, finishes since the last one
        return out

    def _scheduled_request(self, request: Request, n: int, d: Sequence[int]) -> ScheduledRequest:
        """`n` tokens of `request` from num_computed_tokens; with drafts `d`, its last
        committed token and the drafts (end - len(d) == num_tokens)."""
        start = request.num_computed_tokens
        end = start + n
        sp = request.sampling_params
        rid = request.request_id
        sent = self._blocks_sent.get(rid)
        self._blocks_sent[rid] = self.kv.num_request_blocks(rid)
        return ScheduledRequest(
            request_id=rid,
            token_ids=request.all_token_ids[start:end] if not d else [request.all_token_ids[start], *d],
            positions=range(start, end),
            start_pos=start,
            block_ids=self.kv.block_ids(rid, sent or 0),
            sample=end - len(d) == request.num_tokens,
            sampling_params=sp,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            generator_key=(request.parent_id or request.request_id, request.sample_index),
            prompt_logprobs=sp.prompt_logprobs is not None and start < request.num_prompt_tokens,
            full_table=sent is None,
            num_draft_tokens=len(d),
            blend=self._take_blend(request, end),
        )

    @staticmethod
    def _take_blend(request: Request, end: int) -> Any:  # Optional[kvserve.blend.spec.BlendStep]
        """The blend a KV source (the chunk cache) planned for this request, if this step runs
        the rest of its prompt (a blend needs every remaining token at once; a chunked
        prefill computes them in full instead, which is exact)."""
        blend = request.pending_blend
        if blend is None:
            return None
        request.pending_blend = None
        if end != request.num_prompt_tokens:
            return None
        blend.emitted = True  # type: ignore[attr-defined]
        return blend

    def flush(self) -> SchedulerOutput:
        """A step with no requests, carrying the KV saves queued since the last schedule()
        (blocks of requests that just finished): the executor copies them out now, while
        their content is intact; and the tier loads those requests no longer need, to
        drop.  Empty without offload tiers."""
        out = SchedulerOutput()
        self._take_transfers(out)
        return out

    # ------------------------------------------------------------ KV sources
    def _find_plans(self, request: Request) -> list[KVPlan]:
        """Ask the sources in order; stop after a plan that is not ready (a fetch)."""
        repeat = request.request_id in self._fetched
        plans: list[KVPlan] = []
        supplied = 0
        for source in self.sources:
            plan = source.plan(request, supplied, repeat)
            if plan is None:
                continue
            plans.append(plan)
            if not plan.ready:
                break
            supplied += plan.num_tokens
        return plans

    def _wait_for_kv(self, request: Request, plan: KVPlan) -> None:
        """Move the (head) request to WAITING_FOR_KV while `plan`'s source fetches;
        it holds no device blocks meanwhile."""
        popped = self.waiting.pop()
        assert popped is request
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = 0
        self.waiting_for_kv[request.request_id] = request
        plan.source.fetch(request, plan)

    def _requeue_fetched(self) -> None:
        """Requests whose fetch finished go back to the queue, in their policy place
        (FCFS: the front, where they were when they left)."""
        ready = [self.waiting_for_kv.pop(rid) for source in self.sources for rid in source.poll()
                 if rid in self.waiting_for_kv]
        # Latest arrival first, so that FCFS's add-to-front leaves the earliest at the head.
        for request in sorted(ready, key=lambda r: r.arrival_time, reverse=True):
            request.status = RequestStatus.WAITING
            self._fetched.add(request.request_id)
            self.waiting.add_preempted(request)

    def _take_transfers(self, out: SchedulerOutput) -> None:
        """The sources' transfers for the executor, into the step: copies out, loads to drop
        (before those to start, so a request id cancelled and fetched again is the new load)."""
        for source in self.sources:
            out.kv_saves.extend(source.take_saves())
            out.kv_cancels.extend(source.take_cancels())
            out.kv_fetches.extend(source.take_fetches())

    def _num_tokens_to_run(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            n = min(n, threshold)
        return n

    def _preempt(self, request: Request, out: SchedulerOutput, cause: str = "kv_blocks") -> None:
        """Free every block of `request`.  By recompute it starts over later (from what is
        still cached); by swap its computed blocks are copied to host slots first (this
        step, before the forward that may reuse them) and it resumes with all its tokens."""
        self.running.remove(request)
        rid = request.request_id
        mode = "recompute"
        if self.swap is not None:
            num_blocks = -(-request.num_computed_tokens // self.kv.block_size)
            mode = self.swap.choose(request.num_computed_tokens, num_blocks)
            if mode == "swap":
                out.swap_outs.append(self.swap.swap_out(rid, self.kv.block_ids(rid)[:num_blocks]))
        self.kv.free(request)
        self._blocks_sent.pop(rid, None)
        request.status = RequestStatus.PREEMPTED
        if mode == "recompute":
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by[(cause, mode)] = self.preemptions_by.get((cause, mode), 0) + 1
        self.waiting.add_preempted(request)
        out.preempted_ids.append(rid)

    def _swap_in(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Give a swapped-out request device blocks for its computed tokens and `n` more, and
        copy its host slots in; leading blocks still in the prefix cache are shared instead
        of copied.  False (nothing changed) when the pool is short."""
        assert self.swap is not None
        bs = self.kv.block_size
        # Only blocks entirely before num_computed_tokens may be shared: the request writes
        # into its partial last block.
        hits, _ = self.kv.get_computed_blocks(request, count_stats=False)
        hits = hits[:request.num_computed_tokens // bs]
        if self.kv.allocate_slots(request, n, hits) is None:
            return False
        num_swapped = -(-request.num_computed_tokens // bs)
        targets = self.kv.block_ids(request.request_id)[len(hits):num_swapped]
        out.swap_ins.append(self.swap.swap_in(request.request_id, targets, skip=len(hits)))
        return True

    # ---------------------------------------------------------------- update
    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[Request]:
        """Append sampled tokens, apply stop rules.  Returns the requests that changed
        (got tokens or finished), followed by the samples forked this step (n > 1; also
        kept in `new_forks` until the next update, for inspection)."""
        changed: list[Request] = []
        self.new_forks = []
        now = self.clock()
        if result.kv_transfers_done:  # tier loads finished, saves written: the sources' share
            for source in self.sources:
                source.on_transfers_done(result.kv_transfers_done)
        if sched.is_empty:
            return []  # a bookkeeping step (releases, copies, fetches): nothing to commit
        if self.spec is not None:
            self.spec.on_output(sched, result)
        for sr in sched.requests:
            request = self.requests.get(sr.request_id)
            if request is None:
                continue  # aborted while the step ran
            # Commit the KV the executor kept: all scheduled positions unless it says
            # fewer (positions are contiguous from start_pos until blending arrives).
            accepted = result.num_accepted.get(sr.request_id, len(sr.positions))
            assert 0 <= accepted <= len(sr.positions), f"{sr.request_id}: {accepted} accepted positions"
            request.num_computed_tokens = sr.start_pos + accepted
            plp = result.prompt_logprobs.get(sr.request_id)
            if plp is not None:
                self._record_prompt_logprobs(request, sr, plp)
            sampled = result.sampled.get(sr.request_id)
            if not sampled:
                continue
            if request.num_samples_to_fork > 1:
                self._fork_samples(request)  # before a stop could free the shared blocks
            for tok in sampled:
                request.append_output_token(tok.token_id)
                if tok.logprobs is not None:
                    request.output_logprobs.append(tok.logprobs)
                if request.first_token_time is None:
                    request.first_token_time = now
                status = self._check_stop(request, tok.token_id)
                if status is not None:
                    self.running.remove(request)
                    self._finish(request, status)
                    break
            if sr.num_draft_tokens and not request.is_finished and self.kv.trim(request, request.num_computed_tokens):
                self._blocks_sent.pop(sr.request_id, None)  # its table shrank: the next step sends it whole
            changed.append(request)
        return changed + self.new_forks

    @staticmethod
    def _record_prompt_logprobs(request: Request, sr: ScheduledRequest, plp: list) -> None:
        # plp[i] is the distribution at position sr.start_pos + i predicting the
        # token at the next position; position 0 of the prompt has no logprob.
        # A request preempted mid-prefill recomputes positions it already recorded;
        # those are skipped, so entry p always describes prompt position p.
        if not request.prompt_logprobs:
            request.prompt_logprobs = [None]
        for i, entry in enumerate(plp):
            target = sr.start_pos + i + 1  # the prompt position this entry scores
            if target >= request.num_prompt_tokens:
                break
            if target == len(request.prompt_logprobs):
                request.prompt_logprobs.append(entry)
            assert target <= len(request.prompt_logprobs), "prompt logprobs must be computed in order"

    def _check_stop(self, request: Request, token_id: int) -> Optional[RequestStatus]:
        sp = request.sampling_params
        n_out = request.num_output_tokens
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in sp.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and n_out >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ------------------------------------------------------------------ n > 1
    def _fork_samples(self, parent: Request) -> None:
        """Once the prompt is computed, start samples 1..n-1 on the parent's blocks."""
        n = parent.num_samples_to_fork
        parent.num_samples_to_fork = 1
        group_id = parent.parent_id or parent.request_id
        for i in range(1, n):
            child = Request(
                request_id=f"{group_id}#{i}",
                prompt_token_ids=parent.prompt_token_ids,
                sampling_params=parent.sampling_params,
                eos_token_ids=parent.eos_token_ids,
                arrival_time=parent.arrival_time,
                priority=parent.priority,
                tenant=parent.tenant,
                slo=parent.slo,
                parent_id=group_id,
                sample_index=i,
                block_size=parent.block_size,
                hash_extra_keys=parent.hash_extra_keys,
            )
            self.fork(parent, child)
            self.new_forks.append(child)

    def fork(self, parent: Request, child: Request) -> None:
        """Admit `child` (a further sample of `parent`'s prompt) sharing its blocks."""
        child.num_computed_tokens = self.kv.fork(parent, child)
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.WAITING
        self.requests[child.request_id] = child
        self.waiting.add_preempted(child)
