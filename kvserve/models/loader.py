"""Load a model from a local Hugging Face directory (config.json + safetensors).

Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
checkpoints are supported, and .gguf files (kvserve/models/gguf yields their
tensors under HF names).  HF names reach parameters through the model's own
weight mapping (`WeightMapping`: what the model class declares), so the loader
has no per-architecture code.  Every error names the file and, where it applies,
the tensor: a missing file, a missing tensor, or a shape mismatch.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from kvserve.models.model_config import ModelArchConfig, parse_model_config
from kvserve.models.registry import model_class
from kvserve.models.rope import RotaryEmbedding

Checkpoint = Iterable[tuple[str, "Path | str", Callable[[], torch.Tensor]]]  # (HF name, where, read)


class WeightMapping:
    """HF checkpoint names -> this model's parameters, from what the model class declares:

    `checkpoint_prefix`           dropped from names that have it ("model.layers.0..." -> "layers.0...")
    `packed_modules`              fused layer -> the checkpoint modules that are its shards, in order
                                  ({"qkv_proj": ("q_proj", "k_proj", "v_proj")}); the fused layer's
                                  `output_sizes` (kvserve.models.layers.MergedLinear) size the shards
    `ignored_checkpoint_tensors`  name fragments of tensors that are not parameters

    A new architecture declares these three on its class; the loader has no per-model code.
    """

    def __init__(self, model: torch.nn.Module, cfg: ModelArchConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.prefix: str = getattr(model, "checkpoint_prefix", "")
        self.ignored: tuple[str, ...] = tuple(getattr(model, "ignored_checkpoint_tensors", ()))
        packed: dict[str, tuple[str, ...]] = dict(getattr(model, "packed_modules", {}))
        self.shard_of = {shard: (fused, i) for fused, shards in packed.items() for i, shard in enumerate(shards)}
        self.params = dict(model.named_parameters())

    def skip(self, hf_name: str) -> bool:
        if any(frag in hf_name for frag in self.ignored):
            return True
        return hf_name == "lm_head.weight" and self.cfg.tie_word_embeddings  # tied: the embedding is the head

    def target(self, hf_name: str) -> tuple[str, Optional[int]]:
        """(our parameter name, shard index within a fused parameter or None)."""
        name = hf_name[len(self.prefix):] if self.prefix and hf_name.startswith(self.prefix) else hf_name
        module, _, leaf = name.rpartition(".")  # leaf: "weight" / "bias"
        parent, _, last = module.rpartition(".")
        if last in self.shard_of:
            fused, part = self.shard_of[last]
            return f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}", part
        return name, None

    def shard_sizes(self, param_name: str) -> Optional[list[int]]:
        """Rows of each shard of a fused parameter, or None for a plain one."""
        module = self.model.get_submodule(param_name.rpartition(".")[0])
        sizes = getattr(module, "output_sizes", None)
        return list(sizes) if sizes is not None else None

    def expected_parts(self, param_name: str) -> set[Optional[int]]:
        sizes = self.shard_sizes(param_name)
        return {None} if sizes is None else set(range(len(sizes)))


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


def load_weights(model: torch.nn.Module, cfg: ModelArchConfig, checkpoint: Checkpoint, dtype: torch.dtype,
                 source: "Path | str") -> None:
    """Copy every checkpoint tensor, under its HF name, into `model` through the model's
    WeightMapping; errors name the file and tensor (unexpected, missing, wrong shape).

    `checkpoint` yields (HF name, file it comes from, read) for safetensors files
    (iter_checkpoint), a .gguf file (models/gguf) or tensors in memory (named_tensors).
    """
    mapping = WeightMapping(model, cfg)
    params = mapping.params
    loaded: dict[str, set[Optional[int]]] = {}
    for hf_name, path, read in checkpoint:
        if mapping.skip(hf_name):
            continue
        name, part = mapping.target(hf_name)
        param = params.get(name)
        if param is None:
            raise ValueError(f"{path}: unexpected tensor {hf_name!r} for {cfg.architecture}")
        tensor = read()
        if part is None:
            dest = param.data
        else:
            sizes = mapping.shard_sizes(name)
            assert sizes is not None, f"{name} is not a fused layer"
            dest = param.data.narrow(0, sum(sizes[:part]), sizes[part])
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(
                f"{path}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)} from config.json"
            )
        dest.copy_(tensor.to(dtype))
        loaded.setdefault(name, set()).add(part)
    missing = [name for name in params
               if not (name == "lm_head.weight" and cfg.tie_word_embeddings)
               and loaded.get(name, set()) != mapping.expected_parts(name)]
    if missing:
        raise ValueError(f"{source}: checkpoint is missing tensors for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")


def named_tensors(tensors: Iterable[tuple[str, torch.Tensor]], source: str = "<tensors>") -> Checkpoint:
    """(HF name, tensor) pairs (e.g. a state dict, a converter's output) as a Checkpoint."""
    for name, tensor in tensors:
        yield name, source, (lambda t=tensor: t)


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
    checkpoint: Checkpoint
    if gguf:  # a .gguf file: its tensors under HF names, through the same mapping below
        from kvserve.models.gguf.checkpoint import iter_gguf_checkpoint

        checkpoint = iter_gguf_checkpoint(model_dir)
    else:
        checkpoint = iter_checkpoint(model_dir)
    load_weights(model, cfg, checkpoint, dtype, model_dir)
    model.eval()
    return model, cfg
