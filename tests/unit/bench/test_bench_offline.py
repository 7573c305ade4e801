"""`kvserve bench offline` on a tiny model of the reference architecture (fast)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.bench.errors import BenchInputError
from kvserve.bench.offline import (
    REFERENCE_CONFIG,
    build_reference_model,
    engine_knobs,
    offline_workload,
    parse_baselines,
    parse_bytes,
    parse_range,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)


def _engine_importable() -> bool:
    try:
        from kvserve import LLM, SamplingParams  # type: ignore[attr-defined]  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_reference_model(tmp_path_factory.mktemp("tiny"), seed=0, config_overrides=TINY)


@pytest.fixture()
def hw_file(tmp_path: Path) -> Path:
    p = tmp_path / "hw.json"
    p.write_text(json.dumps({"name": "test-cpu", "matmul_flops": 1.4e11, "mem_bandwidth": 2e10, "mem_bytes": 2e10}))
    return p


def test_reference_model_saved_as_safetensors(tiny_model: Path) -> None:
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    # transformers 5 nests rope_theta under rope_parameters; 4.x keeps it at the top level
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert theta == REFERENCE_CONFIG["rope_theta"] == 100000.0
    assert cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2
    assert list(tiny_model.glob("*.safetensors"))


def test_offline_cli(cli, tiny_model: Path, hw_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    engine = _engine_importable()
    out = tmp_path / "offline.json"
    args = ["bench", "offline", "--model", str(tiny_model), "--num-prompts", "3", "--input-len-range", "4:12",
            "--output-len", "4", "--baselines", "hf-static,hf-cb", "--hw", str(hw_file), "--result-file", str(out)]
    rc = cli(args if engine else args + ["--no-engine"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    systems = {s["name"]: s for s in json.loads(out.read_text())["systems"]}
    static = systems["hf-static"]
    assert static["status"] == "ok" and static["detail"] == ""  # every output had 4 tokens
    assert static["output_tok_s"] > 0 and static["total_tok_s"] > static["output_tok_s"]
    assert 0 < static["roofline_fraction"] < 1
    assert systems["hf-cb"]["status"] in ("ok", "unavailable")
    if systems["hf-cb"]["status"] == "ok":
        assert systems["hf-cb"]["detail"] == ""
    if engine:
        assert systems["engine"]["status"] == "ok", systems["engine"]
        assert systems["engine"]["detail"] == ""
        assert systems["hf-static"]["engine_speedup"] > 0
        assert "engine / hf-static" in printed
    else:
        assert systems["engine"]["status"] == "skipped"


def test_workload_matches_reference_shape() -> None:
    reqs = offline_workload(32, (64, 512), 64, 49152, seed=0)
    assert len(reqs) == 32 and all(64 <= r.prompt_len <= 512 and r.output_len == 64 for r in reqs)
    assert all(max(r.prompt) < 49152 for r in reqs)  # type: ignore[type-var]
    assert [r.prompt for r in reqs] == [r.prompt for r in offline_workload(32, (64, 512), 64, 49152, seed=0)]


def test_option_parsing() -> None:
    assert parse_range("64:512") == (64, 512) and parse_range("8-16") == (8, 16)
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("500MB") == 500_000_000 and parse_bytes("1024") == 1024
    assert parse_baselines("hf-static, hf-cb") == ["hf-static", "hf-cb"] and parse_baselines("none") == []
    for bad in (lambda: parse_range("5"), lambda: parse_range("9:3"), lambda: parse_bytes("lots"),
                lambda: parse_baselines("vllm")):
        with pytest.raises(BenchInputError):
            bad()


def test_engine_knobs_pass_only_what_was_set() -> None:
    import argparse

    ns = argparse.Namespace(dtype="float32", block_size=16, no_prefix_caching=False, seed=0, max_num_seqs=None,
                            max_num_batched_tokens=256, kv_cache_memory="1GiB", num_kv_blocks=None)
    assert engine_knobs(ns) == {"device": "cpu", "dtype": "float32", "block_size": 16, "enable_prefix_caching": True,
                                "seed": 0, "max_num_batched_tokens": 256, "kv_cache_memory": 1 << 30}


def test_bad_model_dir(cli, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = cli(["bench", "offline", "--model", str(tmp_path), "--no-engine"])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err and str(tmp_path) in err
