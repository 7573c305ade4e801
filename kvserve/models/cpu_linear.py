"""Linear layers on CPU with pre-packed weights: kvserve's blocked kernel, or oneDNN.

Why: on the CPUs this project runs on, torch's `F.linear` (MKL sgemm) is far from the
memory and compute limits for the row counts of serving, and oneDNN reaches only about
half of the memory bandwidth at the few rows of a decode step.  Over the weights of a
whole SmolLM2-135M forward (30 layers + the LM head, float32, 2-core AMD EPYC, AVX2;
`chrt -f 50 python benchmarks/cpu_linear.py`), minimum ms per forward, session 8:

    rows            1      8     32    128    512
    blocked      38.9   44.4  104.6  268.2 1210.0    (kvserve.models.cpu_gemm)
    oneDNN       55.3   67.0  128.9  286.1 1182.5

and session 9 (2-core Intel Xeon, AVX-512, the AVX-512 microkernel), median ms:

    rows            1      8     32    128    512
    blocked      18.0   24.0   41.8  122.2  447.0
    oneDNN       24.6   30.7   48.1  117.7  450.5
    F.linear     20.7   51.2   56.2  123.0  441.2

Modes (KVSERVE_CPU_LINEAR): "blocked" (default) packs each weight into kvserve's column
blocks (kvserve/models/csrc/cpu_model_ops.cpp); a weight whose row count is not a multiple
of 16, or a machine where the extension cannot be built, gets oneDNN's packing instead
(`torch.ops.mkldnn._reorder_linear_weight`).  "onednn" packs everything for oneDNN.
`pack_linears(model)` packs once the weights are loaded (EngineCore.from_config) and frees
the plain weights (the packed copy replaces them, so memory is unchanged), except where MKL is
measured faster at prefill sizes on this machine: then the projections keep them and take
`F.linear` from that many rows on (kvserve.models.cpu_linear_rows).  The blocked
weights of a model share one arena in transparent huge pages (kvserve.utils.cpu_alloc):
a decode step streams all of them, and with 4 KB pages it misses the TLB on every page.

Results equal `F.linear` up to float rounding (another summation order).  The reference
path is a model loaded without packing (`KVSERVE_CPU_LINEAR=reference`, or `pack_linears`
not called): tests/unit/models/test_cpu_linear.py holds the paths equal, and the parity
tests hold the packed path to HF transformers token for token.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.models import cpu_gemm

logger = logging.getLogger(__name__)

ENV = "KVSERVE_CPU_LINEAR"  # "blocked" (default), "onednn" or "reference" (plain F.linear)
MODES = ("blocked", "onednn", "reference")


def mode() -> str:
    value = os.environ.get(ENV, "blocked")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def packing_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether models loaded for this device and dtype get packed weights."""
    return (mode() != "reference" and device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def _use_blocked(weight: torch.Tensor) -> bool:
    # The blocked kernel covers [N, K] with N a multiple of its block (every real model's
    # projections and vocabularies are); other shapes, or no compiler, go to oneDNN.
    return (mode() == "blocked" and weight.shape[0] % cpu_gemm.BLOCK == 0 and weight.dtype == torch.float32
            and cpu_gemm.load() is not None)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 CPU weight -> its packed form: kvserve's column blocks (3-D, see
    kvserve.models.cpu_gemm) or oneDNN's packed tensor (2-D, opaque layout)."""
    if _use_blocked(weight):  # in its own huge-page buffer (see pack_linears)
        from kvserve.utils.cpu_alloc import zero_pages

        return cpu_gemm.pack_weight(weight, out=zero_pages((cpu_gemm.packed_numel(tuple(weight.shape)),), torch.float32))
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def linear(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
           packed: Optional[torch.Tensor] = None, plain_from_rows: Optional[int] = None) -> torch.Tensor:
    """y = x W^T (+ b) for x [..., in]: through `packed` (from `pack`) when given, else F.linear;
    F.linear also from `plain_from_rows` rows on, where the layer kept its plain weight for it
    (kvserve.models.cpu_linear_rows)."""
    if packed is None or (plain_from_rows is not None and x.numel() >= plain_from_rows * x.shape[-1]):
        assert weight is not None and weight.numel() > 0, "a packed layer was called without its packed weight"
        return F.linear(x, weight, bias)
    if packed.dim() == 3:  # column blocks: [N / 16, K, 16]
        return cpu_gemm.linear(x, packed, bias, packed.shape[0] * cpu_gemm.BLOCK)
    out_features = packed.shape[0]
    if x.numel() == 0:
        return x.new_zeros(*x.shape[:-1], out_features)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


