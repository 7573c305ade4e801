"""Workload synthesis: Mooncake prefix blocks, exact-length prompts, length distributions, ShareGPT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvserve.bench.datasets import LengthDist, random_requests, sharegpt_requests, trace_requests
from kvserve.bench.errors import BenchInputError
from kvserve.bench.tokens import IdsRenderer, TextRenderer, load_tokenizer
from kvserve.bench.traces import TraceRecord, read_burstgpt, read_mooncake


@pytest.fixture(scope="module")
def gpt2(shared_data: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(shared_data / "tokenizers/gpt2")


@pytest.fixture(scope="module")
def gpt2_text(gpt2) -> TextRenderer:  # type: ignore[no-untyped-def]
    return TextRenderer(gpt2)  # building the word-token pool takes ~1 s; share it


def _rec(hash_ids: tuple[int, ...], n_in: int, line: int, n_out: int = 4) -> TraceRecord:
    return TraceRecord(0.0, n_in, n_out, hash_ids, line=line)


def _blocks(ids: list[int], bs: int) -> list[list[int]]:
    return [ids[i : i + bs] for i in range(0, len(ids), bs)]


def _common_blocks(a: list[int], b: list[int], bs: int) -> int:
    """Leading full blocks that are identical."""
    k = 0
    for x, y in zip(_blocks(a, bs), _blocks(b, bs)):
        if x != y or len(x) != bs or len(y) != bs:
            break
        k += 1
    return k


# ----------------------------------------------------------------------------- Mooncake prefix synthesis


@pytest.mark.parametrize("block_size", [512, 16])
def test_hand_made_prefix_sharing(block_size: int) -> None:
    bs = block_size
    recs = [
        _rec((1, 2, 3), 2 * bs + bs // 2, line=1),  # 3 blocks, last partial
        _rec((1, 2, 4), 3 * bs, line=2),  # shares exactly 2 blocks with rec 0
        _rec((5, 6), 2 * bs, line=3),  # shares nothing
        _rec((1, 2, 3), 2 * bs + 3, line=4),  # same ids as rec 0, shorter partial last block
    ]
    reqs, skipped = trace_requests(recs, None, IdsRenderer(50_000), seed=7, block_size=bs)
    assert skipped == 0
    a, b, c, d = (list(r.prompt) for r in reqs)  # type: ignore[arg-type]
    assert [len(x) for x in (a, b, c, d)] == [r.input_len for r in recs]
    assert a[: 2 * bs] == b[: 2 * bs] and a[2 * bs] != b[2 * bs]
    assert _common_blocks(a, b, bs) == 2
    assert _common_blocks(a, c, bs) == 0 and a[0] != c[0]
    # equal hash ids -> the shorter partial block is a prefix of the longer one
    assert d == a[: len(d)]


def test_real_mooncake_prefix_sharing(shared_data: Path) -> None:
    """For many pairs of real requests: k shared leading hash ids <=> exactly k shared blocks."""
    recs = read_mooncake(shared_data / "traces/mooncake/conversation_trace.jsonl")[:60]
    reqs, _ = trace_requests(recs, None, IdsRenderer(32_000), seed=0, block_size=512)
    checked_nonzero = 0
    for i in range(len(reqs)):
        for j in range(i + 1, len(reqs)):
            hi, hj = recs[i].hash_ids, recs[j].hash_ids
            k = 0
            while k < min(len(hi), len(hj)) and hi[k] == hj[k]:
                k += 1
            pi, pj = list(reqs[i].prompt), list(reqs[j].prompt)  # type: ignore[arg-type]
            bi, bj = _blocks(pi, 512), _blocks(pj, 512)
            for m in range(k):  # the k shared blocks are identical (up to the shorter partial)
                n = min(len(bi[m]), len(bj[m]))
                assert bi[m][:n] == bj[m][:n]
            if k < min(len(bi), len(bj)):  # the next block differs
                assert bi[k] != bj[k]
            checked_nonzero += k > 0
    assert checked_nonzero > 10  # the trace really has shared prefixes among these requests
    assert all(r.prompt_len == rec.input_len for r, rec in zip(reqs, recs))


def test_prefix_sharing_survives_text_round_trip(gpt2, gpt2_text) -> None:  # type: ignore[no-untyped-def]
    bs = 32
    recs = [_rec((10, 11, 12), 3 * bs, line=1), _rec((10, 11, 99), 2 * bs + 5, line=2)]
    renderer = gpt2_text
    before = renderer.repaired
    reqs, _ = trace_requests(recs, None, renderer, seed=1, block_size=bs)
    ids = [gpt2.encode(r.prompt, add_special_tokens=False) for r in reqs]
    assert [len(x) for x in ids] == [3 * bs, 2 * bs + 5]
    assert ids[0][: 2 * bs] == ids[1][: 2 * bs] and ids[0][2 * bs] != ids[1][2 * bs]
    assert renderer.repaired == before  # exact round trip, no repair needed


def test_block_contents_depend_on_seed() -> None:
    recs = [_rec((1,), 64, line=1)]
    a, _ = trace_requests(recs, None, IdsRenderer(1000), seed=0, block_size=64)
    b, _ = trace_requests(recs, None, IdsRenderer(1000), seed=0, block_size=64)
    c, _ = trace_requests(recs, None, IdsRenderer(1000), seed=1, block_size=64)
    assert a[0].prompt == b[0].prompt != c[0].prompt


def test_trace_requests_skips_failed_rows(shared_data: Path) -> None:
    recs = read_burstgpt(shared_data / "traces/burstgpt/burstgpt_sample.csv")
    zero = sum(1 for r in recs if r.output_len == 0 or r.input_len == 0)
    reqs, skipped = trace_requests(recs, None, IdsRenderer(1000), seed=0)
    assert skipped == zero > 0 and len(reqs) == len(recs) - zero
    assert [r.index for r in reqs] == list(range(len(reqs)))
    with pytest.raises(BenchInputError, match="no usable requests"):
        trace_requests([_rec((), 5, 1, n_out=0)], None, IdsRenderer(1000), seed=0)


# ----------------------------------------------------------------------------- random + text prompts


def test_random_requests_ids_exact_and_seeded() -> None:
    r = IdsRenderer(500, exclude=frozenset({0, 1}))
    a = random_requests(50, LengthDist.parse("uniform:5:40"), LengthDist.parse("7"), r, seed=3)
    b = random_requests(50, LengthDist.parse("uniform:5:40"), LengthDist.parse("7"), r, seed=3)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    for x in a:
        assert isinstance(x.prompt, list) and len(x.prompt) == x.prompt_len and 5 <= x.prompt_len <= 40
        assert x.output_len == 7 and all(2 <= t < 500 for t in x.prompt)


def test_random_text_prompts_encode_to_exact_length(gpt2, gpt2_text) -> None:  # type: ignore[no-untyped-def]
    renderer = gpt2_text
    reqs = random_requests(20, LengthDist.parse("uniform:1:300"), LengthDist.parse("4"), renderer, seed=0)
    for r in reqs:
        assert isinstance(r.prompt, str)
        assert len(gpt2.encode(r.prompt, add_special_tokens=False)) == r.prompt_len


def test_text_renderer_repairs_arbitrary_ids(gpt2, gpt2_text) -> None:  # type: ignore[no-untyped-def]
    renderer = gpt2_text
    before = renderer.repaired
    # single letters merge when concatenated ("abab..." is fewer tokens): the ids do not round-trip,
    # and the repair loop must still produce text of exactly the intended length
    ids = (gpt2.encode("a") + gpt2.encode("b")) * 40
    assert len(gpt2.encode(gpt2.decode(ids))) != len(ids)
    text, n = renderer.render(ids)
    assert renderer.repaired == before + 1
    assert n == len(ids) and len(gpt2.encode(text, add_special_tokens=False)) == n


@pytest.mark.parametrize(
    "spec,lo,hi",
    [("12", 12, 12), ("uniform:3:9", 3, 9), ("normal:100:10", 1, None), ("lognormal:50:0.5", 1, None),
     ("exponential:20", 1, None)],
)
def test_length_dist(spec: str, lo: int, hi: int | None) -> None:
    x = LengthDist.parse(spec).sample(np.random.default_rng(0), 4000)
    assert x.min() >= lo and (hi is None or x.max() <= hi)
    if spec.startswith("uniform"):
        assert set(x.tolist()) == set(range(3, 10))  # inclusive bounds
    if spec.startswith("normal"):
        assert abs(x.mean() - 100) < 1.5
    if spec.startswith("lognormal"):
        assert abs(np.median(x) - 50) < 3


@pytest.mark.parametrize("spec", ["", "abc", "uniform:5", "uniform:9:3", "normal:1:-1", "0", "gauss:1:2", "nan"])
def test_length_dist_rejects(spec: str) -> None:
    with pytest.raises(BenchInputError):
        LengthDist.parse(spec)


# ----------------------------------------------------------------------------- ShareGPT


def test_sharegpt(shared_data: Path, gpt2) -> None:  # type: ignore[no-untyped-def]
    path = shared_data / "prompts/sharegpt/ShareGPT_V3_filtered_500.json"
    data = json.loads(path.read_text())
    firsts = {d["conversations"][0]["value"] for d in data}
    reqs = sharegpt_requests(path, 8, gpt2, LengthDist.parse("uniform:4:9"), "text", seed=0)
    assert len(reqs) == 8 and len({r.prompt for r in reqs}) == 8  # type: ignore[misc]
    for r in reqs:
        assert r.prompt in firsts
        assert r.prompt_len == len(gpt2.encode(r.prompt, add_special_tokens=False))
        assert 4 <= r.output_len <= 9
    ids = sharegpt_requests(path, 3, gpt2, LengthDist.parse("5"), "ids", seed=0, max_input_len=16)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len <= 16 for r in ids)


def test_sharegpt_broken(tmp_path: Path, gpt2) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "s.json"
    bad.write_text('[{"id": 1, "conversations": [{"from": "human", "value": "hi"}]}, {"id": 2}]')
    with pytest.raises(BenchInputError, match="entry 1"):
        sharegpt_requests(bad, 2, gpt2, LengthDist.parse("5"), "ids", seed=0)
    bad.write_text("[{")
    with pytest.raises(BenchInputError, match=str(bad)):
        sharegpt_requests(bad, 2, gpt2, LengthDist.parse("5"), "ids", seed=0)
