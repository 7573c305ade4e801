"""The launch flags of `kvserve serve` (kvserve/launch/launcher.py runs them)."""
from __future__ import annotations

import argparse
from typing import Any

from kvserve.entrypoints.arg_types import positive_float, positive_int
from kvserve.router.cli import add_policy_arg


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "launching on Ray (--replicas or --pd; docs/disaggregation.md)",
        "Start the router and the instances as Ray actors on a local Ray cluster (or an existing one, "
        "--ray-address), each instance pinned to its share of the cores. The router listens on --host/--port; "
        "every other serve flag goes to each instance. Needs `pip install ray`.")
    g.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                   help="N identical instances behind the router (data parallelism)")
    g.add_argument("--pd", default=None, metavar="P:D",
                   help="P prefill and D decode instances behind the router (prefill/decode disaggregation; "
                        "KV moves over --kv-transfer, default shm:// on one machine, ray:// on a cluster)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (HOST:PORT of its head) instead of starting a local one")
    add_policy_arg(g, "--router-policy", default="kv-aware", intro="the router's --policy. ")
    g.add_argument("--cpus-per-instance", type=positive_float, default=None, metavar="N",
                   help="Ray CPUs each instance reserves (default: this machine's cores / instances on a local "
                        "cluster, 1 on --ray-address); each is pinned to an equal share of its node's cores")
    g.add_argument("--launch-timeout", type=positive_float, default=900.0, metavar="SECONDS",
                   help="how long the cluster, the instances and the router may take to come up "
                        "(default: %(default)g)")


def wants_launch(args: Any) -> bool:
    return any(getattr(args, name, None) is not None for name in ("replicas", "pd", "ray_address"))
