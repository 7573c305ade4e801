"""An early-exit draft model: the target's first N decoder layers, its final norm and LM head.

The only checkpoint at hand with SmolLM2's tokenizer is SmolLM2-135M-Instruct itself, so the
speed benchmark makes its draft from it (self-speculative drafting, as LayerSkip / Draft &
Verify do; the model is not trained for early exit, so acceptance is modest).  The result is
an ordinary HF-format directory (config.json with num_hidden_layers = N, model.safetensors),
loaded like any other draft with `--speculative-method draft:DIR`.

    python -m kvserve.spec_decode.truncated_draft smollm2-135m-instruct /tmp/smollm2-draft6 --layers 6
    python -m kvserve.spec_decode.truncated_draft smollm2-135m-instruct /tmp/smollm2-skip --keep-layers 0-9,25-29
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _config_and_tensors(model: Path) -> tuple[dict[str, Any], Iterator[tuple[str, Any, Any]]]:
    from kvserve.models.gguf.reader import is_gguf_path

    if is_gguf_path(model):
        from kvserve.models.gguf.checkpoint import gguf_config_dict, iter_gguf_checkpoint

        return gguf_config_dict(model), iter_gguf_checkpoint(model)
    from kvserve.models.loader import iter_checkpoint

    return json.loads((model / "config.json").read_text()), iter_checkpoint(model)


def parse_layers(spec: str) -> list[int]:
    """"0-9,26-29" -> [0, ..., 9, 26, ..., 29] (sorted, unique)."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"layer list must look like 0-9,26-29, got {spec!r}") from None
        out.update(range(a, b + 1))
    return sorted(out)


def write_truncated_draft(model: str | Path, out_dir: str | Path, num_layers: Optional[int] = None,
                          dtype: Optional[torch.dtype] = torch.float32,
                          layers: Optional[Sequence[int]] = None) -> Path:
    """Write the first `num_layers` layers of `model` (a directory, a .gguf or a built-in name),
    or the decoder layers `layers` (renumbered in order: a layer-skipping draft), with its
    embeddings, final norm and head, as an HF-format model in `out_dir`; returns `out_dir`."""
    from safetensors.torch import save_file

    from kvserve.models.builtin import resolve_model

    path = resolve_model(str(model))[0]
    cfg, tensors = _config_and_tensors(path)
    total = int(cfg["num_hidden_layers"])
    if (num_layers is None) == (layers is None):
        raise ValueError("give either num_layers or layers")
    keep = list(range(num_layers)) if num_layers is not None else sorted(set(layers or ()))
    if not keep or keep[0] < 0 or keep[-1] >= total:
        raise ValueError(f"--layers must be in [1, {total}] for {path} (layer ids in [0, {total - 1}]), "
                         f"got {num_layers if num_layers is not None else list(layers or ())}")
    new_id = {old: new for new, old in enumerate(keep)}
    kept: dict[str, torch.Tensor] = {}
    for name, _where, read in tensors:
        m = _LAYER.match(name)
        if m is not None:
            if int(m.group(1)) not in new_id:
                continue
            name = f"model.layers.{new_id[int(m.group(1))]}." + name[m.end():]
        t = read()
        kept[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    cfg = dict(cfg, num_hidden_layers=len(keep))
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory, .gguf or built-in name")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    ap.add_argument("--keep-layers", default=None, help="keep these decoder layers, e.g. 0-9,26-29 (layer skipping)")
    args = ap.parse_args(argv)
    layers = parse_layers(args.keep_layers) if args.keep_layers else None
    print(write_truncated_draft(args.model, args.out_dir, args.layers, layers=layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
