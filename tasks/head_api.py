"""The head as the flow reaches it: where it runs (the head.env it writes) and what its
dashboard says (Ray's State API), with the cluster's token when it has one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from tasks.cluster import ClusterPlan


@dataclass
class HeadInfo:
    node: str
    ip: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    deadline: int = 0  # the allocation's end, Unix seconds, as the scheduler has it (0: none or unknown)


def ports_verified(text: str | None) -> bool:
    """Whether head.env says the head found every one of its ports its own (ar_verify_ports):
    before that, a port may be another user's listener, which must never get the token."""
    return bool(text) and re.search(r"^RAY_PORTS_VERIFIED=all$", text, re.M) is not None


def parse_head_env(text: str) -> HeadInfo:
    values = dict(re.findall(r"^(RAY_\w+)=(.*)$", text, re.M))
    deadline = values.get("RAY_DEADLINE", "").strip()
    return HeadInfo(
        values["RAY_HEAD_NODE"], values["RAY_HEAD_IP"], int(values["RAY_GCS_PORT"]),
        int(values["RAY_DASHBOARD_PORT"]), int(values["RAY_CLIENT_PORT"]),
        int(deadline) if deadline.isdigit() else 0,
    )


def auth_headers(plan: ClusterPlan) -> dict[str, str]:
    if not plan.settings.token_auth:
        return {}
    return {"Authorization": f"Bearer {plan.token.get_secret_value()}"}


async def alive_nodes(client: httpx.AsyncClient) -> list[dict]:
    response = await client.get("/api/v0/nodes", params={"limit": 10000})
    response.raise_for_status()
    rows = response.json()["data"]["result"]["result"]
    return [row for row in rows if row.get("state") == "ALIVE"]


def node_name(node: dict) -> str:
    """A Ray node as the scheduler names it (ar_run_node starts each with --node-name)."""
    return str(node.get("node_name") or node.get("node_ip"))
