"""Helpers for end-to-end tests: a tiny model on disk, a real `kvserve serve` process, /metrics parsing."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kvserve.entrypoints.cli serve MODEL ...` on 127.0.0.1, logs to a file."""

    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str,
                 env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(env or {}))
        cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--no-access-log", *extra_args]
        # cwd=REPO with -m: the checkout under test is imported, not an installed copy.
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 420.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log_text()[-3000:]}")

    def engine_pid(self) -> int:
        match = re.search(r"engine pid (\d+)", self.log_text())
        assert match, "the server did not log its engine pid"
        return int(match.group(1))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


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
