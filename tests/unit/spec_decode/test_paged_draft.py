"""The paged, batched draft runner (kvserve/spec_decode/paged_draft.py) against the dense
reference (DraftModelProposer on DenseModelRunner): the same drafts for the same requests,
batched, through acceptances, rejections (rollback), preemption (released KV), forks and
finishes, on a pool small enough to evict; its block pool stays consistent throughout."""
from __future__ import annotations

import random

import pytest

from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.draft_model import DraftModelProposer
from kvserve.spec_decode.paged_draft import DraftBlockPool, PagedDraftProposer
from tests.helpers.tiny_models import build_tiny_model

VOCAB = 512


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    # A small random draft with the tiny targets' vocabulary, from a real (Llama 3.1) config.
    return build_tiny_model("llama-tied", tmp_path_factory.mktemp("paged_draft") / "draft", seed=1,
                            overrides={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64})


@pytest.fixture(scope="module")
def dense(draft_dir):
    return DraftModelProposer(DenseModelRunner.load(draft_dir))


def paged(draft_dir, backend: str, num_blocks: int = 256, block_size: int = 4) -> PagedDraftProposer:
    return PagedDraftProposer.load(draft_dir, num_blocks=num_blocks, block_size=block_size,
                                   attention_backend=backend, pack_weights=False)


def near_tie(runner: DenseModelRunner, tokens: list[int], a: int, b: int, tol: float = 1e-4) -> bool:
    """Whether the draft's logits after `tokens` rate a and b within `tol` (a legitimate flip
    between two attention implementations)."""
    logits = runner.extend(runner.new_sequence(), tokens)[-1]
    return abs(float(logits[a] - logits[b])) <= tol


def check_same(dense: DraftModelProposer, state_tokens: list[int], want: list[int], got: list[int]) -> None:
    assert len(want) == len(got), (want, got)
    for j, (w, g) in enumerate(zip(want, got)):
        if w != g:  # allowed only at a near-tie, after which the two continue differently
            assert near_tie(dense.runner, state_tokens + want[:j], w, g), (j, want, got)
            return


def simulate(dense: DraftModelProposer, proposer: PagedDraftProposer, seed: int, steps: int = 30,
             preempt: float = 0.1, short_ok: bool = False) -> dict[str, int]:
    """Random requests drafting in batches; commit random acceptances (and wrong corrections),
    preempt, fork and finish some; every proposal must equal the dense reference's."""
    rng = random.Random(seed)
    reqs: dict[str, tuple] = {}  # id -> (dense state, paged state)
    counts = dict(drafts=0, rejected=0, preempted=0, forked=0, finished=0, short=0)

    def add(rid: str, tokens: list[int], num_prompt: int) -> None:
        reqs[rid] = (dense.new_state(tokens, num_prompt), proposer.new_state(tokens, num_prompt))

    for i in range(4):
        add(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 30))], 0)
    for step in range(steps):
        ids = sorted(reqs)
        ks = [rng.choice([0, 1, 2, 3, 4]) for _ in ids]
        got = proposer.propose_batch([reqs[r][1] for r in ids], ks)
        for rid, k, g in zip(ids, ks, got):
            d_state = reqs[rid][0]
            want = dense.propose(d_state, k)
            if short_ok and len(g) < len(want):  # the small pool had room for fewer drafts
                counts["short"] += 1
                want = want[:len(g)]  # greedy: the drafts that fit are the first ones
            check_same(dense, d_state.token_ids, want, g)
            counts["drafts"] += len(g)
            # Verify: accept a prefix of the drafts, then a correction (wrong on purpose
            # sometimes: it differs from the draft it replaces) or the bonus token.
            a = rng.randrange(len(want) + 1)
            corr = rng.randrange(VOCAB)
            if a < len(want) and corr == want[a]:
                corr = (corr + 1) % VOCAB
            counts["rejected"] += len(want) - a
            for st in reqs[rid]:
                st.append(want[:a] + [corr])
        proposer.check_integrity()
        for rid in list(reqs):
            u = rng.random()
            if u < preempt:  # preempted: the draft KV goes, the state stays
                proposer.release_cache(reqs[rid][1])
                counts["preempted"] += 1
            elif u < preempt + 0.05:  # finished
                for st, p in zip(reqs.pop(rid), (dense, proposer)):
                    p.finish(st)
                counts["finished"] += 1
            elif u < preempt + 0.1:  # a sample forks from it (n > 1): a new state mid-output
                toks = reqs[rid][0].token_ids
                add(f"{rid}f{step}", list(toks), reqs[rid][0].num_prompt_tokens)
                counts["forked"] += 1
        if len(reqs) < 3:
            add(f"n{step}", [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 20))], 0)
        proposer.check_integrity()
    for st in reqs.values():
        proposer.finish(st[1])
    proposer.check_integrity()
    assert proposer.pool.num_free == proposer.pool.num_blocks, "draft blocks left after every request finished"
    return counts


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_paged_drafts_equal_the_dense_reference(draft_dir, dense, backend):
    proposer = paged(draft_dir, backend)
    counts = simulate(dense, proposer, seed=0)
    assert counts["drafts"] > 100 and counts["rejected"] > 30
    assert min(counts["preempted"], counts["forked"], counts["finished"]) > 0, counts
    assert counts["short"] == proposer.num_short == 0
    # Batched: one forward per draft position per step, not per request.
    assert proposer.num_forwards <= 30 * 4


