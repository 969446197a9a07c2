"""The one retry policy: exponential backoff with full jitter (so that clients and replicas that
failed together do not come back together), bounded by a number of attempts, a time budget, or
both. Every call that is sent again (a client's request answered 503, a replica's outcome while
the control plane restarts, a task whose replica died) goes through here.

    async for attempt in retrying(is_retryable, budget_s=30):
        with attempt:
            await call()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import stop_base

FIRST_WAIT_S = 0.1
MAX_WAIT_S = 2.0


def _policy(
    retry_on: Callable[[BaseException], bool],
    budget_s: float | None,
    attempts: int | None,
    first_wait_s: float,
) -> dict[str, Any]:
    stop: stop_base = stop_never
    if budget_s is not None and not math.isinf(budget_s):
        stop = stop | stop_before_delay(max(budget_s, 0.0))
    if attempts is not None:
        stop = stop | stop_after_attempt(attempts)
    return {
        "retry": retry_if_exception(retry_on),
        "stop": stop,
        "wait": wait_random_exponential(multiplier=first_wait_s, max=MAX_WAIT_S),
        "reraise": True,
    }


def retrying(
    retry_on: Callable[[BaseException], bool],
    *,
    budget_s: float | None = None,
    attempts: int | None = None,
    first_wait_s: float = FIRST_WAIT_S,
) -> AsyncRetrying:
    """Retry what `retry_on` accepts until `attempts` or `budget_s` runs out (neither: until
    it succeeds); then the last error is raised as it was."""
    return AsyncRetrying(**_policy(retry_on, budget_s, attempts, first_wait_s))


def retrying_sync(
    retry_on: Callable[[BaseException], bool],
    *,
    budget_s: float | None = None,
    attempts: int | None = None,
    first_wait_s: float = FIRST_WAIT_S,
) -> Retrying:
    """`retrying` for blocking code."""
    return Retrying(**_policy(retry_on, budget_s, attempts, first_wait_s))
