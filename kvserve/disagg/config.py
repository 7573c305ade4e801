"""Roles and KV-transfer settings of one engine (prefill/decode disaggregation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ROLES = ("both", "prefill", "decode")
DEFAULT_TRANSFER_URL = "shm://"  # same host: blocks through files in /dev/shm
DEFAULT_TRANSFER_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DisaggConfig:
    """role: what the instance reports (`kvserve:instance_info{role}`) and what a router sends it.
        Every role serves a request without transfer parameters locally (counted as `local`);
        a request with `kv_transfer_params: {"do_remote_decode": true}` is prefilled and its
        KV exported; one with a prefill answer's parameters imports the KV and decodes.
    kv_transfer: the transport URL (kvserve.disagg.transport): "shm://[DIR]" (same host) or
        "ray://[ADDRESS][?codec=NAME]" (Ray's object store, across hosts).
    timeout_s: a decode instance fails a request whose blocks have not arrived by then; a
        prefill instance drops exported blocks nobody fetched by then.
    instance_id: names this instance's exports (default: pid-based)."""

    role: str = "both"
    kv_transfer: str = DEFAULT_TRANSFER_URL
    timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S
    instance_id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {self.role!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"kv_transfer_timeout must be > 0 seconds, got {self.timeout_s!r}")
        scheme = self.kv_transfer.partition("://")[0]
        if "://" not in self.kv_transfer or scheme not in ("shm", "ray"):
            raise ValueError(f"kv_transfer must be a URL shm://[DIR] or ray://[ADDRESS], got {self.kv_transfer!r}")
