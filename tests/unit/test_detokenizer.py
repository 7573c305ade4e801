"""Incremental detokenization and stop strings, against full decodes of a real tokenizer."""
from __future__ import annotations

import pytest

from kvserve.engine.detokenizer import IncrementalDetokenizer
from tests.helpers.tiny_models import TOKENIZERS


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / "qwen2.5-0.5b"))


TEXTS = ["Hello, world! ça va? 日本語のテキスト 🙂👍🏽 done", "naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "  spaces\n\nand\ttabs"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("tok_name", ["gpt2", "qwen"])
def test_incremental_equals_full_decode_and_never_emits_broken_chars(text, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    prompt = tok.encode("Prompt:")
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, prompt)
    pieces = [d.add_tokens([i]) for i in ids]
    pieces.append(d.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == d.text


def test_the_texts_really_split_characters_across_tokens(gpt2, qwen):
    for tok in (gpt2, qwen):
        assert any("\ufffd" in tok.decode([i]) for text in TEXTS for i in tok.encode(text))


def test_stop_string_spanning_tokens_truncates(gpt2):
    ids = gpt2.encode("The answer is 42. END of story")
    d = IncrementalDetokenizer(gpt2, [], stop=["42. E"])
    for i in ids:
        d.add_tokens([i])
        if d.stopped_on:
            break
    assert d.stopped_on == "42. E"
    assert d.text == "The answer is "
    d2 = IncrementalDetokenizer(gpt2, [], stop=["42. E"], include_stop_str_in_output=True)
    for i in ids:
        d2.add_tokens([i])
        if d2.stopped_on:
            break
    assert d2.text == "The answer is 42. E"


def test_visible_text_holds_back_a_possible_stop_prefix(gpt2):
    d = IncrementalDetokenizer(gpt2, [], stop=["STOP"])
    for i in gpt2.encode("abc ST"):
        d.add_tokens([i])
    assert d.stopped_on is None
    assert d.visible_text(finished=False) == d.text[:-3]
    assert d.visible_text(finished=True) == d.text
