"""Block <-> stored entry (header + codec payload) for tiers that store bytes."""
from __future__ import annotations

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.base import KVBlock
from kvserve.kv_store.codecs.base import Codec, CodecError
from kvserve.kv_store.file_format import CorruptEntry, EntryHeader, check_header, pack_header, unpack_entry
from kvserve.kv_store.namespace import KVNamespace


class EntrySerializer:
    """Packs blocks for one (namespace, codec) and unpacks only entries of that
    same namespace and codec; anything else raises CorruptEntry."""

    def __init__(self, namespace: KVNamespace, codec: Codec) -> None:
        self.namespace = namespace
        self.codec = codec
        self._digest = namespace.digest()

    def pack(self, block_hash: BlockHash, block: KVBlock) -> tuple[bytes, bytes]:
        """(header, payload); raises CodecError if the codec refuses the block."""
        payload = self.codec.encode(block)
        header = EntryHeader(
            namespace_digest=self._digest,
            block_hash=block_hash,
            codec=self.codec.identity,
            dtype=self.namespace.dtype,
            shape=self.namespace.block_shape,
            payload_len=len(payload),
        )
        return pack_header(header, payload), payload

    def unpack(self, data: bytes | memoryview, block_hash: BlockHash | None) -> tuple[BlockHash, KVBlock]:
        """Verify and decode; `block_hash` None accepts any key of this namespace."""
        header, payload = unpack_entry(data)
        check_header(
            header,
            namespace_digest=self._digest,
            codec=self.codec.identity,
            dtype=self.namespace.dtype,
            shape=self.namespace.block_shape,
            block_hash=block_hash,
        )
        try:
            block = self.codec.decode(payload, self.namespace.torch_dtype, self.namespace.block_shape)
        except CodecError as e:
            raise CorruptEntry(f"payload does not decode: {e}") from None
        if tuple(block.shape) != self.namespace.block_shape or block.dtype != self.namespace.torch_dtype:
            raise CorruptEntry("decoded block has the wrong shape or dtype")
        return header.block_hash, block
