"""Device pool <-> host block copies: layout, ownership, and save-before-load order."""
from __future__ import annotations

import torch

from kvserve.core.kv_offload import KVLoad, KVSave
from kvserve.worker.kv_transfer import KVTransfer, gather_blocks, scatter_blocks

L, NB, BS, H, D = 3, 6, 4, 2, 5


def pools():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, NB, BS, H, D, generator=g) for _ in range(L)]


def test_gather_matches_the_kv_store_block_layout():
    kv = pools()
    out = gather_blocks(kv, [4, 1])
    assert out.shape == (2, L, 2, BS, H, D)
    for i, bid in enumerate([4, 1]):
        for layer in range(L):
            assert torch.equal(out[i, layer, 0], kv[layer][0, bid])  # K
            assert torch.equal(out[i, layer, 1], kv[layer][1, bid])  # V


def test_gathered_blocks_own_their_memory():
    kv = pools()
    out = gather_blocks(kv, [2])
    before = out.clone()
    for layer in range(L):
        kv[layer].zero_()
    assert torch.equal(out, before)


def test_scatter_round_trip_into_other_blocks_leaves_the_rest_alone():
    src = pools()
    blocks = list(gather_blocks(src, [0, 3]))
    dst = [torch.zeros(2, NB, BS, H, D) for _ in range(L)]
    scatter_blocks(dst, [5, 2], blocks)
    for layer in range(L):
        assert torch.equal(dst[layer][:, 5], src[layer][:, 0])
        assert torch.equal(dst[layer][:, 2], src[layer][:, 3])
        for other in (0, 1, 3, 4):
            assert not dst[layer][:, other].any()


class FakeIO:
    def __init__(self, loaded):
        self.saved = []
        self.loaded = loaded

    def submit_saves(self, items):
        self.saved.extend(items)

    def take_loaded(self, request_id):
        return self.loaded.pop(request_id, [])


def test_save_is_copied_out_before_a_load_overwrites_the_same_block():
    kv = pools()
    old = gather_blocks(kv, [1])[0].clone()
    new = torch.full((L, 2, BS, H, D), 7.0)
    skip = torch.full((L, 2, BS, H, D), -1.0)
    io = FakeIO({"r": [skip, new]})
    KVTransfer(kv, io).apply([KVSave(b"h" * 32, 1)], [KVLoad("r", 1, [1])])
    (h, saved), = io.saved
    assert h == b"h" * 32 and torch.equal(saved, old)
    assert torch.equal(gather_blocks(kv, [1])[0], new)
    assert io.loaded == {}  # the runner took the request's host copies
