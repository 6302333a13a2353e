"""What one party may ask of the server per unit of time, and how broken HTTP is logged.

Rates are kept by the `limits` package, in memory: requests in a moving window (the times of at
most a rate's count of requests per party), probe bytes as a sliding-window counter (two counts);
keys expire with their window, so memory follows the parties of the last window, not all of them.
A client is counted by its id; a caller without a valid token (registration, probes, settings,
wrong tokens) by its address. Behind a reverse proxy every caller has the proxy's address: limit
per address there.
"""

from __future__ import annotations

import logging
import math
import time

from aiohttp.http_exceptions import HttpProcessingError
from limits import RateLimitItem, parse, storage, strategies


def rate(text: str) -> RateLimitItem:
    """'50/second', '600/minute', '10 per 1 second' -> a rate (ValueError if it is none)."""
    try:
        return parse(text)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (try 50/second or 600/minute)") from None


class RateLimits:
    """The server's rate limits: per client, per address without a token, anonymous probe bytes."""

    def __init__(self, per_client: str, per_address: str, probe_bytes_per_minute: int):
        memory = storage.MemoryStorage()
        self.requests = strategies.MovingWindowRateLimiter(memory)
        self.bytes = strategies.SlidingWindowCounterRateLimiter(memory)
        self.client, self.address = rate(per_client), rate(per_address)
        self.probe = parse(f"{max(int(probe_bytes_per_minute), 1)}/minute")

    @staticmethod
    def _hit(limiter: strategies.RateLimiter, item: RateLimitItem, key: str, cost: int = 1) -> float | None:
        if limiter.hit(item, key, cost=cost):
            return None
        return max(limiter.get_window_stats(item, key).reset_time - time.time(), 0.0)

    def client_request(self, client_id: str) -> float | None:
        """None if the client may make a request now; otherwise the seconds until it may."""
        return self._hit(self.requests, self.client, f"client:{client_id}")

    def anonymous_request(self, address: str) -> float | None:
        """As `client_request`, for a request without a valid token from this address."""
        return self._hit(self.requests, self.address, f"address:{address}")

    def probe_bytes(self, address: str, size: int) -> float | None:
        """As `client_request`, for an anonymous probe of `size` bytes (they count against a budget
        per address and minute: a probe's answer is ~10^4 times its request)."""
        return self._hit(self.bytes, self.probe, f"probe:{address}", cost=size) if size > 0 else None


class BrokenHttpLog:
    """The logger aiohttp's connection handler is given: HTTP that does not parse (a stranger's
    scanner, a TLS hello on a plain port) is one warning line per address and minute, not an
    ERROR with a traceback per request; everything else goes on to the real logger as it was."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0):
        self.logger, self.every_s = logger, every_s
        self.last: dict[str, float] = {}
        self.suppressed = 0

    def exception(self, msg: str, *args, exc_info=None, **kw) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.broken(str(args[0]) if args else "?", exc_info)
        else:
            self.logger.exception(msg, *args, exc_info=exc_info, **kw)

    def broken(self, address: str, exc: HttpProcessingError) -> None:
        now = time.monotonic()
        if now - self.last.get(address, -math.inf) < self.every_s:
            self.suppressed += 1
            return
        if len(self.last) > 10_000:  # forget quiet addresses: the table stays bounded
            self.last = {a: t for a, t in self.last.items() if now - t < self.every_s}
        self.last[address] = now
        message = getattr(exc, "message", "") or type(exc).__name__
        self.logger.warning("broken HTTP from %s answered 400: %s (more from it this minute are not logged)",
                            address, " ".join(str(message).split())[:200])

    def __getattr__(self, name: str):
        return getattr(self.logger, name)
