"""Build the swap manager for `preemption_mode` swap/auto: host slots from the swap space,
and the cost model from the roofline numbers of the model and the device."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from kvserve.bench.roofline import HW_PRESETS, LINK_PRESETS, model_spec_from_config
from kvserve.config import SchedulerConfig
from kvserve.core.swap import PreemptionCostModel, SwapManager

logger = logging.getLogger(__name__)

# A CPU "device": the host link is memory itself; peak FLOP/s of a few cores.
_CPU_PEAK_FLOPS = 2e11
_CPU_LINK_BPS = 10e9


def device_numbers(device_type: str, device_name: str = "") -> tuple[float, float]:
    """(peak FLOP/s, host link bytes/s) for the cost model."""
    if device_type != "cuda":
        return _CPU_PEAK_FLOPS, _CPU_LINK_BPS
    name = device_name.lower()
    for key, hw in HW_PRESETS.items():
        if key in name:
            return hw.peak_flops, LINK_PRESETS["pcie5" if key in ("h100", "h200") else "pcie4"]
    return HW_PRESETS["a100"].peak_flops, LINK_PRESETS["pcie4"]


def cost_model(model_dir: str, block_bytes: int, block_size: int, device_type: str,
               device_name: str = "") -> PreemptionCostModel:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    spec = model_spec_from_config(cfg)
    peak, link = device_numbers(device_type, device_name)
    return PreemptionCostModel(block_bytes=block_bytes, block_size=block_size, link_bandwidth=link,
                               flops_per_token=2.0 * spec.active_params, peak_flops=peak,
                               attn_flops_per_pair=spec.attn_flops_per_pair())


def build_swap_manager(config: SchedulerConfig, model_dir: str, block_bytes: int, block_size: int,
                       device_type: str, device_name: str = "") -> Optional[SwapManager]:
    """None for recompute-only preemption."""
    if config.preemption_mode == "recompute":
        return None
    num_host_blocks = config.swap_space_bytes // block_bytes
    try:
        cost: Optional[PreemptionCostModel] = cost_model(model_dir, block_bytes, block_size, device_type, device_name)
    except (OSError, ValueError, KeyError) as exc:  # a GGUF file has no config.json
        if config.preemption_mode == "auto":
            logger.warning("no roofline numbers for %s (%s): preemption_mode auto swaps whenever there is room",
                           model_dir, exc)
        cost = None
    mode = config.preemption_mode if cost is not None else "swap"
    logger.info("preemption: %s, host swap space of %d blocks", config.preemption_mode, num_host_blocks)
    return SwapManager(num_host_blocks, mode, cost)
