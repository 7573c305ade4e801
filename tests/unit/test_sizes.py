"""One size parser for every flag and tier spec: the same text gives the same bytes everywhere."""
from __future__ import annotations

import argparse

import pytest

from kvserve.bench.errors import BenchInputError
from kvserve.bench.offline import parse_bytes
from kvserve.entrypoints.serve_cli import parse_size as serve_parse_size
from kvserve.kv_store import parse_size as tier_parse_size
from kvserve.kv_store import parse_tier_spec
from kvserve.utils.sizes import parse_size

CASES = [
    ("1048576", 1048576), ("4GiB", 4 << 30), ("512mib", 512 << 20), ("1.5GB", 1_500_000_000),
    ("20GB", 20 * 10**9), ("1.5K", 1536), ("2g", 2 << 30), ("64 KiB", 65536), ("3T", 3 << 40), ("7b", 7),
]
BAD = ["", "GiB", "4XB", "-1GiB", "0", "four", "1e9", "0.1b"]


@pytest.mark.parametrize("text,expected", CASES)
def test_every_entry_point_reads_a_size_the_same_way(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert serve_parse_size(text) == expected
    assert tier_parse_size(text) == expected
    assert parse_bytes(text) == expected
    assert parse_tier_spec(f"cpu:{text}").size == expected


@pytest.mark.parametrize("text", BAD)
def test_bad_sizes_are_refused_with_each_entry_points_error(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
    with pytest.raises(argparse.ArgumentTypeError):
        serve_parse_size(text)
    with pytest.raises(BenchInputError, match="--kv-cache-memory"):
        parse_bytes(text)
