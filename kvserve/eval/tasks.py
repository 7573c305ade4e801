"""Synthetic long-context tasks with exactly checkable answers.

Every task is a list of `KEY: value` lines (keys are four upper-case letters,
values four digits or, for pointer lines, another key) followed by one or more
questions.  Generators are seeded and deterministic; the context is filled to a
target length *in tokens* of a given tokenizer, so one suite measures a model at
256, 512, 1024, ... tokens whatever its vocabulary.

Tasks (`TASK_NAMES`):

- ``kv_retrieval``  "What is the value of ABCD?" -> ``ABCD: 4821``
- ``multi_kv``      "What are the values of ABCD, EFGH, IJKL?" -> the three lines, in that order
- ``two_hop``       some values are keys; "Which key does ABCD point to, and what is its
                    value?" -> ``ABCD: QRST`` and ``QRST: 4821`` (two lines)
- ``copy``          "Repeat the list exactly." -> every line of the list
- ``arithmetic``    "What is 37 + 48?" after a list of distractor lines -> ``85``

Lookup answers quote the lines that answer the question (newline-separated), so
the key is repeated before its value.  This is a deliberate choice: it makes the
answer a pure copy from the context (an induction pattern small models learn
quickly), while the hard part, finding the right line among hundreds, remains.

Formats (`FORMATS`): ``plain`` (a completion prompt ending in ``"Answer: "``)
and ``chat`` (a user message; the prompt is rendered with the tokenizer's chat
template).

Context length: for ``plain`` the prompt's token count including special tokens
the tokenizer adds (BOS), for ``chat`` the rendered template with the generation
prompt.  For ``copy`` the answer's tokens count too, since the model reads and
writes the whole list.  Instances use the largest number of lines that fits.

`solve(prompt)` is an independent answer parser: it reads only the prompt text
(regexes over the lines and the question) and recomputes the answer, so tests
can check every generator against it.  `score(instance, output)` is exact match
after stripping surrounding whitespace.

The same rendering is used to build training sequences
(`render_training_text`), so the demo model is trained on exactly the format it
is evaluated on.
"""
from __future__ import annotations

import dataclasses
import random
import re
import string
import zlib
from typing import Any, Iterable, Sequence

HEADER = "Below is a list of keys and values."
TASK_NAMES: tuple[str, ...] = ("kv_retrieval", "multi_kv", "two_hop", "copy", "arithmetic")
FORMATS: tuple[str, ...] = ("plain", "chat")

KEY_LEN = 4
_KEY_ALPHABET = string.ascii_uppercase
_VALUE_RANGE = (1000, 9999)
_ARITH_MAX = 99
_POINTER_FRACTION = 1 / 3  # two_hop: share of lines whose value is another key

_Q_KV = "What is the value of {key}?"
_Q_MULTI = "What are the values of {keys}?"
_Q_TWO_HOP = "Which key does {key} point to, and what is its value?"
_Q_COPY = "Repeat the list exactly."
_Q_ARITH = "What is {a} {op} {b}?"


@dataclasses.dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str


@dataclasses.dataclass(slots=True)
class TaskSample:
    """Format-free task content: the context lines and the question/answer pairs.

    Evaluation instances use the first pair only; training sequences ask all of
    them in turn (later questions see the earlier answers).
    """

    task: str
    lines: list[str]
    qas: list[QA]
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class TaskInstance:
    """One evaluation item.

    `prompt` is the completion prompt (``plain``) or the user message content
    (``chat``; then `messages` holds the conversation to render).  Use
    `prompt_token_ids` to get the exact tokens the model should see.
    """

    uid: str
    task: str
    fmt: str
    context_length: int  # the target, in tokens
    num_tokens: int  # actual tokens (prompt, plus the answer for `copy`)
    prompt: str
    answer: str
    messages: tuple[dict[str, str], ...] | None
    metadata: dict[str, Any]

    def prompt_token_ids(self, tokenizer: Any) -> list[int]:
        """Prompt tokens for `tokenizer`: BOS + text for plain, the chat template for chat."""
        return _Tok(tokenizer).prompt_ids(self)


# --------------------------------------------------------------------------- sampling


def _rng(*parts: object) -> random.Random:
    """A Random seeded stably from `parts` (Python's hash() is salted per process)."""
    return random.Random(zlib.crc32("\x1f".join(map(str, parts)).encode()))


