"""A request's deadline budget: the one place that computes how long each step of a request may take.

A request may take `request_timeout_s` in all, or less when its caller's own deadline comes
sooner. Each upstream call then gets the shortest of its own timeout and what is left, and a
DEADLINE_EXCEEDED says which of the three bounded it.
"""

from __future__ import annotations

import dataclasses
import time

from cbir.errors import UpstreamTimeout

OWN_TIMEOUT, BUDGET, CALLER = "own", "budget", "caller"


@dataclasses.dataclass(frozen=True)
class Budget:
    end: float  # a time.monotonic() value
    bound_by: str  # BUDGET, or CALLER when the caller's deadline is the sooner one
    context: object | None = None  # the caller's grpc.ServicerContext, to cancel upstream work with it
    setting: str = "request_timeout_s"  # the gateway setting the budget comes from, named when it runs out

    @classmethod
    def for_request(cls, budget_s: float, context=None, setting: str = "request_timeout_s") -> "Budget":
        now = time.monotonic()
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining < budget_s:
            return cls(now + remaining, CALLER, context, setting)
        return cls(now + budget_s, BUDGET, context, setting)

    def describe(self) -> str:
        """What bounds a step that this budget cuts short, in words."""
        if self.bound_by == CALLER:
            return "the caller's remaining deadline"
        return f"the request's deadline budget ({self.setting})"

    def remaining_s(self) -> float:
        return self.end - time.monotonic()

    def timeout_for(self, own_timeout_s: float, what: str) -> tuple[float, str]:
        """(timeout, what bounds it) for one step with its own timeout; UpstreamTimeout when no time is left."""
        remaining = self.remaining_s()
        if remaining <= 0:
            whose = "the caller's deadline has passed" if self.bound_by == CALLER else f"{self.describe()} is spent"
            raise UpstreamTimeout(f"no time left for {what}: {whose}")
        if remaining < own_timeout_s:
            return remaining, self.bound_by
        return own_timeout_s, OWN_TIMEOUT
