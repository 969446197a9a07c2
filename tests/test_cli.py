"""The `llama-deploy-ray` command end to end, in processes of its own, against the shared core:
deploy from a file, run, stream, human input, cancel, look, fail clearly, and redeploy a changed
workflow without a restart."""

from __future__ import annotations

import json
import re
import sys

import pytest

from llama_deploy_ray import ControlPlaneConfig, LlamaDeployClient, TaskStatus

from .conftest import wait_for
from .terminal import Cli, Tmux

GREETER = """
from llama_index.core.workflow import StartEvent, StopEvent, Workflow, step


class Greeter(Workflow):
    @step
    async def greet(self, ev: StartEvent) -> StopEvent:
        return StopEvent(result="GREETING " + str(ev.get("name", "you")))
"""

WORKFLOWS = """
import asyncio

from llama_index.core.workflow import (
    Context, Event, HumanResponseEvent, InputRequiredEvent, StartEvent, StopEvent, Workflow, step,
)


class Tick(Event):
    n: int


class Counter(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        for n in range(3):
            ctx.write_event_to_stream(Tick(n=n))
        return StopEvent(result={"counted": 3})


class Broken(Workflow):
    @step
    async def fail(self, ev: StartEvent) -> StopEvent:
        raise ValueError("no greeting today")


class Asker(Workflow):
    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> StopEvent:
        answer = await ctx.wait_for_event(
            HumanResponseEvent, waiter_event=InputRequiredEvent(prefix="name?")
        )
        return StopEvent(result="asked " + answer.response)


class Sleeper(Workflow):
    @step
    async def sleep(self, ev: StartEvent) -> StopEvent:
        await asyncio.sleep(float(ev.get("seconds", 60)))
        return StopEvent(result="slept")
"""

DEPLOYMENT = """\
applications:
  - name: cli_greeter
    import_path: cli_greeter:Greeter
    ray_actor_options: {num_cpus: 0}
  - name: cli_counter
    import_path: cli_workflows:Counter
    ray_actor_options: {num_cpus: 0}
  - name: cli_broken
    import_path: cli_workflows:Broken
    ray_actor_options: {num_cpus: 0}
  - name: cli_asker
    import_path: cli_workflows:Asker
    ray_actor_options: {num_cpus: 0}
    input_hold_s: 0.5
  - name: cli_sleeper
    import_path: cli_workflows:Sleeper
    ray_actor_options: {num_cpus: 0}
"""


@pytest.fixture(scope="module")
def cli(
    control_plane_config: ControlPlaneConfig, core_env: dict[str, str], tmp_path_factory
) -> Cli:
    workdir = tmp_path_factory.mktemp("cli")
    (workdir / "cli_greeter.py").write_text(GREETER)
    (workdir / "cli_workflows.py").write_text(WORKFLOWS)
    (workdir / "deployment.yaml").write_text(DEPLOYMENT)
    # wide enough that Rich tables keep a service's name on one line
    return Cli(workdir, {**core_env, "COLUMNS": "200"})


@pytest.mark.timeout(600)
def test_deploy_a_file_run_and_look(cli: Cli) -> None:
    deployed = cli("deploy", "deployment.yaml").stdout
    assert "cli_greeter" in deployed and "DEPLOYED" in deployed
    assert cli("run", "cli_greeter", "-a", "name=ray").stdout.strip() == "GREETING ray"
    session = "cli-session"
    args = ("run", "cli_greeter", "--session", session, "--json-args", '{"name": "json"}')
    assert cli.json(*args) == "GREETING json"
    (task,) = cli.json("tasks", session)
    assert task["status"] == "completed" and task["result"] == "GREETING json"
    assert cli.json("result", task["task_id"], "--session", session) == "GREETING json"
    assert session in {s["session_id"] for s in cli.json("sessions")}
    status = {s["service_name"]: s for s in cli.json("status")}
    assert status["cli_greeter"]["replicas"] == {"RUNNING": 1}
    assert "cli_greeter" in cli("status").stdout


def test_stream_prints_events_as_they_happen(cli: Cli) -> None:
    lines = cli("--json", "run", "cli_counter", "--stream").stdout.splitlines()
    ticks = [json.loads(line) for line in lines[:-1]]
    assert [t["n"] for t in ticks if t["__type__"] == "Tick"] == [0, 1, 2]
    assert json.loads(lines[-1]) == {"counted": 3}