_ARENA_ALIGN = 16  # floats (64 bytes): each packed weight starts on a cache line


def _blocked_arena(weights: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """One huge-page buffer for the blocked packings of `weights`: id(weight) -> its slice."""
    from kvserve.utils.cpu_alloc import zero_pages

    blocked = [w for w in weights if _use_blocked(w)]
    sizes = [-(-cpu_gemm.packed_numel(tuple(w.shape)) // _ARENA_ALIGN) * _ARENA_ALIGN for w in blocked]
    if not blocked:
        return {}
    arena = zero_pages((sum(sizes),), torch.float32)
    views: dict[int, torch.Tensor] = {}
    offset = 0
    for w, size in zip(blocked, sizes):
        views[id(w)] = arena[offset:offset + cpu_gemm.packed_numel(tuple(w.shape))]
        offset += size
    return views


def pack_linears(model: nn.Module) -> int:
    """Pack every kvserve Linear of `model` (see module doc) and free its plain weight;
    returns how many were packed.  Call once, after the weights are loaded."""
    from kvserve.models.layers import Linear

    named = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear) and m.packed_weight is None]
    todo = [m for _, m in named]
    arena_views = _blocked_arena([m.weight for m in todo])
    for module in todo:
        view = arena_views.get(id(module.weight))
        module.packed_weight = cpu_gemm.pack_weight(module.weight, out=view) if view is not None else pack(module.weight)
    # The LM head runs on the sampled rows only (a decode-sized count): it never keeps its plain weight.
    projections = [m for name, m in named if m.packed_weight.dim() == 3 and name.rsplit(".", 1)[-1] != "lm_head"]
    from_rows = _plain_from_rows(projections)
    keep_plain = {id(m) for m in projections} if from_rows is not None else set()
    count = 0
    for module in todo:
        if id(module) in keep_plain:
            module.plain_from_rows = from_rows  # keeps its plain weight for MKL at prefill sizes
        else:  # the packed copy replaces the plain one; shape metadata stays on the module
            module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
        count += 1
    pack_head = getattr(model, "pack_lm_head", None)
    if callable(pack_head) and pack_head():  # True when it packed a copy (a tied head)
        count += 1
    logger.debug("packed weights (%s) for %d linear layers", mode(), count)
    return count


def _plain_from_rows(projections: list[nn.Module]) -> Optional[int]:
    """The row count from which `projections` (blocked-packed, plain weights still loaded) run
    through F.linear: the environment's, or calibrated on one module of each shape (one layer's
    projections), or None (see kvserve.models.cpu_linear_rows)."""
    from kvserve.models import cpu_linear_rows

    choice = cpu_linear_rows.setting()
    if not projections or choice == "off":
        return None
    if isinstance(choice, int):
        return choice
    extra = sum(m.weight.numel() * m.weight.element_size() for m in projections)
    available = cpu_linear_rows.available_memory_bytes()
    if available is not None and extra > cpu_linear_rows.MAX_MEMORY_SHARE * available:
        logger.info("CPU linears: the blocked kernel at every row count (a second copy of the weights, %.0f MB, "
                    "would take more than %.0f%% of the %.0f MB available)", extra / 2**20,
                    100 * cpu_linear_rows.MAX_MEMORY_SHARE, available / 2**20)
        return None
    by_shape: dict[tuple[int, ...], nn.Module] = {}
    for m in projections:
        by_shape.setdefault(tuple(m.weight.shape), m)
    sample = list(by_shape.values())
    from_rows = cpu_linear_rows.calibrate([m.weight.detach() for m in sample], [m.packed_weight for m in sample])
    if from_rows is None:
        logger.info("CPU linears: kvserve's blocked kernel at every row count (MKL measured no faster here)")
    else:
        logger.info("CPU linears: MKL from %d rows (measured faster here at prefill sizes); the plain weights "
                    "stay loaded for it (%.0f MB)", from_rows, extra / 2**20)
    return from_rows
