"""The error tree: every error pickles, crosses HTTP and a Ray actor, keeps the seed's parents."""

from __future__ import annotations

import pickle

import pytest
import ray

from llama_deploy_ray import (
    ControlPlaneUnavailableError,
    ForbiddenError,
    InvalidRequestError,
    LlamaDeployError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceConflictError,
    ServiceNotFoundError,
    ServiceOverloadedError,
    SessionNotFoundError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    TaskTimeoutError,
    UnauthorizedError,
)
from llama_deploy_ray._shared.errors import error_from_json, error_to_json

ERRORS = [
    ServiceNotFoundError("svc"),
    SessionNotFoundError("sid"),
    TaskNotFoundError("tid"),
    InvalidRequestError("bad input"),
    ServiceConflictError("taken"),
    ControlPlaneUnavailableError("down"),
    ServiceOverloadedError("full"),
    RequestTimeoutError("slow"),
    TaskFailedError("tid", "boom", "ValueError"),
    TaskTimeoutError("tid", "timed out", "WorkflowTimeoutError"),
    TaskCancelledError("tid", "cancelled by a client"),
    TaskStateError("already completed"),
    UnauthorizedError("no key"),
    ForbiddenError("cross-site"),
    PayloadTooLargeError("too big"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_and_survive_http(error: LlamaDeployError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and again.detail() == error.detail()
    assert str(again) == str(error)
    rebuilt = error_from_json(error_to_json(error), error.status_code)
    assert type(rebuilt) is type(error) and rebuilt.detail() == error.detail()
    assert rebuilt.message == error.message


def test_not_found_errors_share_a_parent_and_are_value_errors_as_in_the_seed() -> None:
    for error in ERRORS[:3]:
        assert isinstance(error, NotFoundError) and error.status_code == 404
        assert isinstance(error, ValueError)  # what llama_deploy's client raised


def test_errors_cross_a_ray_actor(control_plane_config) -> None:
    @ray.remote(num_cpus=0)
    class Raiser:
        def raise_(self, error: LlamaDeployError) -> None:
            raise error

    raiser = Raiser.remote()
    for error in ERRORS:
        with pytest.raises(type(error)) as info:
            ray.get(raiser.raise_.remote(error))
        assert isinstance(info.value, LlamaDeployError)
        assert info.value.detail() == error.detail()