def _unique_keys(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    keys: list[str] = []
    while len(keys) < n:
        key = "".join(rng.choices(_KEY_ALPHABET, k=KEY_LEN))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def _values(rng: random.Random, n: int) -> list[str]:
    return [str(rng.randint(*_VALUE_RANGE)) for _ in range(n)]


def _kv_lines(keys: Sequence[str], values: Sequence[str]) -> list[str]:
    return [f"{k}: {v}" for k, v in zip(keys, values)]


def _depth(index: int, n: int) -> float:
    return index / max(1, n - 1)


def _sample_kv(rng: random.Random, n: int, q: int) -> TaskSample:
    keys, values = _unique_keys(rng, n), _values(rng, n)
    picks = rng.sample(range(n), q)
    qas = [QA(_Q_KV.format(key=keys[i]), f"{keys[i]}: {values[i]}") for i in picks]
    return TaskSample("kv_retrieval", _kv_lines(keys, values), qas,
                      {"num_lines": n, "depth": _depth(picks[0], n), "key": keys[picks[0]],
                       "value": values[picks[0]]})


def _sample_multi(rng: random.Random, n: int, q: int) -> TaskSample:
    keys, values = _unique_keys(rng, n), _values(rng, n)
    qas, first = [], []
    for _ in range(q):
        picks = rng.sample(range(n), min(n, rng.choice((2, 3))))
        first = first or picks
        qas.append(QA(_Q_MULTI.format(keys=", ".join(keys[i] for i in picks)),
                      "\n".join(f"{keys[i]}: {values[i]}" for i in picks)))
    return TaskSample("multi_kv", _kv_lines(keys, values), qas,
                      {"num_lines": n, "num_keys": len(first),
                       "depths": [_depth(i, n) for i in first]})


def _sample_two_hop(rng: random.Random, n: int, q: int) -> TaskSample:
    keys = _unique_keys(rng, n)
    num_ptr = min(n - 1, max(q, round(n * _POINTER_FRACTION)))
    order = list(range(n))
    rng.shuffle(order)
    pointers, targets = order[:num_ptr], order[num_ptr:]
    values = _values(rng, n)
    for i in pointers:  # a pointer's value is the key of a digit line
        values[i] = keys[rng.choice(targets)]
    picks = rng.sample(pointers, q)
    by_key = dict(zip(keys, values))
    qas = [QA(_Q_TWO_HOP.format(key=keys[i]), f"{keys[i]}: {values[i]}\n{values[i]}: {by_key[values[i]]}")
           for i in picks]
    hop = keys.index(values[picks[0]])
    return TaskSample("two_hop", _kv_lines(keys, values), qas,
                      {"num_lines": n, "depth": _depth(picks[0], n), "hop_depth": _depth(hop, n),
                       "value": by_key[values[picks[0]]]})


def _sample_copy(rng: random.Random, n: int, q: int) -> TaskSample:
    lines = _kv_lines(_unique_keys(rng, n), _values(rng, n))
    return TaskSample("copy", lines, [QA(_Q_COPY, "\n".join(lines))], {"num_lines": n})


def _sample_arith(rng: random.Random, n: int, q: int) -> TaskSample:
    lines = _kv_lines(_unique_keys(rng, n), _values(rng, n))
    qas = []
    for _ in range(q):
        a, b = rng.randint(0, _ARITH_MAX), rng.randint(0, _ARITH_MAX)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        qas.append(QA(_Q_ARITH.format(a=a, op=op, b=b), str(a + b if op == "+" else a - b)))
    return TaskSample("arithmetic", lines, qas, {"num_lines": n})


_SAMPLERS = {
    "kv_retrieval": (_sample_kv, 1),  # (sampler, minimum lines for one question)
    "multi_kv": (_sample_multi, 3),
    "two_hop": (_sample_two_hop, 2),
    "copy": (_sample_copy, 1),
    "arithmetic": (_sample_arith, 0),
}


def min_lines(task: str, num_queries: int = 1) -> int:
    """Fewest context lines `task` needs for `num_queries` questions."""
    base = _SAMPLERS[task][1]
    if task in ("kv_retrieval",):
        return max(base, num_queries)
    if task == "two_hop":
        return max(base, num_queries + 1)
    return base


def make_sample(task: str, num_lines: int, seed: int | str, num_queries: int = 1) -> TaskSample:
    """The sample of `task` with `num_lines` context lines drawn from `seed`."""
    if task not in _SAMPLERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASK_NAMES}")
    if task == "copy" and num_queries != 1:
        raise ValueError("copy asks one question")
    if num_lines < min_lines(task, num_queries):
        raise ValueError(f"{task} needs at least {min_lines(task, num_queries)} lines")
    sampler, _ = _SAMPLERS[task]
    return sampler(_rng("sample", task, seed, num_lines, num_queries), num_lines, num_queries)


