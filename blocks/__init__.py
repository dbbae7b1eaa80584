"""Prefect blocks of activate-ray: register with `prefect block register -m blocks`."""

from blocks.site import HpcSite
from blocks.ssh import SshConnection

__all__ = ["HpcSite", "SshConnection"]
