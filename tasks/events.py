"""Prefect events of a cluster's life, so an automation or a deployment trigger can
chain work on it: `activate-ray.cluster.ready`, `.job-finished`, `.torn-down`.

The resource is the cluster (`activate-ray.cluster.<cluster id>`); the payload says
where it runs (scheduler, job id, nodes). Never a secret: the token stays in its file.
"""

from __future__ import annotations

from prefect.events import emit_event

from tasks.logs import get_run_logger

EVENT_PREFIX = "activate-ray.cluster"


def cluster_resource_id(cluster_id: str) -> str:
    return f"{EVENT_PREFIX}.{cluster_id}"


def emit_cluster_event(what: str, cluster_id: str, *, scheduler: str, job_id: str, nodes: list[str],
                       **details: object) -> None:
    """Emit `activate-ray.cluster.<what>` about this cluster; an event lost never fails a run."""
    try:
        emit_event(
            event=f"{EVENT_PREFIX}.{what}",
            resource={"prefect.resource.id": cluster_resource_id(cluster_id), "prefect.resource.name": cluster_id},
            payload={"scheduler": scheduler, "job_id": job_id, "nodes": list(nodes), **details},
        )
    except Exception as exc:
        get_run_logger().debug("event %s not emitted: %s", what, exc)
