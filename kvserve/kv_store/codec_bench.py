"""Measure KV codecs: compression ratio, encode/decode speed, reconstruction error.

    python -m kvserve.kv_store.codec_bench                      # model KV, default codec list
    python -m kvserve.kv_store.codec_bench --entropy-compare    # cachegen with each entropy coder
    python -m kvserve.kv_store.codec_bench --entropy-stage 876  # the entropy coders alone
    python -m kvserve.kv_store.codec_bench --source gaussian    # i.i.d. N(0,1) blocks

KV source `model` (default): a random-weight model built with transformers from
a shrunk copy of /work/shared/data/configs/qwen2.5-0.5b.json (vocab cut to the
GPT-2 tokenizer's), run on ShareGPT prompts tokenized with the GPT-2 tokenizer;
its past_key_values are cut into blocks [L, 2, block_size, H, D].
Caveat: random weights give KV without the structure of a trained model (no
outlier channels from training, weak token-to-token correlation), so the
delta and entropy stages gain less here than on real KV; treat ratios as a
lower bound and errors as relative to this data only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kvserve.kv_store.codecs import Codec, get_codec
from kvserve.kv_store.codecs.cachegen import CacheGenCodec
from kvserve.kv_store.codecs.entropy import get_entropy_coder

DATA = Path("/work/shared/data")
DEFAULT_CODECS = [
    "raw", "int8", "fp8",
    "cachegen", "cachegen-b765", "cachegen-b654", "cachegen-b888",
]
ENTROPY_COMPARE = ["lz4", "zstd1", "zstd", "zstd9", "zstd19", "brotli5", "brotli11", "ans"]


def model_kv_blocks(
    num_layers: int, seq_len: int, num_seqs: int, block_size: int, dtype: torch.dtype, seed: int = 0,
    config: Path = DATA / "configs/qwen2.5-0.5b.json",
) -> list[torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers/gpt2/tokenizer.json"))  # type: ignore[no-untyped-call]
    cfg = AutoConfig.from_pretrained(str(config))
    cfg.num_hidden_layers = num_layers
    cfg.vocab_size = len(tok)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    prompts = json.loads((DATA / "prompts/sharegpt/ShareGPT_V3_filtered_500.json").read_text())
    text = "\n\n".join(p["conversations"][0]["value"] for p in prompts)
    ids = tok(text, return_tensors="pt").input_ids[0]
    blocks: list[torch.Tensor] = []
    for i in range(num_seqs):
        chunk = ids[i * seq_len:(i + 1) * seq_len][None]
        with torch.no_grad():
            cache = model(chunk, use_cache=True).past_key_values
        k = torch.stack([layer.keys[0] for layer in cache.layers])    # [L, H, T, D]
        v = torch.stack([layer.values[0] for layer in cache.layers])
        kv = torch.stack([k, v], dim=1).permute(0, 1, 3, 2, 4)       # [L, 2, T, H, D]
        for t in range(0, kv.shape[2] - block_size + 1, block_size):
            blocks.append(kv[:, :, t:t + block_size].contiguous().to(dtype))
    return blocks


def gaussian_blocks(num_blocks: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(num_blocks)]


def measure(codec: Codec, blocks: list[torch.Tensor]) -> dict[str, float | str]:
    shape, dtype = tuple(blocks[0].shape), blocks[0].dtype
    n_elem = blocks[0].numel() * len(blocks)
    t0 = time.perf_counter()
    payloads = [codec.encode(b) for b in blocks]
    t1 = time.perf_counter()
    decoded = [codec.decode(p, dtype, shape) for p in payloads]
    t2 = time.perf_counter()
    nbytes = sum(len(p) for p in payloads)
    err2 = ref2 = 0.0
    max_rel = 0.0
    for b, d in zip(blocks, decoded):
        bf, df = b.double(), d.double()
        err2 += float((bf - df).pow(2).sum())
        ref2 += float(bf.pow(2).sum())
        # max error relative to the block's absmax per (layer, kv)
        amax = bf.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-30)
        max_rel = max(max_rel, float(((bf - df).abs() / amax).max()))
    in_mb = n_elem * dtype.itemsize / 1e6
    return {
        "codec": codec.identity,
        "ratio_vs_fp32": n_elem * 4 / nbytes,
        "ratio_vs_fp16": n_elem * 2 / nbytes,
        "bits_per_value": nbytes * 8 / n_elem,
        "encode_MBps": in_mb / (t1 - t0),
        "decode_MBps": in_mb / (t2 - t1),
        "rel_l2_err": (err2 / ref2) ** 0.5,
        "max_err_rel_absmax": max_rel,
    }


def _entropy_bits(stream: np.ndarray) -> float:
    """Order-0 empirical entropy of one stream, in bits (an ideal per-stream model)."""
    if len(stream) == 0:
        return 0.0
    counts = np.bincount(stream.astype(np.int16) + 128, minlength=256)
    p = counts[counts > 0] / len(stream)
    return float(-(p * np.log2(p)).sum() * len(stream))


def measure_entropy_stage(blocks: list[torch.Tensor], bits: str, coders: list[str],
                          repeats: int = 3) -> list[dict[str, float | str]]:
    """Time only the entropy coders on cachegen's symbol streams (best of `repeats`)."""
    codec = get_codec(f"cachegen-b{bits}")
    assert isinstance(codec, CacheGenCodec)
    sections: list[list[np.ndarray]] = []
    for b in blocks:
        _, anchors, others = codec.symbols(b)
        sections += [anchors, others]
    n_sym = sum(len(x) for sec in sections for x in sec)
    ideal = sum(_entropy_bits(x) for sec in sections for x in sec)
    rows: list[dict[str, float | str]] = [{
        "coder": "ideal order-0 per stream", "bits_per_symbol": ideal / n_sym, "vs_ideal": 1.0,
        "encode_Msym_s": float("nan"), "decode_Msym_s": float("nan")}]
    for name in coders:
        coder = get_entropy_coder(name)
        enc_t = dec_t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            bodies = [coder.encode(sec) for sec in sections]
            t1 = time.perf_counter()
            for body, sec in zip(bodies, sections):
                coder.decode(body, [len(x) for x in sec])
            t2 = time.perf_counter()
            enc_t, dec_t = min(enc_t, t1 - t0), min(dec_t, t2 - t1)
        nbits = 8 * sum(len(body) for body in bodies)
        rows.append({"coder": name, "bits_per_symbol": nbits / n_sym, "vs_ideal": nbits / ideal,
                     "encode_Msym_s": n_sym / enc_t / 1e6, "decode_Msym_s": n_sym / dec_t / 1e6})
    return rows


