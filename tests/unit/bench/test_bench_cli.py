"""CLI surface: every flag documented, roofline and hw-probe commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


def _walk(parser: argparse.ArgumentParser, path: str = "kvserve"):  # type: ignore[no-untyped-def]
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_flag_has_help() -> None:
    from kvserve.entrypoints.cli import build_parser

    seen = set()
    for path, parser in _walk(build_parser()):
        if not path.startswith(("kvserve bench", "kvserve roofline", "kvserve hw-probe")):
            continue
        seen.add(path)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{path} {action.option_strings} has no help"
    assert {"kvserve bench", "kvserve bench serve", "kvserve bench offline", "kvserve roofline",
            "kvserve hw-probe"} <= seen


def test_bench_without_subcommand_prints_help(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli(["bench"]) == 2
    assert "serve" in capsys.readouterr().out


def test_roofline_json(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = cli(["roofline", "--config", "llama-3.1-8b", "--hw", "h100", "--batch", "1", "--context", "4095",
              "--link-bandwidth", "pcie4", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["kv_bytes_per_token"] == 131072
    assert doc["decode_step"]["time_s"] == pytest.approx(4.6406e-3, rel=1e-4)
    assert doc["swap_time_s"] == pytest.approx(4095 * 131072 / 32e9)


def test_roofline_table_and_errors(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli(["roofline", "--config", "qwen3-30b-a3b", "--hw", "a100", "--link-bandwidth", "100gbe"]) == 0
    out = capsys.readouterr().out
    assert "KV bytes per token" in out and "98,304" in out and "(MoE)" in out
    assert cli(["roofline", "--config", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "llama-3.1-8b" in err and "Traceback" not in err
    assert cli(["roofline", "--config", "llama-3.1-8b", "--dtype", "fp7"]) == 2


def test_hw_probe_then_roofline(cli, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "hw.json"
    rc = cli(["hw-probe", "--matmul-sizes", "128", "--mem-mib", "8", "--repeats", "3", "--output", str(out),
              "--no-cache"])
    assert rc == 0
    doc = json.loads(out.read_text())
    # Units check only (FLOP/s and B/s, not G-units): a loaded CI machine can measure very low.
    assert doc["matmul_flops"] > 1e6 and doc["mem_bandwidth"] > 1e6 and doc["mem_bytes"] > 1e8
    assert "GFLOP/s" in capsys.readouterr().out
    assert cli(["roofline", "--config", "qwen2.5-0.5b", "--hw", str(out), "--dtype", "fp32"]) == 0
    assert "cpu-local" in capsys.readouterr().out  # the probe names itself
