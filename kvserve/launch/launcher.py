"""`kvserve serve MODEL --replicas N | --pd P:D [--ray-address ADDR]`: the router and the instances
as Ray actors.

Steps: connect to (or start) the Ray cluster; create one ProcessActor per instance, each reserving
its CPUs, and ask where each landed; give the actors on each node equal shares of that node's cores;
start the instances (`kvserve serve` with the user's flags plus --role) concurrently and wait for
their /health; start the router actor on this node at --host/--port; print one JSON line
(`{"kvserve_launch": {...}}`: the router's URL and each instance's URL, pid and cores); supervise
until SIGINT/SIGTERM.  An instance that dies is only logged: the router's health checks remove it
and its clients get answers or OpenAI errors from the router, never a hang.  The router dying
ends the launch (exit 1).  Shutdown: the router first (it drains), then the instances (they
drain), then the actors, then the local cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from kvserve.entrypoints.arg_types import configure_logging
from kvserve.launch.actors import ProcessActor
from kvserve.launch.cluster import LocalRayCluster, RayMissingError, require_ray, use_cluster_token
from kvserve.launch.plan import InstanceSpec, instance_argv, instance_specs, router_argv, split_cores

logger = logging.getLogger("kvserve.launch")

_SUPERVISE_INTERVAL_S = 1.0


class Launch:
    def __init__(self, ray: Any, args: argparse.Namespace, parser: argparse.ArgumentParser,
                 specs: list[InstanceSpec], local: bool, ray_address: str) -> None:
        self.ray = ray
        self.args = args
        self.parser = parser
        self.specs = specs
        self.local = local
        self.ray_address = ray_address
        self.instances: list[tuple[InstanceSpec, Any, dict[str, Any]]] = []  # (spec, actor, start info)
        self.router: Optional[Any] = None
        self.router_url: Optional[str] = None
        self._gone: set[str] = set()

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        ray, args = self.ray, self.args
        timeout = args.launch_timeout
        cpus = args.cpus_per_instance or (len(os.sched_getaffinity(0)) / len(self.specs) if self.local else 1.0)
        actor_cls = ray.remote(ProcessActor)
        actors = [actor_cls.options(num_cpus=cpus, max_concurrency=2).remote(s.name) for s in self.specs]
        try:
            infos = ray.get([a.node_info.remote() for a in actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"Ray could not place {len(actors)} instances of {cpus:g} CPUs each within "
                               f"{timeout:g} s (cluster CPUs: {ray.cluster_resources().get('CPU', 0):g}); "
                               "lower --cpus-per-instance or add nodes") from None
        shares = _core_shares(infos)
        env = _secret_env(args)
        flags = instance_argv(self.parser, args)
        starts = []
        here_ip = ray.util.get_node_ip_address()
        for spec, actor, info, cores in zip(self.specs, actors, infos, shares):
            # An instance on the router's machine listens on loopback (a local cluster, or nodes of
            # a cluster that share this host); one elsewhere on its node's IP, for the router to reach.
            host = "127.0.0.1" if self.local or info["ip"] == here_ip else info["ip"]
            model = [str(args.model)] if args.model else []  # none: the instances' default model
            argv = ["serve", *model, *flags, "--role", spec.role, *self._transfer_flags(spec)]
            starts.append(actor.start.remote(argv, host, cores, env, None, timeout))
        self.instances = [(s, a, {}) for s, a in zip(self.specs, actors)]
        results = ray.get(starts)  # a failed start raises with that instance's log
        self.instances = [(s, a, {**r, "node_id": info["node_id"]})
                          for s, a, r, info in zip(self.specs, actors, results, infos)]
        for spec, _, r in self.instances:
            logger.info("%s (%s) at %s, pid %d, cores %s", spec.name, spec.role, r["url"], r["pid"], r["cores"])
        self._start_router(env, timeout)

    def _transfer_flags(self, spec: InstanceSpec) -> list[str]:
        if spec.role == "both" or self.args.kv_transfer != "shm://":  # the user chose a transport
            return []
        # One machine: shared memory; a cluster: Ray's object store (kvserve/disagg/transport.py).
        return [] if self.local else ["--kv-transfer", f"ray://{self.ray_address}"]

    def _start_router(self, env: dict[str, str], timeout: float) -> None:
        ray, args = self.ray, self.args
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        tokenizer = args.tokenizer or _tokenizer_path(args.model)
        argv = router_argv([(s, r["url"]) for s, _, r in self.instances], policy=args.router_policy,
                           block_size=args.block_size, tokenizer=tokenizer, max_request_bytes=args.max_request_bytes)
        self.router = ray.remote(ProcessActor).options(num_cpus=0, scheduling_strategy=here).remote("router")
        info = ray.get(self.router.start.remote(argv, args.host, None, env, args.port, timeout))
        self.router_url = info["url"]
        logger.info("router (%s) at %s", args.router_policy, self.router_url)

    def summary(self) -> dict[str, Any]:
        return {"router": self.router_url, "ray_address": self.ray_address,
                "instances": [{"name": s.name, "role": s.role, **r} for s, _, r in self.instances]}

    # -------------------------------------------------------------- supervise
    def supervise(self, stop: threading.Event) -> int:
        """Until `stop` is set: 0; the router gone: 1."""
        while not stop.wait(_SUPERVISE_INTERVAL_S):
            if self.router is not None and self._status("router", self.router) is not None:
                logger.error("the router exited; stopping the launch")
                return 1
            for spec, actor, _ in self.instances:
                if spec.name not in self._gone and self._status(spec.name, actor) is not None:
                    self._gone.add(spec.name)
                    logger.warning("%s is gone; the router routes around it (%d of %d instances left)",
                                   spec.name, len(self.instances) - len(self._gone), len(self.instances))
        return 0

    def _status(self, name: str, actor: Any) -> Optional[str]:
        """None while `name` runs, else why it does not."""
        try:
            code = self.ray.get(actor.poll.remote(), timeout=30)
        except self.ray.exceptions.GetTimeoutError:
            return None  # busy, not dead
        except self.ray.exceptions.RayError as exc:
            return f"actor died: {type(exc).__name__}"
        return None if code is None else f"exit status {code}"

    # ------------------------------------------------------------------- stop
    def stop(self) -> None:
        ray = self.ray
        for name, actor in ([("router", self.router)] if self.router is not None else []) + [
                (s.name, a) for s, a, _ in self.instances]:
            try:
                ray.get(actor.stop.remote(30.0), timeout=60)
            except ray.exceptions.RayError:
                pass  # already gone
            except Exception:  # noqa: BLE001 - keep stopping the others
                logger.exception("stopping %s failed", name)
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass


def _core_shares(infos: list[dict[str, Any]]) -> list[list[int]]:
    """Equal shares of each node's cores among the actors placed on it, in actor order."""
    by_node: dict[str, list[int]] = {}
    for i, info in enumerate(infos):
        by_node.setdefault(info["node_id"], []).append(i)
    shares: list[list[int]] = [[] for _ in infos]
    for members in by_node.values():
        cores = infos[members[0]]["cores"]
        for i, share in zip(members, split_cores(cores, len(members))):
            shares[i] = share
    return shares


