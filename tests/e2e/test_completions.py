"""/v1/completions through the real `openai` client."""
from __future__ import annotations

import pytest

from kvserve.sampling_params import SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]


def _offline_greedy(offline, prompts, max_tokens: int) -> list:  # type: ignore[no-untyped-def]
    return offline.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)


def test_non_streaming_shape_and_usage(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0.0)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.model == "tiny"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert 1 <= resp.usage.completion_tokens <= 8


def test_model_alias_is_accepted_and_echoed(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.completions.create(model="tiny-alias", prompt="a", max_tokens=1)
    assert resp.model == "tiny-alias"


def test_greedy_matches_offline_engine(client, offline) -> None:  # type: ignore[no-untyped-def]
    expected = _offline_greedy(offline, PROMPTS, 16)
    for prompt, exp in zip(PROMPTS, expected):
        resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0.0)
        assert resp.choices[0].text == exp.outputs[0].text
        assert resp.usage.completion_tokens == len(exp.outputs[0].token_ids)
        assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)


def test_streaming_matches_non_streaming(client) -> None:  # type: ignore[no-untyped-def]
    full = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0.0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompts_and_batches(client, offline) -> None:  # type: ignore[no-untyped-def]
    ids = offline.get_tokenizer().encode(PROMPTS[2])
    single = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0.0)
    from_text = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0.0)
    assert single.choices[0].text == from_text.choices[0].text

    # Batch of token-id prompts with n=2: choice index = prompt_index * n + sample_index.
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], n=2, max_tokens=6, temperature=0.0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == single.choices[0].text
    short = client.completions.create(model="tiny", prompt=ids[:3], max_tokens=6, temperature=0.0)
    assert batch.choices[2].text == short.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + 3

    texts = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=4, temperature=0.0)
    assert len(texts.choices) == len(PROMPTS)


def test_n_samples_streaming_equals_non_streaming_with_seed(client) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=3, seed=11)
    full = client.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert len({c.text for c in full.choices}) > 1, "n samples should differ at temperature 1"
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in full.choices}


def test_seed_reproducibility(client) -> None:  # type: ignore[no-untyped-def]
    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_string(client) -> None:  # type: ignore[no-untyped-def]
    base = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.0)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"degenerate stop string from {text!r}"
    cut = text.find(stop)
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.0, stop=[stop])
    assert resp.choices[0].text == text[:cut]
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.0, stop=stop, stream=True) if c.choices)
    assert streamed == text[:cut]
    incl = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert incl.choices[0].text == text[:cut + len(stop)]


def test_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0.0, logprobs=3)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0.0
        assert 3 <= len(top) <= 4  # top-3 plus the sampled token
        assert token_lp == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_echo(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0.0, echo=True,
                                     logprobs=1)
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0.0)
    assert resp.choices[0].text == PROMPTS[0] + plain.choices[0].text
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(lp.tokens) == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert all(v is not None for v in lp.token_logprobs[1:])


def test_vllm_extension_fields_accepted(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, user="tester",
        extra_body={"ignore_eos": True, "min_tokens": 8, "top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1},
    )
    assert resp.usage.completion_tokens == 8
    assert resp.choices[0].finish_reason == "length"
