"""Prefect blocks of activate-ray: register with `prefect block register -m blocks`."""

from blocks.ssh import SshConnection

__all__ = ["SshConnection"]
