"""CacheBlend through the real server: `segments` in /v1/completions (text or token ids),
`blend_documents` in chat, chunk counters on /metrics, and a clear 400 for bad segments."""
from __future__ import annotations

import httpx
import pytest

from tests.e2e.harness import get_metrics, metric

DOCS = [[200 + i for i in range(40)], [300 + i for i in range(33)], [400 + i for i in range(25)]]
HEAD = [11, 12, 13, 14, 15, 16, 17]
QUESTION = [21, 22, 23]


def _post(server, path: str, body: dict) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.base_url + path, json=body, timeout=120)


def test_segments_reuse_chunks_in_any_order(server, client) -> None:  # type: ignore[no-untyped-def]
    before = get_metrics(server.base_url)
    hits0 = metric(before, "kvserve:cacheblend_chunk_hits_total")
    misses0 = metric(before, "kvserve:cacheblend_chunk_misses_total")
    first = client.completions.create(model="tiny", prompt=None, max_tokens=4, temperature=0.0,
                                      extra_body={"segments": [HEAD, *DOCS, QUESTION]})
    assert first.usage.prompt_tokens == len(HEAD) + sum(map(len, DOCS)) + len(QUESTION)
    assert 1 <= first.usage.completion_tokens <= 4
    second = client.completions.create(model="tiny", prompt=None, max_tokens=4, temperature=0.0,
                                       extra_body={"segments": [HEAD, DOCS[2], DOCS[0], DOCS[1], QUESTION]})
    assert second.choices[0].finish_reason in ("length", "stop")
    after = get_metrics(server.base_url)
    assert metric(after, "kvserve:cacheblend_chunk_misses_total") - misses0 == 3
    assert metric(after, "kvserve:cacheblend_chunk_hits_total") - hits0 == 3
    assert metric(after, "kvserve:cacheblend_tokens_reused_total") > 0
    assert 0 < metric(after, "kvserve:cacheblend_recomputed_fraction") < 1


def test_text_segments_and_chat_documents(server, client) -> None:  # type: ignore[no-untyped-def]
    docs = ["The first document talks about rivers and lakes.\n", "The second one is about mountains.\n"]
    resp = client.completions.create(model="tiny", prompt=None, max_tokens=3,
                                     extra_body={"segments": ["Read these.\n", *docs, "Question: what?"]})
    assert resp.choices[0].text is not None and resp.usage.prompt_tokens > 10
    chat = client.chat.completions.create(
        model="tiny", max_tokens=3,
        messages=[{"role": "system", "content": "Answer from the documents."},
                  {"role": "user", "content": f"{docs[0]}{docs[1]}Which one is about mountains?"}],
        extra_body={"blend_documents": docs})
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("body,param,text", [
    ({"segments": [HEAD, [], QUESTION]}, "segments", "segment 1 is empty"),
    ({"segments": [HEAD] * 65}, "segments", "at most 64"),
    ({"segments": [HEAD, [5] * 1100, QUESTION]}, "segments", "more than the context allows"),
    ({"segments": [HEAD]}, "segments", "at least 2 segments"),
    ({"segments": [HEAD, QUESTION], "prompt": "hi"}, "segments", "not both"),
    ({"segments": [HEAD, {"a": 1}, QUESTION]}, "segments[1]", None),  # the schema: names the item
])
def test_bad_segments_are_a_400(server, body, param, text) -> None:  # type: ignore[no-untyped-def]
    r = _post(server, "/v1/completions", {"model": "tiny", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if text:
        assert text in err["message"]


def test_chat_document_not_in_the_messages_is_a_400(server) -> None:  # type: ignore[no-untyped-def]
    r = _post(server, "/v1/chat/completions", {
        "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}],
        "blend_documents": ["not there"]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "blend_documents"
    assert "does not appear verbatim" in r.json()["error"]["message"]
    # The server still serves.
    assert _post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}).status_code == 200
