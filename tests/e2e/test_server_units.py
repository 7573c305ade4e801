"""Exact-state tests of the server's pure pieces (no server, no model): fast, and they pin the invariants."""
from __future__ import annotations

import argparse

import pytest

from kvserve.engine.engine_ipc import EngineStatsSnapshot, RequestDelta, SampleDelta, StepOutputs, dumps, loads
from kvserve.engine.engine_process import DeltaTracker
from kvserve.entrypoints.openai.errors import from_validation_error
from kvserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.entrypoints.openai.serving import merge_deltas
from kvserve.entrypoints.serve_cli import parse_size
from kvserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


@pytest.mark.parametrize("text,expected", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1048576", 1048576),
    ("2g", 2 * 2**30), ("64 KiB", 65536),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "4XB", "-1GiB", "0", "four"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def _out(rid: str, samples: list[tuple[str, list[int], str | None]], finished: bool = False,
         logprobs: bool = False) -> RequestOutput:
    outs = []
    for i, (text, ids, reason) in enumerate(samples):
        lps = [{t: Logprob(-0.5, 1, f"<{t}>")} for t in ids] if logprobs else None
        outs.append(CompletionOutput(i, text, list(ids), logprobs=lps, finish_reason=reason))
    return RequestOutput(rid, None, [1, 2], outs, finished, RequestMetrics(0.0))


def test_delta_tracker_sends_only_what_is_new() -> None:
    tracker = DeltaTracker()
    d1 = tracker.delta(_out("r", [("He", [5], None)], logprobs=True))
    assert [(s.index, s.text, s.token_ids) for s in d1.samples] == [(0, "He", [5])]
    assert d1.samples[0].logprobs == [[(5, -0.5, 1, "<5>")]]
    # A token whose text is held back: tokens advance, text does not.
    d2 = tracker.delta(_out("r", [("He", [5, 6], None)]))
    assert [(s.text, s.token_ids) for s in d2.samples] == [("", [6])]
    # Nothing new for sample 0, a new sample 1 appears (n > 1 fork).
    d3 = tracker.delta(_out("r", [("He", [5, 6], None), ("X", [9], None)]))
    assert [(s.index, s.text, s.token_ids) for s in d3.samples] == [(1, "X", [9])]
    d4 = tracker.delta(_out("r", [("Hello", [5, 6], "stop"), ("X", [9], "length")], finished=True))
    assert [(s.index, s.text, s.token_ids, s.finish_reason) for s in d4.samples] == [
        (0, "llo", [], "stop"), (1, "", [], "length")]
    assert d4.finished
    assert tracker._sent == {}  # finished requests are forgotten


def test_merge_deltas_concatenates_per_request_and_sample() -> None:
    batch = [
        RequestDelta("a", [SampleDelta(0, "x", [1])]),
        RequestDelta("b", [SampleDelta(0, "p", [7])]),
        RequestDelta("a", [SampleDelta(0, "y", [2]), SampleDelta(1, "z", [3])]),
        RequestDelta("a", [SampleDelta(0, "", [], finish_reason="length")], finished=True),
    ]
    merged = {d.request_id: d for d in merge_deltas(batch)}
    assert list(merged) == ["a", "b"]
    a = merged["a"]
    assert a.finished
    assert [(s.index, s.text, s.token_ids, s.finish_reason) for s in a.samples] == [
        (0, "xy", [1, 2], "length"), (1, "z", [3], None)]
    assert batch[0].samples[0].text == "x"  # the inputs are not modified


def test_step_outputs_pickle_round_trip() -> None:
    msg = StepOutputs([RequestDelta("a", [SampleDelta(0, "x", [1], [[(1, -0.1, 1, "x")]], "stop", "\n")],
                                    finished=True)], EngineStatsSnapshot(num_running=3, kv_cache_usage=0.25))
    assert loads(dumps(msg)) == msg


@pytest.mark.parametrize("body,param,code", [
    ('{"prompt": "x", "bogus": 1}', "bogus", "unknown_parameter"),
    ('{"max_tokens": 3}', "prompt", "missing_required_parameter"),
    ('{"prompt": "x", "temperature": "1"}', "temperature", "invalid_type"),
    ('{"prompt": "x", "n": 0}', "n", "invalid_value"),
    ('{"prompt": [[1], "a"]}', "prompt", "invalid_value"),
])
def test_completion_validation_errors(body: str, param: str, code: str) -> None:
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate_json(body)
    err = from_validation_error(info.value)  # type: ignore[arg-type]
    assert (err.status, err.param, err.code) == (400, param, code)


def test_chat_validation_error_names_the_nested_field() -> None:
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate_json('{"messages": [{"role": "user", "content": "a"}, {"role": "x"}]}')
    err = from_validation_error(info.value)  # type: ignore[arg-type]
    assert err.param == "messages[1].role"
