"""The demo-model training script's data and losses: drill rows, copy sources, the attention
probe, attention supervision and data-parallel sharding."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "scripts"))

import train_demo_model as train  # noqa: E402

from kvserve.eval import tasks  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    # The script's own tokenizer builder: what the tests check is what training sees.
    return train.build_tokenizer(tmp_path_factory.mktemp("tok"), 512, seed=0)


def _line_of(text_tokens: list[str], t: int) -> str:
    """The text of the line that token t belongs to."""
    start = t
    while start > 0 and text_tokens[start - 1] != "\n":
        start -= 1
    end = t
    while end < len(text_tokens) and text_tokens[end] != "\n":
        end += 1
    return "".join(text_tokens[start:end])


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize("length", [128, 512])
def test_drill_rows_fit_and_every_source_is_the_same_digit_of_the_queried_key(tokenizer, length: int) -> None:
    for i in range(5):
        row = train.make_drill_row(tokenizer, length, f"test/{length}/{i}")
        assert len(row.ids) <= length and len(row.targets) == len(row.ids) == len(row.sources)
        pieces = _pieces(tokenizer, row.ids)
        answer_at = "".join(pieces).index("Answer: ")
        mapped = [t for t, s in enumerate(row.sources) if s >= 0]
        assert mapped, "a drill row quotes at least one value"
        for t in mapped:
            s = row.sources[t]
            assert s < t and row.ids[s] == row.ids[t] and row.targets[t]
            assert pieces[t].isdigit()
            assert len("".join(pieces[:s])) < answer_at, "the source lies in the context"
            # Same key: the KEY before the value on the answer line ("Answer: KEY: value" on the
            # first) is the KEY of the context line.
            assert _line_of(pieces, t).split(": ")[-2] == _line_of(pieces, s).split(": ")[-2]


def test_drill_lines_vary_and_the_hardest_rows_use_the_most_lines(tokenizer) -> None:
    counts = {len(re.findall(r"^[A-Z]{4}: \d{4}$", tokenizer.decode(
        train.make_drill_row(tokenizer, 256, f"n/{i}").ids).split("Question:")[0], re.M)) for i in range(30)}
    assert len(counts) > 3 and min(counts) >= 1
    hardest = train.make_drill_row(tokenizer, 256, "n/x", min_lines=256)
    lines = re.findall(r"^[A-Z]{4}: \d{4}$", tokenizer.decode(hardest.ids).split("Question:")[0], re.M)
    assert len(lines) == max(counts | {len(lines)})


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
@pytest.mark.parametrize("fmt", tasks.FORMATS)
def test_copy_sources_of_every_task_point_at_an_earlier_identical_token(tokenizer, task: str, fmt: str) -> None:
    row = train.make_row(tokenizer, task, fmt, 256, f"src/{task}/{fmt}", 1)
    mapped = [t for t, s in enumerate(row.sources) if s >= 0]
    for t in mapped:
        s = row.sources[t]
        assert s < t and row.ids[s] == row.ids[t] and row.targets[t]
    if task == "kv_retrieval":
        assert len(mapped) == 4  # the four digits of the one quoted value
    elif task == "arithmetic":
        assert mapped == []  # nothing is quoted from the context
    else:
        assert mapped


def _tiny_model(tokenizer, layers: int = 2):
    args = argparse.Namespace(d_model=64, d_ff=128, layers=layers, heads=4, kv_heads=2, rope_theta=10000.0, seed=0,
                              tie_embeddings=False)
    return train.build_model(tokenizer, args)


def test_attention_probe_reproduces_the_heads_attention(tokenizer) -> None:
    model = _tiny_model(tokenizer)
    probe = train.AttentionProbe(model, layer=1, head=3)
    ids, _, _, _ = train.collate([train.make_drill_row(tokenizer, 128, f"p/{i}") for i in range(3)],
                                 tokenizer.pad_token_id)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions[1][:, 3]
        probed = probe.log_probs().exp()
    assert probed.shape == eager.shape
    assert torch.allclose(probed, eager, atol=1e-6)


def test_attention_supervision_trains_the_layers_below_the_probed_head(tokenizer) -> None:
    model = _tiny_model(tokenizer)
    probe = train.AttentionProbe(model, layer=1, head=0)
    ids, mask, sources, _ = train.collate([train.make_drill_row(tokenizer, 128, f"g/{i}") for i in range(4)],
                                          tokenizer.pad_token_id)
    model(input_ids=ids)
    loss = train.attention_supervision_loss(probe, sources)
    # Near-uniform attention at initialisation: about log(number of visible positions).
    assert 2.0 < float(loss.detach()) < 6.0
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.v_proj.weight.grad is None  # only q/k shape the attention


def test_attention_supervision_is_zero_when_nothing_is_quoted(tokenizer) -> None:
    model = _tiny_model(tokenizer)
    probe = train.AttentionProbe(model, layer=1, head=0)
    row = train.make_row(tokenizer, "arithmetic", "plain", 128, "a/0", 1)
    ids, _, sources, _ = train.collate([row], tokenizer.pad_token_id)
    model(input_ids=ids)
    assert float(train.attention_supervision_loss(probe, sources)) == 0.0


def test_worker_shards_partition_the_steps_batch(tokenizer) -> None:
    weights = {"kv_drill": 0.4, "kv_retrieval": 0.3, "copy": 0.3}
    whole = train.make_batch(tokenizer, 7, 0, 256, 4096, weights)
    shards = [train.make_batch(tokenizer, 7, 0, 256, 4096, weights, rank=r, world=2) for r in range(2)]
    rows = lambda ids: sorted(tuple(x for x in row.tolist() if x != tokenizer.pad_token_id) for row in ids)  # noqa: E731
    assert rows(whole[0]) == sorted(rows(shards[0][0]) + rows(shards[1][0]))
    assert shards[0][3] + shards[1][3] != [] and len(shards[0][3]) >= len(shards[1][3])


def test_single_question_rows_fill_the_row_with_context(tokenizer) -> None:
    # --single-question-frac 1: every lookup row asks one question, as an eval prompt does,
    # so nearly the whole row is context lines; without it, lookup rows of this length ask
    # several questions whose answers take a large share of the row.
    weights = {"kv_retrieval": 0.5, "multi_kv": 0.25, "two_hop": 0.25}
    questions = {0.0: [], 1.0: []}
    for frac in questions:
        for step in range(6):
            ids, _, _, names = train.make_batch(tokenizer, step, 0, 512, 4096, weights, single_frac=frac)
            assert set(names) <= set(train.LOOKUP_TASKS)
            for row in ids.tolist():
                text = tokenizer.decode([i for i in row if i != tokenizer.pad_token_id])
                questions[frac].append(text.count("Question: "))
    assert set(questions[1.0]) == {1}
    assert sum(questions[0.0]) > 2 * len(questions[0.0]), "the default keeps multi-question rows"


def test_copy_rows_vary_in_line_count_only_with_vary_copy(tokenizer) -> None:
    # Fixed-length copy rows all hold the same number of lines (a model can then copy by a
    # fixed distance back); --vary-copy-length draws each row's length, so the counts differ.
    counts = {False: set(), True: set()}
    for vary in counts:
        for step in range(3):
            ids, _, _, names = train.make_batch(tokenizer, step, 0, 512, 4096, {"copy": 1.0}, vary_copy=vary)
            for row in ids.tolist():
                text = tokenizer.decode([i for i in row if i != tokenizer.pad_token_id])
                # One quoted line per text line: the first follows "Answer: ", the last precedes EOS.
                text = text.replace("Answer: ", "Answer:\n").replace(tokenizer.eos_token, "\n")
                context, answer = text.split("Question: ", 1)
                lines = tasks.parse_lines(context)
                assert list(tasks.parse_lines(answer).items()) == list(lines.items()), "the answer copies the list"
                counts[vary].add((step, len(lines)))
            assert names == ["copy"] * len(names)
    per_step = lambda c: [len({n for s, n in c if s == step}) for step in range(3)]  # noqa: E731
    assert max(per_step(counts[False])) <= 2, "fixed length: (almost) one line count per step and format"
    assert min(per_step(counts[True])) >= 4


def test_single_question_frac_zero_keeps_the_random_stream() -> None:
    # Recipes written before the option existed must rebuild the same batches: with the
    # fraction at 0, a kv_retrieval row draws only its question count, as it always did.
    import random
    ref, got = random.Random(3), random.Random(3)
    expected = [ref.randint(1024 // 96, 1024 // 32) for _ in range(20)]
    assert [train.queries_for("kv_retrieval", 1024, got, 0.0) for _ in range(20)] == expected
    assert got.random() == ref.random()


def test_two_workers_train_and_save_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "model"
    train.main(["--out", str(out), "--workers", "2", "--threads", "1", "--stages", "64:4:1024",
                "--layers", "1", "--d-model", "32", "--heads", "2", "--kv-heads", "1", "--d-ff", "64",
                "--task-weights", "kv_drill=0.5,kv_retrieval=0.5", "--attn-sup-weight", "1", "--log-every", "2",
                "--eval-every", "100", "--eval-n", "1", "--ckpt-dir", str(tmp_path / "ckpt")])
    from kvserve import LLM, SamplingParams

    llm = LLM(str(out))
    new_ids = llm.generate(["Below is a list of keys and values.\nABCD: 1234\n"],
                           SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
    assert len(new_ids) >= 1
