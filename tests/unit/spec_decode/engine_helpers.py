"""Helpers for the engine-level speculative decoding tests: an oracle proposer, a step
recorder that checks KV integrity after every step, and a runner of LLM with a spec setting."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from kvserve import LLM
from kvserve.spec_decode.adaptive import SpecLengthPolicy
from kvserve.spec_decode.base import Proposer, ProposerState
from kvserve.spec_decode.manager import SpecDecodeManager
from kvserve.spec_decode.scheduling import SpecScheduling


class ListState(ProposerState):
    def append(self, token_ids: Sequence[int]) -> None:
        self.token_ids.extend(token_ids)


class OracleProposer(Proposer):
    """Proposes the known continuation of a reference sequence, each draft replaced by a
    wrong token with probability `error`: exercises every accepted length and rollback."""

    def __init__(self, references: Sequence[Sequence[int]], error: float, vocab_size: int, seed: int = 0) -> None:
        self.references = [list(r) for r in references]
        self.error = error
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def new_state(self, prompt_token_ids: Sequence[int], num_prompt_tokens: Optional[int] = None) -> ListState:
        s = ListState(len(prompt_token_ids) if num_prompt_tokens is None else num_prompt_tokens)
        s.token_ids.extend(prompt_token_ids)
        return s

    def propose(self, state: ProposerState, k: int) -> list[int]:
        n = state.num_tokens
        for ref in self.references:
            if len(ref) > n and ref[:n] == state.token_ids:
                out = ref[n:n + k]
                return [(t + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size
                        if self.rng.random() < self.error else t for t in out]
        return []


def oracle_spec(references: Sequence[Sequence[int]], error: float, vocab_size: int, k: int = 4,
                seed: int = 0) -> SpecScheduling:
    return SpecScheduling(SpecDecodeManager(OracleProposer(references, error, vocab_size, seed),
                                            SpecLengthPolicy(k, adaptive=False)))


@dataclass
class StepRecord:
    requests: list[tuple[str, int, int, bool]]  # (id, tokens, drafts, sample)
    num_accepted: dict[str, int]


@dataclass
class Recorder:
    """Wraps the executor: records each step and checks the KV manager after it."""

    inner: Any
    core: Any
    steps: list[StepRecord] = field(default_factory=list)

    def execute(self, step: Any) -> Any:
        out = self.inner.execute(step)
        if step.requests:
            self.steps.append(StepRecord([(r.request_id, len(r.token_ids), r.num_draft_tokens, r.sample)
                                          for r in step.requests], dict(out.num_accepted)))
        self.core.kv_manager.check_integrity()
        return out

    def __getattr__(self, name: str) -> Any:  # kv_caches etc. of the real runner
        return getattr(self.inner, name)

    @property
    def mixed_steps(self) -> int:
        """Steps holding a drafting request and a prefill chunk (several tokens, no drafts)."""
        return sum(1 for s in self.steps if any(d for _, _, d, _ in s.requests)
                   and any(n > 1 and d == 0 for _, n, d, _ in s.requests))

    @property
    def max_accepted(self) -> int:
        return max((a for s in self.steps for a in s.num_accepted.values()), default=0)


def run_llm(model_dir: Any, prompts: list, params: Any, *, method: Optional[str] = None,
            spec: Optional[SpecScheduling] = None, adaptive: bool = False, k: int = 4,
            prepare: Optional[Callable[[Any], None]] = None, **kwargs: Any) -> tuple[list, Any, Recorder]:
    """Generate with speculation `method` (or an injected `spec`), recording every step;
    `prepare(core)` runs just before generating (e.g. to wrap the runner's model)."""
    opts: dict[str, Any] = dict(num_kv_blocks=256, block_size=4)
    opts.update(kwargs)
    with LLM(str(model_dir), speculative_method=method, num_speculative_tokens=k,
             speculative_adaptive=adaptive, **opts) as llm:
        core = llm.engine.core
        if spec is not None:
            core.scheduler.spec = spec
        rec = Recorder(core.executor, core)
        core.executor = rec
        if prepare is not None:
            prepare(core)
        outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, core, rec


def tokens(outs: list) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outs]
