"""Per-key rate limits: a token bucket per API key (or client id).

Each key's bucket holds up to ``burst`` tokens and refills at ``requests_per_minute / 60`` tokens per second;
a request takes one token or is refused with the seconds until one is available. Keys are kept in an LRU of at
most ``max_keys`` so a flood of made-up keys cannot grow memory without bound (an evicted key starts full again).
The clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable


class RateLimiter:
    def __init__(self, requests_per_minute: float, burst: int = 10, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        if requests_per_minute <= 0 or burst < 1:
            raise ValueError("requests_per_minute must be > 0 and burst >= 1")
        self.rate = requests_per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str | None) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying; 0.0 when allowed)."""
        key = key or "-"
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return ok, 0.0 if ok else (1.0 - tokens) / self.rate
