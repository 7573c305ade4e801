"""Transfer faults at the engine: each ends the request with a clear error (never a recompute,
never a hang), leaves no device block held and nothing in the transport; other requests keep
running while one waits for its KV."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvserve.request import RequestStatus
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.disagg.helpers import engine, greedy, prefill, prompt_set, run

DECODE_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pd_faults")
    model = build_tiny_model("llama3", root / "model", seed=5)
    kv, delay = root / "kv", root / "delay"
    p = engine(model, kv_transfer=f"shm://{kv}", kv_transfer_timeout=3.0)
    d = engine(model, kv_transfer=f"shm://{kv}?fetch_delay_file={delay}", kv_transfer_timeout=DECODE_TIMEOUT_S)
    ref = engine(model)
    return dict(p=p, d=d, ref=ref, kv=kv, delay=delay)


def clean(s) -> None:
    d = s["d"]
    assert d.core.kv_manager.req_blocks == {} and not d.has_unfinished_requests()
    d.core.kv_manager.check_integrity()
    assert d.core.disagg.source.num_fetches_in_flight == 0 and not d.core.disagg.source._host
    assert [f for f in os.listdir(s["kv"]) if f.endswith(".kv")] == []


def test_transfer_timeout_fails_the_request(setup):
    s = setup
    prompt = prompt_set()[2]
    params = prefill(s["p"], [prompt])
    computed = s["d"].core.disagg.stats()["prompt_tokens_computed"]
    s["delay"].write_text("3")
    try:
        s["d"].add_request({"prompt_token_ids": prompt}, greedy(4), request_id="t", kv_transfer_params=params["p0"])
        t0 = time.monotonic()
        out = run(s["d"])["t"]
    finally:
        s["delay"].unlink()
    assert time.monotonic() - t0 < DECODE_TIMEOUT_S + 2
    assert out.error is not None and out.error.startswith("KV transfer failed: ")
    assert "did not arrive within" in out.error and out.outputs[0].finish_reason == "error"
    st = s["d"].core.disagg.stats()
    assert st["import_failed_timeout"] == 1 and st["prompt_tokens_computed"] == computed  # not recomputed
    clean(s)


def test_vanished_blocks_fail_the_request(setup):
    s = setup
    prompt = prompt_set()[3]
    params = prefill(s["p"], [prompt])
    os.unlink(params["p0"]["locator"]["path"])  # e.g. the prefill host cleaned its tmpfs
    s["d"].add_request({"prompt_token_ids": prompt}, greedy(4), request_id="v", kv_transfer_params=params["p0"])
    out = run(s["d"])["v"]
    assert out.error is not None and "the transfer is gone" in out.error
    assert s["d"].core.disagg.stats()["import_failed_error"] == 1
    clean(s)


def test_abort_while_fetching_releases_everything(setup):
    s = setup
    prompt = prompt_set()[4]
    params = prefill(s["p"], [prompt])
    s["delay"].write_text("0.5")
    try:
        s["d"].add_request({"prompt_token_ids": prompt}, greedy(4), request_id="a", kv_transfer_params=params["p0"])
        s["d"].step()
        assert s["d"].core.scheduler.requests["a"].status == RequestStatus.WAITING_FOR_KV
        s["d"].abort("a")
    finally:
        s["delay"].unlink()
    assert s["d"].core.disagg.stats()["import_aborted"] == 1
    time.sleep(0.6)  # the fetch thread finishes into nothing
    clean(s)


def test_other_requests_keep_decoding_while_one_waits(setup):
    s = setup
    prompts = prompt_set()
    want = {}
    for i in (0, 5):
        s["ref"].add_request({"prompt_token_ids": prompts[i]}, greedy(6), request_id=str(i))
    for rid, out in run(s["ref"]).items():
        want[rid] = out.outputs[0].token_ids
    params = prefill(s["p"], [prompts[5]])
    s["delay"].write_text("0.5")
    d = s["d"]
    try:
        d.add_request({"prompt_token_ids": prompts[5]}, greedy(6), request_id="5", kv_transfer_params=params["p0"])
        d.add_request({"prompt_token_ids": prompts[0]}, greedy(6), request_id="0")
        overlapped = False
        got = {}
        while d.has_unfinished_requests():
            for out in d.step():
                waiting = d.core.scheduler.requests.get("5")
                if out.request_id == "0" and waiting is not None and waiting.status == RequestStatus.WAITING_FOR_KV:
                    overlapped = True  # request 0 got tokens while 5 waited outside the batch
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
    finally:
        s["delay"].unlink()
    assert overlapped
    assert got == want
    clean(s)


def test_exports_nobody_fetches_expire_while_idle(setup):
    s = setup
    before = s["p"].core.disagg.stats()["exports_expired"]
    params = prefill(s["p"], [prompt_set()[1]])
    path = Path(params["p0"]["locator"]["path"])
    assert path.exists()
    deadline = time.monotonic() + 10
    while path.exists() and time.monotonic() < deadline:  # the engine does not step meanwhile
        time.sleep(0.2)
    assert not path.exists()
    assert s["p"].core.disagg.stats()["exports_expired"] == before + 1
    assert s["p"].core.disagg.stats()["exports_held"] == 0


def test_a_refused_request_releases_its_transfer(setup, monkeypatch):
    s = setup
    prompt = prompt_set()[6]
    params = prefill(s["p"], [prompt])
    path = Path(params["p0"]["locator"]["path"])

    def refuse(request):  # e.g. the scheduling policy refuses it, or it cannot fit here
        raise ValueError("refused")

    monkeypatch.setattr(s["d"].core.scheduler, "add_request", refuse)
    with pytest.raises(ValueError, match="refused"):
        s["d"].add_request({"prompt_token_ids": prompt}, greedy(4), request_id="r", kv_transfer_params=params["p0"])
    assert not path.exists() and "r" not in s["d"].core.disagg.source._imports
