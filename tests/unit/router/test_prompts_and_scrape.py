"""Prompt hashing equals the engine's block hashes; /metrics scraping reads what kvserve exports."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.router.prompts import PromptHasher, completion_token_ids
from kvserve.router.scrape import parse_metrics

TOKENIZERS = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tokenizers"


def engine_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    from kvserve.request import Request
    from kvserve.sampling_params import SamplingParams

    return Request("r", tokens, SamplingParams(max_tokens=1), block_size=block_size).block_hashes


@pytest.mark.parametrize("block_size", [4, 16])
def test_token_id_prompts_hash_as_the_engine_does(block_size: int) -> None:
    tokens = list(range(3, 3 + 70))
    r = PromptHasher(None, block_size).route_request("/v1/completions", {"prompt": tokens})
    assert r.num_prompt_tokens == 70
    assert r.block_hashes == engine_hashes(tokens, block_size)
    assert len(r.block_hashes) == 70 // block_size
    assert r.num_blocks(block_size) == -(-70 // block_size)


def test_prompt_shapes() -> None:
    assert completion_token_ids({"prompt": [[5, 6], [7]]}, None) == [5, 6]  # a batch: its first prompt
    assert completion_token_ids({"prompt": [1, True]}, None) is None  # not token ids
    assert completion_token_ids({"prompt": "text"}, None) is None  # text without a tokenizer
    hasher = PromptHasher(None, 16)
    for body in ({"prompt": "text"}, {"messages": []}, ["not", "an", "object"], {}):
        r = hasher.route_request("/v1/completions", body)
        assert r.num_prompt_tokens is None and r.block_hashes == []


@pytest.fixture(scope="module")
def gpt2():  # type: ignore[no-untyped-def]
    if not (TOKENIZERS / "gpt2").is_dir():
        pytest.skip("shared gpt2 tokenizer not found")
    from kvserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZERS / "gpt2")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tok


def test_text_and_chat_prompts_use_the_servers_rules(gpt2) -> None:  # type: ignore[no-untyped-def]
    from kvserve.entrypoints.openai.prompts import chat_prompt
    from kvserve.entrypoints.openai.protocol import ChatMessage

    hasher = PromptHasher(gpt2, 4)
    text = "The quick brown fox jumps over the lazy dog " * 3
    ids = gpt2.encode(text, add_special_tokens=True)
    assert hasher.token_ids("/v1/completions", {"prompt": text}) == ids
    r = hasher.route_request("/v1/completions", {"prompt": text})
    assert r.block_hashes == engine_hashes(ids, 4)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    expected = chat_prompt(gpt2, [ChatMessage.model_validate(m) for m in messages], add_generation_prompt=True,
                           continue_final_message=False, chat_template_kwargs=None, add_special_tokens=False)
    assert hasher.token_ids("/v1/chat/completions", {"messages": messages}) == expected.token_ids
    no_gen = hasher.token_ids("/v1/chat/completions", {"messages": messages, "add_generation_prompt": False})
    assert no_gen is not None and no_gen != expected.token_ids
    # A conversation the server would refuse is routed without hashes (the instance answers the 400).
    assert hasher.route_request("/v1/chat/completions", {"messages": [{"role": "wizard"}]}).block_hashes == []
    assert hasher.failures == 1


def test_scrape_reads_kvserves_own_metrics() -> None:
    from kvserve.engine.engine_ipc import EngineStatsSnapshot
    from kvserve.metrics import ServerMetrics

    m = ServerMetrics("tiny")
    m.on_engine_stats(EngineStatsSnapshot(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                                          prefix_cache_queries=100, prefix_cache_hits=40))
    stats = parse_metrics(m.render().decode())
    assert (stats.running, stats.waiting, stats.queue, stats.kv_usage) == (3, 2, 5, 0.25)
    assert (stats.prefix_queries, stats.prefix_hits) == (100, 40)
    assert stats.role is None and stats.block_size is None  # kvserve reports no role yet


def test_scrape_role_block_size_and_label_sets() -> None:
    text = "\n".join([
        'vllm:num_requests_running{model_name="a"} 2', 'vllm:num_requests_running{model_name="b"} 1',
        'vllm:kv_cache_usage_perc{model_name="a"} 0.5', 'vllm:kv_cache_usage_perc{model_name="b"} 0.7',
        'kvserve:instance_info{role="prefill",block_size="32"} 1',
    ]) + "\n"
    stats = parse_metrics(text)
    assert (stats.running, stats.kv_usage, stats.role, stats.block_size) == (3, 0.7, "prefill", 32)
    vllm = parse_metrics('vllm:cache_config_info{block_size="16",enable_prefix_caching="True"} 1\n')
    assert vllm.block_size == 16 and vllm.role is None
    assert parse_metrics('kvserve:instance_info{role="chef"} 1\n').role is None
