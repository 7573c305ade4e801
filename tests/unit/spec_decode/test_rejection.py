"""Verification: greedy matching on exact cases; rejection sampling keeps the target distribution.

The statistical tests run many independent "requests" through several
speculative steps of a synthetic model (a Markov chain on a small vocabulary:
the target's and the draft's next-token tables depend on the previous token),
and compare the joint distribution of the first T emitted tokens with the
target chain's by a chi-square test.  Each test also shows that a wrong
verifier fails the same check, so the check has power.
"""
from __future__ import annotations

import pytest
import torch

from kvserve.spec_decode.rejection import greedy_verify, rejection_sample

V, T, KMAX = 4, 3, 3


def chain_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Normalised exponentials: rows drawn from Dirichlet(1, ..., 1).
    P = -torch.rand(V, V, generator=g).log()
    Q = -torch.rand(V, V, generator=g).log()
    # Zeros on both sides: the draft proposes tokens the target never emits, and misses some it does.
    P[0, 1] = 0.0
    P[2, 3] = 0.0
    Q[1, 0] = 0.0
    Q[3, 2] = 0.0
    return P / P.sum(1, keepdim=True), Q / Q.sum(1, keepdim=True)


def simulate(P, Q, n: int, mode: str, seed: int, verifier=rejection_sample) -> torch.Tensor:
    """[n, T] first T emitted tokens after context token 0, with random k in 0..KMAX per step.

    mode: "sampled" (drafts drawn from Q, probs passed), "onehot" (drafts = argmax Q, no probs),
    "sampled_as_onehot" (drafts drawn from Q, passed as deterministic: still exact, since
    conditioned on the draft the one-hot rule emits a sample of P), "onehot_claiming_q"
    (drafts = argmax Q but Q passed as their distribution: a wrong verifier input).
    """
    g = torch.Generator().manual_seed(seed)
    last = torch.zeros(n, dtype=torch.long)
    emitted = [[] for _ in range(n)]
    while min(len(e) for e in emitted) < T:
        k = torch.randint(0, KMAX + 1, (n,), generator=g)
        drafts = torch.empty((n, KMAX), dtype=torch.long)
        prev = last
        for j in range(KMAX):
            if mode in ("onehot", "onehot_claiming_q"):
                drafts[:, j] = Q[prev].argmax(-1)
            else:
                u = torch.rand(n, 1, generator=g)  # inverse CDF draw from Q[prev]
                drafts[:, j] = (Q[prev].cumsum(-1) <= u).sum(-1).clamp(max=V - 1)
            prev = drafts[:, j]
        ctx = torch.cat([last.unsqueeze(1), drafts], 1)  # [n, KMAX + 1]: the token before each row
        t_rows = P[ctx]  # [n, KMAX + 1, V]
        q_rows = Q[ctx[:, :KMAX]]  # [n, KMAX, V]
        t_valid = torch.arange(KMAX + 1).unsqueeze(0) <= k.unsqueeze(1)
        d_valid = torch.arange(KMAX).unsqueeze(0) < k.unsqueeze(1)
        probs = q_rows[d_valid] if mode in ("sampled", "onehot_claiming_q") else None
        ks = k.tolist()
        out = verifier(t_rows[t_valid], drafts[d_valid], ks, draft_probs=probs, generator=g)
        for i, toks in enumerate(out.token_ids):
            assert len(toks) == out.num_accepted[i] + 1 <= ks[i] + 1
            emitted[i].extend(toks)
        last = torch.tensor([e[-1] for e in emitted])
    return torch.tensor([e[:T] for e in emitted])


def chi_square_pvalue(samples: torch.Tensor, P: torch.Tensor) -> float:
    """Goodness of fit of [n, T] samples to the chain P from context 0 (cells with expected < 5 pooled)."""
    a, b, c = torch.meshgrid(torch.arange(V), torch.arange(V), torch.arange(V), indexing="ij")
    return chi_square_pvalue_joint(samples, P[0][a] * P[a, b] * P[b, c])