def test_failures_exit_1_with_one_line_on_stderr(cli: Cli) -> None:
    failed = cli("run", "cli_broken", status=1)
    assert failed.stderr.count("\n") == 1 and "no greeting today" in failed.stderr
    assert "cli_nowhere" in cli("run", "cli_nowhere", status=1).stderr
    (cli.cwd / "bad.yaml").write_text(
        "applications:\n  - name: x\n    import_path: a:b\n    replicas: 2\n"
    )
    bad = cli("deploy", "bad.yaml", status=1)
    assert "bad.yaml:4: applications[0].replicas: Extra inputs are not permitted" in bad.stderr
    assert cli("run", "cli_greeter", "-a", "no-equals", status=2).returncode == 2


def test_human_input_and_cancel(cli: Cli, control_plane_config: ControlPlaneConfig) -> None:
    with LlamaDeployClient(control_plane_config) as client:
        session = client.create_session()
        asking = session.run_nowait("cli_asker")
        wait_for(
            lambda: session.get_task(asking).status is TaskStatus.WAITING,
            timeout_s=60,
            what="the task to wait for input",
        )
        event = json.dumps({"__type__": "HumanResponseEvent", "response": "ray"})
        cli("send-event", "cli_asker", asking, event, "--session", session.session_id)
        assert session.get_task_result(asking, wait_s=60).result == "asked ray"

        sleeping = session.run_nowait("cli_sleeper", seconds=120)
        (cancelled,) = cli.json("cancel", sleeping, "--session", session.session_id)
        assert cancelled["status"] == "cancelled"
        assert (
            "cancelled" in cli("result", sleeping, "--session", session.session_id, status=1).stderr
        )


@pytest.mark.timeout(600)
def test_a_changed_file_redeploys_only_what_changed(cli: Cli) -> None:
    session = "cli-redeploy"
    assert cli("run", "cli_greeter", "--session", session).stdout.strip() == "GREETING you"
    source = cli.cwd / "cli_greeter.py"
    source.write_text(source.read_text().replace('"GREETING "', '"WELCOME "'))
    deployment = cli.cwd / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("input_hold_s: 0.5", "input_hold_s: 1"))
    statuses = {s["service_name"]: s["status"] for s in cli.json("deploy", "deployment.yaml")}
    assert statuses == {
        "cli_greeter": "DEPLOYED",  # its code changed
        "cli_counter": "UNCHANGED",
        "cli_broken": "UNCHANGED",
        "cli_asker": "DEPLOYED",  # its options changed
        "cli_sleeper": "UNCHANGED",
    }
    # the core did not restart: the same session answers with the new code
    assert cli("run", "cli_greeter", "--session", session).stdout.strip() == "WELCOME you"
    assert len(cli.json("tasks", session)) == 2


@pytest.mark.timeout(300)
def test_in_a_real_terminal_deploy_shows_its_replicas_start_and_status_a_table(cli: Cli) -> None:
    (cli.cwd / "tmux.yaml").write_text(
        "applications:\n  - name: cli_tmux\n    import_path: cli_greeter:Greeter\n"
        "    ray_actor_options: {num_cpus: 0}\n"
    )
    terminal = Tmux(cli.cwd, cli.env)
    try:
        command = f"{sys.executable} -m llama_deploy_ray"
        terminal.type(f"{command} deploy tmux.yaml && {command} status && echo ALL-DONE")
        screens: list[str] = []

        def finished() -> bool:
            screens.append(terminal.screen())
            return "ALL-DONE" in screens[-1].replace("echo ALL-DONE", "")

        wait_for(finished, timeout_s=240, what="deploy and status to finish")
        # while it deployed, the live table showed the service with its replica counts
        assert any("replicas running / starting / wanted" in s and "cli_tmux" in s for s in screens)
        final = screens[-1]
        assert re.search(r"cli_tmux\s*│\s*DEPLOYED\s*│\s*1 / 0 / 1", final), final
        # status: a table a person reads, one row per service
        assert re.search(r"cli_tmux\s*│\s*RUNNING\s*│\s*1\s*│", final), final
    finally:
        terminal.close()
