"""The one retry policy: exponential backoff with full jitter (so that clients and replicas that
failed together do not come back together), bounded by a number of attempts, a time budget, or
both. Every call that is sent again (a client's request answered 503, a replica's outcome while
the control plane restarts, a task whose replica died) goes through here.

    result = await retrying(is_retryable, budget_s=30)(call)

On hot paths, `call_retrying` makes the first attempt plainly and builds the policy only once
it failed: the retry machinery costs about 60 microseconds a call, most calls succeed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError
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

from .config import RECORD_BUDGET_S

T = TypeVar("T")

FIRST_WAIT_S = 0.1
MAX_WAIT_S = 2.0


def full_jitter_s(failures: int, first_wait_s: float = FIRST_WAIT_S) -> float:
    """The policy's wait before attempt `failures + 1`, for loops tenacity cannot drive (a
    stream that reconnects between the events it yields)."""
    return random.uniform(0, min(MAX_WAIT_S, first_wait_s * 2 ** (failures - 1)))


def actor_unreachable(exc: BaseException) -> bool:
    """A call on an actor that died or restarts: the same call may succeed if sent again."""
    return isinstance(exc, (RayActorError, ActorUnavailableError))


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


async def call_retrying(
    fn: Callable[[], Awaitable[T]],
    retry_on: Callable[[BaseException], bool],
    *,
    budget_s: float | None = None,
    attempts: int | None = None,
    first_wait_s: float = FIRST_WAIT_S,
) -> T:
    """`fn()`, and again under the policy if it failed in a way `retry_on` accepts."""
    try:
        return await fn()
    except Exception as exc:
        if not retry_on(exc) or attempts == 1:
            raise
    more = None if attempts is None else attempts - 1
    policy = retrying(retry_on, budget_s=budget_s, attempts=more, first_wait_s=first_wait_s)
    return await policy(fn)


def call_retrying_sync(
    fn: Callable[[], T],
    retry_on: Callable[[BaseException], bool],
    *,
    budget_s: float | None = None,
) -> T:
    """`call_retrying` for blocking code."""
    try:
        return fn()
    except Exception as exc:
        if not retry_on(exc):
            raise
    return retrying_sync(retry_on, budget_s=budget_s)(fn)


async def call_actor(call: Callable[[], Awaitable[T]], budget_s: float = RECORD_BUDGET_S) -> T:
    """`call()` on one of the core's actors, sent again while the actor restarts (for calls
    that are safe to repeat); `call` returns the call's ref, e.g. `partial(a.f.remote, x)`."""

    async def attempt() -> T:  # tenacity awaits coroutine functions only
        return await call()

    return await call_retrying(attempt, actor_unreachable, budget_s=budget_s)
