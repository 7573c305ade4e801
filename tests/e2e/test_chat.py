"""/v1/chat/completions through the real `openai` client."""
from __future__ import annotations

import pytest

from kvserve.sampling_params import SamplingParams

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_non_streaming_shape(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, temperature=0.0)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert 1 <= resp.usage.completion_tokens <= 8


def test_chat_template_from_tokenizer_config(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    body = httpx.post(server.base_url + "/tokenize", json={"messages": MESSAGES, "return_token_strs": True}).json()
    detok = httpx.post(server.base_url + "/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert detok == "<|system|>\nYou are terse.\n<|user|>\nName a colour.\n<|assistant|>\n"
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])


def test_greedy_matches_offline_chat(client, offline) -> None:  # type: ignore[no-untyped-def]
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0.0)
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streaming(client) -> None:  # type: ignore[no-untyped-def]
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0.0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_and_seed(client) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2, seed=5)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {c.index: c.message.content for c in a.choices}


def test_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0.0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_stop_string(client) -> None:  # type: ignore[no-untyped-def]
    text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16,
                                          temperature=0.0).choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0.0, stop=stop)
    assert resp.choices[0].message.content == text[:text.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_content_parts_are_joined(client) -> None:  # type: ignore[no-untyped-def]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}]
    joined = [{"role": "user", "content": "Name a\ncolour."}]
    a = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6, temperature=0.0)
    b = client.chat.completions.create(model="tiny", messages=joined, max_tokens=6, temperature=0.0)
    assert a.choices[0].message.content == b.choices[0].message.content
