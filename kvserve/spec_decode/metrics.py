"""Speculative decoding counters (plain data; the server exports them to Prometheus).

Counted per verification of one request that drafted k >= 1 tokens and had
a accepted (a step that drafted nothing is not a draft):
  num_drafts              verifications
  num_draft_tokens        sum k       (proposed)
  num_accepted_tokens     sum a       (accepted)
  proposed_per_position   [j]: drafts with k > j
  accepted_per_position   [j]: drafts with a > j
Derived: acceptance rate overall and per position (the conditional rate at
position j is accepted[j] / accepted[j-1] among drafts long enough; the
unconditional one, accepted[j] / proposed[j], is what vLLM reports) and the
mean acceptance length 1 + accepted / drafts: tokens emitted per speculating
step (vLLM's definition).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecDecodeMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"need 0 <= accepted ({num_accepted}) <= drafted ({num_drafted})")
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self._grow(num_drafted)
        for j in range(num_drafted):
            self.proposed_per_position[j] += 1
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    def merge(self, other: "SpecDecodeMetrics") -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self._grow(len(other.proposed_per_position))
        for j, n in enumerate(other.proposed_per_position):
            self.proposed_per_position[j] += n
        for j, n in enumerate(other.accepted_per_position):
            self.accepted_per_position[j] += n

    def _grow(self, n: int) -> None:
        while len(self.proposed_per_position) < n:
            self.proposed_per_position.append(0)
            self.accepted_per_position.append(0)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "proposed_per_position": list(self.proposed_per_position),
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_rate_per_position": self.acceptance_rate_per_position,
        }
