"""`kvserve serve MODEL --replicas 2` and `--pd 1:1` for real: a local Ray cluster started and stopped
by the command, two instances of the tiny test model pinned to disjoint cores, the kv-aware router
in front, all on loopback.  Then `--replicas 2 --ray-address ADDR` on a two-node cluster started by
the test (a head and a node joined to it, both on this machine): one replica per node, and the
cluster outlives the launch.  For each mode, tests run in file order on one launch; the last ones
kill an instance and stop the launch.

Checks: greedy outputs through the router equal one engine's (offline LLM on the same model); both
replicas serve (--replicas), the decode instance computes no prompt token (--pd); each instance and
its engine process are pinned to their cores with matching torch threads; an instance killed
mid-stream leaves every client with an answer or an OpenAI error within a bound and is removed;
SIGTERM stops everything, Ray included.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="the Ray launcher needs `pip install ray` (in the test extras)")

from kvserve.launch.process import CliProcess  # noqa: E402
from tests.e2e.harness import build_chat_model  # noqa: E402

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):",
           "The capital of France is a city that", "Once upon a time there was", "1, 2, 3, 4,"]
ENGINE = ["--block-size", "4", "--num-kv-blocks", "96", "--max-model-len", "256", "--max-num-seqs", "16",
          "--served-model-name", "m"]  # passed on to every instance
MAX_TOKENS = 12


# "ray-address": the same --replicas 2, on a Ray cluster started here, outside the launcher: a head
# and a second node joined to it (`ray start --address`), one CPU each, so the two replicas (one
# Ray CPU each on a cluster) must land on different nodes.  The launcher must leave it running.
MODES = {"replicas": ["--replicas", "2"], "pd": ["--pd", "1:1"], "ray-address": ["--replicas", "2"]}


class ExternalCluster:
    """A two-node Ray cluster on this machine, each node in its own temp directory."""

    def __init__(self, log_dir: Path) -> None:
        from kvserve.launch.cluster import LocalRayCluster

        self.head = LocalRayCluster(1, log_dir=log_dir)
        self.node: Optional[LocalRayCluster] = None
        try:
            self.head.start(600)
            self.node = LocalRayCluster(1, log_dir=log_dir, join=self.head.address, token=self.head.token)
            self.node.start(600)
        except BaseException:
            self.stop()
            raise

    @property
    def env(self) -> dict[str, str]:
        """How a driver joins it: the cluster's token (as with any token-authenticated cluster)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.head.token}

    def state(self) -> dict[str, Any]:
        """Alive nodes and CPUs as a fresh driver sees them (a subprocess: this one stays Ray-free)."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                "print(json.dumps({'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive']), "
                "'cpus': ray.cluster_resources().get('CPU', 0), 'free_cpus': ray.available_resources().get('CPU', 0)}))"
                % self.head.address)
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **self.env), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for node in (self.node, self.head):
            if node is not None:
                node.stop()


class Launch(CliProcess):
    """`kvserve serve MODEL <mode flags> --host 127.0.0.1 --port P`, ready once it prints its summary."""

    def __init__(self, model: Path, log_path: Path, mode: str, cluster: Optional[ExternalCluster] = None) -> None:
        self.mode = mode
        self.cluster = cluster
        address = ["--ray-address", cluster.head.address] if cluster else []
        env = dict(TMPDIR=str(log_path.parent), **(cluster.env if cluster else {}))
        super().__init__(["serve", str(model), *MODES[mode], *address, "--no-access-log", *ENGINE], log_path,
                         env=env)
        self.summary: dict[str, Any] = {}

    def text(self) -> str:
        return self.log_text()

    def wait_ready(self, timeout_s: float = 900.0) -> "Launch":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"launch exited with {self.proc.returncode}:\n{self.text()[-4000:]}"
            for line in self.text().splitlines():
                if line.startswith('{"kvserve_launch"'):
                    self.summary = json.loads(line)["kvserve_launch"]
                    return self
            time.sleep(0.5)
        raise TimeoutError(self.text()[-4000:])

    def instances(self) -> list[dict[str, Any]]:
        return httpx.get(self.url + "/router/instances", timeout=10).json()["instances"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("launch-model"))


@pytest.fixture(scope="module", params=list(MODES))
def launch(request: pytest.FixtureRequest, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    logs = tmp_path_factory.mktemp("launch")
    cluster = ExternalCluster(logs) if request.param == "ray-address" else None
    try:
        run = Launch(model, logs / "launch.log", request.param, cluster)
        try:
            yield run.wait_ready()
        finally:
            run.stop(120)
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="module")
def reference(model: Path) -> list[str]:
    """One engine's greedy texts for PROMPTS (same engine settings as the instances)."""
    from kvserve import LLM, SamplingParams

    with LLM(model=str(model), block_size=4, num_kv_blocks=96, max_model_len=256, dtype="float32") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].text for o in outs]


