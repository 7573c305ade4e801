"""Readers for request traces -> `TraceRecord`s.

Every reader validates each row and raises `BenchInputError` naming the file and the 1-based line
on the first bad one; a file with a header but no rows is an error too (never a silently empty
workload).  Timestamps are normalised to seconds since the first record.

Formats:
  azure     CSV  TIMESTAMP (wall clock "YYYY-MM-DD HH:MM:SS.fffffff"), ContextTokens, GeneratedTokens
  burstgpt  CSV  Timestamp (s), Model, Request tokens, Response tokens, Total tokens, Log Type
  mooncake  JSONL {"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}
  generic   CSV  timestamp (s, optional column), input_length, output_length
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from kvserve.bench.errors import BenchInputError, at

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
GENERIC_COLUMNS = ("input_length", "output_length")  # plus an optional "timestamp" (seconds)
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a trace."""

    timestamp_s: float | None  # seconds since the trace's first record; None if the trace has none
    input_len: int  # prompt tokens
    output_len: int  # generated tokens
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per prefix block; equal ids = identical blocks
    line: int = 0  # 1-based line in the source file, for messages
    model: str | None = None  # BurstGPT: which model served it
    extra: dict[str, str] = field(default_factory=dict)  # e.g. BurstGPT "Log Type"


# ----------------------------------------------------------------------------- helpers


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BenchInputError(f"{path}: trace file not found")
    if not path.is_file():
        raise BenchInputError(f"{path}: not a regular file")


def _int_field(path: Path, line: int, name: str, raw: Any, minimum: int = 0) -> int:
    # bool is an int subclass; a JSON `true` is not a token count.
    if isinstance(raw, bool):
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be an integer, got {raw!r}")
    try:
        value = int(raw) if not isinstance(raw, str) else int(raw.strip())
    except (TypeError, ValueError):
        raise BenchInputError(
            f"{at(path, line)}: column {name!r} must be an integer, got {raw!r}"
        ) from None
    if isinstance(raw, float) and raw != value:
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be an integer, got {raw!r}")
    if value < minimum:
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be >= {minimum}, got {value}")
    return value


def _float_field(path: Path, line: int, name: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be a number, got {raw!r}")
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BenchInputError(f"{at(path, line)}: column {name!r} must be finite, got {raw!r}")
    return value


def parse_wall_clock(text: str) -> datetime:
    """Parse Azure's "2023-11-16 18:15:46.6805900" (7 fractional digits, more than strptime's %f).

    Sub-microsecond digits are dropped; the result is naive (the trace has no zone)."""
    text = text.strip()
    base, _, frac = text.partition(".")
    stamp = datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad fractional seconds in {text!r}")
        stamp = stamp.replace(microsecond=int((frac + "000000")[:6]))
    return stamp


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) for a CSV file after checking its header.

    `newline=""` lets the csv module handle CRLF (Azure) and a missing final newline."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise BenchInputError(f"{path}: empty file (expected a header with {', '.join(required)})") from None
        except csv.Error as exc:
            raise BenchInputError(f"{at(path, 1)}: unreadable CSV header: {exc}") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise BenchInputError(
                f"{at(path, 1)}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                f"header is {', '.join(repr(h) for h in header)}"
            )
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise BenchInputError(f"{at(path, reader.line_num)}: unreadable CSV row: {exc}") from None
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                raise BenchInputError(
                    f"{at(path, line)}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}: "
                    f"{','.join(values)!r}"
                )
            yield line, dict(zip(header, values))


def _nonempty(path: Path, records: list[TraceRecord]) -> list[TraceRecord]:
    if not records:
        raise BenchInputError(f"{path}: the trace has no request rows")
    return records


def _relative(records: list[TraceRecord], stamps: list[float]) -> list[TraceRecord]:
    """Rebuild records with timestamps relative to the earliest one."""
    t0 = min(stamps)
    return [
        TraceRecord(s - t0, r.input_len, r.output_len, r.hash_ids, r.line, r.model, r.extra)
        for r, s in zip(records, stamps)
    ]


# ----------------------------------------------------------------------------- readers


def read_azure(path: str | Path) -> list[TraceRecord]:
    """Azure LLM inference trace 2023 (code or conversation)."""
    path = Path(path)
    _check_file(path)
    records: list[TraceRecord] = []
    walls: list[datetime] = []
    for line, row in _csv_rows(path, AZURE_COLUMNS):
        try:
            stamp = parse_wall_clock(row["TIMESTAMP"])
        except ValueError:
            raise BenchInputError(
                f"{at(path, line)}: column 'TIMESTAMP' must look like '2023-11-16 18:15:46.6805900', "
                f"got {row['TIMESTAMP']!r}"
            ) from None
        records.append(
            TraceRecord(
                None,
                _int_field(path, line, "ContextTokens", row["ContextTokens"]),
                _int_field(path, line, "GeneratedTokens", row["GeneratedTokens"]),
                line=line,
            )
        )
        walls.append(stamp)
    records = _nonempty(path, records)
    # Subtract datetimes (exact, zone-free) rather than epoch floats (local-zone and DST dependent).
    first = min(walls)
    return _relative(records, [(w - first).total_seconds() for w in walls])


