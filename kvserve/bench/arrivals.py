"""Send times (seconds after the benchmark starts) for each request.

* rate = inf: every request at t=0 (a closed burst; use --max-concurrency to bound it).
* Poisson: exponential gaps with mean 1/rate.
* Gamma: gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)); the mean gap stays 1/rate
  for every burstiness, the coefficient of variation is 1/sqrt(burstiness): burstiness < 1 is
  burstier than Poisson, > 1 smoother, = 1 is Poisson exactly.
* Replay: trace timestamps relative to the first request, multiplied by time_scale
  (0.5 replays twice as fast).

The first request is sent at t=0 in every mode.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kvserve.bench.errors import BenchInputError


def synthetic_send_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Cumulative send times for `num` requests at `rate` requests/s (inf = all at once)."""
    if num < 0:
        raise BenchInputError(f"number of requests must be >= 0, got {num}")
    if not rate > 0:
        raise BenchInputError(f"--request-rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise BenchInputError(f"--burstiness must be a positive number, got {burstiness}")
    if num == 0:
        return []
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def replay_send_times(timestamps: Sequence[float | None], time_scale: float = 1.0) -> list[float]:
    """Send times from trace timestamps (seconds), shifted so the first is 0 and scaled."""
    if not (time_scale >= 0 and math.isfinite(time_scale)):
        raise BenchInputError(f"--time-scale must be a finite number >= 0, got {time_scale}")
    if not timestamps:
        return []
    if any(t is None for t in timestamps):
        raise BenchInputError("--replay-timestamps needs a trace with timestamps; this dataset has none")
    ts = [float(t) for t in timestamps]  # type: ignore[arg-type]
    t0 = ts[0]
    # Traces are in time order; a record earlier than the first is sent at once rather than
    # reordering requests.
    return [max(0.0, (t - t0) * time_scale) for t in ts]
