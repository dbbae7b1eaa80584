"""Where a cluster runs: this machine, an SSH target, or a saved SSH connection block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.local_transport import LocalTransport
from tasks.settings import RayClusterSettings
from tasks.transport import Transport

if TYPE_CHECKING:
    from tasks.ssh_transport import SshParams


async def open_target(settings: RayClusterSettings) -> Transport:
    """This machine, an SSH target (user@host:port or ~/.ssh/config alias), or a saved SSH block."""
    ssh_options = dict(
        key_file=settings.ssh_key_file or None,
        known_hosts=settings.known_hosts or None,
        accept_new_host_key=settings.accept_new_host_key,
    )
    if not settings.host:
        return LocalTransport(node_ssh=ssh_options)
    from tasks.ssh_transport import SshParams, SshTransport  # asyncssh: only where SSH is used

    params = None
    if "@" not in settings.host and ":" not in settings.host:
        params = await _block_params(settings)
    return await SshTransport(params or SshParams.parse(settings.host, **ssh_options)).connect()


async def _block_params(settings: RayClusterSettings) -> SshParams | None:
    from blocks.ssh import SshConnection

    try:
        block = await SshConnection.aload(settings.host)
    except Exception:  # no such block (or no server): host is an ssh alias
        return None
    return block.ssh_params(settings.accept_new_host_key)
