"""Many concurrent streams, and client disconnects freeing their KV blocks."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from kvserve.sampling_params import SamplingParams
from tests.e2e.harness import get_metrics, metric, wait_for

NUM_STREAMS = 64
MAX_TOKENS = 12


def _prompts(n: int) -> list[list[int]]:
    # Distinct token-id prompts of varied lengths (ids well inside the gpt2 vocabulary).
    return [[100 + 37 * i + j for j in range(4 + i % 9)] for i in range(n)]


def _idle(base_url: str) -> bool:
    m = get_metrics(base_url)
    return (metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
            and metric(m, "vllm:kv_cache_usage_perc") == 0)


def test_64_concurrent_streams_complete_with_correct_tokens(server, offline) -> None:  # type: ignore[no-untyped-def]
    import openai

    prompts = _prompts(NUM_STREAMS)
    expected = offline.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)

    async def run() -> list[tuple[str, int, int]]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        peak = 0

        async def one(prompt: list[int]) -> tuple[str, int, int]:
            text, chunks, usage = "", 0, None
            stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                                     temperature=0.0, stream=True,
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    chunks += 1
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return text, chunks, usage

        async def watch() -> None:
            nonlocal peak
            async with httpx.AsyncClient() as http:
                while True:
                    text = (await http.get(server.base_url + "/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("vllm:num_requests_running{"):
                            peak = max(peak, int(float(line.rsplit(" ", 1)[1])))
                    await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(one(p) for p in prompts))
        finally:
            watcher.cancel()
            await client.close()
        assert peak > 1, "streams should have run in one batch, not one after another"
        return results

    results = asyncio.run(run())
    for (text, chunks, usage), exp in zip(results, expected):
        assert text == exp.outputs[0].text
        assert usage == len(exp.outputs[0].token_ids)
        assert chunks >= 1
    wait_for(lambda: _idle(server.base_url), what="engine idle after the streams")


def test_streaming_disconnect_aborts_and_frees_blocks(server) -> None:  # type: ignore[no-untyped-def]
    before = get_metrics(server.base_url)
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data:"):
                    got += 1
                    if got == 3:
                        break
            during = get_metrics(server.base_url)
            assert metric(during, "vllm:num_requests_running") >= 1
            assert metric(during, "vllm:kv_cache_usage_perc") > 0
        # Leaving the block closes the connection mid-stream.
    wait_for(lambda: _idle(server.base_url), what="running=0 and KV usage=0 after the disconnect")
    after = get_metrics(server.base_url)
    aborted = metric(after, "vllm:request_success_total", finished_reason="abort") - \
        metric(before, "vllm:request_success_total", finished_reason="abort")
    assert aborted == 1
    generated = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    assert generated < 1000, "the request should have stopped at the disconnect"


def test_non_streaming_disconnect_aborts(server) -> None:  # type: ignore[no-untyped-def]
    before = get_metrics(server.base_url)
    body = {"model": "tiny", "prompt": "Another long story", "max_tokens": 1000, "ignore_eos": True}
    # 1000 tokens (the tiny model's whole context) take several seconds even on a fast machine.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: _idle(server.base_url), what="engine idle after the client gave up")
    after = get_metrics(server.base_url)
    assert metric(after, "vllm:request_success_total", finished_reason="abort") - \
        metric(before, "vllm:request_success_total", finished_reason="abort") == 1
