"""Trace readers on the real files in shared/data/traces and on deliberately broken copies."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.bench.errors import BenchInputError
from kvserve.bench.traces import (
    read_azure,
    read_burstgpt,
    read_generic_csv,
    read_mooncake,
    read_trace_file,
)

# ----------------------------------------------------------------------------- real files


def test_azure_code_real(shared_data: Path) -> None:
    recs = read_azure(shared_data / "traces/azure/AzureLLMInferenceTrace_code.csv")
    assert len(recs) == 8819
    first, last = recs[0], recs[-1]
    assert (first.timestamp_s, first.input_len, first.output_len) == (0.0, 4808, 10)
    # 19:14:19.9280160 - 18:17:03.9799600 = 57 min 15.948056 s
    assert last.timestamp_s == pytest.approx(57 * 60 + 15.948056, abs=1e-6)
    assert all(a.timestamp_s <= b.timestamp_s for a, b in zip(recs, recs[1:]))  # type: ignore[operator]
    assert first.line == 2 and last.line == 8820


def test_azure_conv_real(shared_data: Path) -> None:
    recs = read_azure(shared_data / "traces/azure/AzureLLMInferenceTrace_conv.csv")
    assert len(recs) == 19366
    assert (recs[0].input_len, recs[0].output_len) == (374, 44)
    # second row: 18:15:50.9951690 - 18:15:46.6805900
    assert recs[1].timestamp_s == pytest.approx(4.314579, abs=1e-6)
    # no trailing newline: the last row is still read
    assert (recs[-1].input_len, recs[-1].output_len) == (197, 183)


def test_mooncake_real(shared_data: Path) -> None:
    conv = read_mooncake(shared_data / "traces/mooncake/conversation_trace.jsonl")
    assert len(conv) == 12031
    assert conv[0].hash_ids == tuple(range(14))
    assert (conv[0].input_len, conv[0].output_len) == (6758, 500)
    assert conv[1].hash_ids[0] == 0 and conv[1].hash_ids[1] == 14
    assert conv[-1].timestamp_s == pytest.approx(3536.999)
    syn = read_mooncake(shared_data / "traces/mooncake/synthetic_trace.jsonl")
    assert len(syn) == 3993
    # Mooncake invariant used by prefix synthesis: the last block is the only partial one.
    for r in conv[:2000] + syn[:2000]:
        assert (len(r.hash_ids) - 1) * 512 < r.input_len <= len(r.hash_ids) * 512


def test_burstgpt_real(shared_data: Path) -> None:
    recs = read_burstgpt(shared_data / "traces/burstgpt/burstgpt_sample.csv")
    assert len(recs) == 54
    assert (recs[0].timestamp_s, recs[0].input_len, recs[0].output_len) == (0.0, 472, 18)
    assert recs[1].timestamp_s == 40.0  # 45 - 5
    assert recs[0].model == "ChatGPT" and recs[0].extra["log_type"] == "Conversation log"
    assert any(r.output_len == 0 for r in recs)  # failed requests are in the trace


def test_read_trace_file_sniffs_formats(shared_data: Path) -> None:
    assert len(read_trace_file(shared_data / "traces/burstgpt/burstgpt_sample.csv")) == 54
    assert read_trace_file(shared_data / "traces/mooncake/synthetic_trace.jsonl")[0].hash_ids


def test_generic_csv(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("timestamp,input_length,output_length\n10.5,100,20\n11.0,50,5\n")
    recs = read_trace_file(p)
    assert [(r.timestamp_s, r.input_len, r.output_len) for r in recs] == [(0.0, 100, 20), (0.5, 50, 5)]
    q = tmp_path / "no_time.csv"
    q.write_text("input_length,output_length\n3,4\n")
    assert read_generic_csv(q)[0].timestamp_s is None


# ----------------------------------------------------------------------------- broken copies


def _azure_copy(shared: Path, tmp: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    raw = (shared / "traces/azure/AzureLLMInferenceTrace_code.csv").read_bytes().decode()
    lines = raw.split("\r\n")[:50]
    out = tmp / "azure_broken.csv"
    out.write_bytes("\r\n".join(edit(lines)).encode())
    return out


def _expect(path: Path, fn, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BenchInputError) as info:
        fn(path)
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg


def test_azure_missing_column(shared_data: Path, tmp_path: Path) -> None:
    def drop_generated(lines: list[str]) -> list[str]:
        return [",".join(line.split(",")[:2]) for line in lines]

    _expect(_azure_copy(shared_data, tmp_path, drop_generated), read_azure, ":1:", "'GeneratedTokens'")


def test_azure_bad_int_names_line(shared_data: Path, tmp_path: Path) -> None:
    def corrupt(lines: list[str]) -> list[str]:
        lines[6] = lines[6].rsplit(",", 1)[0] + ",twelve"
        return lines

    _expect(_azure_copy(shared_data, tmp_path, corrupt), read_azure, ":7:", "GeneratedTokens", "twelve")


def test_azure_bad_timestamp(shared_data: Path, tmp_path: Path) -> None:
    def corrupt(lines: list[str]) -> list[str]:
        lines[3] = "yesterday," + lines[3].split(",", 1)[1]
        return lines

    _expect(_azure_copy(shared_data, tmp_path, corrupt), read_azure, ":4:", "TIMESTAMP")


def test_azure_wrong_field_count(shared_data: Path, tmp_path: Path) -> None:
    def corrupt(lines: list[str]) -> list[str]:
        lines[10] = lines[10] + ",999"
        return lines

    _expect(_azure_copy(shared_data, tmp_path, corrupt), read_azure, ":11:", "expected 3 fields")


def test_negative_tokens(tmp_path: Path) -> None:
    p = tmp_path / "neg.csv"
    p.write_text("input_length,output_length\n5,5\n-3,5\n")
    _expect(p, read_generic_csv, ":3:", ">= 0")


def test_header_only_and_empty(tmp_path: Path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n")
    _expect(header_only, read_azure, "no request rows")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    _expect(empty, read_azure, "empty file")
    empty_jsonl = tmp_path / "e.jsonl"
    empty_jsonl.write_text("\n\n")
    _expect(empty_jsonl, read_mooncake, "no request rows")


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.csv", read_trace_file, "not found")


def test_mooncake_broken(shared_data: Path, tmp_path: Path) -> None:
    lines = (shared_data / "traces/mooncake/synthetic_trace.jsonl").read_text().splitlines()[:20]
    cases = {
        "badjson": (lambda ls: ls[:4] + ['{"timestamp": 5, "input_length": '] + ls[5:], ":5:", "not valid JSON"),
        "missing": (lambda ls: ls[:8] + ['{"timestamp": 5, "input_length": 3, "hash_ids": [1]}'] + ls[9:], ":9:",
                    "'output_length'"),
        "hashes": (lambda ls: ls[:2] + ['{"timestamp": 5, "input_length": 3, "output_length": 2, "hash_ids": "x"}']
                   + ls[3:], ":3:", "hash_ids"),
        "float": (lambda ls: ls[:1] + ['{"timestamp": 5, "input_length": 3.5, "output_length": 2}'] + ls[2:], ":2:",
                  "input_length"),
        "array": (lambda ls: ls[:3] + ["[1, 2, 3]"] + ls[4:], ":4:", "JSON object"),
        "no_ts": (lambda ls: ls[:6] + ['{"input_length": 3, "output_length": 2}'] + ls[7:], ":7:", "timestamp"),
    }
    for name, (edit, where, what) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(edit(list(lines))) + "\n")
        _expect(p, read_mooncake, where, what)


def test_burstgpt_broken(shared_data: Path, tmp_path: Path) -> None:
    lines = (shared_data / "traces/burstgpt/burstgpt_sample.csv").read_text().splitlines()
    p = tmp_path / "b.csv"
    lines[12] = "soon," + lines[12].split(",", 1)[1]
    p.write_text("\n".join(lines) + "\n")
    _expect(p, read_burstgpt, ":13:", "'Timestamp'")
    q = tmp_path / "b2.csv"
    q.write_text("Timestamp,Model,Request tokens,Total tokens,Log Type\n5,ChatGPT,1,2,x\n")
    _expect(q, read_burstgpt, ":1:", "'Response tokens'")


def test_unrecognised_csv_header(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    _expect(p, read_trace_file, ":1:", "unrecognised CSV header")
