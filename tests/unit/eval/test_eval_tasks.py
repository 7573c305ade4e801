"""Task generators: every instance is checked by the independent parser `tasks.solve`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvserve
from kvserve.eval import tasks

DEMO_MODEL = Path(kvserve.__file__).resolve().parent / "demo_model"
GPT2_TOKENIZER = Path(os.environ.get("KVSERVE_SHARED_DATA", "/work/shared/data")) / "tokenizers" / "gpt2" / "tokenizer.json"

# Instances use the most lines that fit, so they fall short of the target by less than
# one line (two for copy, which also counts the answer) plus a few tokens of slack.
MAX_SHORTFALL = {"copy": 40}
DEFAULT_SHORTFALL = 20


@pytest.fixture(scope="module")
def demo_tokenizer():
    if not (DEMO_MODEL / "tokenizer.json").exists():
        pytest.skip("demo model not built")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not GPT2_TOKENIZER.exists():
        pytest.skip("shared GPT-2 tokenizer not available")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_instances_verify_and_fit(demo_tokenizer, task, length, fmt):
    for i in range(3):
        inst = tasks.make_instance(task, length, f"t/{i}", demo_tokenizer, fmt)
        assert tasks.solve(inst.prompt) == inst.answer
        assert tasks.score(inst, inst.answer)
        assert tasks.score(inst, f"  {inst.answer}\n")
        assert not tasks.score(inst, inst.answer + "0")
        assert inst.task == task and inst.fmt == fmt and inst.context_length == length
        n = len(inst.prompt_token_ids(demo_tokenizer))
        if task == "copy":
            n += len(demo_tokenizer(inst.answer + demo_tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        assert n == inst.num_tokens
        assert length - MAX_SHORTFALL.get(task, DEFAULT_SHORTFALL) <= n <= length


def test_plain_prompt_tokens_extend_to_the_answer(demo_tokenizer):
    """Prompt tokens + answer tokens == tokens of prompt + answer: generation sees what training saw."""
    for task in tasks.TASK_NAMES:
        inst = tasks.make_instance(task, 256, "concat", demo_tokenizer)
        whole = demo_tokenizer(inst.prompt + inst.answer)["input_ids"]
        parts = inst.prompt_token_ids(demo_tokenizer) + demo_tokenizer(inst.answer, add_special_tokens=False)["input_ids"]
        assert whole == parts


def test_chat_prompt_uses_template(demo_tokenizer):
    inst = tasks.make_instance("kv_retrieval", 256, 7, demo_tokenizer, "chat")
    ids = inst.prompt_token_ids(demo_tokenizer)
    assert ids[0] == demo_tokenizer.bos_token_id
    assert ids.count(demo_tokenizer.bos_token_id) == 1
    assert demo_tokenizer.convert_ids_to_tokens(ids[-2:])[0] == "<|assistant|>"
    assert inst.messages is not None and inst.messages[0]["role"] == "user"
    assert inst.messages[0]["content"] == inst.prompt


def test_other_tokenizer_plain(gpt2_tokenizer):
    """Generators work with any Hugging Face tokenizer (lengths are in its tokens)."""
    for task in tasks.TASK_NAMES:
        inst = tasks.make_instance(task, 400, 3, gpt2_tokenizer)
        assert tasks.solve(inst.prompt) == inst.answer
        assert 400 - 60 <= inst.num_tokens <= 400


def test_chat_needs_a_template(gpt2_tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        tasks.make_instance("kv_retrieval", 256, 0, gpt2_tokenizer, "chat")


def test_suite_is_deterministic_and_covers_cells(demo_tokenizer):
    args = (["kv_retrieval", "two_hop"], [128, 256], 2, 5, demo_tokenizer)
    a = tasks.generate_suite(*args, formats=tasks.FORMATS)
    b = tasks.generate_suite(*args, formats=tasks.FORMATS)
    assert a == b
    assert len(a) == 2 * 2 * 2 * 2
    assert len({inst.uid for inst in a}) == len(a)
    assert len({inst.prompt for inst in a}) == len(a)  # different seeds per instance
    c = tasks.generate_suite(["kv_retrieval"], [128], 2, 6, demo_tokenizer)
    assert c[0].prompt != a[0].prompt


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_samples_are_consistent(task):
    """Format-free samples: unique keys, every question answerable, training text spans the answers."""
    for seed in range(20):
        q = 1 if task == "copy" else 3
        sample = tasks.make_sample(task, 30, seed, q)
        table = tasks.parse_lines("\n".join(sample.lines))
        assert len(table) == len(sample.lines) == 30
        for qa in sample.qas:
            prompt = "\n".join([tasks.HEADER, *sample.lines, f"Question: {qa.question}"])
            assert tasks.solve(prompt) == qa.answer


def test_training_text_spans(demo_tokenizer):
    for fmt in tasks.FORMATS:
        sample = tasks.make_sample("multi_kv", 12, 1, 3)
        text, spans, _ = tasks.render_training_text(sample, fmt, demo_tokenizer)
        assert [text[a:b] for a, b in spans] == [qa.answer + "</s>" for qa in sample.qas]


def test_two_hop_answer_names_intermediate_key():
    sample = tasks.make_sample("two_hop", 40, 3, 1)
    table = tasks.parse_lines("\n".join(sample.lines))
    first, second = sample.qas[0].answer.split("\n")
    key, hop = first.split(": ")
    hop2, value = second.split(": ")
    assert table[key] == hop == hop2 and table[hop] == value and value.isdigit()


def test_parser_rejects_ambiguous_and_unknown():
    with pytest.raises(ValueError, match="twice"):
        tasks.solve("ABCD: 1234\nABCD: 5678\nQuestion: What is the value of ABCD?")
    with pytest.raises(ValueError, match="unrecognized"):
        tasks.solve("ABCD: 1234\nQuestion: Who are you?")
    with pytest.raises(ValueError):
        tasks.make_instance("nope", 256, 0, None)


def test_arithmetic_parser():
    assert tasks.solve("Question: What is 37 + 48?") == "85"
    assert tasks.solve("Question: What is 48 - 37?") == "11"