def print_table(rows: list[dict[str, float | str]]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def _coder_available(name: str) -> bool:
    try:
        get_entropy_coder(name)
        return True
    except ValueError:
        print(f"# skipping entropy coder {name}: not installed")
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["model", "gaussian"], default="model")
    ap.add_argument("--layers", type=int, default=24, help="model layers (qwen2.5-0.5b has 24)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--num-seqs", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated codec specs")
    ap.add_argument("--entropy-compare", action="store_true",
                    help="compare entropy coders inside cachegen (overrides --codecs)")
    ap.add_argument("--entropy-stage", metavar="BITS", default=None,
                    help="time only the entropy coders on cachegen-bBITS symbols (e.g. 876)")
    ap.add_argument("--blocks-cache", type=Path, default=None,
                    help="save the generated KV blocks here, or load them if the file exists")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (machine is shared)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.blocks_cache is not None and args.blocks_cache.exists():
        blocks = torch.load(args.blocks_cache)
        print(f"# {len(blocks)} blocks {list(blocks[0].shape)} {blocks[0].dtype} loaded from {args.blocks_cache}")
    elif args.source == "model":
        t = time.perf_counter()
        blocks = model_kv_blocks(args.layers, args.seq_len, args.num_seqs, args.block_size, dtype)
        print(f"# {len(blocks)} blocks {list(blocks[0].shape)} {args.dtype} from a random-weight "
              f"{args.layers}-layer qwen2.5-0.5b-shaped model on ShareGPT ({time.perf_counter() - t:.1f}s)")
    else:
        blocks = gaussian_blocks(64, (args.layers, 2, args.block_size, 2, 64), dtype)
        print(f"# {len(blocks)} i.i.d. N(0,1) blocks {list(blocks[0].shape)} {args.dtype}")
    if args.blocks_cache is not None and not args.blocks_cache.exists():
        torch.save(blocks, args.blocks_cache)
    dtype = blocks[0].dtype
    if args.entropy_stage:
        coders = [c for c in ENTROPY_COMPARE if _coder_available(c)]
        print(f"# entropy stage only, cachegen-b{args.entropy_stage} symbols, best of 3")
        print_table(measure_entropy_stage(blocks, args.entropy_stage, coders))
        return 0
    specs = ([f"cachegen-{e}" for e in ENTROPY_COMPARE] if args.entropy_compare
             else [s for s in args.codecs.split(",") if s])
    rows = []
    for spec in specs:
        codec = get_codec(spec)
        codec.decode(codec.encode(blocks[0]), dtype, tuple(blocks[0].shape))  # warm-up
        rows.append(measure(codec, blocks))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
