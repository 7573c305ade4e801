"""An early-exit draft model: the target's first N decoder layers, its final norm and LM head.

The only checkpoint at hand with SmolLM2's tokenizer is SmolLM2-135M-Instruct itself, so the
speed benchmark makes its draft from it (self-speculative drafting, as LayerSkip / Draft &
Verify do; the model is not trained for early exit, so acceptance is modest).  The result is
an ordinary HF-format directory (config.json with num_hidden_layers = N, model.safetensors),
loaded like any other draft with `--speculative-method draft:DIR`.

    python -m kvserve.spec_decode.truncated_draft smollm2-135m-instruct /tmp/smollm2-draft6 --layers 6
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _config_and_tensors(model: Path) -> tuple[dict[str, Any], Iterator[tuple[str, Any, Any]]]:
    from kvserve.models.gguf.reader import is_gguf_path

    if is_gguf_path(model):
        from kvserve.models.gguf.checkpoint import gguf_config_dict, iter_gguf_checkpoint

        return gguf_config_dict(model), iter_gguf_checkpoint(model)
    from kvserve.models.loader import iter_checkpoint

    return json.loads((model / "config.json").read_text()), iter_checkpoint(model)


def write_truncated_draft(model: str | Path, out_dir: str | Path, num_layers: int,
                          dtype: Optional[torch.dtype] = torch.float32) -> Path:
    """Write the first `num_layers` layers of `model` (a directory, a .gguf or a built-in name)
    as an HF-format model in `out_dir`; returns `out_dir`."""
    from safetensors.torch import save_file

    from kvserve.models.builtin import resolve_model

    path = resolve_model(str(model))[0]
    cfg, tensors = _config_and_tensors(path)
    total = int(cfg["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise ValueError(f"--layers must be in [1, {total}] for {path}, got {num_layers}")
    kept: dict[str, torch.Tensor] = {}
    for name, _where, read in tensors:
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) < num_layers:
            t = read()
            kept[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    cfg = dict(cfg, num_hidden_layers=num_layers)
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:num_layers]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory, .gguf or built-in name")
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers to keep (from the first)")
    args = ap.parse_args(argv)
    print(write_truncated_draft(args.model, args.out_dir, args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