def read_burstgpt(path: str | Path) -> list[TraceRecord]:
    """BurstGPT trace (timestamps are seconds from the trace start)."""
    path = Path(path)
    _check_file(path)
    records: list[TraceRecord] = []
    stamps: list[float] = []
    for line, row in _csv_rows(path, BURSTGPT_COLUMNS):
        stamps.append(_float_field(path, line, "Timestamp", row["Timestamp"]))
        records.append(
            TraceRecord(
                None,
                _int_field(path, line, "Request tokens", row["Request tokens"]),
                _int_field(path, line, "Response tokens", row["Response tokens"]),
                line=line,
                model=row["Model"].strip(),
                extra={"log_type": row["Log Type"].strip()},
            )
        )
    return _relative(_nonempty(path, records), stamps)


def read_generic_csv(path: str | Path) -> list[TraceRecord]:
    """CSV with columns input_length, output_length and optionally timestamp (seconds)."""
    path = Path(path)
    _check_file(path)
    records: list[TraceRecord] = []
    stamps: list[float] = []
    has_time = True
    for line, row in _csv_rows(path, GENERIC_COLUMNS):
        has_time = has_time and "timestamp" in row
        if has_time:
            stamps.append(_float_field(path, line, "timestamp", row["timestamp"]))
        records.append(
            TraceRecord(
                None,
                _int_field(path, line, "input_length", row["input_length"]),
                _int_field(path, line, "output_length", row["output_length"]),
                line=line,
            )
        )
    records = _nonempty(path, records)
    return _relative(records, stamps) if has_time else records


def read_mooncake(path: str | Path) -> list[TraceRecord]:
    """Mooncake JSONL trace (timestamp in ms).  `hash_ids` and `timestamp` are optional in custom
    JSONL traces, but when present they must be well formed."""
    path = Path(path)
    _check_file(path)
    records: list[TraceRecord] = []
    stamps: list[float] = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BenchInputError(f"{at(path, line)}: not valid JSON ({exc.msg}): {text.strip()[:80]!r}") from None
            if not isinstance(obj, dict):
                raise BenchInputError(f"{at(path, line)}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in ("input_length", "output_length") if k not in obj]
            if missing:
                raise BenchInputError(
                    f"{at(path, line)}: missing key(s) {', '.join(repr(m) for m in missing)}; "
                    f"keys are {', '.join(repr(k) for k in obj)}"
                )
            if records and (("timestamp" in obj) != (len(stamps) == len(records))):
                raise BenchInputError(f"{at(path, line)}: 'timestamp' must be on every line or on none")
            if "timestamp" in obj:
                stamps.append(_float_field(path, line, "timestamp", obj["timestamp"]) / 1000.0)
            hash_ids = obj.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
            ):
                raise BenchInputError(f"{at(path, line)}: 'hash_ids' must be a list of integers")
            records.append(
                TraceRecord(
                    None,
                    _int_field(path, line, "input_length", obj["input_length"]),
                    _int_field(path, line, "output_length", obj["output_length"]),
                    tuple(hash_ids),
                    line=line,
                )
            )
    records = _nonempty(path, records)
    return _relative(records, stamps) if stamps else records


def _sniff_csv(path: Path) -> Callable[[str | Path], list[TraceRecord]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        first = f.readline()
    if not first.strip():
        raise BenchInputError(f"{path}: empty file (expected a CSV header)")
    header = {h.strip() for h in next(csv.reader([first]))}
    if "TIMESTAMP" in header or "ContextTokens" in header:
        return read_azure
    if "Request tokens" in header or "Response tokens" in header:
        return read_burstgpt
    if "input_length" in header or "output_length" in header:
        return read_generic_csv
    raise BenchInputError(
        f"{at(path, 1)}: unrecognised CSV header {sorted(header)}; expected Azure "
        f"({', '.join(AZURE_COLUMNS)}), BurstGPT ({', '.join(BURSTGPT_COLUMNS)}) "
        f"or generic (timestamp, input_length, output_length) columns"
    )


def read_trace_file(path: str | Path) -> list[TraceRecord]:
    """Read a custom trace, choosing the reader from the extension (.jsonl/.json) or CSV header."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return read_mooncake(path)
    return _sniff_csv(path)(path)


READERS: dict[str, Callable[[str | Path], list[TraceRecord]]] = {
    "azure-conv": read_azure,
    "azure-code": read_azure,
    "mooncake": read_mooncake,
    "burstgpt": read_burstgpt,
    "trace": read_trace_file,
}
