"""Graceful shutdown with a deadline that keeps to the protocol (`kvserve serve --drain-timeout`).

uvicorn's own graceful-shutdown timeout cancels the request tasks: clients then
get a plain-text 500 or a stream cut mid-chunk, and the log a traceback each.
`DrainingServer` instead, at the deadline, ends every in-flight request through
the API (`ServerContext.expire_in_flight`: 503 JSON, or an `error` event and
`[DONE]` on a stream); they then finish by themselves within milliseconds.
uvicorn's timeout is kept only as a backstop, `backstop_s` after the deadline,
for a handler blocked on a client that stopped reading.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Optional

import uvicorn

if TYPE_CHECKING:
    from kvserve.entrypoints.openai.serving import ServerContext

logger = logging.getLogger("kvserve.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: "ServerContext", backstop_s: float) -> None:
        timeout = ctx.drain.timeout_s
        config.timeout_graceful_shutdown = None if timeout is None else timeout + backstop_s  # type: ignore[assignment]
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        timeout = self.ctx.drain.timeout_s
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self._deadline)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    def _deadline(self) -> None:
        # The count is of the requests the engine still had, not of the open HTTP calls: a call whose
        # request has just finished is still open while it writes its normal answer.
        open_calls = self.ctx.drain.in_flight
        ended = self.ctx.expire_in_flight()
        logger.warning("drain timeout of %g s reached: ending the %d requests still in flight with a 503 error "
                       "(streams: an error event, then [DONE]); %d HTTP calls were open",
                       self.ctx.drain.timeout_s, ended, open_calls)
