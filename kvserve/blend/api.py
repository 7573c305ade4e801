"""The server's side of segments: `segments` in /v1/completions, `blend_documents` in chat.

Everything here runs in the API process, so a bad segment list is refused with a 400
(an OpenAI error object naming the parameter) before anything is queued.
"""
from __future__ import annotations

from typing import Any, Optional

from kvserve.blend.prompts import tokenize_segments
from kvserve.blend.spec import check_blend_request


def completion_segments(segments: list[Any], tokenizer: Any, max_model_len: int, n: int,
                        ratio: float = 0.0) -> tuple[Optional[str], list[int], list[int]]:
    """(text, token ids, segment lengths) of a `segments` field, or a 400 naming `segments`."""
    from kvserve.entrypoints.openai.errors import bad_request

    try:
        text, ids, lens = tokenize_segments(tokenizer, segments)
        check_blend_request(lens, len(ids), n, ratio, max_model_len)
    except ValueError as exc:
        raise bad_request(str(exc), "segments") from None
    return text, ids, lens


def split_rendered_chat(text: str, documents: list[str]) -> list[str]:
    """A rendered chat prompt cut around each of `documents` (in order, each found verbatim
    after the previous one): [before, doc_1, between, doc_2, ..., doc_n, after], empty
    pieces between documents dropped.  ValueError when a document is not found."""
    pieces: list[str] = []
    pos = 0
    for i, doc in enumerate(documents):
        if not doc:
            raise ValueError(f"blend_documents[{i}] is empty")
        at = text.find(doc, pos)
        if at < 0:
            raise ValueError(f"blend_documents[{i}] does not appear verbatim in the messages "
                             "(after the documents before it)")
        if at > pos or not pieces:
            pieces.append(text[pos:at])
        pieces.append(doc)
        pos = at + len(doc)
    pieces.append(text[pos:])
    return pieces


def chat_segments(text: str, documents: list[str], tokenizer: Any, max_model_len: int,
                  n: int) -> tuple[list[int], list[int]]:
    """(token ids, segment lengths) of a rendered chat prompt with marked documents, or a 400
    naming `blend_documents`.  The template's text is tokenized without special tokens
    (it spells them out itself), one piece at a time."""
    from kvserve.entrypoints.openai.errors import bad_request

    try:
        pieces = split_rendered_chat(text, documents)
        ids: list[int] = []
        lens: list[int] = []
        for piece in pieces:
            toks = tokenizer.encode(piece, add_special_tokens=False)
            ids.extend(toks)
            lens.append(len(toks))
        check_blend_request(lens, len(ids), n, 0.0, max_model_len)
    except ValueError as exc:
        raise bad_request(str(exc), "blend_documents") from None
    return ids, lens
