"""Scheduling fields of a request (priority, tenant, SLO) and the server flags behind them.

Body fields (both generation endpoints; docs/scheduling.md):
    priority      integer, lower is served first (the `priority` policy), as in vLLM
    tenant        who the request is accounted to (the `fair` policy); default: OpenAI's `user`
    slo_ttft_ms   time-to-first-token target, ms (the `slo` policy)
    slo_tpot_ms   time-per-output-token target, ms

Defaults: a request without targets takes its tenant's (--tenant-default-slo), else the
engine's global ones (--default-slo-ttft-ms / --default-slo-tpot-ms, applied by the policy).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Optional

from kvserve.config import parse_tenant_weights
from kvserve.entrypoints.arg_types import non_negative_float, positive_float
from kvserve.request import SLO

POLICY_CHOICES = ("fcfs", "priority", "fair", "slo")


@dataclass(frozen=True)
class RequestScheduling:
    priority: int = 0
    tenant: Optional[str] = None
    slo: Optional[SLO] = None


@dataclass
class SchedulingDefaults:
    tenant_slo: dict[str, SLO] = field(default_factory=dict)


def parse_tenant_slo(spec: Optional[str]) -> dict[str, SLO]:
    """"chat=1000/100,batch=20000" -> {"chat": SLO(1.0, 0.1), "batch": SLO(20.0, None)}."""
    out: dict[str, SLO] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        ttft, _, tpot = value.partition("/")
        try:
            slo = SLO(ttft_s=float(ttft) / 1000 if ttft else None, tpot_s=float(tpot) / 1000 if tpot else None)
        except ValueError:
            slo = None
        if not sep or not name.strip() or slo is None or (slo.ttft_s is None and slo.tpot_s is None):
            raise ValueError(f"tenant SLOs are NAME=TTFT_MS[/TPOT_MS] pairs, e.g. 'chat=1000/100,batch=20000'; "
                             f"got {part!r}")
        out[name.strip()] = slo
    return out


def request_scheduling(req: Any, defaults: SchedulingDefaults) -> RequestScheduling:
    """The scheduling fields of a parsed request body (SamplingFields)."""
    tenant = req.tenant if req.tenant is not None else req.user
    if req.slo_ttft_ms is not None or req.slo_tpot_ms is not None:
        slo: Optional[SLO] = SLO(ttft_s=None if req.slo_ttft_ms is None else req.slo_ttft_ms / 1000,
                                 tpot_s=None if req.slo_tpot_ms is None else req.slo_tpot_ms / 1000)
    else:
        slo = defaults.tenant_slo.get(tenant) if tenant is not None else None
    return RequestScheduling(priority=req.priority, tenant=tenant, slo=slo)


# ----------------------------------------------------------------------- server flags
def _checked(parse: Any) -> Any:
    def check(text: str) -> Any:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check




def _fraction(text: str) -> float:
    v = positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return v


def add_scheduling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduling (docs/scheduling.md)")
    g.add_argument("--scheduling-policy", choices=POLICY_CHOICES, default="fcfs",
                   help="fcfs = arrival order; priority = the request's `priority` (lower first); fair = "
                        "per-tenant virtual token counters (VTC); slo = least slack to the TTFT deadline, "
                        "TPOT-aware chunking (default: %(default)s)")
    g.add_argument("--tenant-weights", type=_checked(parse_tenant_weights), default=None, metavar="T=W,...",
                   help="fair: service weights per tenant, e.g. 'a=2,b=1' (default: 1 each)")
    g.add_argument("--fair-max-step-ms", type=non_negative_float, default=200.0, metavar="MS",
                   help="fair: while two or more tenants have requests, a step holds at most the tokens that "
                        "take this long by the measured step time, so a request arriving mid-step waits at "
                        "most about this long for it (0: off; default: %(default)g)")
    g.add_argument("--default-slo-ttft-ms", type=positive_float, default=None, metavar="MS",
                   help="slo: TTFT target of requests without one (default: none)")
    g.add_argument("--default-slo-tpot-ms", type=positive_float, default=None, metavar="MS",
                   help="slo: TPOT target of requests without one (default: none)")
    g.add_argument("--tenant-default-slo", type=_checked(parse_tenant_slo), default=None,
                   metavar="T=TTFT_MS[/TPOT_MS],...",
                   help="per-tenant targets of requests without their own, e.g. 'chat=1000/100,batch=20000'")
    g.add_argument("--slo-reject", action="store_true",
                   help="slo: answer 429 to a request that cannot meet its TTFT at arrival, instead of "
                        "queueing it behind the feasible ones")
    g.add_argument("--preemption-mode", choices=["recompute", "swap", "auto"], default="recompute",
                   help="how a request loses its KV blocks when they run out: recompute later, swap to host "
                        "memory, or auto = per request, the cheaper by a roofline cost model (default: %(default)s)")
    g.add_argument("--swap-space", type=positive_float, default=4.0, metavar="GiB",
                   help="host memory for swapped-out KV blocks, GiB (default: %(default)g)")
    g.add_argument("--admission-kv-limit", type=_fraction, default=None, metavar="FRACTION",
                   help="with the KV cache at least this full and requests already waiting, new requests get "
                        "429 with Retry-After (default: off)")


def scheduling_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(scheduling_policy=args.scheduling_policy, tenant_weights=args.tenant_weights,
                fair_max_step_ms=args.fair_max_step_ms,
                default_slo_ttft_ms=args.default_slo_ttft_ms, default_slo_tpot_ms=args.default_slo_tpot_ms,
                slo_reject=args.slo_reject, preemption_mode=args.preemption_mode, swap_space=args.swap_space)


def scheduling_server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(admission_kv_limit=args.admission_kv_limit,
                scheduling=SchedulingDefaults(parse_tenant_slo(args.tenant_default_slo)))
