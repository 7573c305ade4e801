"""The speculative-decoding options (CLI, LLM keyword arguments, config) and their metrics on
/metrics; stop strings with speculation on a tiny model with a real tokenizer."""
from __future__ import annotations

import pytest

from kvserve import SamplingParams
from kvserve.config import EngineArgs
from kvserve.engine.engine_ipc import EngineStatsSnapshot
from kvserve.entrypoints.cli import build_parser
from kvserve.metrics import ServerMetrics
from kvserve.spec_decode.cli_args import speculative_engine_kwargs
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.metrics import SpecDecodeMetrics
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.spec_decode.engine_helpers import oracle_spec, run_llm


@pytest.mark.parametrize("command", [["serve"], ["bench", "offline"]])
def test_flags_parse_into_engine_kwargs(command):
    p = build_parser()
    args = p.parse_args(command + ["--speculative-method", "suffix", "--num-speculative-tokens", "3",
                                   "--no-speculative-adaptive"])
    assert speculative_engine_kwargs(args) == dict(speculative_method="suffix", num_speculative_tokens=3,
                                                   speculative_adaptive=False)
    args = p.parse_args(command)
    assert args.speculative_method is None and args.speculative_adaptive and speculative_engine_kwargs(args) == {}
    for bad in (["--speculative-method", "eagle"], ["--speculative-method", "draft:"],
                ["--num-speculative-tokens", "0"], ["--num-speculative-tokens", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(command + bad)


def test_config_validates():
    cfg = EngineArgs(speculative_method="draft:/models/tiny", num_speculative_tokens=2).create_engine_config("m")
    assert cfg.speculative == SpeculativeConfig("draft:/models/tiny", 2, True)
    assert cfg.speculative.draft_model == "/models/tiny" and cfg.speculative.enabled
    assert not EngineArgs().create_engine_config("m").speculative.enabled
    with pytest.raises(ValueError, match="speculative method"):
        SpeculativeConfig("medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 17)


def test_metrics_are_exported_under_vllm_names():
    m = SpecDecodeMetrics()
    m.observe(3, 2)
    m.observe(2, 0)
    sm = ServerMetrics("tiny")
    assert b"spec_decode" not in sm.render()  # nothing without speculation
    sm.on_engine_stats(EngineStatsSnapshot(spec_decode=m.as_dict()))
    text = sm.render().decode()
    for line in ('vllm:spec_decode_num_drafts_total{model_name="tiny"} 2.0',
                 'vllm:spec_decode_num_draft_tokens_total{model_name="tiny"} 5.0',
                 'vllm:spec_decode_num_accepted_tokens_total{model_name="tiny"} 2.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="1"} 1.0',
                 'kvserve:spec_decode_num_draft_tokens_per_pos_total{model_name="tiny",position="2"} 1.0',
                 'kvserve:spec_decode_acceptance_rate_per_pos{model_name="tiny",position="0"} 0.5',
                 'kvserve:spec_decode_acceptance_rate{model_name="tiny"} 0.4',
                 'kvserve:spec_decode_mean_acceptance_length{model_name="tiny"} 2.0'):
        assert line in text


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("qwen_text_spec"), tokenizer="qwen2.5-0.5b",
                            overrides={"vocab_size": 151936})


def test_stop_strings_inside_accepted_drafts(text_model):
    prompt = ["Once upon a time"]
    base_sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (base,), core, _ = run_llm(text_model, prompt, base_sp, num_kv_blocks=128)
    text = base.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"degenerate text {text!r}"
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    (off,), _, _ = run_llm(text_model, prompt, sp, num_kv_blocks=128)
    seq = base.prompt_token_ids + base.outputs[0].token_ids
    (on,), on_core, rec = run_llm(text_model, prompt, sp, num_kv_blocks=128,
                                  spec=oracle_spec([seq], 0.0, 151936))
    assert rec.max_accepted >= 4  # the stop string lands inside a run of accepted drafts
    for o in (off, on):
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == stop
        assert o.outputs[0].text == text[: text.index(stop)]
    assert on.outputs[0].token_ids == off.outputs[0].token_ids
    assert on_core.kv_manager.num_free_blocks == on_core.kv_manager.num_blocks
