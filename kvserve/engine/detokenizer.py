"""Incremental detokenization and stop strings.

Decoding token by token is wrong for byte-level BPE: a multi-byte UTF-8
character may span tokens, and decoding a lone piece yields U+FFFD.  We decode
a short window of context plus the new tokens and emit only text that has
settled (no trailing U+FFFD), as TGI and vLLM do.
"""
from __future__ import annotations

from typing import Optional, Sequence

# Prompt tokens kept as left context: some tokenizers (SentencePiece) render
# a leading space differently at the start of a string.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = list(stop)
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.stopped_on: Optional[str] = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly settled text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            new = ""
        if new:
            self.text += new
            self._check_stop(len(new))
        return new

    def flush(self) -> str:
        """At the end of generation: emit whatever is pending (even an incomplete character)."""
        full_text = self._decode(self.ids[self.prefix_offset:])
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = full_text[len(prefix_text):] if full_text.startswith(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        if new and self.stopped_on is None:
            self.text += new
            self._check_stop(len(new))
        return new

    def _check_stop(self, num_new_chars: int) -> None:
        if not self.stop or self.stopped_on is not None:
            return
        # A stop string may straddle the old text and the new chars.
        search_from = max(0, len(self.text) - num_new_chars - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.stopped_on = s
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]

    def visible_text(self, finished: bool) -> str:
        """Text safe to show a streaming client: hold back a possible stop-string prefix."""
        if finished or self.stopped_on is not None or not self.max_stop_len:
            return self.text
        return self.text[: max(0, len(self.text) - (self.max_stop_len - 1))]