# --------------------------------------------------------------------------- rendering


def _body(sample: TaskSample) -> str:
    return "\n".join([HEADER, *sample.lines]) + "\n"


def plain_prompt(sample: TaskSample) -> str:
    """Completion prompt for the first question; the model writes the answer, then EOS."""
    return f"{_body(sample)}Question: {sample.qas[0].question}\nAnswer: "


def chat_messages(sample: TaskSample, num_turns: int = 1, with_answers: bool = False) -> list[dict[str, str]]:
    """The conversation: the list and the first question in one user turn, then one turn per question."""
    messages: list[dict[str, str]] = []
    for i, qa in enumerate(sample.qas[:num_turns]):
        prefix = _body(sample) if i == 0 else ""
        messages.append({"role": "user", "content": f"{prefix}Question: {qa.question}"})
        if with_answers:
            messages.append({"role": "assistant", "content": qa.answer})
    return messages


def render_training_text(sample: TaskSample, fmt: str, tokenizer: Any) -> tuple[str, list[tuple[int, int]], bool]:
    """Full text asking every question of `sample` with its answer.

    Returns (text, spans, add_special_tokens): `spans` are the character ranges
    the model must produce (each answer and the EOS after it); tokenize `text`
    with `add_special_tokens` to get the training sequence.
    """
    tok = _Tok(tokenizer)
    if fmt == "plain":
        parts, spans, pos = [], [], 0
        for i, qa in enumerate(sample.qas):
            head = (_body(sample) if i == 0 else "\n") + f"Question: {qa.question}\nAnswer: "
            pos += len(head)
            tail = qa.answer + tok.eos_text
            spans.append((pos, pos + len(tail)))
            parts += [head, tail]
            pos += len(tail)
        return "".join(parts), spans, True
    if fmt == "chat":
        convo = chat_messages(sample, len(sample.qas), with_answers=True)
        text = tok.render_chat(convo, add_generation_prompt=False)
        spans = []
        for turn, qa in enumerate(sample.qas):
            start = len(tok.render_chat(convo[: 2 * turn + 1], add_generation_prompt=True))
            end = start + len(qa.answer) + len(tok.eos_text)
            if text[start:end] != qa.answer + tok.eos_text:
                raise ValueError("chat template must put each answer right after the generation prompt, then EOS")
            spans.append((start, end))
        return text, spans, False
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


class _Tok:
    """The few tokenizer operations the tasks need (a Hugging Face tokenizer underneath)."""

    def __init__(self, tokenizer: Any):
        self.tk = tokenizer
        self.eos_text = tokenizer.eos_token or ""

    def ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tk(text, add_special_tokens=add_special_tokens)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not getattr(self.tk, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; use the plain format")
        return self.tk.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, inst: TaskInstance) -> list[int]:
        if inst.fmt == "chat":
            assert inst.messages is not None
            return self.ids(self.render_chat(list(inst.messages), True), add_special_tokens=False)
        return self.ids(inst.prompt, add_special_tokens=True)

    def answer_len(self, answer: str) -> int:
        return len(self.ids(answer + self.eos_text, add_special_tokens=False))


# --------------------------------------------------------------------------- fitting to a length


def fit_lines(task: str, budget: int, measure, seed: int | str, num_queries: int = 1,
              max_lines: int = 100_000) -> TaskSample:
    """The sample with the most lines whose `measure(sample)` (tokens) is <= `budget`.

    `measure` is monotone in the number of lines for a fixed seed; the search
    extrapolates from two probes, then steps to the exact boundary.
    """
    lo = min_lines(task, num_queries)
    sample = make_sample(task, lo, seed, num_queries)
    base = measure(sample)
    if base > budget:
        raise ValueError(f"{task}: even {lo} lines need {base} tokens > {budget}")
    probe = lo + 8
    # Every line costs at least one token.  A multi-question sample can measure *shorter* with
    # more lines (its questions are drawn anew), and a per-line estimate near zero once sent the
    # search to 100,000 lines, then down one line at a time over megabyte texts: a hang.
    per_line = max(1.0, (measure(make_sample(task, probe, seed, num_queries)) - base) / (probe - lo))
    n = min(max_lines, max(lo, lo + int((budget - base) / per_line)))
    best = sample
    cand = make_sample(task, n, seed, num_queries)
    if measure(cand) <= budget:  # walk up to the boundary
        best = cand
        while n < max_lines:
            cand = make_sample(task, n + 1, seed, num_queries)
            if measure(cand) > budget:
                break
            best, n = cand, n + 1
    else:  # bisect down: lo fits, n does not
        good, bad = lo, n
        while bad - good > 1:
            mid = (good + bad) // 2
            cand = make_sample(task, mid, seed, num_queries)
            if measure(cand) <= budget:
                best, good = cand, mid
            else:
                bad = mid
    return best


