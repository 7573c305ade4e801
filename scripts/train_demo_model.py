#!/usr/bin/env python
"""Train kvserve's demo model from scratch on synthetic long-context tasks.

The model is a small Llama (transformers' `LlamaForCausalLM`) trained on the
tasks in `kvserve.eval.tasks` (key-value retrieval, multi-key and two-hop
lookups, copying, small-number arithmetic; each in plain and chat format) with a
curriculum from short to long contexts.  The tokenizer is a byte-level BPE with
a small vocabulary, trained here on the same synthetic text.  The result is a
standard Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json).

    python scripts/train_demo_model.py --out kvserve/demo_model            # train (CPU, ~1 h)
    python scripts/train_demo_model.py --eval-only --out kvserve/demo_model # accuracy table

Data for step s is drawn from a seed derived from (--seed, s), so a run resumed
from a checkpoint (--resume) sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kvserve.eval import tasks  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Pre-tokenizer: upper-case letters and digits are always single tokens, so a key or a
# value tokenizes the same wherever it appears and the tokens the model must copy come
# from a small alphabet (36 symbols; pilots with letter/digit *pairs* as tokens, 776
# symbols, learned to copy far more slowly).  Words keep one optional leading space;
# punctuation runs keep one trailing space (": " is one token).
PRETOKEN_REGEX = r" ?[A-Z]?[a-z]+|[A-Z]|[0-9]|[^\sA-Za-z0-9]+ ?|\s+"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TASK_WEIGHTS = {"kv_retrieval": 0.35, "multi_kv": 0.1, "two_hop": 0.15, "copy": 0.3, "arithmetic": 0.1}
EVAL_LENGTHS = (256, 512, 1024, 2048)


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(out: Path, vocab_size: int, seed: int):
    """Train the byte-level BPE on synthetic task text and save it (HF format) to `out`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()

    def corpus():
        for i in range(400):
            for task in tasks.TASK_NAMES:
                s = tasks.make_sample(task, 16, f"tok/{seed}/{i}", 1)
                yield tasks.plain_prompt(s) + s.qas[0].answer

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=4096,
                                 chat_template=CHAT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config.json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    cfg["add_bos_token"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(out)


# --------------------------------------------------------------------------- data


@dataclass
class Row:
    ids: list[int]
    targets: list[bool]  # targets[t]: token t is an answer token (the model must predict it)
    task: str
    # sources[t]: the context position token t is a copy of (a value character quoted in
    # an answer), or -1; used by the attention-supervision loss (--attn-sup-weight).
    sources: list[int] | None = None


# Lookup tasks whose context can fill a whole row when the row asks a single question.
LOOKUP_TASKS = ("kv_retrieval", "multi_kv", "two_hop")


def queries_for(task: str, length: int, rng: random.Random, single_frac: float = 0.0) -> int:
    """How many questions a training row of `length` tokens asks (eval rows ask one).

    Many questions per row give dense supervision, but their answers take up to half the
    row, so the context holds about half as many lines as an eval prompt of that length.
    With `single_frac` > 0, that fraction of lookup rows asks one question: its context
    fills the row, as in eval (as many distractor lines, the same question-to-line
    distances).  The extra random draw is made only when `single_frac` > 0, so recipes
    without it reproduce the same batches as before the option existed.
    """
    if task == "copy":
        return 1
    if single_frac > 0 and task in LOOKUP_TASKS and rng.random() < single_frac:
        return 1
    if task == "arithmetic":
        return rng.randint(1, max(1, length // 32))
    per = 96 if task == "multi_kv" else 32
    return rng.randint(max(1, length // (3 * per)), max(1, length // per))


def make_row(tokenizer, task: str, fmt: str, length: int, seed: str, num_queries: int) -> Row:
    """One training sequence of at most `length` tokens with its answer mask."""
    add = fmt == "plain"

    def measure(sample: tasks.TaskSample) -> int:
        text, _, _ = tasks.render_training_text(sample, fmt, tokenizer)
        return len(tokenizer(text, add_special_tokens=add)["input_ids"])

    sample = tasks.fit_lines(task, length, measure, seed, num_queries)
    text, spans, add = tasks.render_training_text(sample, fmt, tokenizer)
    enc = tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    sources = token_sources(quoted_line_copies(text, spans), offsets)
    return Row(list(enc["input_ids"]), answer_mask(offsets, spans), task, sources)


def answer_mask(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (character offsets from the tokenizer): does it lie inside an answer span?"""
    return [b > a and any(s <= a and b <= e for s, e in spans) for a, b in offsets]


def quoted_line_copies(text: str, spans: list[tuple[int, int]]) -> dict[int, int]:
    """Answer character -> the context character it copies.

    Every answer line `KEY: VALUE` that quotes a context line is mapped character by
    character (the VALUE part: digits, or a key for two-hop pointer lines) onto the
    first occurrence of that line, which is the context's.
    """
    copies: dict[int, int] = {}
    for start, end in spans:
        pos = start
        for line in text[start:end].split("\n"):
            quoted = re.match(r"[A-Z]+: [A-Z0-9]+", line)  # the EOS text may follow the last line
            found = text.find("\n" + quoted.group(0) + "\n") if quoted else -1
            if found >= 0 and found + 1 < start:
                sep = line.find(": ")
                for d in range(sep + 2, quoted.end()):
                    copies[pos + d] = found + 1 + d
            pos += len(line) + 1
    return copies


def token_sources(copies: dict[int, int], offsets) -> list[int]:
    """For each token: the token it copies (per the character map `copies`), or -1.

    Only single-character tokens are mapped (upper-case letters and digits always are).
    """
    token_at = {a: t for t, (a, b) in enumerate(offsets) if b == a + 1}
    sources = [-1] * len(offsets)
    for t, (a, b) in enumerate(offsets):
        if b == a + 1 and a in copies and copies[a] in token_at:
            sources[t] = token_at[copies[a]]
    return sources


DRILL = "kv_drill"  # training-only task: dense multi-query lookup (see make_drill_row)


def make_drill_row(tokenizer, length: int, seed: str, min_lines: int = 1) -> Row:
    """A dense multi-query associative-recall row (MQAR, as in Zoology) in the task's own format.

    The context lists n `KEY: value` lines; the answer then quotes lines again for keys drawn
    at random (with replacement) until the row is full, and only the *values* (and the
    newline after each) carry loss: every one of them is a content lookup, unlike `copy`,
    which a model can solve by position.  About 40% of the row's tokens are supervised,
    against a few percent for a single retrieval question.

    n is drawn uniformly from [min_lines, most that fit with as many queries as lines], so
    every batch mixes easy rows (one or two lines: copy the right slot) with hard ones (pick
    one line among many): a curriculum inside each batch.  Queries are drawn with
    replacement because with a permutation of the keys the last answers follow by
    elimination (a pilot learned exactly that: 95% on the last query, ~25% on the first).
    """
    rng = random.Random(seed)
    most = max(1, (length - 30) // 21)
    n = rng.randint(min(min_lines, most), most)
    num_queries = max(1, (length - 30 - 10 * n) // 10)
    keys = tasks._unique_keys(rng, n)
    values = tasks._values(rng, n)
    order = [rng.randrange(n) for _ in range(num_queries)]
    head = tasks.HEADER + "\n"
    value_start = []  # character offset of each context value
    for k, v in zip(keys, values):
        value_start.append(len(head) + len(k) + 2)
        head += f"{k}: {v}\n"
    head += "Question: Give the value of every key again.\nAnswer: "
    parts, spans, pos = [head], [], len(head)
    copies: dict[int, int] = {}  # answer digit char -> context digit char
    for i in order:
        key_part = f"{keys[i]}: "
        pos += len(key_part)
        val_part = f"{values[i]}\n"
        spans.append((pos, pos + len(val_part)))
        for d in range(len(values[i])):
            copies[pos + d] = value_start[i] + d
        parts += [key_part, val_part]
        pos += len(val_part)
    text = "".join(parts)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return Row(list(enc["input_ids"])[:length], answer_mask(offsets, spans)[:length], DRILL,
               token_sources(copies, offsets)[:length])


def make_batch(tokenizer, step: int, seed: int, max_len: int, batch_tokens: int,
               task_weights: dict[str, float] = TASK_WEIGHTS, rank: int = 0, world: int = 1,
               single_frac: float = 0.0, vary_copy: bool = False):
    """Rows for `step`: one length per step (no padding waste), mixed tasks and formats.

    A copy row fills its length with as many lines as fit, so at a fixed length it always
    has the same line count and can be solved by attending a fixed distance back.  A model
    trained that way copies only at its training lengths (measured: the session-5 v7 model
    copied perfectly at 272/544/1,088 tokens and at 0% exact match at 256/512/1,024).  With
    `vary_copy`, each copy row is built to a length drawn uniformly from [length/4, length]
    (the rest is padding), so only a real copy (find the line, continue it) works.

    With `world` data-parallel workers, worker `rank` builds rows rank, rank + world, ...
    of the same step (the random draws of every row are still made, so the batch as a
    whole does not depend on the number of workers).
    """
    rng = random.Random(f"batch/{seed}/{step}")
    length = rng.choice([max_len // 4, max_len // 2, max_len, max_len]) if max_len >= 256 else max_len
    length = max(48, length)
    rows = []
    names, weights = zip(*task_weights.items())
    for r in range(max(world, batch_tokens // length)):
        task = rng.choices(names, weights)[0]
        fmt = rng.choice(tasks.FORMATS)
        q = queries_for(task, length, rng, single_frac)
        row_len = length
        if vary_copy and task == "copy":  # drawn only with the option: older recipes keep their stream
            row_len = rng.randint(max(48, length // 4), length)
        if r % world != rank:
            continue
        row_seed = f"train/{seed}/{step}/{r}"
        if task == DRILL:
            rows.append(make_drill_row(tokenizer, length, row_seed))
            continue
        # Too short for this task and query count: ask one question, else a plain lookup.
        for t, n in ((task, q), (task, 1), ("kv_retrieval", 1)):
            try:
                rows.append(make_row(tokenizer, t, fmt, row_len if t == task else length, row_seed, n))
                break
            except ValueError:
                continue
    return collate(rows, tokenizer.pad_token_id)


def collate(rows: list[Row], pad_id: int):
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    sources = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = torch.tensor(r.targets)
        if r.sources is not None:
            sources[i, : len(r.ids)] = torch.tensor(r.sources)
    return ids, mask, sources, [r.task for r in rows]


# --------------------------------------------------------------------------- model and loss


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 64 * math.ceil(len(tokenizer) / 64)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=args.d_model,
        intermediate_size=args.d_ff, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.d_model // args.heads,
        max_position_embeddings=4096, rope_theta=args.rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, pad_id: int = 0, lm_weight: float = 0.0):
    """Mean over rows of the mean cross-entropy on each row's answer tokens.

    Position t predicts token t+1, so the hidden states at mask[:, 1:] positions are
    projected (only those: the LM head is not applied to the rest).  With `lm_weight` > 0,
    that weight times the mean next-token loss over every non-pad token is added: the
    context's structure (where `: ` and newlines fall, which token class comes next)
    then trains position-in-line and previous-token features from the first step.
    """
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, T, d]
    extra = 0.0
    if lm_weight > 0:
        real = ids[:, 1:] != pad_id
        extra = lm_weight * F.cross_entropy(model.lm_head(hidden[:, :-1][real]).float(), ids[:, 1:][real])
    sel = mask[:, 1:]  # [B, T-1]
    logits = model.lm_head(hidden[:, :-1][sel])  # [N, V]
    target = ids[:, 1:][sel]
    nll = F.cross_entropy(logits.float(), target, reduction="none")
    row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(sel)[sel]
    per_row = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, row, nll)
    counts = sel.sum(1).clamp(min=1)
    correct = torch.zeros(ids.shape[0], device=ids.device).index_add_(
        0, row, (logits.argmax(-1) == target).float())
    return (per_row / counts).mean() + extra, (per_row / counts).detach(), (correct / counts).detach()


class AttentionProbe:
    """Recomputes one head's attention log-probabilities in one layer, for supervision.

    A forward pre-hook keeps the layer's input and rotary tables; `log_probs` rebuilds that
    head's queries and keys exactly as LlamaAttention does (projection, RoPE, scaling,
    causal mask), so gradients reach the head's q/k projections and, through the residual
    stream, every layer below it.
    """

    def __init__(self, model, layer: int, head: int):
        self.attn = model.model.layers[layer].self_attn
        self.head = head
        cfg = model.config
        self.head_dim = cfg.head_dim
        self.kv_head = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
        self.inputs = None
        self.attn.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.inputs = (hidden, kwargs["position_embeddings"])

    def log_probs(self) -> torch.Tensor:
        """[B, T, T] log attention of the probed head (row: query position, column: key)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hidden, (cos, sin) = self.inputs
        hd, a = self.head_dim, self.attn
        q = F.linear(hidden, a.q_proj.weight[self.head * hd: (self.head + 1) * hd])[:, None]
        k = F.linear(hidden, a.k_proj.weight[self.kv_head * hd: (self.kv_head + 1) * hd])[:, None]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q[:, 0] @ k[:, 0].transpose(1, 2)) * a.scaling  # [B, T, T]
        T = scores.shape[-1]
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        return torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def attention_supervision_loss(probe: AttentionProbe, sources: torch.Tensor) -> torch.Tensor:
    """Mean -log attention, from the position before each quoted value character, on that
    character's context occurrence: the lookup an induction-style head must do to copy it."""
    sel = sources[:, 1:] >= 0  # query position t predicts token t + 1
    if not sel.any():
        return torch.zeros(())
    logp = probe.log_probs()[:, :-1]  # [B, T-1, T]
    return -logp[sel].gather(1, sources[:, 1:][sel][:, None]).mean()


def parse_weights(spec: str) -> dict[str, float]:
    """'kv_drill=0.8,kv_retrieval=0.2' -> {'kv_drill': 0.8, 'kv_retrieval': 0.2}."""
    weights = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    unknown = set(weights) - set(tasks.TASK_NAMES) - {DRILL}
    if unknown:
        raise SystemExit(f"unknown task(s) in task weights: {sorted(unknown)}")
    return weights


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, total - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def parse_stages(spec: str, batch_tokens: int) -> list[tuple[int, int, int]]:
    """'256:600:4096,512:500' -> [(256, 600, 4096), (512, 500, batch_tokens)].

    Each stage is (max context length, steps, tokens per step).
    """
    out = []
    for part in spec.split(","):
        fields = [int(x) for x in part.split(":")]
        out.append((fields[0], fields[1], fields[2] if len(fields) > 2 else batch_tokens))
    return out


def stage_of(step: int, stages: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(max context length, tokens per step) at `step`."""
    for length, steps, batch in stages:
        if step < steps:
            return length, batch
        step -= steps
    return stages[-1][0], stages[-1][2]


# --------------------------------------------------------------------------- quick eval


@torch.no_grad()
def teacher_forced_accuracy(model, tokenizer, task: str, fmt: str, length: int, n: int, seed: int,
                            device: str) -> float:
    """Exact match under teacher forcing: every answer token (and EOS) is the argmax.

    This equals greedy-decoding exact match, at the cost of one forward pass.
    """
    model.eval()
    ok = 0
    for i in range(n):
        inst = tasks.make_instance(task, length, f"heldout/{seed}/{i}", tokenizer, fmt)
        prompt = inst.prompt_token_ids(tokenizer)
        answer = tokenizer(inst.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        ok += int(logits.argmax(-1).tolist() == answer)
    model.train()
    return ok / n


@torch.no_grad()
def drill_accuracy(model, tokenizer, length: int, n: int, seed: int, device: str) -> tuple[float, float]:
    """(first-digit, whole-value) accuracy over the queries of `n` held-out drill rows
    with as many lines as fit (the hardest rows of that length).

    The first digit of a value is where the lookup happens (later digits can follow the
    found line); whole-value accuracy is what retrieval needs.
    """
    model.eval()
    first = whole = count = 0
    for i in range(n):
        row = make_drill_row(tokenizer, length, f"drill-heldout/{seed}/{i}", min_lines=length)  # most lines
        ids = torch.tensor([row.ids], device=device)
        hit = (model(input_ids=ids).logits[0, :-1].argmax(-1) == ids[0, 1:]).tolist()
        t = 1
        while t < len(row.targets):
            if not row.targets[t]:
                t += 1
                continue
            end = t
            while end < len(row.targets) and row.targets[end]:
                end += 1
            span = hit[t - 1: end - 1]  # hit[p] is the prediction of token p + 1
            first += span[0]
            whole += all(span)
            count += 1
            t = end
    model.train()
    return first / max(1, count), whole / max(1, count)


# --------------------------------------------------------------------------- training


def save_checkpoint(path: Path, model, opt, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    tmp.replace(path)


def train(args) -> None:
    """Build the tokenizer, then train with `--workers` data-parallel processes.

    On a small CPU, N single-threaded workers that average gradients (gloo all-reduce,
    ~1-4 MB per step) outrun one process with N threads: a ~1M-parameter model's matmuls
    are too small to split well across threads.
    """
    tokenizer = build_tokenizer(Path(args.out), args.vocab_size, args.seed)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)
    if args.workers == 1:
        train_worker(0, args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the workers' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    mp.spawn(train_worker, args=(args,), nprocs=args.workers, join=True)


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce every gradient as one flat buffer and divide by the number of workers."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p)
        offset += n


def train_worker(rank: int, args) -> None:
    world = args.workers
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
    lead = rank == 0  # only the lead worker logs, evaluates and writes files
    torch.set_num_threads(args.threads)
    device = args.device
    out = Path(args.out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = build_model(tokenizer, args).to(device)  # same seed: identical weights on every worker
    nparams = sum(p.numel() for p in model.parameters())
    if lead:
        print(f"model: {nparams / 1e6:.2f}M parameters, {world} worker(s) x {args.threads} thread(s), "
              f"config {model.config.to_diff_dict()}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    stages = parse_stages(args.stages, args.batch_tokens)
    weights = parse_weights(args.task_weights)
    early_weights = parse_weights(args.early_task_weights) if args.early_task_weights else weights
    total = sum(s for _, s, _ in stages)
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        if lead:
            print(f"resumed from {args.resume} at step {start}", flush=True)
    model.train()
    probe = None
    if args.attn_sup_weight > 0:
        layer = args.layers // 2 if args.attn_sup_layer is None else args.attn_sup_layer
        probe = AttentionProbe(model, layer, head=0)
    t0, tokens, hist, sup_hist = time.time(), 0, [], []
    end = total if args.stop_after is None else min(total, args.stop_after)
    for step in range(start, end):
        max_len, batch_tokens = stage_of(step, stages)
        mix = early_weights if step < args.early_steps else weights
        ids, mask, sources, names = make_batch(tokenizer, step, args.seed, max_len, batch_tokens, mix,
                                               rank, world, args.single_question_frac, args.vary_copy_length)
        ids, mask, sources = ids.to(device), mask.to(device), sources.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args)
        loss, row_loss, row_acc = answer_loss(model, ids, mask, tokenizer.pad_token_id, args.lm_loss_weight)
        if probe is not None and step < args.attn_sup_steps:
            sup = attention_supervision_loss(probe, sources)
            sup_hist.append(float(sup.detach()))
            loss = loss + args.attn_sup_weight * sup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(list(model.parameters()), world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel() * world  # approximately: the other workers' rows are as long
        hist.extend(zip(names, row_loss.tolist(), row_acc.tolist()))
        if lead and (step + 1) % args.log_every == 0:
            el = time.time() - t0
            by_task = {n: [(l, a) for m, l, a in hist if m == n] for n in {**early_weights, **weights}}
            summary = " ".join(f"{n}={sum(l for l, _ in v) / len(v):.2f}/{sum(a for _, a in v) / len(v):.2f}"
                               for n, v in by_task.items() if v)
            hist = []
            if sup_hist:
                summary += f" attn_sup={sum(sup_hist) / len(sup_hist):.2f}"
                sup_hist = []
            print(f"step {step + 1}/{total} len<={max_len} loss/tok_acc {summary} "
                  f"lr {lr_at(step, total, args):.2e} {tokens / el:.0f} tok/s {el / 60:.1f} min", flush=True)
        if lead and ((step + 1) % args.eval_every == 0 or step + 1 == end):
            accs = {L: teacher_forced_accuracy(model, tokenizer, "kv_retrieval", "plain", L, args.eval_n,
                                               args.seed + 1, device)
                    for L in sorted({256, max_len})}
            drill = {L: drill_accuracy(model, tokenizer, L, args.eval_n, args.seed + 1, device)
                     for L in sorted({128, max_len})}
            print(f"  eval step {step + 1}: kv_retrieval plain {accs} kv_drill (first digit, value) "
                  f"{ {L: (round(a, 2), round(b, 2)) for L, (a, b) in drill.items()} }", flush=True)
        if lead and ((step + 1) % args.ckpt_every == 0 or step + 1 == end):
            save_checkpoint(ckpt_dir / "last.pt", model, opt, step + 1)
    if lead:
        print(f"training done: {(time.time() - t0) / 60:.1f} min, {tokens} tokens", flush=True)
        save_model(model, tokenizer, out)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def save_model(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    model.config.torch_dtype = torch.float32
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    # transformers 5 writes rope settings only as `rope_parameters`; add the classic keys
    # that transformers 4.x and other loaders (kvserve's included) read.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False,
                     max_new_tokens=64).save_pretrained(out)
    print(f"saved model to {out}", flush=True)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(args) -> dict:
    """Held-out exact-match accuracy with Hugging Face greedy generation, batched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.out)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(args.device).eval()
    results: dict[str, float] = {}
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    for task in args.eval_tasks.split(","):
        for fmt in tasks.FORMATS:
            for length in lengths:
                n = args.eval_n_kv if task == "kv_retrieval" else args.eval_n
                suite = tasks.generate_suite([task], [length], n, args.eval_seed, tok, [fmt])
                t = time.time()
                ok = sum(greedy_batch(model, tok, suite[i: i + args.eval_batch], args.device)
                         for i in range(0, len(suite), args.eval_batch))
                results[f"{task}/{fmt}/{length}"] = ok / len(suite)
                print(f"{task:13s} {fmt:5s} {length:5d}: {ok}/{len(suite)} = {ok / len(suite):.3f} "
                      f"({time.time() - t:.0f}s)", flush=True)
    if args.eval_json:
        Path(args.eval_json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.eval_tasks.split(","), lengths)
    return results


def greedy_batch(model, tok, batch: list[tasks.TaskInstance], device: str) -> int:
    prompts = [inst.prompt_token_ids(tok) for inst in batch]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    max_new = max(len(tok(inst.answer, add_special_tokens=False)["input_ids"]) for inst in batch) + 2
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                         max_new_tokens=max_new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(tasks.score(inst, text) for inst, text in zip(batch, texts))


def print_table(results: dict[str, float], task_names: list[str], lengths: list[int]) -> None:
    print("\n| task | format | " + " | ".join(str(L) for L in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    for task in task_names:
        for fmt in tasks.FORMATS:
            cells = [results.get(f"{task}/{fmt}/{L}") for L in lengths]
            print(f"| {task} | {fmt} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "kvserve" / "demo_model"), help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus, init and data")
    p.add_argument("--workers", type=int, default=1,
                   help="data-parallel worker processes (gloo); on CPU use one per core with --threads 1")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary budget (model rows padded to 64)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--stages", default="64:500:2048,128:500:2048,256:800:4096,512:400:8192,1024:200:8192,2048:100:12288",
                   help="curriculum: comma-separated max_context_length:steps[:tokens_per_step]")
    p.add_argument("--task-weights", default=",".join(f"{k}={v}" for k, v in TASK_WEIGHTS.items()),
                   help="training mixture, task=weight,...")
    p.add_argument("--early-task-weights", default=None,
                   help="training mixture for the first --early-steps steps (default: --task-weights)")
    p.add_argument("--early-steps", type=int, default=0)
    p.add_argument("--vary-copy-length", action="store_true",
                   help="build each copy row to a random length up to the step's, so copying cannot go by position")
    p.add_argument("--single-question-frac", type=float, default=0.0,
                   help="fraction of lookup rows (kv_retrieval, multi_kv, two_hop) that ask one question, "
                        "so their context fills the row as in eval")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lm-loss-weight", type=float, default=0.0,
                   help="add this weight x the next-token loss on every token (not only answers)")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input embedding and the LM head")
    p.add_argument("--attn-sup-weight", type=float, default=0.0,
                   help="weight of the attention-supervision loss on quoted values (every task's "
                        "rows that quote the context; 0: off)")
    p.add_argument("--attn-sup-steps", type=int, default=10**9, help="apply attention supervision for this many steps")
    p.add_argument("--attn-sup-layer", type=int, default=None, help="supervised layer (default: layers // 2)")
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250, help="steps between quick held-out checks")
    p.add_argument("--eval-n", type=int, default=30, help="instances per cell (quick checks; eval table except kv)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--ckpt-dir", default=str(REPO / "out" / "demo_model_ckpt"))
    p.add_argument("--resume", default=None, help="checkpoint to resume training from")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (the schedule still spans all --stages), then save")
    p.add_argument("--eval-only", action="store_true", help="evaluate --out with HF greedy generation")
    p.add_argument("--eval-tasks", default=",".join(tasks.TASK_NAMES))
    p.add_argument("--eval-lengths", default=",".join(map(str, EVAL_LENGTHS)))
    p.add_argument("--eval-n-kv", type=int, default=200, help="instances per kv_retrieval cell")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-batch", type=int, default=25)
    p.add_argument("--eval-json", default=None, help="write the accuracy table here as JSON")
    args = p.parse_args(argv)
    if args.eval_only:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
