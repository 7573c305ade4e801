"""Draft model on its own paged KV pool, batched across the speculating requests.

The engine's draft-model proposer.  The draft runs through a `ModelRunner` of
its own (kvserve/worker/model_runner.py): its own per-layer KV pool in the
target's layout ([2, num_blocks, block_size, KVH, D]), its own block tables
and the attention backend the target uses (on CPU float32 the C++ paged decode
kernel for single-token queries, the torch path for multi-token catch-ups).
One `propose_batch` call drafts for every speculating request of a step:

  step 0      each request feeds the committed tokens its draft KV lacks (after a
              rollback: the correction token, or the accepted drafts + correction
              when the cache held other drafts; a new request: its whole prompt),
              all requests in one forward; the last position's argmax is draft 1
  step j ≥ 1  every request still drafting feeds its draft j (one token: the decode
              kernel), one forward per j; its argmax is draft j + 1

Invariants (the same as the dense reference, kvserve.spec_decode.dense_runner,
which tests hold it equal to):

- a state's `cached` lists the tokens whose KV rows [0, len(cached)) hold in its
  draft blocks; only committed tokens and the drafts it last fed are there;
- proposing keeps the longest prefix of `cached` that agrees with the committed
  tokens (accepted drafts), at most all but the last committed token (whose
  logits are needed), and drops the rest: rollback of rejected drafts is
  truncating `cached` and freeing the blocks past it;
- blocks are private to the request (no prefix caching in the draft pool), held
  from its first proposal until it finishes, aborts or is preempted
  (`release_cache`), or until another request needs them and it is not drafting
  in this step (evicted least recently used first; it recomputes its prefix the
  next time it drafts).  Short of blocks even then, a request drafts only what
  fits in the rest of the pool (nothing if its catch-up does not fit): the draft
  never fails a step.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from kvserve.protocol import ScheduledRequest, SchedulerOutput
from kvserve.sampling_params import SamplingParams
from kvserve.spec_decode.base import Proposer, ProposerState, check_k, check_tokens
from kvserve.spec_decode.dense_runner import common_prefix

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
_key_counter = itertools.count()


class DraftBlockPool:
    """The draft's KV blocks: a free list and one block table per request key."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"draft KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, key: str, num_tokens: int) -> int:
        """Blocks `key` lacks to hold `num_tokens` rows."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(key, ())))

    def grow(self, key: str, num_tokens: int) -> bool:
        """Extend `key`'s table to cover `num_tokens` rows; False (nothing taken) if short."""
        need = self.missing(key, num_tokens)
        if need > len(self._free):
            return False
        table = self.tables.setdefault(key, [])
        table.extend(self._free.pop() for _ in range(need))
        return True

    def trim(self, key: str, num_tokens: int) -> None:
        """Free the blocks past the first cdiv(num_tokens, block_size) of `key`'s table."""
        table = self.tables.get(key)
        if table is None:
            return
        keep = self.blocks_for(num_tokens)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]

    def free(self, key: str) -> None:
        self._free.extend(reversed(self.tables.pop(key, [])))

    def check_integrity(self) -> None:
        held = [b for t in self.tables.values() for b in t]
        every = held + self._free
        assert len(every) == len(set(every)) == self.num_blocks, "draft blocks lost or held twice"


class PagedDraftState(ProposerState):
    def __init__(self, num_prompt_tokens: int) -> None:
        super().__init__(num_prompt_tokens)
        self.key = f"draft-{next(_key_counter)}"  # the draft runner's request id
        self.cached: list[int] = []  # tokens whose KV rows [0, len) hold in the draft pool

    def append(self, token_ids: Sequence[int]) -> None:
        self.token_ids.extend(check_tokens(token_ids))


