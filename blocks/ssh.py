"""A saved SSH connection: the private key is a secret, never logged."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SshConnection(Block):
    """How to reach an HPC login node (or one big SSH host) over SSH."""

    _block_type_name = "Activate Ray SSH Connection"
    _block_type_slug = "activate-ray-ssh-connection"
    _description = "Host, user and key for running Ray clusters over SSH"

    host: str = Field(..., title="Host", description="Login node host name or IP")
    port: int = Field(22, ge=1, le=65535, title="Port")
    username: str = Field("", title="User", description="Empty: your local user name")
    private_key: SecretStr | None = Field(None, title="Private key", description="OpenSSH private key text")
    known_hosts: str = Field("", title="known_hosts", description="known_hosts lines for the host, instead of ~/.ssh/known_hosts (/etc/ssh/ssh_known_hosts is read as well)")

    def ssh_params(self, accept_new_host_key: bool = False):
        from tasks.ssh_transport import SshParams

        return SshParams(
            host=self.host,
            port=self.port,
            username=self.username or None,
            private_key=self.private_key.get_secret_value() if self.private_key else None,
            known_hosts_text=self.known_hosts or None,
            accept_new_host_key=accept_new_host_key,
        )
