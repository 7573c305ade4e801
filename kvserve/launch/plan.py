"""What `kvserve serve MODEL --replicas N | --pd P:D` launches: pure functions, no Ray.

  parse_pd("1:1")              -> (1, 1)
  split_cores([0, 1, 2], 2)    -> [[0, 1], [2]]   each instance's share of a node's cores
  instance_argv(parser, args)  -> the `kvserve serve` flags every instance gets (the user's serve
                                  flags, minus the launcher's own and the HTTP address)
  router_argv(...)             -> the `kvserve router` command line over the instances
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# Flags of `kvserve serve` that belong to the launch, not to each instance (argparse dests).
LAUNCH_DESTS = frozenset({"replicas", "pd", "ray_address", "router_policy", "cpus_per_instance",
                          "launch_timeout", "host", "port", "role", "api_key"})


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    name: str  # "replica-0", "prefill-0", "decode-0"
    role: str  # both | prefill | decode


def parse_pd(text: str) -> tuple[int, int]:
    """'P:D' -> (P, D), each >= 1; ValueError with the reason otherwise."""
    p, sep, d = text.partition(":")
    try:
        num_p, num_d = int(p), int(d)
    except ValueError:
        num_p = num_d = 0
    if not sep or num_p < 1 or num_d < 1:
        raise ValueError(f"--pd takes PREFILL:DECODE instance counts, each >= 1 (e.g. 1:1), got {text!r}")
    return num_p, num_d


def instance_specs(replicas: Optional[int], pd: Optional[str]) -> list[InstanceSpec]:
    if (replicas is None) == (pd is None):
        raise ValueError("give either --replicas N or --pd P:D")
    if replicas is not None:
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        return [InstanceSpec(f"replica-{i}", "both") for i in range(replicas)]
    assert pd is not None
    num_p, num_d = parse_pd(pd)
    return ([InstanceSpec(f"prefill-{i}", "prefill") for i in range(num_p)]
            + [InstanceSpec(f"decode-{i}", "decode") for i in range(num_d)])


def split_cores(cores: Sequence[int], n: int) -> list[list[int]]:
    """`n` shares of `cores`: disjoint and as equal as possible (the first shares get the extra
    cores) when there are enough; else one core each, in turn (instances then share cores)."""
    if n < 1:
        raise ValueError(f"need at least one share, got {n}")
    cores = sorted(cores)
    if not cores:
        raise ValueError("no cores to share")
    if n > len(cores):
        return [[cores[i % len(cores)]] for i in range(n)]
    base, extra = divmod(len(cores), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(cores[start:start + size])
        start += size
    return out


def instance_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The serve flags the user gave (those that differ from their defaults), minus LAUNCH_DESTS,
    as a command line: each instance runs `kvserve serve MODEL <these> --host H --port P --role R`."""
    out: list[str] = []
    for action in parser._actions:  # argparse has no public iterator over its actions
        dest = action.dest
        if not action.option_strings or dest in LAUNCH_DESTS or dest == "help" or dest.startswith("_"):
            continue
        value = getattr(args, dest, action.default)
        if value == action.default:
            continue
        out.extend(_flag(action, value))
    return out


def _flag(action: argparse.Action, value: Any) -> list[str]:
    long = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    if isinstance(action, argparse.BooleanOptionalAction):
        return [long] if value else ["--no-" + long[2:]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [long]
    if isinstance(action, argparse._AppendAction):
        return [part for v in value for part in (long, str(v))]
    if isinstance(value, (list, tuple)):
        return [long, *map(str, value)]
    return [long, str(value)]


def router_argv(instances: Sequence[tuple[InstanceSpec, str]], *, policy: str, block_size: int,
                tokenizer: Optional[str], max_request_bytes: Optional[int] = None) -> list[str]:
    """`kvserve router ...` over (spec, url) pairs: --instance for replicas, --prefill/--decode for a
    split (the actor adds --host and --port)."""
    argv = ["router", "--policy", policy, "--block-size", str(block_size)]
    for spec, url in instances:
        argv += [{"both": "--instance", "prefill": "--prefill", "decode": "--decode"}[spec.role], url]
    if tokenizer is not None:
        argv += ["--tokenizer", tokenizer]
    if max_request_bytes is not None:
        argv += ["--max-request-bytes", str(max_request_bytes)]
    return argv
