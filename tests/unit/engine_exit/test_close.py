"""Closing an offline LLM (issue 12, items 1-4), in-process: the context manager, `del`,
what each offload policy leaves in a persistent tier, the flush of device blocks on
close, a corrupt disk tier healing in one run, and one engine per disk directory."""
from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import KVTierConfig
from kvserve.kv_store.dir_lock import DirectoryLock, DiskTierLockedError
from kvserve.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import build_tiny_model

TOKENS = 400
BLOCK_SIZE = 4
FULL_BLOCKS = TOKENS // BLOCK_SIZE                      # 100 (the prompt's last one is full too)
MAX_HIT = (TOKENS - 1) // BLOCK_SIZE * BLOCK_SIZE       # 396: the last prompt token is never matched
ENGINE = dict(block_size=BLOCK_SIZE, num_kv_blocks=512, max_model_len=1024)
SP = SamplingParams(max_tokens=1, temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model("llama3", tmp_path_factory.mktemp("close_model"), seed=5))


def prompt(seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(512) for _ in range(TOKENS)]}


def cached(llm: LLM, seed: int = 0) -> int:
    return llm.generate(prompt(seed), SP, use_tqdm=False)[0].metrics.num_cached_tokens


def disk_entries(path: Path) -> int:
    return len(list(path.rglob("*.kvb")))


def tier_threads(llm: LLM) -> list:
    return list(llm.engine.core.kv_tiers.io._threads)


# ------------------------------------------------------------- closing


def test_with_block_writes_device_blocks_stops_threads_and_unlocks(model: str, tmp_path: Path) -> None:
    with LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", kv_offload_policy="evict", **ENGINE) as llm:
        assert cached(llm) == 0
        threads = tier_threads(llm)
        # "evict" and a pool that never filled: nothing has gone down yet.
        assert disk_entries(tmp_path) == 0
    assert llm.closed and not any(t.is_alive() for t in threads)
    # Closing wrote every cached device block (prompt and decoded) to the persistent tier.
    assert disk_entries(tmp_path) == FULL_BLOCKS
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(prompt(), SP, use_tqdm=False)
    assert llm.close() is True  # idempotent
    with LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", **ENGINE) as again:  # the lock was released
        assert cached(again) == MAX_HIT


def test_del_closes_at_once(model: str, tmp_path: Path) -> None:
    gc.disable()  # `del` alone must close: no reference cycle may keep the engine alive
    try:
        llm = LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", **ENGINE)
        cached(llm)
        threads = tier_threads(llm)
        del llm
        assert not any(t.is_alive() for t in threads)
        assert disk_entries(tmp_path) == FULL_BLOCKS
        DirectoryLock(tmp_path).release()  # the directory is free again
    finally:
        gc.enable()


def test_exit_hook_closes_an_llm_nobody_closed(model: str, tmp_path: Path) -> None:
    llm = LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", **ENGINE)
    cached(llm)
    hook = llm.engine._finalizer
    assert hook.alive and hook.atexit   # interpreter exit calls it (weakref.finalize)
    hook()                              # what the exit does
    assert llm.closed and not any(t.is_alive() for t in tier_threads(llm))
    assert disk_entries(tmp_path) == FULL_BLOCKS


# ------------------------------------------------------------- policies


@pytest.mark.parametrize("tiers, policy, resolved", [
    ("cpu:4MiB", "auto", "evict"),
    ("disk:{d}:64MiB", "auto", "finish"),
    ("cpu:4MiB,disk:{d}:64MiB", "auto", "finish"),
    ("disk:{d}:64MiB", "evict", "evict"),
    ("cpu:4MiB", "finish", "finish"),
])
def test_auto_policy_is_finish_with_a_persistent_tier(model: str, tmp_path: Path, tiers: str, policy: str,
                                                      resolved: str) -> None:
    with LLM(model, kv_tiers=tiers.format(d=tmp_path), kv_offload_policy=policy, **ENGINE) as llm:
        assert llm.engine.kv_tier_stats()["offload_policy"] == resolved


def test_default_policy_is_auto_and_bad_ones_are_refused() -> None:
    assert KVTierConfig().offload_policy == "auto"
    with pytest.raises(ValueError, match="kv_offload_policy"):
        KVTierConfig(tiers="cpu:1MiB", offload_policy="sometimes")


def test_default_policy_writes_a_disk_tier_before_close(model: str, tmp_path: Path) -> None:
    """Under the default (finish, with a disk tier) the blocks go down as the request
    finishes, not only on close: another process could read them right away."""
    with LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", **ENGINE) as llm:
        cached(llm)
        assert llm.engine.core.wait_for_kv_saves(30)
        assert disk_entries(tmp_path) == FULL_BLOCKS
        assert llm.engine.kv_tier_stats()["io"]["blocks_flushed_on_close"] == 0


def test_memory_tier_under_auto_is_not_flushed_on_close(model: str) -> None:
    llm = LLM(model, kv_tiers="cpu:4MiB", **ENGINE)
    cached(llm)
    llm.close()
    st = llm.engine.kv_tier_stats()
    assert st["offload_policy"] == "evict" and st["io"]["blocks_flushed_on_close"] == 0
    assert st["tiers"]["0:cpu"]["puts"] == 0   # nothing evicted, nothing worth writing


def test_interrupted_step_writes_no_device_blocks(model: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks are registered when a step is scheduled; if the step never ran (Ctrl-C),
    their KV is garbage and must not reach a tier that outlives the process."""
    llm = LLM(model, kv_tiers=f"disk:{tmp_path}:64MiB", kv_offload_policy="evict", **ENGINE)

    def interrupted(self, sched):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelRunner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt(), SP, use_tqdm=False)
    monkeypatch.undo()
    llm.close()
    assert disk_entries(tmp_path) == 0


# ------------------------------------------------------------- disk tier: healing, lock


def test_corrupt_disk_tier_heals_in_one_run(model: str, tmp_path: Path) -> None:
    spec = f"disk:{tmp_path}:64MiB"
    with LLM(model, kv_tiers=spec, **ENGINE) as llm:
        cached(llm)
    files = list(tmp_path.rglob("*.kvb"))
    assert len(files) == FULL_BLOCKS
    for f in files:  # flip a payload byte of every entry
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x55
        f.write_bytes(bytes(data))
    with LLM(model, kv_tiers=spec, **ENGINE) as llm:
        assert cached(llm) == 0  # the first load chunk is corrupt: everything is recomputed
        assert llm.engine.kv_tier_stats()["tiers"]["0:disk"]["corrupt"] > 0
    # The recomputed blocks replaced every corrupt entry, not just the chunk that was read.
    with LLM(model, kv_tiers=spec, **ENGINE) as llm:
        assert cached(llm) == MAX_HIT
        assert llm.engine.kv_tier_stats()["tiers"]["0:disk"]["corrupt"] == 0


def test_two_engines_on_one_disk_directory_are_refused(model: str, tmp_path: Path) -> None:
    spec = f"disk:{tmp_path}:1MiB"
    with LLM(model, kv_tiers=spec, **ENGINE):
        with pytest.raises(DiskTierLockedError, match="in use by another disk tier of this process"):
            LLM(model, kv_tiers=spec, **ENGINE)
    LLM(model, kv_tiers=spec, **ENGINE).close()  # free again once the first is closed
