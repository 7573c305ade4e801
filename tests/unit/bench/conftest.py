from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _shared_data() -> Path:
    env = os.environ.get("KVSERVE_SHARED_DATA")
    if env:
        return Path(env)
    # parents of this file: [0]=bench, [1]=unit, [2]=tests, [3]=repo root
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()


SHARED = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set KVSERVE_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def fake_server():  # type: ignore[no-untyped-def]
    from .fake_openai_server import FakeServer

    with FakeServer() as srv:
        yield srv


@pytest.fixture()
def cli():  # type: ignore[no-untyped-def]
    """Run `kvserve ...` in-process; returns the exit status."""
    from kvserve.entrypoints.cli import main

    return main

