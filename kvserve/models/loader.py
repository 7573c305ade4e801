"""Load a model from a local Hugging Face directory (config.json + safetensors).

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
checkpoints are supported.  Every error names the file and, where it applies,
the tensor: a missing file, a missing tensor, or a shape mismatch.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from kvserve.models.model_config import ModelArchConfig, parse_model_config
from kvserve.models.registry import model_class
from kvserve.models.rope import RotaryEmbedding

# HF tensor name -> (our parameter name, slice index into a fused parameter or None).
# Fused: qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows.
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: malformed index ({exc})") from None
        out = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {index.name} for tensor {name!r} is missing")
            out[name] = path
        return out
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found (and no model.safetensors.index.json)")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, Path, Callable[[], torch.Tensor]]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise ValueError(f"{path}: cannot be read as safetensors ({exc})") from None
        with handle as f:
            for name in names:
                yield name, path, (lambda f=f, name=name: f.get_tensor(name))


def _target(hf_name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.match(hf_name)
    if m:
        idx, rest = m.groups()
        for suffix in (".weight", ".bias"):
            if rest.endswith(suffix):
                base = rest[: -len(suffix)]
                if base in _FUSED:
                    ours, part = _FUSED[base]
                    return f"layers.{idx}.{ours}{suffix}", part
        return f"layers.{idx}.{rest}", None
    if hf_name.startswith("model."):
        return hf_name[len("model."):], None
    if hf_name == "lm_head.weight":
        return "lm_head.weight", None
    return hf_name, None


def _fused_parts(cfg: ModelArchConfig, param_name: str) -> list[int]:
    if ".qkv_proj." in param_name:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


@contextlib.contextmanager
def _skip_param_init() -> Iterator[None]:
    """Skip the random init nn.Linear/nn.Embedding run in __init__: every parameter is then
    overwritten from the checkpoint (load_model checks none is missing), and the init costs
    ~2-3 s for a 135M model on this CPU (0.2 s without; building on the meta device instead is
    slower still: its normal_ imports torch._dynamo).  transformers' no_init_weights does the same."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device,
               max_positions: int) -> tuple[torch.nn.Module, ModelArchConfig]:
    model_dir = Path(model_dir)
    from kvserve.models.gguf.reader import is_gguf_path

    gguf = is_gguf_path(model_dir)
    if not gguf and not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    cfg = parse_model_config(model_dir)
    with torch.device(device), _skip_param_init():
        model = model_class(cfg.architecture)(cfg, max_positions)
    model.to(dtype=dtype)
    with torch.device(device):
        # cos/sin tables are built (and kept) in float32, as HF does; cast per step.
        model.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
    params = dict(model.named_parameters())
    loaded: dict[str, set[int | None]] = {}
    if gguf:  # a .gguf file: its tensors under HF names, through the same mapping below
        from kvserve.models.gguf.checkpoint import iter_gguf_checkpoint

        checkpoint = iter_gguf_checkpoint(model_dir)
    else:
        checkpoint = iter_checkpoint(model_dir)
    for hf_name, path, read in checkpoint:
        if "rotary_emb.inv_freq" in hf_name:
            continue
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        name, part = _target(hf_name)
        param = params.get(name)
        if param is None:
            raise ValueError(f"{path}: unexpected tensor {hf_name!r} for {cfg.architecture}")
        tensor = read()
        if part is None:
            dest = param.data
        else:
            sizes = _fused_parts(cfg, name)
            start = sum(sizes[:part])
            dest = param.data.narrow(0, start, sizes[part])
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(
                f"{path}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)} from config.json"
            )
        dest.copy_(tensor.to(dtype))
        loaded.setdefault(name, set()).add(part)
    missing = []
    for name in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        want = {None} if (".qkv_proj." not in name and ".gate_up_proj." not in name) else set(
            range(len(_fused_parts(cfg, name)))
        )
        if loaded.get(name, set()) != want:
            missing.append(name)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint is missing tensors for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    model.eval()
    return model, cfg
