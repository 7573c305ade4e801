"""KV events: how an instance tells the router which blocks it stored and evicted.

The router ingests them at `POST /router/kv_events` (app.py) or in-process through
`KVEventIngestor.ingest`.  One batch, JSON:

    {"instance": "http://127.0.0.1:8001",        # the instance as the router knows it (--instance URL)
     "seq": 17,                                  # optional: batch number, +1 per batch from that instance
     "block_size": 16,                           # optional: tokens per block; must equal the router's
     "events": [
       {"type": "stored",  "block_hashes": ["<64 hex chars>", ...], "parent_block_hash": "<hex>" | null},
       {"type": "removed", "block_hashes": ["<64 hex chars>", ...]},
       {"type": "all_cleared"}
     ]}

Hashes are the engine's own (kvserve/hashing.py: SHA-256 chained over the parent block's hash),
hex encoded.  The shapes follow vLLM's KV events (BlockStored / BlockRemoved / AllBlocksCleared)
so that an engine emitting those maps onto this one field for field.  Events of a batch apply in
order.  A gap in `seq` means a batch was lost, so the instance's reported entries can no longer be
trusted: the router forgets that instance's blocks and starts over from the batch that arrived.

Emitting these events is the engine's side and is not built yet; today the index is fed by the
router's own routing decisions (kv_index.py) and these endpoints are exercised by tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvserve.router.kv_index import KVIndex, optional_hash, parse_hash

MAX_EVENTS_PER_BATCH = 10_000


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlockStored(_Event):
    type: Literal["stored"]
    block_hashes: list[str] = Field(min_length=1)
    parent_block_hash: Optional[str] = None


class BlockRemoved(_Event):
    type: Literal["removed"]
    block_hashes: list[str] = Field(min_length=1)


class AllBlocksCleared(_Event):
    type: Literal["all_cleared"]


KVEvent = Annotated[Union[BlockStored, BlockRemoved, AllBlocksCleared], Field(discriminator="type")]


class KVEventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance: str
    seq: Optional[int] = Field(None, ge=0)
    block_size: Optional[int] = Field(None, ge=1)
    events: list[KVEvent] = Field(max_length=MAX_EVENTS_PER_BATCH)


class KVEventError(ValueError):
    """A batch the router cannot apply; the message says why (becomes a 400)."""


@dataclass(slots=True)
class IngestResult:
    stored: int = 0  # block hashes reported stored
    removed: int = 0
    cleared: int = 0  # all_cleared events
    gap: bool = False  # a batch was missing before this one (the instance's entries were reset)


class KVEventIngestor:
    """Applies event batches to a `KVIndex` after validating all of a batch (all or nothing)."""

    def __init__(self, index: KVIndex, block_size: int, known_instances: set[str]) -> None:
        self.index = index
        self.block_size = block_size
        self.known_instances = known_instances
        self._last_seq: dict[str, int] = {}

    def parse(self, raw: bytes | str | dict) -> KVEventBatch:  # type: ignore[type-arg]
        try:
            if isinstance(raw, dict):
                return KVEventBatch.model_validate(raw)
            return KVEventBatch.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise KVEventError(f"invalid KV event batch at {where}: {first.get('msg')}") from None

    def ingest(self, raw: bytes | str | dict) -> IngestResult:  # type: ignore[type-arg]
        batch = self.parse(raw)
        instance = batch.instance.rstrip("/")
        if instance not in self.known_instances:
            raise KVEventError(f"unknown instance {batch.instance!r}; known: {', '.join(sorted(self.known_instances))}")
        if batch.block_size is not None and batch.block_size != self.block_size:
            raise KVEventError(f"the batch's block_size is {batch.block_size} but the router hashes blocks of "
                               f"{self.block_size} tokens (--block-size); the hashes cannot match")
        # Decode every hash before applying anything: a bad batch changes nothing.
        decoded: list[tuple[str, list[bytes]]] = []
        try:
            for ev in batch.events:
                if isinstance(ev, AllBlocksCleared):
                    decoded.append(("all_cleared", []))
                else:
                    if isinstance(ev, BlockStored):
                        optional_hash(ev.parent_block_hash)
                    decoded.append((ev.type, [parse_hash(h) for h in ev.block_hashes]))
        except ValueError as exc:
            raise KVEventError(str(exc)) from None
        result = IngestResult()
        if batch.seq is not None:
            last = self._last_seq.get(instance)
            if last is not None and batch.seq <= last:
                raise KVEventError(f"batch seq {batch.seq} from {instance} is not after the last one ({last})")
            if last is not None and batch.seq != last + 1:
                self.index.clear_instance(instance)
                result.gap = True
            self._last_seq[instance] = batch.seq
        for kind, hashes in decoded:
            if kind == "stored":
                self.index.apply_stored(instance, hashes)
                result.stored += len(hashes)
            elif kind == "removed":
                self.index.apply_removed(instance, hashes)
                result.removed += len(hashes)
            else:
                self.index.clear_instance(instance)
                result.cleared += 1
        return result

    def forget_instance(self, instance: str) -> None:
        """The instance restarted (or was removed): its next batch may start from any seq."""
        self._last_seq.pop(instance, None)
