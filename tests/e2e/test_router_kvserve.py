"""`kvserve router --policy kv-aware` (a real subprocess) in front of two real `kvserve serve` instances
of the tiny test model, with the real `openai` client.

Tests run in file order on module-scoped processes; the last two kill the instances.  The router's
health interval is long, so an instance leaves the rotation only because a request found it dead
(the retry path), not because a periodic check saw it first.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

# test_pd_disagg imports RouterProcess from here.
from tests.e2e.harness import RouterProcess, ServerProcess, get_metrics, metric

HEADER = "x-kvserve-instance"


@pytest.fixture(scope="module")
def instances(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    logs = tmp_path_factory.mktemp("router-instances")
    servers = [ServerProcess(model_dir, logs / f"instance{i}.log", "--served-model-name", "tiny") for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def router(instances: list[ServerProcess], model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    args = [a for s in instances for a in ("--instance", s.base_url)]
    r = RouterProcess(tmp_path_factory.mktemp("router") / "router.log", *args, "--policy", "kv-aware",
                      "--tokenizer", str(model_dir), "--health-interval", "600")
    try:
        yield r.wait_ready()
    finally:
        r.stop()


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_through_the_router_equal_direct(router: RouterProcess, instances: list[ServerProcess]) -> None:
    via, direct = client(router.url), client(instances[0].base_url)
    kw: dict[str, Any] = dict(model="tiny", prompt="The weather today is", max_tokens=12, temperature=0)
    a = via.completions.create(**kw)
    b = direct.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == b.choices[0].finish_reason
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and a.usage.completion_tokens == 12
    sa = list(via.completions.create(**kw, stream=True))
    sb = list(direct.completions.create(**kw, stream=True))
    # Chunk boundaries depend on timing (the server merges tokens a slow reader has not taken yet),
    # so the streams are compared by their text.
    assert "".join(c.choices[0].text for c in sa if c.choices) == b.choices[0].text
    assert "".join(c.choices[0].text for c in sb if c.choices) == b.choices[0].text
    assert sa[-1].choices[0].finish_reason == sb[-1].choices[0].finish_reason == "length"


def test_chat_through_the_router_equals_direct(router: RouterProcess, instances: list[ServerProcess]) -> None:
    via, direct = client(router.url), client(instances[1].base_url)
    kw: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=10,
                              temperature=0)
    a, b = via.chat.completions.create(**kw), direct.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    sa = list(via.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in sa if c.choices) == b.choices[0].message.content
    assert [m.id for m in via.models.list().data] == ["tiny"]


def test_kv_aware_sends_a_repeated_prefix_to_the_same_instance(router: RouterProcess) -> None:
    """...and the router's predicted hit equals the engine's own cached-token count, request by request:
    the router's block hashes are the engine's."""
    via = client(router.url)
    prefix = "Below is a long shared document about routers and caches. " * 8
    served: list[str] = []
    for i, suffix in enumerate(["First question?", "Second one?", "A third", "And a fourth question here"]):
        before = get_metrics(router.url)
        raw = via.completions.with_raw_response.create(model="tiny", prompt=prefix + suffix, max_tokens=2,
                                                       temperature=0)
        out = raw.parse()
        served.append(raw.headers[HEADER])
        after = get_metrics(router.url)
        predicted = (metric(after, "kvserve:router_kv_predicted_hit_tokens_total", instance=served[-1])
                     - metric(before, "kvserve:router_kv_predicted_hit_tokens_total", instance=served[-1]))
        cached = out.usage.prompt_tokens_details.cached_tokens
        assert predicted == cached, (i, predicted, cached)
        if i:
            assert cached >= 64  # the prefix is 88 tokens: its 5 full blocks
    assert len(set(served)) == 1
    # A chat conversation too (the router renders the chat template as the server does).
    messages = [{"role": "system", "content": prefix}, {"role": "user", "content": "hi"}]
    hosts = {via.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=1)
             .headers[HEADER] for _ in range(2)}
    assert len(hosts) == 1


def test_a_killed_instance_is_retried_on_the_other(router: RouterProcess, instances: list[ServerProcess]) -> None:
    via = client(router.url)
    prefix = "A second document, cached on exactly one instance. " * 6
    first = via.completions.with_raw_response.create(model="tiny", prompt=prefix + "one", max_tokens=1)
    victim = next(s for s in instances if s.base_url == first.headers[HEADER])
    survivor = next(s for s in instances if s is not victim)
    engine_pid = victim.engine_pid()
    victim.proc.kill()  # SIGKILL: no drain, the port refuses connections
    victim.proc.wait(10)
    try:
        os.kill(engine_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # kv-aware prefers the victim (it holds the prefix): the first attempt fails, the retry succeeds.
    again = via.completions.with_raw_response.create(model="tiny", prompt=prefix + "two", max_tokens=3)
    assert again.headers[HEADER] == survivor.base_url and again.parse().usage.completion_tokens == 3
    m = get_metrics(router.url)
    assert metric(m, "kvserve:router_failed_attempts_total", instance=victim.base_url, reason="connect") == 1
    assert metric(m, "kvserve:router_retries_total", instance=survivor.base_url) == 1
    assert metric(m, "kvserve:router_instance_healthy", instance=victim.base_url, slot="any") == 0
    out = via.completions.create(model="tiny", prompt=prefix + "three", max_tokens=2)
    assert out.usage.prompt_tokens_details.cached_tokens > 0  # the survivor now holds the prefix


def test_all_instances_down_is_a_503(router: RouterProcess, instances: list[ServerProcess]) -> None:
    for s in instances:
        if s.proc.poll() is None:
            s.stop()
    with pytest.raises(openai.APIStatusError) as err:
        client(router.url).completions.create(model="tiny", prompt="anyone?", max_tokens=1)
    assert err.value.status_code == 503
    assert err.value.response.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(router.url + "/health").status_code == 503
