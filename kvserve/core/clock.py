"""The scheduler's clock: injected, so a simulator (or a test) runs the core on its own time.

Core modules never call `time` themselves; they call the `Clock` they were given.
"""
from __future__ import annotations

import time
from typing import Callable

Clock = Callable[[], float]  # seconds; compared with Request.arrival_time


def wall_clock() -> float:
    """The default: wall-clock seconds (time.time), the unit of request arrival times."""
    return time.time()
