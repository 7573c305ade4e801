"""Helpers for end-to-end tests: a tiny model on disk, real `kvserve serve` and `kvserve router`
processes, /metrics parsing."""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvserve.launch.process import CliProcess, wait_healthy
from kvserve.launch.process import free_port as _free_port

REPO = Path(__file__).resolve().parents[2]

# A minimal chat template (the gpt2 tokenizer has none); the server must take it from tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_chat_model(out_dir: Path) -> Path:
    """A tiny random Llama with the gpt2 tokenizer (so it produces text) and a chat template."""
    from tests.helpers.tiny_models import build_tiny_model

    build_tiny_model("llama-tied", out_dir, tokenizer="gpt2")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return out_dir


def free_port() -> int:
    return _free_port("127.0.0.1")


class ServerProcess(CliProcess):
    """`python -m kvserve.entrypoints.cli serve MODEL ...` on 127.0.0.1, logs to a file (the
    start and the /health wait are kvserve.launch.process's, shared with the benchmarks)."""

    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str,
                 env: Optional[dict[str, str]] = None) -> None:
        super().__init__(["serve", str(model_dir), "--no-access-log", *extra_args], log_path, env=env)

    @property
    def base_url(self) -> str:
        return self.url

    def wait_ready(self, timeout_s: float = 420.0) -> "ServerProcess":
        wait_healthy([self], timeout_s)
        return self

    def engine_pid(self) -> int:
        match = re.search(r"engine pid (\d+)", self.log_text())
        assert match, "the server did not log its engine pid"
        return int(match.group(1))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


class RouterProcess(CliProcess):
    """`python -m kvserve.entrypoints.cli router ARGS...` on 127.0.0.1."""

    def __init__(self, log_path: Path, *args: str) -> None:
        super().__init__(["router", *args], log_path)

    def wait_ready(self, timeout_s: float = 180.0) -> "RouterProcess":
        wait_healthy([self], timeout_s, interval_s=0.1)
        return self

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        return super().stop(timeout_s)


def get_metrics(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels without model_name): value}."""
    text = httpx.get(base_url + "/metrics", timeout=10.0).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def metric(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what} (last value {last!r})")


def sse_events(lines) -> list:  # type: ignore[no-untyped-def]
    """Parse `data:` lines of an SSE body into JSON objects (and the string '[DONE]')."""
    events = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
