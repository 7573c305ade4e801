"""Prefill/decode disaggregation, the router's side: pick a pair, relay the transfer parameters.

A request goes first to a prefill instance, which computes the prompt's KV and answers (non-
streamed, one token) with `kv_transfer_params`: an opaque object naming where the blocks can be
pulled from.  The router copies that object into the original request and sends it to a decode
instance, which imports the blocks and continues from the first generated token; the decode
instance's answer (streamed or not) goes to the client unchanged.  This is vLLM's disaggregated
prefill protocol, so an instance implementing it plugs in as it is.

The router never moves KV itself and never lets a decode instance silently recompute a prompt:
a prefill answer without transfer parameters is a 502 to the client, not a fallback to local
computation.  The pair is only formed from
instances that report the roles (`kvserve:instance_info{role="prefill"|"decode"}`, scrape.py;
`kvserve serve --role prefill|decode`).

A transfer that fails on the decode side (the decode instance answers the OpenAI error
`kv_transfer_failed`: the blocks are gone, damaged or late, e.g. the prefill instance died) is
retried once more through a fresh prefill, never recomputed on the decode instance: for a
stream, while its first event is that error, so nothing has reached the client yet.

`TransferProtocol` is the seam for other handshakes (e.g. one where the decode instance is
chosen first and told to the prefill instance, as SGLang's bootstrap does).
"""
from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Protocol

from fastapi.responses import Response

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.router.metrics import RouterMetrics
from kvserve.router.prompts import RouteRequest
from kvserve.router.proxy import Buffered, Forwarder, _PassThrough

logger = logging.getLogger(__name__)


class TransferParamsMissing(ValueError):
    pass


class TransferProtocol(Protocol):
    name: ClassVar[str]

    def prefill_request(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body sent to the prefill instance."""
        ...

    def decode_request(self, body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
        """The body sent to the decode instance; TransferParamsMissing if the prefill answer has none."""
        ...


class TransferParamsRelay:
    """vLLM's protocol: `kv_transfer_params` requested from the prefill side, relayed to the decode side."""

    name: ClassVar[str] = "kv-transfer-params"

    def prefill_request(self, body: dict[str, Any]) -> dict[str, Any]:
        out = dict(body)
        out["kv_transfer_params"] = {"do_remote_decode": True}
        out["stream"] = False
        out.pop("stream_options", None)
        out["max_tokens"] = 1  # the prefill instance samples the first token only
        if "max_completion_tokens" in out:
            out["max_completion_tokens"] = 1
        out["n"] = 1
        return out

    def decode_request(self, body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
        params = prefill_answer.get("kv_transfer_params") if isinstance(prefill_answer, dict) else None
        if not isinstance(params, dict) or not params:
            raise TransferParamsMissing("the prefill answer carries no kv_transfer_params")
        if "error" in params:  # the prefill instance could not export the blocks
            raise TransferParamsMissing(str(params["error"]))
        out = dict(body)
        out["kv_transfer_params"] = params
        return out


class PDRouter:
    """Runs one request through a (prefill, decode) pair chosen by the routing policy per slot."""

    def __init__(self, prefill: Forwarder, decode: Forwarder, metrics: RouterMetrics,
                 protocol: TransferProtocol | None = None, max_pair_attempts: int = 2) -> None:
        self.prefill = prefill
        self.decode = decode
        self.metrics = metrics
        self.protocol: TransferProtocol = protocol or TransferParamsRelay()
        self.max_pair_attempts = max_pair_attempts  # prefill + decode rounds when a transfer fails

    def check_pair(self) -> None:
        """503 before any work if either side has no routable instance."""
        for slot, fwd in (("prefill", self.prefill), ("decode", self.decode)):
            if not fwd.pool.routable(slot):
                self.metrics.pd_requests.labels("no_pair").inc()
                raise fwd.no_instance_error(slot, [])

    async def handle(self, path: str, body: dict[str, Any], headers: dict[str, str],
                     route: RouteRequest) -> Response:
        for attempt in range(self.max_pair_attempts):
            response = await self._round(path, body, headers, route)
            if attempt + 1 < self.max_pair_attempts and await _transfer_failed(response):
                self.metrics.pd_requests.labels("transfer_retried").inc()
                logger.warning("KV transfer failed on the decode side; prefilling again")
                continue
            break
        return response

    async def _round(self, path: str, body: dict[str, Any], headers: dict[str, str],
                     route: RouteRequest) -> Response:
        self.check_pair()
        prefill_body = json.dumps(self.protocol.prefill_request(body)).encode()
        answer = await self._prefill(path, prefill_body, headers, route)
        if answer.status >= 400:
            self.metrics.pd_requests.labels("prefill_failed").inc()
            return answer.response()  # the instance's own error (4xx: the client's request is bad)
        try:
            decode_body = self.protocol.decode_request(body, json.loads(answer.body))
        except (ValueError, TransferParamsMissing) as exc:
            self.metrics.pd_requests.labels("no_transfer_params").inc()
            raise OpenAIError(502, f"The prefill instance {answer.inst.url} answered without KV transfer "
                                   f"parameters ({exc}); the router does not recompute the prompt on a decode "
                                   "instance in its place.", code="kv_transfer_failed",
                              type="server_error") from None
        response = await self.decode.send("decode", "POST", path, json.dumps(decode_body).encode(), headers, route)
        assert not isinstance(response, Buffered)
        self.metrics.pd_requests.labels("ok" if response.status_code < 400 else "decode_failed").inc()
        return response

    async def _prefill(self, path: str, body: bytes, headers: dict[str, str], route: RouteRequest) -> Buffered:
        try:
            answer = await self.prefill.send("prefill", "POST", path, body, headers, route, buffer=True)
        except OpenAIError:
            self.metrics.pd_requests.labels("prefill_failed").inc()
            raise
        assert isinstance(answer, Buffered)
        return answer


_TRANSFER_FAILED = b'"kv_transfer_failed"'


async def _transfer_failed(response: Response) -> bool:
    """True when the decode instance said the KV transfer failed before anything reached the
    client (an error answer, or a stream whose first event is that error); such a stream is
    closed here."""
    if isinstance(response, _PassThrough):
        first = response.first_chunk
        if first.lstrip().startswith(b'data: {"error"') and _TRANSFER_FAILED in first:
            await response.discard()
            return True
        return False
    return response.status_code >= 500 and _TRANSFER_FAILED in bytes(response.body)
