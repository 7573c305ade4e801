"""Arrival processes: Poisson, gamma burstiness, replay with time scaling."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvserve.bench.arrivals import replay_send_times, synthetic_send_times
from kvserve.bench.errors import BenchInputError


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.asarray(times))


def test_infinite_rate_sends_everything_at_once() -> None:
    assert synthetic_send_times(5, math.inf) == [0.0] * 5


def test_poisson_rate_and_dispersion() -> None:
    t = synthetic_send_times(20001, 10.0, 1.0, seed=1)
    g = _gaps(t)
    assert t[0] == 0.0 and np.all(g >= 0)
    assert g.mean() == pytest.approx(0.1, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_mean_changes_cv(burstiness: float) -> None:
    g = _gaps(synthetic_send_times(20001, 5.0, burstiness, seed=2))
    assert g.mean() == pytest.approx(0.2, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_seeded() -> None:
    assert synthetic_send_times(50, 3.0, 0.5, seed=4) == synthetic_send_times(50, 3.0, 0.5, seed=4)
    assert synthetic_send_times(50, 3.0, 0.5, seed=4) != synthetic_send_times(50, 3.0, 0.5, seed=5)


def test_replay_scales_offsets() -> None:
    assert replay_send_times([5.0, 6.0, 8.0], 0.5) == [0.0, 0.5, 1.5]
    assert replay_send_times([5.0, 6.0, 8.0]) == [0.0, 1.0, 3.0]


@pytest.mark.parametrize(
    "call",
    [
        lambda: synthetic_send_times(3, 0.0),
        lambda: synthetic_send_times(3, -1.0),
        lambda: synthetic_send_times(3, 1.0, burstiness=0.0),
        lambda: replay_send_times([1.0, None]),
        lambda: replay_send_times([1.0], time_scale=-1.0),
    ],
)
def test_rejects(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BenchInputError):
        call()