class PagedDraftProposer(Proposer):
    """Greedy drafts from a draft model run batched on its own paged KV pool."""

    name = "draft"
    proposes_for_free = False

    def __init__(self, runner: Any, max_positions: int, target_vocab_size: Optional[int] = None) -> None:
        """`runner`: a kvserve.worker.model_runner.ModelRunner over the draft model (its own pool)."""
        vocab = runner.cfg.vocab_size
        if target_vocab_size is not None and vocab > target_vocab_size:
            raise ValueError(f"draft vocabulary ({vocab}) is larger than the target's "
                             f"({target_vocab_size}): the draft could propose ids the target does not have")
        self.runner = runner
        self.max_positions = max_positions
        self.pool = DraftBlockPool(runner.num_blocks, runner.block_size)
        self._live: OrderedDict[str, PagedDraftState] = OrderedDict()  # states holding blocks, LRU first
        self.num_forwards = 0  # draft forward passes run (for tests and the benchmark)
        self.num_evictions = 0  # idle requests' draft KV freed for another's drafts
        self.num_short = 0  # proposals cut (or given none) for want of blocks
        self.max_k_seen = 0  # the most drafts asked of one request so far
        # Seconds of the last propose_batch spent catching up on prompts (first proposals,
        # recomputes after preemption): SpecScheduling keeps them out of the per-draft cost.
        self.last_prefill_s = 0.0

    @classmethod
    def load(cls, model_dir: str | Path, *, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
             device: str = "cpu", attention_backend: str = "auto", target_vocab_size: Optional[int] = None,
             max_positions: Optional[int] = None, pack_weights: bool = True) -> "PagedDraftProposer":
        """Load the draft with kvserve's loader (packed oneDNN weights on CPU float32, as the
        target's) and give it a pool of `num_blocks` blocks of `block_size` tokens."""
        from kvserve.models import cpu_linear
        from kvserve.models.builtin import resolve_model
        from kvserve.models.loader import load_model
        from kvserve.models.model_config import parse_model_config
        from kvserve.worker.model_runner import ModelRunner

        model_dir = resolve_model(str(model_dir))[0]  # a directory, a .gguf or a built-in name
        max_pos = max_positions or parse_model_config(Path(model_dir)).max_position_embeddings
        dev = torch.device(device)
        model, cfg = load_model(model_dir, dtype, dev, max_pos)
        if pack_weights and cpu_linear.packing_enabled(dev, dtype):
            cpu_linear.pack_linears(model)
        runner = ModelRunner(model, cfg, num_blocks, block_size, dtype, dev, frozenset(), attention_backend)
        return cls(runner, int(model.rotary.cos.shape[0]), target_vocab_size)

    @property
    def vocab_size(self) -> int:
        return int(self.runner.cfg.vocab_size)

    def new_state(self, prompt_token_ids: Sequence[int],
                  num_prompt_tokens: Optional[int] = None) -> PagedDraftState:
        ids = check_tokens(prompt_token_ids)
        state = PagedDraftState(len(ids) if num_prompt_tokens is None else num_prompt_tokens)
        state.token_ids.extend(ids)
        return state

    def propose(self, state: ProposerState, k: int) -> list[int]:
        return self.propose_batch([state], [k])[0]

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def propose_batch(self, states: Sequence[ProposerState], ks: Sequence[int]) -> list[list[int]]:
        if len(states) != len(ks):
            raise ValueError(f"{len(states)} states but {len(ks)} lengths")
        out: list[list[int]] = [[] for _ in states]
        self.last_prefill_s = 0.0
        self.max_k_seen = max([self.max_k_seen, *ks])
        todo = self._prepare(states, ks)
        if not todo:
            return out
        # Step 0: catch up on the committed tokens; the last position's argmax is draft 1.
        reqs = []
        prefill = False
        for i, s, k in todo:
            keep = len(s.cached)
            # More than a rollback ever leaves (k accepted drafts + the bonus token): a prompt.
            prefill = prefill or s.num_tokens - keep > 1 + self.max_k_seen
            reqs.append(self._scheduled(s, s.token_ids[keep:], keep, first=True))
            s.cached = list(s.token_ids)
        t0 = time.perf_counter()
        tokens = self._forward(reqs)
        # A one-off prompt catch-up is no per-draft cost: the policy's estimate leaves it out.
        self.last_prefill_s = time.perf_counter() - t0 if prefill else 0.0
        for (i, s, _), t in zip(todo, tokens):
            out[i].append(t)
        # Steps 1..: one token per request still drafting (the paged decode kernel).
        while True:
            todo = [(i, s, k) for i, s, k in todo if len(out[i]) < k]
            if not todo:
                return out
            reqs = []
            for i, s, _ in todo:
                reqs.append(self._scheduled(s, out[i][-1:], len(s.cached), first=False))
                s.cached.append(out[i][-1])
            for (i, s, _), t in zip(todo, self._forward(reqs)):
                out[i].append(t)

    def _prepare(self, states: Sequence[ProposerState], ks: Sequence[int]) -> list[tuple[int, PagedDraftState, int]]:
        """Roll each drafting state back to its agreeing prefix and reserve blocks for its
        drafts; returns (index, state, k) of those that draft."""
        todo: list[tuple[int, PagedDraftState, int]] = []
        for i, (s, k) in enumerate(zip(states, ks)):
            check_k(k)
            if not isinstance(s, PagedDraftState):
                raise TypeError(f"PagedDraftProposer got a {type(s).__name__}")
            n = s.num_tokens
            # Fed positions run to n + k - 2 (the last draft is not fed).
            k = min(k, self.max_positions - n + 1)
            if k <= 0 or n == 0:
                continue
            keep = min(common_prefix(s.cached, s.token_ids), n - 1)
            del s.cached[keep:]
            self.pool.trim(s.key, keep)  # rejected drafts' blocks go back to the pool
            todo.append((i, s, k))
        drafting = {s.key for _, s, _ in todo}
        fits = []
        for i, s, k in todo:
            rows = s.num_tokens + k - 1
            if not self.pool.grow(s.key, rows):
                self._evict(self.pool.missing(s.key, rows), drafting)
                if not self.pool.grow(s.key, rows):
                    # Short of blocks: the drafts that fit in the rest of the pool, as the
                    # target drafts into the slots it holds (greedy: a prefix of the full k).
                    self.num_short += 1
                    room = (len(self.pool.tables.get(s.key, ())) + self.pool.num_free) * self.pool.block_size
                    k = min(k, room - s.num_tokens + 1)
                    if k <= 0 or not self.pool.grow(s.key, s.num_tokens + k - 1):
                        continue  # not even the catch-up fits: no drafts for it this step
            self._live[s.key] = s
            self._live.move_to_end(s.key)
            fits.append((i, s, k))
        return fits

    def _evict(self, need: int, keep: set[str]) -> None:
        """Free the blocks of least recently drafting requests outside `keep` until `need` are free."""
        for key in list(self._live):
            if self.pool.num_free >= need:
                return
            if key not in keep:
                self.release_cache(self._live[key])
                self.num_evictions += 1

    def _scheduled(self, s: PagedDraftState, token_ids: list[int], start: int, first: bool) -> ScheduledRequest:
        # The first forward of a proposal sends the whole table (it may have been trimmed
        # or grown); the later ones append nothing (blocks were reserved up front).
        return ScheduledRequest(
            request_id=s.key, token_ids=token_ids, positions=range(start, start + len(token_ids)),
            start_pos=start, block_ids=list(self.pool.tables[s.key]) if first else [], sample=True,
            sampling_params=_GREEDY, prompt_token_ids=[], output_token_ids=[], generator_key=(s.key, 0),
            prompt_logprobs=False, full_table=first)

    def _forward(self, reqs: list[ScheduledRequest]) -> list[int]:
        """One forward of the draft runner; each request's greedy next token."""
        self.num_forwards += 1
        res = self.runner.execute(SchedulerOutput(requests=reqs,
                                                  num_batched_tokens=sum(len(r.token_ids) for r in reqs)))
        return [res.sampled[r.request_id][0].token_id for r in reqs]

    # ------------------------------------------------------------------ release
    def release_cache(self, state: ProposerState) -> None:
        """Free the state's draft KV (preempted, finished, or evicted); it recomputes later."""
        if isinstance(state, PagedDraftState):
            state.cached = []
            self.pool.free(state.key)
            self.runner.block_tables.remove(state.key)
            self._live.pop(state.key, None)

    def finish(self, state: ProposerState) -> None:
        self.release_cache(state)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        for key, s in self._live.items():
            assert self.pool.blocks_for(len(s.cached)) <= len(self.pool.tables.get(key, ())), \
                f"{key}: cached rows beyond its draft blocks"
        assert set(self.pool.tables) <= set(self._live), "draft blocks held by a released state"
