"""`kvserve eval`: task accuracy and token-level agreement of an engine configuration.

Two measurements, both seeded and deterministic (greedy decoding):

1. Exact-match accuracy on held-out instances of the synthetic tasks
   (`kvserve.eval.tasks`) per task, format and context length.  Meaningful for
   a model trained on them (the demo model).
2. Token-level agreement with a full-precision reference (fp32, SDPA attention,
   no prefix cache, no tiers): top-1 agreement, KL divergence, greedy match length and
   the reference perplexity of the candidate's continuation (`kvserve.eval.token_metrics`),
   on either the kv-retrieval prompts of each context length (`token_source="retrieval"`)
   or real ShareGPT prompts through the chat template (`"sharegpt"`, one cell;
   `kvserve.eval.real_prompts`).  "auto": ShareGPT for a model with a chat template other
   than the demo model, retrieval otherwise.
   Meaningful for any model, random weights included.

KV tiers: with `kv_tiers` set, every measured request first runs once to fill the
tiers, the device prefix cache is then emptied, and the measured request loads
its prompt's KV from the tiers, so a lossy codec's cost shows in both numbers.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from kvserve.eval import tasks
from kvserve.eval.token_metrics import TokenMetrics, compare_sequence

# The reference configuration: the lossless, full-precision engine.
REFERENCE_ENGINE: dict[str, Any] = dict(dtype="float32", attention_backend="torch", enable_prefix_caching=False)


@dataclass
class EvalSettings:
    tasks: Sequence[str] = tasks.TASK_NAMES
    lengths: Sequence[int] = (256, 512, 1024, 2048)
    formats: Sequence[str] = ("plain",)
    num_per_cell: int = 50
    seed: int = 1234
    accuracy: bool = True
    token_metrics: bool = True
    token_prompts: int = 8  # kv-retrieval prompts per context length for the token metrics
    token_len: int = 32  # continuation tokens scored per prompt
    batch: int = 16  # requests submitted together (and, with tiers, one fill/measure round)
    token_source: str = "auto"  # auto | retrieval | sharegpt
    sharegpt: Optional[str] = None  # prompts file for "sharegpt" (default: the packaged sample)
    sharegpt_max_len: int = 512  # tokens per chat-templated ShareGPT prompt
    segments: int = 0  # CacheBlend: the list cut into this many documents, cached in another order first (0: off)


@dataclass
class EvalResult:
    model: str
    engine: dict[str, Any]
    settings: dict[str, Any]
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # "task/fmt/len" -> counts
    token_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "len" or "sharegpt" -> summary
    kv_tier_stats: Optional[dict[str, Any]] = None
    kv_codec: Optional[dict[str, Any]] = None  # stored bytes per block vs raw, with tiers
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class _Candidate:
    """The engine under test; runs requests, through a tier round trip when it has tiers."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any]) -> None:
        from kvserve import LLM

        kwargs = dict(engine_kwargs)
        self.roundtrip = bool(kwargs.get("kv_tiers"))
        if self.roundtrip:
            # Blocks must reach the tiers when their request finishes, not only on eviction.
            kwargs["kv_offload_policy"] = "finish"
        self.llm = LLM(model, **kwargs)
        self.core = self.llm.engine.core
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.capture = False
        self.core.runner.sample_logprobs_hook = self._on_sample

    def _on_sample(self, request_ids: list[str], logprobs: torch.Tensor) -> None:
        if self.capture:
            for rid, row in zip(request_ids, logprobs):
                self.rows.setdefault(rid, []).append(row.cpu())

    def generate(self, prompts: list[list[int]], params: Any, capture: bool = False) -> list[Any]:
        from kvserve import SamplingParams

        batch = [{"prompt_token_ids": p} for p in prompts]
        if self.roundtrip:
            self.llm.generate(batch, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            if not self.core.wait_for_kv_saves(120):
                raise RuntimeError("KV saves did not reach the tiers within 120 s")
            if not self.core.reset_prefix_cache():
                raise RuntimeError("could not empty the device prefix cache between fill and measure")
        self.capture = capture
        try:
            return self.llm.generate(batch, params, use_tqdm=False)
        finally:
            self.capture = False

    def close(self) -> None:
        self.llm.engine.close()


def _reference_logprobs(llm: Any, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[len(continuation), vocab] reference log-softmax rows predicting `continuation` after `prompt`."""
    from kvserve import SamplingParams

    first = len(prompt) - 1  # the position whose logits predict continuation[0]
    rows: dict[int, torch.Tensor] = {}

    def hook(_rid: str, start: int, lp: torch.Tensor) -> None:
        for i in range(max(0, first - start), lp.shape[0]):
            rows[start + i] = lp[i].cpu()

    runner = llm.engine.core.runner
    runner.prompt_logprobs_hook = hook
    try:
        # Prompt logprobs cover positions up to len(ids) - 2, i.e. first + N - 1: all N rows.
        ids = prompt + continuation
        llm.generate([{"prompt_token_ids": ids}],
                     SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        runner.prompt_logprobs_hook = None
    return torch.stack([rows[first + t] for t in range(len(continuation))])


def _token_source(settings: EvalSettings, model_dir: str, tok: Any) -> str:
    """auto: real prompts for a chat model (a chat template, and not the demo model, which was
    trained on the synthetic tasks), the retrieval prompts otherwise."""
    from kvserve.models.builtin import DEMO_NAME, builtin_name_of

    source = settings.token_source
    if source == "auto":
        chat = bool(getattr(tok, "chat_template", None))
        return "sharegpt" if chat and builtin_name_of(model_dir) != DEMO_NAME else "retrieval"
    if source not in ("retrieval", "sharegpt"):
        raise ValueError(f"unknown token source {source!r}; choose auto, retrieval or sharegpt")
    return source


def _token_cells(settings: EvalSettings, source: str, tok: Any) -> list[tuple[str, list[list[int]]]]:
    """(cell name, prompts) for the token metrics."""
    from kvserve.eval.real_prompts import sharegpt_token_prompts

    if source == "sharegpt":
        return [("sharegpt", sharegpt_token_prompts(tok, settings.token_prompts, settings.sharegpt_max_len,
                                                    settings.sharegpt))]
    cells = []
    for length in settings.lengths:
        suite = tasks.generate_suite(["kv_retrieval"], [length], settings.token_prompts,
                                     settings.seed + 1, tok, ["plain"])
        cells.append((str(length), [i.prompt_token_ids(tok) for i in suite]))
    return cells


def _codec_size(cand: _Candidate) -> Optional[dict[str, Any]]:
    """Stored bytes per block in the first tier against the engine's raw block."""
    stats = cand.llm.engine.kv_tier_stats()
    if not stats or not stats.get("tiers"):
        return None
    name, tier = next(iter(stats["tiers"].items()))
    puts = int(tier.get("puts", 0))
    raw = cand.core.kv_tiers.namespace.block_nbytes
    if not puts:
        return None
    per_block = tier["bytes_written"] / puts
    return {"tier": name, "blocks": puts, "bytes_per_block": per_block, "raw_block_bytes": raw,
            "ratio_vs_raw": raw / per_block}


def _accuracy(cand: _Candidate, tok: Any, settings: EvalSettings, result: EvalResult,
              log: Callable[[str], None]) -> None:
    from kvserve import SamplingParams

    for task in settings.tasks:
        for fmt in settings.formats:
            for length in settings.lengths:
                suite = tasks.generate_suite([task], [length], settings.num_per_cell, settings.seed, tok, [fmt])
                ok = 0
                for group in _chunks(suite, settings.batch):
                    max_new = max(len(tok(i.answer, add_special_tokens=False)["input_ids"]) for i in group) + 8
                    params = SamplingParams(temperature=0, max_tokens=max_new)
                    if settings.segments:  # CacheBlend (kvserve/blend/eval_segments.py)
                        from kvserve.blend.eval_segments import generate_segmented

                        outs = generate_segmented(cand.llm, group, tok, settings.segments, params, settings.seed)
                    else:
                        outs = cand.generate([i.prompt_token_ids(tok) for i in group], params)
                    ok += sum(tasks.score(i, o.outputs[0].text) for i, o in zip(group, outs))
                key = f"{task}/{fmt}/{length}"
                result.accuracy[key] = {"correct": ok, "total": len(suite), "accuracy": ok / len(suite)}
                log(f"accuracy {key}: {ok}/{len(suite)} = {ok / len(suite):.3f}")


def run_eval(model: Optional[str], engine_kwargs: dict[str, Any], settings: EvalSettings,
             log: Callable[[str], None] = print) -> EvalResult:
    """`model`: a directory, .gguf file or built-in name; None is the demo model (kvserve-demo)."""
    from kvserve import LLM, SamplingParams
    from kvserve.engine.llm_engine import resolve_model_dir
    from kvserve.models.builtin import DEMO_NAME

    model_dir = resolve_model_dir(model or DEMO_NAME)
    t0 = time.time()
    cand = _Candidate(model_dir, engine_kwargs)
    tok = cand.llm.get_tokenizer()
    if tok is None:
        cand.close()
        raise ValueError(f"{model_dir} has no tokenizer; pass --tokenizer (the task prompts are text)")
    try:
        source = _token_source(settings, model_dir, tok)
    except ValueError:
        cand.close()
        raise
    result = EvalResult(model_dir, dict(engine_kwargs), {**asdict(settings), "token_source": source})
    token_jobs: list[tuple[str, list[int], list[int], torch.Tensor]] = []
    try:
        if settings.accuracy:
            _accuracy(cand, tok, settings, result, log)
        if settings.token_metrics and settings.segments:
            log("token metrics with --segments: see benchmarks/cacheblend_quality.py (skipped here)")
        elif settings.token_metrics:
            params = SamplingParams(temperature=0, max_tokens=settings.token_len, ignore_eos=True)
            for cell, prompts in _token_cells(settings, source, tok):
                for group in _chunks(prompts, settings.batch):
                    cand.rows.clear()
                    outs = cand.generate(group, params, capture=True)
                    for p, o in zip(group, outs):
                        toks = list(o.outputs[0].token_ids)
                        token_jobs.append((cell, p, toks, torch.stack(cand.rows[o.request_id][:len(toks)])))
        result.kv_tier_stats = cand.llm.engine.kv_tier_stats()
        if cand.roundtrip:
            result.kv_codec = _codec_size(cand)
    finally:
        cand.close()
        del cand
    if token_jobs:
        ref = LLM(model_dir, **REFERENCE_ENGINE)
        try:
            per_cell: dict[str, TokenMetrics] = {}
            for cell, prompt, toks, cand_lp in token_jobs:
                ref_lp = _reference_logprobs(ref, prompt, toks)
                per_cell.setdefault(cell, TokenMetrics()).add(compare_sequence(ref_lp, cand_lp, toks))
            for cell, m in per_cell.items():
                result.token_metrics[cell] = s = m.summary()
                log(f"tokens @{cell}: top-1 {s['top1_agreement']:.4f}, KL {s['kl_mean']:.2e} nats, "
                    f"greedy match {s['greedy_match_mean']:.1f}/{settings.token_len}, "
                    f"reference perplexity {s['ref_perplexity']:.3f}")
        finally:
            ref.engine.close()
    result.seconds = time.time() - t0
    return result


def format_tables(result: EvalResult) -> str:
    """Markdown tables: accuracy (%) per task/format x length, then the token metrics per prompt cell."""
    lines: list[str] = []
    lengths = list(result.settings["lengths"])
    if result.accuracy:
        lines += ["| task | format | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|---|" + "---:|" * len(lengths)]
        for task in result.settings["tasks"]:
            for fmt in result.settings["formats"]:
                cells = [result.accuracy.get(f"{task}/{fmt}/{L}") for L in lengths]
                lines.append(f"| {task} | {fmt} | " + " | ".join(
                    "-" if c is None else f"{100 * c['accuracy']:.1f}" for c in cells) + " |")
    if result.token_metrics:
        lines += ["", "| prompts | sequences | top-1 agreement | KL mean (nats) | KL max | greedy match | full match "
                      "| ref. perplexity |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cell, s in result.token_metrics.items():
            if s.get("tokens"):
                label = f"kv_retrieval @{cell}" if cell.isdigit() else cell
                lines.append(f"| {label} | {s['sequences']} | {s['top1_agreement']:.4f} | {s['kl_mean']:.2e} | "
                             f"{s['kl_max']:.2e} | {s['greedy_match_mean']:.1f}/{result.settings['token_len']} | "
                             f"{100 * s['full_match_fraction']:.0f}% | {s.get('ref_perplexity', float('nan')):.3f} |")
    if result.kv_codec:
        c = result.kv_codec
        lines += ["", f"KV codec {result.engine.get('kv_codec', 'raw')}: {c['bytes_per_block'] / 1024:.2f} KiB per "
                      f"stored block (raw {c['raw_block_bytes'] / 1024:.2f} KiB), {c['ratio_vs_raw']:.2f}x smaller, "
                      f"over {c['blocks']} blocks"]
    return "\n".join(lines)
