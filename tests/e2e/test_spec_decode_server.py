"""Speculative decoding through the real server and the real `openai` client: a server started
with --speculative-method ngram answers greedy completions (plain and streamed) with exactly the
tokens of the offline engine without speculation, and /metrics shows the drafts."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from kvserve import SamplingParams
from tests.e2e.harness import ServerProcess, get_metrics, metric

PROMPT = [100, 101, 102, 103, 104, 100, 101, 102, 103, 104, 100, 101, 102]  # repeats: n-gram drafts


@pytest.fixture(scope="module")
def spec_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("spec") / "server.log", "--served-model-name", "tiny",
                        "--speculative-method", "ngram", "--num-speculative-tokens", "3",
                        "--no-speculative-adaptive")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_greedy_completions_equal_the_engine_without_speculation(spec_server: ServerProcess, offline) -> None:  # type: ignore[no-untyped-def]
    import openai

    client = openai.OpenAI(base_url=spec_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120.0)
    want = offline.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=24,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    text = want.outputs[0].text
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == text and got.usage.completion_tokens == 24
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    m = get_metrics(spec_server.base_url)
    assert metric(m, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert metric(m, "vllm:spec_decode_num_drafts_total") > 0
    assert metric(m, "vllm:spec_decode_num_accepted_tokens_total") <= metric(m, "vllm:spec_decode_num_draft_tokens_total")
