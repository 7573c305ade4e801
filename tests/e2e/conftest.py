"""Shared fixtures: one tiny model and one default server for the whole e2e session.

Tests that need special server flags (api key, queue limit, SIGTERM, crash)
start their own module-scoped servers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.harness import ServerProcess, build_chat_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("e2e-logs") / "server.log",
                        "--served-model-name", "tiny", "tiny-alias")
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120.0)


@pytest.fixture(scope="session")
def offline(model_dir: Path):  # type: ignore[no-untyped-def]
    """The offline engine with the server's default settings, for parity checks."""
    from kvserve.engine.llm import LLM

    return LLM(str(model_dir))
