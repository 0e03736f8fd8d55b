"""Flow runs whose worker died with them (kill -9, a lost machine): Prefect marks them crashed when their
heartbeats stop, and schedules them again, at most twice, for a worker to pick up. The flows make that safe:
a re-run decides the version its crashed attempt registered instead of registering another (flows.train).

Two Prefect automations, made (or updated) when the deployments are registered with a work pool."""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.settings import get_current_settings

MISSED_HEARTBEATS = 3  # Prefect's advice: a run is a zombie after three missed heartbeats
RERUNS = 2  # a run that crashes every time (out of memory, say) is not re-run for ever


def automations() -> list[Automation]:
    """What recovery needs, from this process's heartbeat setting (PREFECT_FLOWS_HEARTBEAT_FREQUENCY), which the
    workers must share."""
    frequency = get_current_settings().flows.heartbeat_frequency
    if not frequency:
        raise ValueError("PREFECT_FLOWS_HEARTBEAT_FREQUENCY is off: without heartbeats a dead worker's runs stay "
                         "Running for ever")
    flow_runs = ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"})
    crash = Automation(
        name="tripcast: crash unresponsive flow runs",
        description=f"A flow run without a heartbeat for {MISSED_HEARTBEATS} x {frequency} s is marked Crashed.",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.*"}, match=flow_runs,
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=MISSED_HEARTBEATS * frequency)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its worker is gone")])
    rerun = Automation(
        name="tripcast: re-run crashed flow runs",
        description=f"A crashed flow run is scheduled again (the first {RERUNS} crashes of a run).",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"}, for_each={"prefect.resource.id"},
                             match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*",
                                                          "prefect.run-count": [str(n) for n in range(1, RERUNS + 1)]}),
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, message="re-run after a crash")])
    return [crash, rerun]


def ensure_crash_recovery() -> list[str]:
    """Create or update the automations; returns their names."""
    made = []
    for automation in automations():
        try:
            existing = Automation.read(name=automation.name)
        except ValueError:
            automation.create()
        else:
            automation.id = existing.id
            automation.update()
        made.append(automation.name)
    return made
