"""Prefect events of a cluster's life, so an automation or a deployment trigger can
chain work on it: `activate-ray.cluster.ready`, `.job-finished`, `.torn-down`.

The resource is the cluster (`activate-ray.cluster.<cluster id>`); the payload says
where it runs (scheduler, job id, nodes). Never a secret: the token stays in its file.
"""

from __future__ import annotations

from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.settings import get_current_settings

from tasks.logs import get_run_logger

EVENT_PREFIX = "activate-ray.cluster"


def cluster_resource_id(cluster_id: str) -> str:
    return f"{EVENT_PREFIX}.{cluster_id}"


def someone_to_tell() -> bool:
    """Inside a run (its server hears events and artifacts), or with a Prefect server configured.
    Outside a run and without one (a cleanup from the command line), only Prefect's temporary
    server would: started for that alone, about 15 s, and its record gone when it stops."""
    return bool(FlowRunContext.get() or TaskRunContext.get() or get_current_settings().api.url)


def emit_cluster_event(what: str, cluster_id: str, *, scheduler: str, job_id: str, nodes: list[str],
                       **details: object) -> None:
    """Emit `activate-ray.cluster.<what>` about this cluster; an event lost never fails a run."""
    if not someone_to_tell():
        return
    try:
        emit_event(
            event=f"{EVENT_PREFIX}.{what}",
            resource={"prefect.resource.id": cluster_resource_id(cluster_id), "prefect.resource.name": cluster_id},
            payload={"scheduler": scheduler, "job_id": job_id, "nodes": list(nodes), **details},
        )
    except Exception as exc:
        get_run_logger().debug("event %s not emitted: %s", what, exc)
