"""The launch plan without Ray: instance specs, core shares, the instances' and the router's argv."""
from __future__ import annotations

import pytest

from kvserve.entrypoints.cli import build_parser
from kvserve.launch.launcher import _core_shares
from kvserve.launch.plan import InstanceSpec, instance_argv, instance_specs, parse_pd, router_argv, split_cores


def test_specs_and_pd_parsing() -> None:
    assert [(s.name, s.role) for s in instance_specs(2, None)] == [("replica-0", "both"), ("replica-1", "both")]
    assert [(s.name, s.role) for s in instance_specs(None, "2:1")] == [
        ("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")]
    assert parse_pd("3:4") == (3, 4)
    for bad in ("1", "0:1", "1:0", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="PREFILL:DECODE"):
            parse_pd(bad)
    with pytest.raises(ValueError, match="either --replicas"):
        instance_specs(2, "1:1")
    with pytest.raises(ValueError, match="either --replicas"):
        instance_specs(None, None)


def test_core_shares_are_disjoint_and_even() -> None:
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([3, 1, 2, 0, 4], 2) == [[0, 1, 2], [3, 4]]
    assert split_cores(range(8), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split_cores([0, 1], 3) == [[0], [1], [0]]  # more instances than cores: they share, in turn
    # Per node: the actors that landed on a node split that node's cores, in actor order.
    infos = [{"node_id": "a", "cores": [0, 1, 2, 3]}, {"node_id": "b", "cores": [0, 1]},
             {"node_id": "a", "cores": [0, 1, 2, 3]}]
    assert _core_shares(infos) == [[0, 1], [0, 1], [2, 3]]


def test_instance_argv_round_trips_the_users_serve_flags() -> None:
    parser = build_parser()
    given = ["serve", "/m", "--replicas", "2", "--port", "9000", "--host", "0.0.0.0", "--api-key", "secret",
             "--role", "decode", "--num-kv-blocks", "64", "--no-kv-events", "--served-model-name", "a", "b",
             "--kv-cache-memory", "1GiB", "--router-policy", "round-robin", "--max-num-seqs", "8"]
    args = parser.parse_args(given)
    argv = instance_argv(args._serve_parser, args)
    # Launch-only flags, the HTTP address, the role (set per instance) and the key (sent in the
    # environment) are not passed on; everything else is, and parses back to the same values.
    for dropped in ("--replicas", "--port", "--host", "--api-key", "secret", "--role", "--router-policy"):
        assert dropped not in argv
    again = parser.parse_args(["serve", "/m", *argv])
    for name in ("num_kv_blocks", "kv_events", "served_model_name", "kv_cache_memory", "max_num_seqs",
                 "block_size", "dtype"):
        assert getattr(again, name) == getattr(args, name), name
    assert instance_argv(args._serve_parser, parser.parse_args(["serve", "/m", "--replicas", "1"])) == []


def test_router_argv() -> None:
    specs = [(InstanceSpec("prefill-0", "prefill"), "http://127.0.0.1:1"),
             (InstanceSpec("decode-0", "decode"), "http://127.0.0.1:2")]
    assert router_argv(specs, policy="kv-aware", block_size=16, tokenizer="/m", max_request_bytes=10) == [
        "router", "--policy", "kv-aware", "--block-size", "16", "--prefill", "http://127.0.0.1:1",
        "--decode", "http://127.0.0.1:2", "--tokenizer", "/m", "--max-request-bytes", "10"]
    replicas = [(InstanceSpec("replica-0", "both"), "http://h:1")]
    assert router_argv(replicas, policy="round-robin", block_size=4, tokenizer=None)[-2:] == ["--instance", "http://h:1"]


def test_launch_flags_are_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from kvserve.entrypoints.cli import main

    assert main(["serve", "/m", "--pd", "2"]) == 2
    assert "PREFILL:DECODE" in capsys.readouterr().err
    assert main(["serve", "/m", "--ray-address", "127.0.0.1:1"]) == 2
    assert "either --replicas" in capsys.readouterr().err