def _secret_env(args: argparse.Namespace) -> dict[str, str]:
    """The API key travels in the environment (not on command lines, which `ps` shows)."""
    key = args.api_key or os.environ.get("KVSERVE_API_KEY")
    return {"KVSERVE_API_KEY": key} if key else {}


def _tokenizer_path(model: Optional[str]) -> Optional[str]:
    from kvserve.models.builtin import resolve_model

    try:
        return str(resolve_model(model)[0])
    except FileNotFoundError:
        return None


class _Interrupted(Exception):
    pass


def _interrupt(*_: Any) -> None:
    raise _Interrupted()


def run_launch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The `kvserve serve --replicas/--pd` entry point; returns the exit status."""
    cluster: Optional[LocalRayCluster] = None
    try:
        specs = instance_specs(args.replicas, args.pd)
        if not args.ray_address:
            cluster = LocalRayCluster(len(os.sched_getaffinity(0)), log_dir=Path(os.environ.get("TMPDIR", "/tmp")))
            # This driver joins with the cluster's own token, set before Ray is imported (Ray reads
            # its authentication settings once per process).
            use_cluster_token(cluster.token)
        ray = require_ray()
    except (ValueError, RayMissingError) as exc:
        sys.stderr.write(f"kvserve serve: {exc}\n")
        return 2
    configure_logging(args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # during start-up: abort it (and clean up, below)
        signal.signal(sig, _interrupt)
    launch: Optional[Launch] = None
    try:
        if cluster is None:
            address = args.ray_address
        else:
            logger.info("starting a local Ray cluster (%g CPUs)", cluster.num_cpus)
            address = cluster.start(args.launch_timeout)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        launch = Launch(ray, args, parser, specs, local=cluster is not None, ray_address=address)
        launch.start()
        for sig in (signal.SIGTERM, signal.SIGINT):  # from now on: a graceful stop
            signal.signal(sig, lambda *_: stop.set())
        print(json.dumps({"kvserve_launch": {**launch.summary(), "ray_head_pid": cluster.pid if cluster else None}}),
              flush=True)
        return launch.supervise(stop)
    except _Interrupted:
        logger.warning("interrupted during start-up; stopping what was started")
        return 1
    except (RuntimeError, ConnectionError, ray.exceptions.RayError) as exc:
        sys.stderr.write(f"kvserve serve: {exc}\n")
        return 1
    finally:
        if launch is not None:
            launch.stop()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.stop()
