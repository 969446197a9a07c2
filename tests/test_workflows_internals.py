"""Each use of llama-index workflows' private internals, so an upgrade fails here, loudly."""

from __future__ import annotations

import asyncio

from workflows import Workflow

from .workflows import EchoWorkflow


def test_each_use_of_the_workflows_internals_still_holds() -> None:
    # one check per touch point in _workflows_internals: an upgrade that moves one fails here
    from workflows import Context
    from workflows.events import HumanResponseEvent as Human
    from workflows.events import StartEvent

    from llama_deploy_ray._shared import workflows_internals as internals
    from llama_deploy_ray._shared.events import accepted_events

    from .workflows import Answer, TypedHumanWorkflow

    workflow = TypedHumanWorkflow(timeout=12, verbose=False)
    assert set(internals.steps_of(workflow)) == {"ask", "answer"}
    internals.look_up_steps_once(workflow)
    assert set(internals.steps_of(workflow)) == {"ask", "answer"}
    assert internals.steps_of(workflow) is not internals.steps_of(workflow)  # a copy each time
    assert set(internals.steps_of_class(TypedHumanWorkflow)) == {"ask", "answer"}
    answer = internals.steps_of(workflow)["answer"]
    assert internals.events_taken_by(answer) == [Answer]
    assert accepted_events(workflow) == {
        "HumanResponseEvent": Human,
        "StartEvent": StartEvent,
        "Answer": Answer,
    }

    async def wrapper(*args: object) -> None: ...

    internals.copy_step_config(answer, wrapper)
    assert internals.events_taken_by(wrapper) == [Answer]

    options = internals.init_options(workflow)
    assert options["timeout"] == 12 and options["verbose"] is False
    rebuilt = EchoWorkflow.__new__(EchoWorkflow)
    Workflow.__init__(rebuilt, **options)  # every option is one __init__ takes
    assert "_timeout" in internals.FRAMEWORK_ATTRS and "marker" not in internals.FRAMEWORK_ATTRS

    async def saved_state() -> dict:
        handler = EchoWorkflow().run(arg1="x")
        await handler
        return handler.ctx.to_dict()

    state = asyncio.run(saved_state())
    assert set(internals.RUN_CLOCK_KEYS) <= set(state)  # the keys that time a run
    Context.from_dict(EchoWorkflow(), internals.with_fresh_run_clock(state))

    assert internals.event_fields(Human(response="r", extra=1)) == {"response": "r", "extra": 1}
