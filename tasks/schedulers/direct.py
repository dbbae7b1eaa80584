"""No scheduler: the whole cluster runs on the host under one supervisor (start_ray_ssh.sh)."""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from tasks.schedulers.base import JobPhase, JobState, Scheduler

if TYPE_CHECKING:
    from tasks.transport import Transport


class DirectScheduler(Scheduler):
    """No batch system: the whole cluster runs on the host under one supervisor."""

    name = "none"
    launch_script = "launch_workers_direct.sh"
    # the supervisor's process group on the host: never 1 (`kill -- -1` reaches every process of the user)
    job_id_re = re.compile(r"^(?!1$)[1-9][0-9]{0,8}$")


    def submit_command(self, cluster_dir: str) -> str:
        return shlex.join(["bash", f"{cluster_dir}/bin/start_ray_ssh.sh", cluster_dir])

    async def submit(self, target: Transport, cluster_dir: str, after: str = "") -> str:
        # after: the job to queue behind, which only a batch system has (continue_after_walltime needs one)
        out = (await target.run(self.submit_command(cluster_dir))).stdout
        match = re.search(r"^RAY_SUPERVISOR_PID=(\d+)$", out, re.M)
        if not match:
            raise RuntimeError(f"the cluster supervisor did not start: {out[-500:]}")
        return match.group(1)

    async def state(self, target: Transport, job_id: str) -> JobState:
        # a zombie counts as ended: the detached supervisor is reaped by the host's init,
        # whenever that gets to it (seconds, on some), and `kill -0` still answers for it
        alive = await target.query(f"ps -o stat= -p {int(job_id)} | grep -qv '^Z'")
        return JobState(JobPhase.running if alive.returncode == 0 else JobPhase.ended)

    def _to_own_group(self, job_id: str, cluster_dir: str, signal: str) -> str:
        if not cluster_dir or not self.job_id_re.fullmatch(job_id):
            return ""
        lib, env = shlex.quote(f"{cluster_dir}/bin/ray_lib.sh"), shlex.quote(f"{cluster_dir}/cluster.env")
        return (f"[ -e {lib} ] && [ -e {env} ] && ( . {env} && . {lib} && ar_group_is_ours {job_id} "
                f"&& kill -{signal} -- -{job_id} ) >/dev/null 2>&1 || true")

    async def wake(self, target: Transport, job_id: str, cluster_dir: str = "") -> bool:
        # the supervisor's group holds every node's shell (WINCH: ignored by every other process)
        if command := self._to_own_group(job_id, cluster_dir, "WINCH"):
            await target.query(command)
            return True
        return False

    async def cancel(self, target: Transport, job_id: str, cluster_dir: str = "") -> None:
        # The supervisor's trap stops every node; shutdown_ray.sh then sweeps. The id was read
        # back from files (the cluster's, the run's state file): TERM goes to the group only
        # once the cluster's own check (ar_group_is_ours) found it this user's and this
        # cluster's; without the cluster's dir nothing is signalled (the sweep still runs).
        if command := self._to_own_group(job_id, cluster_dir, "TERM"):
            await target.query(command)