def test_small_pool_evicts_idle_requests_and_stays_exact(draft_dir, dense):
    """A pool too small for every request's draft KV: idle requests are evicted (and
    recompute later), drafting requests never lose their blocks mid-proposal."""
    proposer = paged(draft_dir, "cpu", num_blocks=40, block_size=4)
    counts = simulate(dense, proposer, seed=1, steps=25, preempt=0.0, short_ok=True)
    assert proposer.num_evictions > 0 and counts["short"] == proposer.num_short
    assert counts["drafts"] > 5 * counts["short"], counts  # shortage is the exception


def test_short_of_blocks_drafts_what_fits(draft_dir, dense):
    proposer = paged(draft_dir, "cpu", num_blocks=3, block_size=4)
    small = proposer.new_state([1, 2])  # 2 tokens + 2 drafts: rows 0..2, 1 block
    big = proposer.new_state(list(range(20)))  # its catch-up alone needs 5 blocks
    mid = proposer.new_state(list(range(5, 11)))  # 6 tokens + 4 drafts need 3 blocks; 2 are left
    out = proposer.propose_batch([small, big, mid], [2, 3, 4])
    assert len(out[0]) == 2 and out[1] == [] and len(out[2]) == 3  # rows 0..7: 3 drafts
    assert out[2] == dense.propose(dense.new_state(list(range(5, 11))), 3)
    assert proposer.num_short == 2
    proposer.check_integrity()


def test_rollback_frees_the_rejected_drafts_blocks(draft_dir):
    proposer = paged(draft_dir, "cpu", num_blocks=64, block_size=4)
    s = proposer.new_state(list(range(1, 8)))  # 7 tokens
    d = proposer.propose(s, 6)  # feeds rows 0..11: 3 blocks
    assert len(d) == 6 and len(proposer.pool.tables[s.key]) == 3
    s.append([(d[0] + 1) % VOCAB])  # the first draft rejected: 8 committed tokens
    proposer.propose(s, 1)  # rolled back to the 7 agreeing rows, feeds row 7 only
    assert s.cached == s.token_ids and len(proposer.pool.tables[s.key]) == 2
    proposer.check_integrity()


def test_block_pool_counts():
    pool = DraftBlockPool(5, 4)
    assert pool.grow("a", 9) and pool.tables["a"] == [0, 1, 2]
    assert not pool.grow("b", 9) and "b" not in pool.tables  # short: nothing taken
    pool.trim("a", 4)
    assert pool.tables["a"] == [0] and pool.num_free == 4
    pool.free("a")
    pool.check_integrity()
    assert pool.num_free == 5
    with pytest.raises(ValueError):
        DraftBlockPool(0, 4)


def test_larger_draft_vocabulary_is_refused(draft_dir):
    with pytest.raises(ValueError, match="larger than the target"):
        PagedDraftProposer.load(draft_dir, num_blocks=8, block_size=4, target_vocab_size=100)



def test_prompt_catch_up_is_kept_out_of_the_per_draft_cost(draft_dir):
    """A first proposal prefills the prompt in the draft: reported apart, and the policy's
    per-draft cost estimate leaves it out (else one long prompt would turn drafting off)."""
    from kvserve.spec_decode.adaptive import SpecLengthPolicy
    from kvserve.spec_decode.manager import SpecDecodeManager
    from kvserve.spec_decode.scheduling import SpecScheduling

    proposer = paged(draft_dir, "cpu")
    s = proposer.new_state(list(range(100, 160)))
    d = proposer.propose(s, 3)
    assert proposer.last_prefill_s > 0
    s.append(d[:1] + [(d[1] + 1) % VOCAB])  # one accepted, then a correction
    proposer.propose(s, 3)
    assert proposer.last_prefill_s == 0.0  # a rollback's catch-up is part of drafting
    spec = SpecScheduling(SpecDecodeManager(proposer, SpecLengthPolicy(4, adaptive=False)))
    proposer.last_prefill_s = 1.5
    spec._observe_draft_cost(2.0, 4)
    assert spec.manager.policy.draft_token_s == pytest.approx(0.125)
