"""Cutting a rendered chat prompt around marked documents (pure text)."""
from __future__ import annotations

import pytest

from kvserve.blend.api import split_rendered_chat


def test_split_keeps_every_character_in_order():
    text = "<|user|>\nDocs: AAA then BBB. Question?\n<|assistant|>\n"
    pieces = split_rendered_chat(text, ["AAA", "BBB"])
    assert pieces == ["<|user|>\nDocs: ", "AAA", " then ", "BBB", ". Question?\n<|assistant|>\n"]
    assert "".join(pieces) == text
    # Adjacent documents: no empty piece between them.
    assert split_rendered_chat("x AAABBB y", ["AAA", "BBB"]) == ["x ", "AAA", "BBB", " y"]


def test_missing_or_out_of_order_documents_are_refused():
    with pytest.raises(ValueError, match=r"blend_documents\[1\] does not appear"):
        split_rendered_chat("x BBB AAA y", ["AAA", "BBB"])
    with pytest.raises(ValueError, match=r"blend_documents\[0\] is empty"):
        split_rendered_chat("x", [""])