def make_instance(task: str, context_length: int, seed: int | str, tokenizer: Any,
                  fmt: str = "plain", uid: str | None = None) -> TaskInstance:
    """One evaluation instance of `task` filled to `context_length` tokens."""
    if task not in _SAMPLERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASK_NAMES}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    tok = _Tok(tokenizer)

    def build(sample: TaskSample) -> TaskInstance:
        qa = sample.qas[0]
        if fmt == "plain":
            prompt, messages = plain_prompt(sample), None
        else:
            messages = tuple(chat_messages(sample))
            prompt = messages[0]["content"]
        inst = TaskInstance(uid or f"{task}/{fmt}/{context_length}/{seed}", task, fmt, context_length, 0,
                            prompt, qa.answer, messages, dict(sample.metadata))
        n = len(tok.prompt_ids(inst)) + (tok.answer_len(qa.answer) if task == "copy" else 0)
        return dataclasses.replace(inst, num_tokens=n)

    sample = fit_lines(task, context_length, lambda s: build(s).num_tokens, seed)
    return build(sample)


def generate_suite(task_names: Iterable[str], context_lengths: Iterable[int], num_per_cell: int,
                   seed: int, tokenizer: Any, formats: Iterable[str] = ("plain",)) -> list[TaskInstance]:
    """`num_per_cell` instances for every (task, format, context length), deterministic in `seed`."""
    out = []
    for task in task_names:
        for fmt in formats:
            for length in context_lengths:
                for i in range(num_per_cell):
                    cell_seed = f"{seed}/{task}/{fmt}/{length}/{i}"
                    out.append(make_instance(task, length, cell_seed, tokenizer, fmt,
                                             uid=f"{task}/{fmt}/{length}/{i}"))
    return out


# --------------------------------------------------------------------------- checking

_LINE_RE = re.compile(r"^([A-Z]{4}): ([A-Z]{4}|\d+)$", re.MULTILINE)
_QUESTION_RE = re.compile(r"Question: (.+?)\s*$", re.MULTILINE)
_SOLVERS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^What is the value of ([A-Z]{4})\?"), "kv_retrieval"),
    (re.compile(r"^What are the values of ([A-Z]{4}(?:, [A-Z]{4})*)\?"), "multi_kv"),
    (re.compile(r"^Which key does ([A-Z]{4}) point to, and what is its value\?"), "two_hop"),
    (re.compile(r"^Repeat the list exactly\."), "copy"),
    (re.compile(r"^What is (\d+) ([+-]) (\d+)\?"), "arithmetic"),
]


def parse_lines(text: str) -> dict[str, str]:
    """The `KEY: value` lines of `text`; a repeated key is an error (the answer would be ambiguous)."""
    table: dict[str, str] = {}
    for key, value in _LINE_RE.findall(text):
        if key in table:
            raise ValueError(f"key {key} appears twice")
        table[key] = value
    return table


def solve(prompt: str) -> str:
    """Recompute the answer to the last question in `prompt` from the prompt text alone."""
    questions = _QUESTION_RE.findall(prompt)
    if not questions:
        raise ValueError("no question in prompt")
    question = questions[-1]
    table = parse_lines(prompt)
    for pattern, task in _SOLVERS:
        m = pattern.match(question)
        if not m:
            continue
        if task == "kv_retrieval":
            return f"{m.group(1)}: {table[m.group(1)]}"
        if task == "multi_kv":
            return "\n".join(f"{k}: {table[k]}" for k in m.group(1).split(", "))
        if task == "two_hop":
            key = m.group(1)
            hop = table[key]
            return f"{key}: {hop}\n{hop}: {table[hop]}"
        if task == "copy":
            body = prompt[: prompt.rindex("Question: ")]
            return "\n".join(line for line in body.splitlines() if _LINE_RE.fullmatch(line))
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return str(a + b if op == "+" else a - b)
    raise ValueError(f"unrecognized question: {question!r}")


def normalize(text: str) -> str:
    return text.strip()


def score(instance: TaskInstance, output_text: str) -> bool:
    """Exact match of the generated text (EOS and surrounding whitespace removed) to the answer."""
    return normalize(output_text) == normalize(instance.answer)
