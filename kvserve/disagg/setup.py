"""Wiring one engine for disaggregation: the remote-peer KV source, the runner's copy-in route.

`attach_disagg(core, runner, config)` is called by EngineCore.from_config for every engine
(the role only changes what the instance reports; any role serves any request, see
config.py).  It inserts the source right after the device prefix cache (before the
offload tiers), and routes the runner's KV loads of transferred requests to it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from kvserve.disagg.config import DisaggConfig
from kvserve.disagg.params import Layout
from kvserve.disagg.source import RemotePeerSource
from kvserve.disagg.transport import transport_for_url
from kvserve.hashing import BlockHash
from kvserve.worker.kv_transfer import HostBlockIO, KVTransfer

if TYPE_CHECKING:
    from kvserve.engine.engine_core import EngineCore
    from kvserve.worker.model_runner import ModelRunner


class RoutedHostIO:
    """The runner's HostBlockIO: loads of transferred requests come from the source, every
    other load and every save go to the KV tiers' I/O (if any)."""

    def __init__(self, source: RemotePeerSource, tiers: Optional[HostBlockIO]) -> None:
        self.source = source
        self.tiers = tiers

    def submit_saves(self, items: list[tuple[BlockHash, torch.Tensor]], persist: bool = False) -> None:
        if self.tiers is None:
            raise RuntimeError("KV saves scheduled without offload tiers")
        if persist:
            self.tiers.submit_saves(items, persist=True)  # type: ignore[call-arg]
        else:
            self.tiers.submit_saves(items)

    def take_loaded(self, request_id: str) -> list[torch.Tensor]:
        blocks = self.source.take_loaded(request_id)
        if blocks is not None:
            return blocks
        return self.tiers.take_loaded(request_id) if self.tiers is not None else []

    # The tiers' background-load verbs (the runner starts and polls tier loads through its
    # KVTransfer); without tiers there are none to start, drop or report.
    def submit_load(self, request_id: str, block_hashes: Any) -> None:
        if self.tiers is None:
            raise RuntimeError("a KV tier load scheduled without offload tiers")
        self.tiers.submit_load(request_id, block_hashes)  # type: ignore[attr-defined]

    def cancel_load(self, request_id: str) -> None:
        if self.tiers is not None:
            self.tiers.cancel_load(request_id)  # type: ignore[attr-defined]

    def poll(self) -> Any:
        if self.tiers is not None:
            return self.tiers.poll()  # type: ignore[attr-defined]
        from kvserve.protocol import KVTransferEvents

        return KVTransferEvents()

    def __getattr__(self, name: str) -> Any:  # any other verb of the tiers' I/O (wait_for_room, ...)
        tiers = self.__dict__.get("tiers")
        if tiers is None:
            raise AttributeError(name)
        return getattr(tiers, name)


def pool_layout(kv_caches: list[torch.Tensor]) -> Layout:
    """Per layer [2, num_blocks, block_size, num_kv_heads, head_dim] -> the transfer layout."""
    first = kv_caches[0]
    return Layout(len(kv_caches), int(first.shape[3]), int(first.shape[4]), str(first.dtype).removeprefix("torch."))


class DisaggEngine:
    """What the engine keeps: the source, the config, stats for /metrics."""

    def __init__(self, core: EngineCore, source: RemotePeerSource, config: DisaggConfig) -> None:
        self.core = core
        self.source = source
        self.config = config

    def stats(self) -> dict[str, Any]:
        d = self.source.snapshot()
        d["role"] = self.config.role
        d["block_size"] = self.source.block_size
        d["prompt_tokens_computed"] = self.core.stats.num_prompt_tokens
        return d

    def close(self) -> None:
        self.source.close()


def attach_disagg(core: EngineCore, runner: ModelRunner, config: DisaggConfig) -> DisaggEngine:
    transport = transport_for_url(config.kv_transfer)
    source = RemotePeerSource(core.kv_manager, transport, pool_layout(runner.kv_caches), runner.kv_caches,
                              config.timeout_s)
    # After the device prefix cache (sources[0]), before the offload tiers: a transferred
    # request's blocks come from its prefill instance, not from a tier.
    core.scheduler.sources.insert(1, source)
    if runner.kv_transfer is None:
        runner.kv_transfer = KVTransfer(runner.kv_caches, RoutedHostIO(source, None))
    else:
        runner.kv_transfer.io = RoutedHostIO(source, runner.kv_transfer.io)
    return DisaggEngine(core, source, config)