def chi_square_pvalue_joint(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """Goodness of fit of [n, 3] samples to a joint distribution [V', V', V'] (cells with expected < 5 pooled)."""
    n, v = samples.shape[0], joint.shape[0]
    idx = samples[:, 0] * v * v + samples[:, 1] * v + samples[:, 2]
    observed = torch.bincount(idx, minlength=v ** 3).double()
    expected = joint.reshape(-1).double() * n
    assert abs(float(expected.sum()) - n) < 1e-5 * n
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


N = 8000


@pytest.mark.parametrize("mode,seed", [("sampled", 1), ("onehot", 2), ("sampled", 3), ("sampled_as_onehot", 1)])
def test_speculative_sampling_keeps_the_target_distribution(mode, seed):
    P, Q = chain_tables(seed)
    samples = simulate(P, Q, N, mode, seed)
    assert chi_square_pvalue(samples, P) > 1e-3
    # Transitions the target gives probability 0 never appear (the draft proposes them often).
    pairs = set(zip(samples[:, :-1].reshape(-1).tolist(), samples[:, 1:].reshape(-1).tolist()))
    assert (0, 1) not in pairs and (2, 3) not in pairs
    assert 1 not in set(samples[:, 0].tolist())  # P[0, 1] = 0 after the context token 0


def test_the_chi_square_check_has_power():
    """Passing a distribution the drafts were not drawn from is caught by the same test,
    and so is sampling from the draft chain itself."""
    P, Q = chain_tables(1)
    assert chi_square_pvalue(simulate(P, Q, N, "onehot_claiming_q", 1), P) < 1e-6
    assert chi_square_pvalue(simulate(Q, Q, N, "sampled", 1), P) < 1e-6


def test_onehot_draft_probs_equal_the_deterministic_path():
    P, Q = chain_tables(5)
    target = P[torch.tensor([0, 1, 2, 3, 1, 2])]  # requests with k = 3 and k = 1
    drafts = torch.tensor([1, 2, 3, 2])
    onehot = torch.nn.functional.one_hot(drafts, V).float()
    a = rejection_sample(target, drafts, [3, 1], draft_probs=None, generator=torch.Generator().manual_seed(9))
    b = rejection_sample(target, drafts, [3, 1], draft_probs=onehot, generator=torch.Generator().manual_seed(9))
    assert a == b


def test_seeded_requests_do_not_depend_on_the_batch():
    P, _ = chain_tables(6)
    mine = P[torch.tensor([0, 2, 1])]  # k = 2, drafts [2, 1]
    other = P[torch.tensor([3, 3, 3, 3])]  # k = 3
    def run(order, seed_other):
        gens = {"me": torch.Generator().manual_seed(42), "other": torch.Generator().manual_seed(seed_other)}
        rows = {"me": (mine, [2, 1], 2), "other": (other, [3, 3, 3], 3)}
        tp = torch.cat([rows[r][0] for r in order])
        d = sum((rows[r][1] for r in order), [])
        out = rejection_sample(tp, d, [rows[r][2] for r in order], generators=[gens[r] for r in order])
        return out.token_ids[order.index("me")]
    base = run(["me", "other"], 1)
    assert run(["other", "me"], 1) == base
    assert run(["other", "me"], 2) == base
    # And a seed really decides: over several seeds the outputs are not all the same.
    outs = set()
    for s in range(20):
        g = torch.Generator().manual_seed(s)
        outs.add(tuple(rejection_sample(mine, [2, 1], [2], generators=[g]).token_ids[0]))
    assert len(outs) > 1


def test_greedy_verify_exact_cases():
    s = torch.tensor([[0, 1., 0], [2, 0, 0], [0, 0, 3.],   # req 0: k=2, drafts 1, 0 -> both match, bonus 2
                      [1, 0, 0],                          # req 1: k=0 -> 0
                      [0, 5, 0], [0, 0, 1],                # req 2: k=1, draft 2 != argmax 1 -> 1
                      [0, 0, 9], [9, 0, 0], [0, 9, 0]])    # req 3: k=2, drafts 2, 1: first ok, second != 0
    out = greedy_verify(s, [1, 0, 2, 2, 1], [2, 0, 1, 2])
    assert out.token_ids == [[1, 0, 2], [0], [1], [2, 0]]
    assert out.num_accepted == [2, 0, 0, 1]


def test_greedy_is_rejection_sampling_with_one_hot_target():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 5, generator=g)
    ks = [3, 0, 2, 3]
    drafts = scores.argmax(-1)[[0, 1, 2, 4, 6, 8, 9, 10]]  # some drafts agree with the target ...
    drafts[2] = (drafts[2] + 1) % 5  # ... and some do not
    drafts[6] = (drafts[6] + 1) % 5
    onehot = torch.nn.functional.one_hot(scores.argmax(-1), 5).float()
    rs = rejection_sample(onehot, drafts, ks, generator=g)
    draft_probs = torch.softmax(torch.randn(8, 5, generator=g), -1)
    rs2 = rejection_sample(onehot, drafts, ks, draft_probs=draft_probs, generator=g)
    assert greedy_verify(scores, drafts, ks) == rs == rs2


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="target has shape"):
        rejection_sample(torch.ones(3, 4) / 4, [1], [1])
    with pytest.raises(ValueError, match="draft ids"):
        greedy_verify(torch.ones(2, 4), [1, 2, 3], [1])
    with pytest.raises(ValueError, match=">= 0"):
        greedy_verify(torch.ones(1, 4), [], [-1])
    with pytest.raises(ValueError, match="generators"):
        rejection_sample(torch.ones(2, 4) / 4, [1], [1], generators=[None, None])


def test_inputs_are_not_modified():
    P, Q = chain_tables(7)
    target = P[torch.tensor([0, 1, 2, 3, 1])]  # k = 2, then k = 1
    drafts = torch.tensor([1, 2, 3])
    probs = Q[torch.tensor([0, 1, 3])]
    t0, q0 = target.clone(), probs.clone()
    for seed in range(20):  # enough draws that some rejections write a residual row
        rejection_sample(target, drafts, [2, 1], draft_probs=probs, generator=torch.Generator().manual_seed(seed))
        rejection_sample(target, drafts, [2, 1], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(target, t0) and torch.equal(probs, q0)