def test_launch_reports_two_pinned_instances(launch: Launch) -> None:
    insts = launch.summary["instances"]
    want_roles = ([("prefill-0", "prefill"), ("decode-0", "decode")] if launch.mode == "pd"
                  else [("replica-0", "both"), ("replica-1", "both")])
    assert [(i["name"], i["role"]) for i in insts] == want_roles
    assert launch.summary["router"] == launch.url
    cores = [set(i["cores"]) for i in insts]
    available = os.sched_getaffinity(0)
    if launch.cluster is not None:  # one replica per node (one Ray CPU each), each with its node's cores
        assert launch.summary["ray_address"] == launch.cluster.head.address
        assert launch.summary["ray_head_pid"] is None  # the launcher started no cluster
        assert insts[0]["node_id"] != insts[1]["node_id"]
        assert {i["node_id"] for i in insts} == set(launch.cluster.state()["nodes"])
        assert cores == [available, available]
    elif len(available) >= 2:
        assert cores[0].isdisjoint(cores[1]) and cores[0] | cores[1] <= available
    for inst, want in zip(insts, cores):
        assert inst["url"].startswith("http://127.0.0.1:")  # the nodes share this host: loopback
        assert os.sched_getaffinity(inst["pid"]) == want
        children = [int(c) for c in Path(f"/proc/{inst['pid']}/task/{inst['pid']}/children").read_text().split()]
        engines = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert engines, "the instance's engine process"
        for pid in engines:
            assert os.sched_getaffinity(pid) == want  # inherited from the instance
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"OMP_NUM_THREADS={len(want)}".encode() in environ  # torch's intra-op threads
    # The router sees both, in their roles, with the instances' block size.
    seen = {i["url"]: i for i in launch.instances()}
    for inst in insts:
        assert seen[inst["url"]]["healthy"] and seen[inst["url"]]["reported_role"] == inst["role"]
        assert seen[inst["url"]]["block_size"] == 4


def test_greedy_outputs_equal_one_engine(launch: Launch, reference: list[str]) -> None:
    client = openai.OpenAI(base_url=launch.url + "/v1", api_key="none", max_retries=0, timeout=120)
    served_by = set()
    for prompt, want in zip(PROMPTS, reference):
        raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS,
                                                          temperature=0.0)
        served_by.add(raw.headers["x-kvserve-instance"])
        assert raw.parse().choices[0].text == want, prompt
        stream = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want, prompt
    urls = [i["url"] for i in launch.summary["instances"]]
    if launch.mode != "pd":
        assert served_by == set(urls), "both replicas answer"
    else:  # the decode instance answers, and it computed no prompt token: all came over the transfer
        assert served_by == {urls[1]}
        decode = httpx.get(urls[1] + "/metrics", timeout=10).text
        assert _metric(decode, "kvserve:prompt_tokens_computed_total") == 0
        assert _metric(decode, "kvserve:kv_transfer_tokens_total", 'direction="in"') > 0
        assert _metric(httpx.get(urls[0] + "/metrics", timeout=10).text, "kvserve:prompt_tokens_computed_total") > 0


def _metric(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_killed_instance_is_removed_and_clients_never_hang(launch: Launch) -> None:
    client = openai.OpenAI(base_url=launch.url + "/v1", api_key="none", max_retries=0, timeout=120)
    outcomes: list[str] = []

    def stream_one(i: int) -> None:
        try:
            stream = client.completions.create(model="m", prompt=f"{PROMPTS[i % len(PROMPTS)]} {i}",
                                               max_tokens=200, temperature=0.0, stream=True,
                                               extra_body={"ignore_eos": True})
            n = sum(1 for c in stream if c.choices)
            outcomes.append(f"ok:{n}")
        except openai.APIError as exc:  # an OpenAI error (the router's error event), not a hang
            outcomes.append(f"error:{type(exc).__name__}")

    threads = [threading.Thread(target=stream_one, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = launch.summary["instances"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), f"a client hung: {outcomes}"
    assert len(outcomes) == 6, outcomes
    if launch.mode != "pd":  # streams on the survivor finish (with --pd 1:1 all were on the victim)
        assert any(o.startswith("ok") for o in outcomes), outcomes
    deadline = time.monotonic() + 60
    while next(i for i in launch.instances() if i["url"] == victim["url"])["healthy"]:
        assert time.monotonic() < deadline, "the dead replica was not removed"
        time.sleep(0.5)
    for prompt in PROMPTS[:3]:
        if launch.mode != "pd":  # the survivor serves everything
            raw = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=4,
                                                              temperature=0.0)
            assert raw.headers["x-kvserve-instance"] == launch.summary["instances"][0]["url"]
        else:  # no decode instance left: an OpenAI error at once, not a hang
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0.0)
            assert err.value.status_code == 503
    deadline = time.monotonic() + 30
    while f"{victim['name']} is gone" not in launch.text():
        assert time.monotonic() < deadline, "the launcher did not notice the dead replica"
        time.sleep(0.5)


def test_sigterm_stops_the_router_the_instances_and_ray(launch: Launch) -> None:
    """SIGTERM stops everything the launcher started: the router, the instances, and a local Ray
    cluster; a cluster it joined (--ray-address) keeps running, with every CPU free again."""
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.proc.wait(180) == 0, launch.text()[-3000:]
    pids = [i["pid"] for i in launch.summary["instances"]]
    if launch.cluster is None:
        pids.append(launch.summary["ray_head_pid"])
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(launch.url + "/health", timeout=2)
    if launch.cluster is not None:
        assert launch.cluster.head.proc is not None and launch.cluster.head.proc.poll() is None
        assert launch.cluster.node is not None and launch.cluster.node.proc is not None
        assert launch.cluster.node.proc.poll() is None
        state = launch.cluster.state()
        assert len(state["nodes"]) == 2 and state["cpus"] == 2
        deadline = time.monotonic() + 60  # the killed actors' CPUs come back
        while state["free_cpus"] != 2:
            assert time.monotonic() < deadline, state
            time.sleep(2)
            state = launch.cluster.state()
