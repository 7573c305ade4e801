"""Eval tasks as segments: the key-value list split into documents (kvserve eval, benchmarks).

An instance's rendered prompt (plain or chat) is cut at line boundaries into
    seg0       everything up to and including the list's header line (BOS, chat preamble)
    documents  `num_docs` groups of consecutive `KEY: value` lines
    question   the rest ("Question: ...\\nAnswer: ", or the chat template's tail)
Each segment is tokenized on its own (only the first with special tokens), so a
document's tokens do not depend on its neighbours; the reference prompt for a
comparison is the concatenation of these same tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvserve.eval.tasks import HEADER, TaskInstance


@dataclass(slots=True)
class SegmentedPrompt:
    seg0: list[int]
    docs: list[list[int]]
    question: list[int]

    def segments(self, order: list[int] | None = None) -> list[list[int]]:
        docs = self.docs if order is None else [self.docs[i] for i in order]
        return [self.seg0, *docs, self.question]

    def flat(self) -> list[int]:
        return [t for s in self.segments() for t in s]


def split_instance(inst: TaskInstance, tokenizer: Any, num_docs: int) -> SegmentedPrompt:
    """The instance's prompt as [seg0, doc_1..doc_num_docs, question] token segments."""
    if inst.fmt == "chat":
        assert inst.messages is not None
        text = tokenizer.apply_chat_template(list(inst.messages), tokenize=False, add_generation_prompt=True)
        first_special = False
    else:
        text, first_special = inst.prompt, True
    head_end = text.index(HEADER) + len(HEADER) + 1  # through the header's newline
    q_start = text.index("Question: ", head_end)
    lines = text[head_end:q_start].splitlines(keepends=True)
    if len(lines) < num_docs:
        raise ValueError(f"{inst.uid}: {len(lines)} lines cannot make {num_docs} documents")
    bounds = [round(i * len(lines) / num_docs) for i in range(num_docs + 1)]
    docs = ["".join(lines[bounds[i]:bounds[i + 1]]) for i in range(num_docs)]

    def ids(s: str, special: bool) -> list[int]:
        return list(tokenizer(s, add_special_tokens=special)["input_ids"])

    return SegmentedPrompt(ids(text[:head_end], first_special), [ids(d, False) for d in docs],
                           ids(text[q_start:], False))


def shuffled_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n) different from the identity (for n > 1)."""
    rng = random.Random(seed)
    order = list(range(n))
    while n > 1 and order == list(range(n)):
        rng.shuffle(order)
    return order


def generate_segmented(llm: Any, instances: list[TaskInstance], tokenizer: Any, num_docs: int, params: Any,
                       seed: int) -> list[Any]:
    """`kvserve eval --segments N`: each instance as [seg0, N documents, question], its
    documents first sent (and cached) in another order, then generated in the original
    order: every document is a chunk-cache hit at a position it was not computed at."""
    from kvserve import SamplingParams

    split = [split_instance(inst, tokenizer, num_docs) for inst in instances]
    warm = [{"segments": s.segments(shuffled_order(num_docs, seed + k))} for k, s in enumerate(split)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return llm.generate([{"segments": s.segments()} for s in split], params, use_tqdm=False)
