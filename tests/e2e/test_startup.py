"""Start-up: the context length defaults to the model's own, a tokenizer larger than the model's
vocabulary is warned about, and a port in use fails before the model is loaded."""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import REPO, ServerProcess

MODEL_CONTEXT = 8192  # beyond the 4,096 that used to be the default whatever the model


@pytest.fixture(scope="module")
def long_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with an 8,192-token context and a 512-token vocabulary, next to the gpt2
    tokenizer (50,257 tokens) of the session's model."""
    from tests.helpers.tiny_models import build_tiny_model

    out = build_tiny_model("llama-tied", tmp_path_factory.mktemp("long-model"),
                           overrides={"max_position_embeddings": MODEL_CONTEXT})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


def test_server_defaults_to_the_models_context_and_warns_about_the_vocabulary(long_model: Path,
                                                                              tmp_path: Path) -> None:
    srv = ServerProcess(long_model, tmp_path / "server.log", "--served-model-name", "long")
    try:
        srv.wait_ready()
        card = httpx.get(srv.base_url + "/v1/models/long").json()
        assert card["max_model_len"] == MODEL_CONTEXT
        # Ids the tokenizer makes beyond the model's vocabulary are refused, not run.
        resp = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    finally:
        srv.stop()
    warnings = [line for line in srv.log_text().splitlines()
                if "WARNING" in line and "the tokenizer has 50257 tokens but the model's vocabulary only 512" in line]
    assert len(warnings) == 1


def test_offline_default_context_is_the_models_capped_by_the_kv_pool(long_model: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from kvserve.engine.llm import LLM

    assert LLM(str(long_model)).engine.max_model_len == MODEL_CONTEXT
    assert LLM(str(long_model), max_model_len=100).engine.max_model_len == 100
    with caplog.at_level(logging.INFO):
        small_pool = LLM(str(long_model), num_kv_blocks=32, block_size=16)  # 512 tokens of KV in all
    assert small_pool.engine.max_model_len == 512
    assert any("max_model_len" in r.getMessage() and "512" in r.getMessage() and str(MODEL_CONTEXT) in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_port_in_use_fails_before_the_model_loads(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", str(model_dir),
                               "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "KV cache" not in proc.stderr + proc.stdout  # no engine was started
