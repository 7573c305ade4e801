"""`kvserve eval`: the token metrics' arithmetic, and the runner on a random-weight model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvserve.entrypoints.cli import main as kvserve_main
from kvserve.eval.runner import EvalSettings, format_tables, run_eval
from kvserve.eval.token_metrics import TokenMetrics, compare_sequence
from tests.helpers.tiny_models import build_tiny_model


def test_compare_sequence_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 11, generator=g).log_softmax(-1)
    cand = (ref + 0.3 * torch.randn(6, 11, generator=g)).log_softmax(-1)
    cand_tokens = cand.argmax(-1).tolist()
    c = compare_sequence(ref, cand, cand_tokens)
    kls, agree = [], 0
    for t in range(6):
        p, q = ref[t].exp().tolist(), cand[t].exp().tolist()
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        agree += max(range(11), key=lambda i: p[i]) == max(range(11), key=lambda i: q[i])
    assert c.top1_agree == agree
    assert c.kl_sum == pytest.approx(sum(kls), rel=1e-6)
    assert c.kl_max == pytest.approx(max(kls), rel=1e-6)
    first_diff = next((t for t in range(6) if ref[t].argmax() != cand_tokens[t]), 6)
    assert c.greedy_match == first_diff


def test_identical_distributions_and_a_late_divergence():
    ref = torch.tensor([[0.0, -5.0, -9.0]] * 4).log_softmax(-1)
    same = compare_sequence(ref, ref.clone(), [0, 0, 0, 0])
    assert (same.top1_agree, same.greedy_match, same.kl_sum) == (4, 4, 0.0)
    cand = ref.clone()
    cand[2] = torch.tensor([-5.0, 0.0, -9.0]).log_softmax(-1)  # the candidate flips at position 2
    c = compare_sequence(ref, cand, [0, 0, 1, 0])
    assert c.greedy_match == 2 and c.top1_agree == 3 and c.kl_sum > 1.0
    m = TokenMetrics()
    m.add(same)
    m.add(c)
    s = m.summary()
    assert s["top1_agreement"] == 7 / 8 and s["greedy_match_mean"] == 3.0 and s["full_match_fraction"] == 0.5
    with pytest.raises(ValueError):
        compare_sequence(ref, ref[:3], [0, 0, 0])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return build_tiny_model("llama-tied", tmp_path_factory.mktemp("eval_model"), tokenizer="gpt2",
                            overrides={"vocab_size": 50257, "max_position_embeddings": 1024})


SETTINGS = dict(tasks=["kv_retrieval"], lengths=[128], num_per_cell=2, token_prompts=2, token_len=6, batch=4)
ENGINE = dict(block_size=8)


def _quiet(_: str) -> None:
    pass


def test_default_engine_agrees_with_the_reference(random_model):
    r = run_eval(str(random_model), ENGINE, EvalSettings(**SETTINGS), log=_quiet)
    s = r.token_metrics["128"]
    assert s["sequences"] == 2 and s["tokens"] == 12
    assert s["top1_agreement"] == 1.0 and s["greedy_match_mean"] == 6 and s["kl_mean"] < 1e-5
    assert r.accuracy["kv_retrieval/plain/128"]["total"] == 2  # random weights: the count, not the value
    assert r.kv_tier_stats is None
    assert "| kv_retrieval | plain |" in format_tables(r)


def test_tier_round_trip_raw_is_lossless_and_int8_is_measurably_lossy(random_model):
    settings = EvalSettings(**{**SETTINGS, "accuracy": False})
    raw = run_eval(str(random_model), {**ENGINE, "kv_tiers": "cpu:64MiB", "kv_codec": "raw"}, settings, log=_quiet)
    int8 = run_eval(str(random_model), {**ENGINE, "kv_tiers": "cpu:64MiB", "kv_codec": "int8"}, settings, log=_quiet)
    for r in (raw, int8):  # the measured requests really took their prompt KV from the tier
        assert r.kv_tier_stats["offload"]["blocks_used"] >= 2 * (128 // 8 - 2)  # all full prompt blocks
    assert raw.token_metrics["128"]["kl_mean"] < 1e-5
    assert int8.token_metrics["128"]["kl_mean"] > 10 * max(raw.token_metrics["128"]["kl_mean"], 1e-9)


def test_cli_writes_json_and_rejects_bad_input(random_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = kvserve_main(["eval", str(random_model), "--tasks", "kv_retrieval", "--lengths", "128", "--num-per-cell",
                       "1", "--token-prompts", "1", "--token-len", "4", "--block-size", "8", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["token_metrics"]["128"]["tokens"] == 4 and d["accuracy"]["kv_retrieval/plain/128"]["total"] == 1
    assert kvserve_main(["eval", str(random_model), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert kvserve_main(["eval", str(random_model), "--kv-codec", "int8"]) == 2
    assert kvserve_main(["eval", str(tmp_path / "missing")]) == 2
